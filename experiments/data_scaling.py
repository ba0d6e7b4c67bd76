"""Data efficiency grid: test accuracy against training-set size for CNN and attention models.

Usage::

  python -m experiments.data_scaling --config=experiments/configs/data_scaling.py \
    --workdir=runs/data_scaling [--workers=2] [--models=cnn,attention_quadratic]

Each grid point ``(model, train_size, seed)`` is an ordinary :func:`train_and_evaluate` run in
``<workdir>/<model>/n<train_size>/s<seed>`` (checkpointed, so rerunning the command resumes the
grid where it stopped; finished points are skipped). ``--workers=W`` runs the grid in ``W``
processes, one CPU thread each (on a 2-core CPU two single-threaded runs of these small models
finish sooner than one two-threaded run). At the end the records are gathered into ``--out``
(default ``experiments/results/data_scaling.json``), a list of
``{"model", "train_size", "seed", "test_accuracy", "val_accuracy", "steps", "params",
"train_seconds", "device"}``, and plotted (mean +- std over seeds against the training-set size)
into ``--plot`` (default ``experiments/results/data_scaling.png``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def grid_points(config, models: Sequence[str] | None = None) -> list[tuple[str, int, int]]:
  """``(model, train_size, seed)`` for every point of ``config.scaling`` (optionally some models)."""
  names = list(models) if models else list(config.scaling.models)
  unknown = [m for m in names if m not in config.scaling.models]
  if unknown:
    raise ValueError(f"models: expected names from {tuple(config.scaling.models)}, got {unknown}")
  return [
    (m, int(n), int(s))
    for n in config.scaling.train_sizes
    for s in config.scaling.seeds
    for m in names
  ]


def run_dir(workdir: str | os.PathLike, model: str, train_size: int, seed: int) -> pathlib.Path:
  """``<workdir>/<model>/n<train_size|all>/s<seed>``."""
  size = "all" if train_size < 0 else str(train_size)
  return pathlib.Path(workdir) / model / f"n{size}" / f"s{seed}"


def _completed(path: pathlib.Path) -> dict | None:
  summary = path / "summary.json"
  if not summary.exists():
    return None
  record = json.loads(summary.read_text())
  return record if record.get("completed") else None


def run_grid(config, workdir: str, points: Sequence[tuple[str, int, int]]) -> None:
  """Trains every point that has no completed summary yet (loading each data subset once)."""
  from experiments.configs import data_scaling as grid_config
  from experiments.train import load_dataset_from_config, train_and_evaluate

  datasets: dict[tuple[int, int], Any] = {}
  for i, (model, size, seed) in enumerate(points):
    path = run_dir(workdir, model, size, seed)
    if _completed(path):
      continue
    run = grid_config.run_config(config, model, size, seed)
    key = (size, seed)
    if key not in datasets:
      datasets.clear()  # the grid is ordered by size and seed: keep one subset in memory
      datasets[key] = load_dataset_from_config(run)
    start = time.perf_counter()
    summary = train_and_evaluate(run, path, dataset=datasets[key])
    print(
      f"[{i + 1}/{len(points)}] {model} n={size} seed={seed}: test "
      f"{summary['final_test_accuracy']:.4f} (val {summary['best_val_accuracy']:.4f}) in "
      f"{time.perf_counter() - start:.0f} s",
      flush=True,
    )


def gather(config, workdir: str, points: Sequence[tuple[str, int, int]]) -> list[dict]:
  """The records of every completed point, in grid order."""
  records = []
  for model, size, seed in points:
    summary = _completed(run_dir(workdir, model, size, seed))
    if summary is None:
      continue
    run_cfg = json.loads((run_dir(workdir, model, size, seed) / "config.json").read_text())
    records.append(
      {
        "model": model,
        "train_size": int(summary.get("num_train_examples", size)),
        "seed": seed,
        "test_accuracy": summary["final_test_accuracy"],
        "val_accuracy": summary["best_val_accuracy"],
        "steps": summary["steps"],
        "params": summary["num_params"],
        "train_seconds": round(float(summary["train_seconds"]), 1),
        "device": summary["platform"],
        "dataset": run_cfg["dataset"]["name"],
      }
    )
  return records


def summarize(records: Sequence[dict]) -> dict[str, dict[int, tuple[float, float, int]]]:
  """``model -> train_size -> (mean, std, count)`` of test accuracy over seeds (std: ddof=0)."""
  import numpy as np

  table: dict[str, dict[int, list[float]]] = {}
  for r in records:
    table.setdefault(r["model"], {}).setdefault(r["train_size"], []).append(r["test_accuracy"])
  return {
    m: {n: (float(np.mean(v)), float(np.std(v)), len(v)) for n, v in sorted(sizes.items())}
    for m, sizes in table.items()
  }


def plot(records: Sequence[dict], path: str | os.PathLike) -> None:
  """Test accuracy (mean +- std over seeds) against training-set size, one line per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = summarize(records)
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for model, sizes in table.items():
    n = list(sizes)
    mean = [sizes[k][0] for k in n]
    std = [sizes[k][1] for k in n]
    ax.errorbar(n, mean, yerr=std, marker="o", ms=3, capsize=3, label=model)
  ax.set_xscale("log")
  ax.set_xlabel("training images")
  ax.set_ylabel("test accuracy (model selected on validation)")
  dataset = records[0].get("dataset", "") if records else ""
  steps = records[0]["steps"] if records else 0
  ax.set_title(
    f"Data efficiency on {dataset}\n{steps} steps per run, mean +- std over seeds", fontsize=10
  )
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)


def _spawn_workers(argv: list[str], workers: int) -> None:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  ).strip()
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "experiments.data_scaling", *argv[1:], f"--worker_index={w}"],
      env=env,
    )
    for w in range(workers)
  ]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"data_scaling: worker exit codes {codes}")


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "Root directory of the grid's runs.")
  flags.DEFINE_string("models", "", "Comma-separated subset of the config's models (default: all).")
  flags.DEFINE_integer("workers", 1, "Number of worker processes (each single-threaded when > 1).")
  flags.DEFINE_integer("worker_index", -1, "Internal: run only this worker's share of the grid.")
  flags.DEFINE_string("out", "experiments/results/data_scaling.json", "Records (JSON list).")
  flags.DEFINE_string("plot", "experiments/results/data_scaling.png", "Plot ('' for none).")
  flags.DEFINE_bool("aggregate_only", False, "Only gather finished runs into --out and --plot.")
  config_flags.DEFINE_config_file("config", None, "experiments/configs/data_scaling.py[:arg]")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = FLAGS.config
  models = [m for m in FLAGS.models.split(",") if m]
  points = grid_points(config, models)
  if not FLAGS.aggregate_only:
    if FLAGS.worker_index >= 0:
      run_grid(config, FLAGS.workdir, points[FLAGS.worker_index :: FLAGS.workers])
      return
    if FLAGS.workers > 1:
      _spawn_workers(sys.argv, FLAGS.workers)
    else:
      run_grid(config, FLAGS.workdir, points)
  records = gather(config, FLAGS.workdir, points)
  pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(FLAGS.out).write_text(json.dumps(records, indent=1) + "\n")
  for model, sizes in summarize(records).items():
    row = "  ".join(f"{n}: {m:.4f}+-{s:.4f} ({c})" for n, (m, s, c) in sizes.items())
    print(f"{model:28s} {row}", flush=True)
  if FLAGS.plot and records:
    plot(records, FLAGS.plot)
  print(f"{len(records)} records -> {FLAGS.out}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
