"""The benchmark scripts run end to end on tiny sizes and compute their derived columns right."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import common, conv_emulation, positional_scaling, train_throughput
from experiments.configs import paper


def test_analytic_macs_pinned():
  """Paper sizes: the authors' dense count and ours (separable aggregation for quadratic)."""
  quad = train_throughput.analytic_macs("quadratic")
  assert quad == {"authors_macs_per_image": 4_503_556_000, "ours_macs_per_image": 3_264_925_600}
  gen = train_throughput.analytic_macs("generalized")
  assert gen["ours_macs_per_image"] == gen["authors_macs_per_image"] == 4_503_556_000
  # More heads: more value projections and aggregations.
  many = train_throughput.analytic_macs("quadratic", heads=16)
  assert many["ours_macs_per_image"] > quad["ours_macs_per_image"]


def test_models_are_the_paper_configs():
  """The benchmarked models are paper.py's; the variants change one field each."""
  for name, model in (
    ("paper_quadratic", "quadratic"),
    ("paper_generalized", "generalized"),
    ("paper_learned", "learned"),
    ("paper_learned_content", "learned_content"),
    ("paper_many_heads", "many_heads"),
    ("resnet18", "resnet18"),
  ):
    config = paper.get_config(f"{model},cifar10").model.to_dict()
    assert train_throughput.MODELS[name] == (config.pop("name"), config), name
  _, quad = train_throughput.MODELS["paper_quadratic"]
  assert quad["shared_dropout_mask"] is True and quad["attention_dropout_rate"] > 0
  _, per_image = train_throughput.MODELS["paper_quadratic_per_image_dropout"]
  assert per_image == {**quad, "shared_dropout_mask": False}
  _, no_dropout = train_throughput.MODELS["paper_quadratic_no_attention_dropout"]
  assert no_dropout == {**quad, "attention_dropout_rate": 0.0}


def test_annotate_gpu_mfu_and_projection():
  gpu = {
    "batch": 100,
    "dtype": "bfloat16",
    "images_per_second": 7500.0,
    "platform": "gpu",
    "device": "NVIDIA H100 80GB HBM3",
    "achieved_tflops": 494.5,
  }
  train_throughput._annotate(gpu)
  assert gpu["mfu"] == pytest.approx(0.5)
  assert gpu["projected_300_epoch_minutes"] == pytest.approx(300 * 45_000 / 7500 / 60)
  # MFU is against the bfloat16 peak: not reported for float32 or an unknown GPU.
  for other in ({"dtype": "float32"}, {"device": "NVIDIA A100-SXM4-40GB"}):
    row = {**gpu, **other}
    del row["mfu"], row["projected_300_epoch_minutes"]
    train_throughput._annotate(row)
    assert "mfu" not in row and row["projected_300_epoch_minutes"] > 0
  cpu = {"batch": 8, "dtype": "float32", "images_per_second": 5.0, "platform": "cpu"}
  train_throughput._annotate(cpu)
  assert cpu == {"batch": 8, "dtype": "float32", "images_per_second": 5.0, "platform": "cpu"}


def _fake_child(monkeypatch, stdout: str, seen: dict):
  def fake_run(cmd, **kw):
    seen["payload"] = json.loads(cmd[-1])

    class P:
      stderr = "Traceback: boom"

    P.stdout = stdout
    return P()

  monkeypatch.setattr(train_throughput.subprocess, "run", fake_run)


def test_run_child_parses_its_row(monkeypatch):
  seen = {}
  result = {"images_per_second": 10.0, "xla_fwd_macs_per_image": 2.0e9, "platform": "cpu"}
  _fake_child(monkeypatch, f"RESULT={json.dumps(result)}\nPEAK_KB=1048576\n", seen)
  args = argparse.Namespace(remat=False, steps=3, timeout=10)
  row = train_throughput._run_child("paper_quadratic", 32, "bfloat16", 2, False, args)
  model, kwargs = train_throughput.MODELS["paper_quadratic"]
  assert seen["payload"] == [model, kwargs, 32, "bfloat16", False, 3, 2, False]
  assert row["model"] == "paper_quadratic" and row["microbatches"] == 2
  assert row["images_per_second"] == 10.0 and row["host_peak_gib"] == 1.0
  assert row["authors_macs_per_image"] == 4_503_556_000
  assert row["xla_over_authors"] == pytest.approx(2.0e9 / 4_503_556_000)
  assert "error" not in row and "mfu" not in row


def test_run_child_reports_a_failure(monkeypatch):
  _fake_child(monkeypatch, "", {})
  args = argparse.Namespace(remat=False, steps=1, timeout=10)
  row = train_throughput._run_child("resnet18", 8, "float32", 1, False, args)
  assert row["error"] == "Traceback: boom" and "images_per_second" not in row


def test_train_throughput_tiny(tmp_path, monkeypatch):
  """A real child process on a tiny CNN: the row and the machine description in the JSON."""
  monkeypatch.setitem(train_throughput.MODELS, "tiny", ("small_cnn", {"features": [4, 8]}))
  out = tmp_path / "train.json"
  train_throughput.main(
    ["--models=tiny", "--batches=4", "--dtypes=float32", "--steps=2", "--microbatches=2"]
    + ["--out", str(out)]
  )
  saved = json.loads(out.read_text())
  (row,) = saved["rows"]
  assert "error" not in row, row.get("error")
  assert row["model"] == "tiny" and row["microbatches"] == 2
  assert row["images_per_second"] > 0 and row["step_min_s"] <= row["step_s"] <= row["step_max_s"]
  assert row["host_peak_gib"] > 0 and row["xla_step_flops"] > 0
  assert row["params"] > 0 and row["platform"] == "cpu"
  machine = saved["machine"]
  for key in ("cpu", "cores", "devices", "jax", "jaxlib", "flax"):
    assert machine[key], key
  assert machine["jax"] == jax.__version__


@pytest.mark.parametrize(
  ("flag", "match"),
  [
    ("--models=vit", "--models: expected names"),
    ("--dtypes=float16", "--dtypes: expected"),
    ("--batches=8,x", "--batches: expected comma-separated int"),
    ("--microbatches=0", "--microbatches"),
  ],
)
def test_train_throughput_rejects_bad_arguments(tmp_path, flag, match):
  with pytest.raises(ValueError, match=match):
    train_throughput.main([flag, "--out", str(tmp_path / "x.json")])
  assert not (tmp_path / "x.json").exists()


def test_machine_info():
  info = common.machine_info()
  assert info["cores"] >= 1 and info["devices"]
  assert info["accelerator"] is None or isinstance(info["accelerator"], str)
  for key in ("jax", "jaxlib", "flax", "python"):
    assert isinstance(info[key], str) and info[key], key


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


def test_time_interleaved_rejects_no_repeats():
  with pytest.raises(ValueError, match="repeats: expected a positive integer, got 0"):
    common.time_interleaved({"a": lambda: jnp.zeros(())}, repeats=0)


def test_markdown_table():
  table = common.markdown_table([{"a": 1.23456, "b": "x"}, {"a": 2}], ["a", "b"]).splitlines()
  assert table == ["| a | b |", "|---|---|", "| 1.23 | x |", "| 2 |  |"]
