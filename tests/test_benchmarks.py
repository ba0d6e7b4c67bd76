"""The benchmark scripts run end to end on tiny sizes and compute their derived columns right."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import (
  common,
  conv_emulation,
  matmul_rates,
  positional_scaling,
  report,
  train_throughput,
)


def test_analytic_macs_pinned():
  """Paper sizes: the authors' dense count and ours (separable aggregation for quadratic)."""
  quad = train_throughput.analytic_macs("quadratic")
  assert quad == {"authors_macs_per_image": 4_503_556_000, "ours_macs_per_image": 3_264_925_600}
  gen = train_throughput.analytic_macs("generalized")
  assert gen["ours_macs_per_image"] == gen["authors_macs_per_image"] == 4_503_556_000


def test_annotate_reference_ratios_and_gpu_projection():
  row = {"batch": 32, "images_per_second": 11.4, "platform": "cpu", "host_peak_gib": 1.95}
  train_throughput._annotate(row, "paper_quadratic")
  assert row["x_reference"] == pytest.approx(2.0)
  assert row["memory_over_reference"] == pytest.approx(0.5)
  gpu = {
    "batch": 100,
    "images_per_second": 7500.0,
    "platform": "gpu",
    "device": "NVIDIA H100 80GB HBM3",
    "achieved_tflops": 494.5,
  }
  train_throughput._annotate(gpu, "paper_quadratic")
  assert gpu["mfu"] == pytest.approx(0.5)
  assert gpu["projected_300_epoch_minutes"] == pytest.approx(300 * 45_000 / 7500 / 60)
  assert "x_reference" not in gpu


def test_report_table():
  rows = [
    {
      "model": "paper_quadratic",
      "batch": 100,
      "dtype": "bfloat16",
      "microbatches": 4,
      "images_per_second": 8.0,
      "x_reference": 2.22,
      "host_peak_gib": 2.0,
      "xla_step_buffers_gib": 1.5,
      "memory_over_reference": 0.28,
      "xla_step_flops": 2.74e12,
      "achieved_tflops": 0.219,
      "allocator": "tcmalloc",
      "page_faults_per_step": 2560.0,
    },
    {"model": "paper_learned", "batch": 8, "dtype": "float32"},
  ]
  table = report.rows_table(rows).splitlines()
  assert table[2] == (
    "| paper_quadratic | 100 | bfloat16 | 4 × 25 | tcmalloc | 8.00 | 2.22× | 2.00 (1.50) | 0.28 "
    "| 27.4 | 219 | 10 |"
  )
  assert "failed" in table[3]
  assert table[0].count("|") == table[2].count("|") == table[3].count("|")


def test_allocator_env():
  base = {"PATH": "/bin", "LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert common.allocator_env("system", base) == base
  thp = common.allocator_env("thp", base)
  assert thp["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert common.allocator_env("thp", {})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  with pytest.raises(ValueError, match="allocator: expected one of"):
    common.allocator_env("jemalloc", base)
  assert base["LD_PRELOAD"] == "libfoo.so"  # the given environment is not modified


def test_allocator_env_tcmalloc(monkeypatch):
  monkeypatch.setattr(common, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
  env = common.allocator_env("tcmalloc", {"LD_PRELOAD": "libfoo.so"})
  assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"
  assert common.allocator_env("tcmalloc", {})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
  monkeypatch.setattr(common, "find_tcmalloc", lambda: None)
  with pytest.raises(FileNotFoundError, match="libtcmalloc-minimal4"):
    common.allocator_env("tcmalloc", {})


def test_child_reports_page_faults_under_the_requested_allocator(monkeypatch):
  # The child's environment is the allocator's: a 'thp' child sees the glibc tunable.
  seen = {}

  def fake_run(cmd, **kw):
    seen["env"] = kw["env"]

    class P:
      stdout = 'RESULT={"images_per_second": 1.0, "page_faults_per_step": 3.0}\nPEAK_KB=1048576'
      stderr = ""

    return P()

  monkeypatch.setattr(train_throughput.subprocess, "run", fake_run)
  args = argparse.Namespace(remat=False, steps=1, timeout=10)
  row = train_throughput._run_child(
    "paper_quadratic", "attention_net", {}, 8, "bfloat16", 1, False, "thp", args
  )
  assert "glibc.malloc.hugetlb=1" in seen["env"]["GLIBC_TUNABLES"]
  assert row["allocator"] == "thp" and row["page_faults_per_step"] == 3.0
  assert row["host_peak_gib"] == 1.0


def test_positional_scaling_tiny(tmp_path):
  out = tmp_path / "pos.json"
  positional_scaling.main(
    [
      "--sizes",
      "4,6",
      "--batch",
      "1",
      "--channels",
      "4",
      "--heads",
      "2",
      "--repeats",
      "1",
      "--out",
      str(out),
    ]
  )
  rows = json.loads(out.read_text())["rows"]
  assert {r["path"] for r in rows} == {
    "dense",
    "separable",
    "dense_projected",
    "separable_projected",
  }
  assert all(r["speedup_vs_dense"] > 0 for r in rows)
  assert all("growth_exponent" in r for r in rows if r["tokens"] == 36)


def test_conv_emulation_tiny(tmp_path):
  out = tmp_path / "conv.json"
  conv_emulation.main(
    [
      "--kernels",
      "3",
      "--sizes",
      "4",
      "--batch",
      "1",
      "--channels",
      "2",
      "--repeats",
      "1",
      "--rounds",
      "3",
      "--out",
      str(out),
    ]
  )
  (row,) = json.loads(out.read_text())["rows"]
  for impl in ("gather", "dense"):
    ratios = row[f"{impl}_time_ratio_rounds"]
    assert len(ratios) == 3 and min(ratios) > 0
    assert row[f"{impl}_time_ratio"] == sorted(ratios)[1]  # the median over rounds


def test_matmul_rates_tiny(tmp_path):
  out = tmp_path / "mm.json"
  matmul_rates.main(
    ["--rows", "8", "--inner", "16", "--cols", "8", "--repeats", "1", "--out", str(out)]
    + ["--batch", "2", "--heads", "2", "--tokens", "8", "--channels", "4"]
  )
  rows = json.loads(out.read_text())["rows"]
  # 2 dtypes x 2 impls x 2 kinds: the 2-D product, the aggregation and the scores
  assert len(rows) == 24 and all(r["gflops"] > 0 for r in rows)
  assert {r["impl"] for r in rows[8:]} == {"einsum", "bmm"}


def test_positional_scaling_position_grads_differentiates_the_centres():
  """``--position_grads``: the gradient reaches the centres and alpha through the probabilities
  (nonzero for both paths) and both paths agree."""
  grads = [
    positional_scaling.make_fn(path, 5, 2, position_grads=True)
    for path in ("dense_projected", "separable_projected")
  ]
  x = jax.random.normal(jax.random.key(1), (2, 25, 3))
  kernel = jax.random.normal(jax.random.key(2), (2, 3, 3))
  got = [g(x, kernel) for g in grads]
  assert len(got[0]) == 4  # x, kernel, centers, alpha
  for a, b in zip(*got):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(got[0][2]).max()) > 0 and float(jnp.abs(got[0][3]).max()) > 0
  plain = positional_scaling.make_fn("dense_projected", 5, 2)(x, kernel)
  assert len(plain) == 2


def test_time_interleaved_runs_each_variant_round_robin():
  order = []

  def variant(name):
    def fn():
      order.append(name)
      return jnp.zeros(())

    return fn

  timed = common.time_interleaved({"a": variant("a"), "b": variant("b")}, warmup=1, repeats=3)
  assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up per variant, then alternating repeats
  assert set(timed) == {"a", "b"}
  for t in timed.values():
    assert 0 <= t["min_s"] <= t["median_s"] <= t["max_s"]


def test_combine_rounds_takes_the_median_round_and_the_largest_memory():
  runs = [
    {"images_per_second": 9.0, "host_peak_gib": 1.5, "step_s": 1 / 9},
    {"error": "timeout"},
    {"images_per_second": 6.0, "host_peak_gib": 1.7, "step_s": 1 / 6},
    {"images_per_second": 8.0, "host_peak_gib": 1.4, "step_s": 1 / 8},
  ]
  row = train_throughput.combine_rounds(runs)
  assert row["images_per_second"] == 8.0 and row["step_s"] == 1 / 8  # median of 6, 8, 9
  assert row["images_per_second_rounds"] == [9.0, None, 6.0, 8.0]
  assert row["host_peak_gib"] == 1.7
  even = train_throughput.combine_rounds(runs[:1] + runs[2:3])
  assert even["images_per_second"] == 6.0  # the lower median of an even count
  failed = train_throughput.combine_rounds([{"error": "a"}, {"error": "b"}])
  assert failed == {"error": "a"}


def test_compare_commits_extracts_a_renamed_package(tmp_path):
  from experiments.benchmarks import compare_commits

  path = compare_commits.extract_package("HEAD", "attnconv_x", str(tmp_path))
  with open(f"{path}/layers.py") as f:
    text = f.read()
  assert "from attnconv_x import matmul as mm" in text
  assert "from attnconv import" not in text and "import attnconv." not in text


def test_compare_commits_tiny_same_code_same_losses(tmp_path):
  """Two copies of the working tree: interleaved steps, and identical programs give identical
  losses (the comparison's sanity check)."""
  from experiments.benchmarks import compare_commits

  small = {"num_layers": 1, "hidden_size": 8, "num_heads": 2, "mlp_dim": 8}
  rows = compare_commits.compare(
    [".", "."], batch=2, dtype="float32", repeats=2, warmup=1, model_kwargs=small
  )
  assert [r["commit"] for r in rows] == [".", "."]
  assert all(len(r["step_s_all"]) == 2 and r["images_per_second"] > 0 for r in rows)
  assert rows[0]["losses"] == rows[1]["losses"]
  assert rows[0]["speedup_vs_first"] == 1.0
