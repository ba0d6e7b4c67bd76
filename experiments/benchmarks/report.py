"""Markdown tables of the training-throughput JSON files (the README's Performance tables).

    python -m experiments.benchmarks.report experiments/results/bench_train_cpu_bf16.json ...

One row per (model, batch, dtype, microbatches, host allocator): images/s, ratio to the issue's
reference, peak resident memory and XLA's step buffers, the ratio of memory to the reference's
peak, step FLOPs per image and achieved rate, and the page faults per step (MiB of 4 KiB pages).
"""

from __future__ import annotations

import json
import sys


def _fmt(value, spec: str, suffix: str = "") -> str:
  return "—" if value is None else f"{value:{spec}}{suffix}"


def rows_table(rows: list[dict]) -> str:
  out = [
    "| model | batch | dtype | accumulation | allocator | img/s | × reference | "
    "peak RSS (XLA buffers) GiB | memory ÷ reference | GFLOP/img (step) | GFLOP/s | "
    "page faults / step (MiB) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "images_per_second" not in r:
      out.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | failed | | | | | | | | |")
      continue
    flops = r.get("xla_step_flops")
    faults = r.get("page_faults_per_step")
    mem = f"{_fmt(r.get('host_peak_gib'), '.2f')} ({_fmt(r.get('xla_step_buffers_gib'), '.2f')})"
    out.append(
      "| "
      + " | ".join(
        [
          r["model"],
          str(r["batch"]),
          r["dtype"],
          f"{r.get('microbatches', 1)} × {r['batch'] // r.get('microbatches', 1)}",
          r.get("allocator", "system"),
          f"{r['images_per_second']:.2f}",
          _fmt(r.get("x_reference"), ".2f", "×"),
          mem,
          _fmt(r.get("memory_over_reference"), ".2f"),
          _fmt(flops / r["batch"] / 1e9 if flops else None, ".1f"),
          _fmt(r["achieved_tflops"] * 1e3 if r.get("achieved_tflops") else None, ".0f"),
          _fmt(faults * 4 / 1024 if faults is not None else None, ".0f"),
        ]
      )
      + " |"
    )
  return "\n".join(out)


def main(argv=None) -> None:
  paths = sys.argv[1:] if argv is None else argv
  rows = []
  for path in paths:
    with open(path) as f:
      rows.extend(json.load(f)["rows"])
  print(rows_table(rows))


if __name__ == "__main__":
  main()
