"""Data efficiency grid: test accuracy against training-set size for CNN and attention models.

Usage::

  python -m experiments.data_scaling --config=experiments/configs/data_scaling.py \
    --workdir=experiments/results/data_scaling_runs [--workers=2] [--models=cnn,gpsa]

Each grid point ``(model, train_size, seed)`` is an ordinary :func:`train_and_evaluate` run in
``<workdir>/<model>/n<train_size>/s<seed>`` (checkpointed, so rerunning the command resumes the
grid where it stopped; finished points are skipped, and a finished run of a different model or
budget in the same directory is an error). Each run's budget is computed from its own training-set
size (:func:`experiments.configs.data_scaling.run_config`). ``--workers=W`` runs the grid in ``W``
processes, one CPU thread each (on a 2-core CPU two single-threaded runs of these small models
finish sooner than one two-threaded run).

As each attention run finishes, its receptive-field summary is cached in its directory
(:func:`cache_receptive_field`). A finished run's small files -- ``config.json``,
``summary.json``, ``metrics.jsonl``, ``centers.jsonl``, ``evaluation_init.json`` and
``receptive_field.json`` -- are then all that ``--aggregate_only`` and the receptive-field study
read: the checkpoints (``checkpoints/``, ``best/``) and ``tensorboard/`` can go. The study's
runs are kept that way in the repository (``experiments/results/data_scaling_runs``, the
checkpoints git-ignored), so its analysis can be redone from them, and a grid split over
machines is merged by copying those files into one workdir.

At the end the records are gathered and analysed (:func:`analyze`) into ``--out`` (default
``experiments/results/data_scaling.json``)::

  {"records": [{"model", "train_size", "seed", "test_accuracy", "init_test_accuracy",
                "val_accuracy", "steps", "epochs", "final_train_accuracy", "late_val_gain",
                "params", "train_seconds", "cpu_seconds", "device", "dataset"}, ...],
   "summary": {"accuracy", "init_accuracy", "gap_to_reference", "gain_over_baseline",
               "trends", "baseline_trends", "best_prior", ..., with --base "budget_effect"},
   "compute": {model or "total": {"runs", "train_hours", "cpu_hours"}}}

``final_train_accuracy`` (the last logged window's, on augmented batches) and ``late_val_gain``
(:func:`late_validation_gain`: the validation accuracy gained over the last 30% of the run) show
whether a point converged or is limited by its budget. ``init_test_accuracy`` is the test
accuracy of the run's initialisation (the trainer's, from its seed; ``experiments.evaluate
--which=init``, cached in the run's ``evaluation_init.json``; one evaluation per model and seed,
the initialisation being the same at every size), the at-initialisation value beside the trained
one (``--noinit_accuracy``: None). :func:`load_records` also reads a plain list of records. The
plot (``--plot``, default ``experiments/results/data_scaling.png``): mean test accuracy with 95%
intervals, each model's paired gap to the CNN and its paired relative gain over the ViT, against
the training-set size (log scale).

``--base=<results JSON>`` names the results of the same points with a shorter budget (the
``data_scaling.py:budget`` variant against the convergence grid): the summary then has
``budget_effect`` (:func:`budget_effect`), the seed-paired change of test accuracy that the
longer budget buys, and whether the shorter runs were compute-limited.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.intervals import CONFIDENCE, interval_text, t_interval  # noqa: E402
from experiments.jsonl import read_jsonl  # noqa: E402

FLAGS = flags.FLAGS

REFERENCE = "cnn"
BASELINE = "vit"


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


def _check_same_run(path: pathlib.Path, run, summary: Mapping[str, Any]) -> None:
  """Raises ValueError if the finished run in ``path`` is not ``run`` (model or budget differ)."""
  saved = json.loads((path / "config.json").read_text())
  want_model = json.loads(json.dumps(run.model.to_dict()))
  if saved.get("model") != want_model or summary.get("steps") != run.num_train_steps:
    raise ValueError(
      f"workdir: expected {path} to hold the run of model {want_model} for "
      f"{run.num_train_steps} steps (or nothing), got a finished run of model "
      f"{saved.get('model')} for {summary.get('steps')} steps; use another --workdir"
    )


def cache_receptive_field(
  path: pathlib.Path,
  run,
  dataset: Any = None,
  *,
  summary: Mapping[str, Any] | None = None,
) -> bool:
  """Caches a finished attention run's receptive-field summary in the run directory
  (:func:`experiments.receptive_field.summarise_run`, its default 200 test images; ``dataset``:
  the run's, when loaded), while the run's best checkpoint is there: the receptive-field study
  then needs only the run's small files. A cached summary that does not match the run (another
  image count, or computed before the run was re-trained) is recomputed. Returns whether the run
  has a valid summary (False for the CNN and for a run whose checkpoint is gone).
  ``summary``: the run's ``summary.json`` contents when already read."""
  from experiments import receptive_field

  if run.model.name == "small_cnn":
    return False
  summary = _completed(path) if summary is None else summary
  if not summary or not summary.get("completed"):
    return False
  if receptive_field.cached_summary(path, summary=summary) is None:
    if not any((path / "best").glob("*")):
      return False
    receptive_field.summarise_run(path, dataset=dataset)
  return True


def run_grid(config, workdir: str, points: Sequence[tuple[str, int, int]]) -> None:
  """Trains every point that has no completed summary yet (loading each data subset once),
  caching each finished attention run's receptive-field summary (:func:`cache_receptive_field`)."""
  from experiments.configs import data_scaling as grid_config
  from experiments.train import load_dataset_from_config, train_and_evaluate

  datasets: dict[tuple[int, int], Any] = {}
  for i, (model, size, seed) in enumerate(points):
    path = run_dir(workdir, model, size, seed)
    run = grid_config.run_config(config, model, size, seed)
    finished = _completed(path)
    if finished:
      _check_same_run(path, run, finished)
      cache_receptive_field(path, run, summary=finished)
      continue
    key = (size, seed)
    if key not in datasets:
      datasets.clear()  # the grid is ordered by size and seed: keep one subset in memory
      datasets[key] = load_dataset_from_config(run)
    dataset = datasets[key]
    run = grid_config.run_config(config, model, size, seed, num_images=int(dataset.num_train))
    start = time.perf_counter()
    summary = train_and_evaluate(run, path, dataset=dataset)
    print(
      f"[{i + 1}/{len(points)}] {model} n={size} seed={seed}: {summary['steps']} steps "
      f"({summary['epochs']:.1f} epochs), test {summary['final_test_accuracy']:.4f} (val "
      f"{summary['best_val_accuracy']:.4f}) in {time.perf_counter() - start:.0f} s",
      flush=True,
    )
    cache_receptive_field(path, run, dataset)


def _last_train_accuracy(rows: Sequence[Mapping[str, Any]]) -> float | None:
  """Train accuracy of the last logged window (the steps since the previous evaluation), from
  a run's ``metrics.jsonl`` rows."""
  return rows[-1].get("train_accuracy") if rows else None


def late_validation_gain(
  path: str | os.PathLike, fraction: float = 0.3, *, rows: Sequence[Mapping[str, Any]] | None = None
) -> float | None:
  """How much a run still learned at its end: the validation accuracy of its last evaluation
  minus that of its last evaluation at or before ``1 - fraction`` of its steps (None without
  two such evaluations). Near 0 for a converged run; with the cosine schedule's small final
  learning rates a clearly positive value says the run was still improving.

  ``rows``: the run's ``metrics.jsonl`` rows when already read (else read from ``path``).

  Raises:
    ValueError: if ``fraction`` is not in (0, 1).
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction: expected a float in (0, 1), got {fraction!r}")
  if rows is None:
    rows = read_jsonl(pathlib.Path(path) / "metrics.jsonl")
  evals = [(int(r["step"]), float(r["val_accuracy"])) for r in rows if "val_accuracy" in r]
  if len(evals) < 2:
    return None
  last_step, last = evals[-1]
  earlier = [v for step, v in evals[:-1] if step <= (1.0 - fraction) * last_step]
  return last - earlier[-1] if earlier else None


def _rounded(seconds: float | None) -> float | None:
  return None if seconds is None else round(float(seconds), 1)


def _device(summary: Mapping[str, Any]) -> str:
  devices = summary.get("devices")
  if isinstance(devices, Mapping):
    return f"{','.join(devices.get('kinds', []))} x{devices.get('count')}"
  return str(summary.get("platform"))


def init_test_accuracy(path: str | os.PathLike) -> float:
  """Test accuracy of a run's initialisation (``<path>/evaluation_init.json``, computed once by
  :func:`experiments.evaluate.evaluate_workdir` with ``which="init"``)."""
  cached = pathlib.Path(path) / "evaluation_init.json"
  if cached.exists():
    return float(json.loads(cached.read_text())["test_accuracy"])
  from experiments.evaluate import evaluate_workdir

  return float(evaluate_workdir(path, which="init", plot=False)["test_accuracy"])


def _initialisation_key(run_cfg: Mapping[str, Any]) -> str:
  """What the trainer's initialisation depends on: the model, the seed, the initialisation
  rewrites, the dtype and the dataset (image shape, classes, normalisation constants) -- not the
  subset or the budget, so runs of one model and seed share it at every size."""
  fields = [run_cfg.get(k) for k in ("model", "seed", "conv_init_alpha", "mimetic_init", "dtype")]
  return json.dumps([*fields, run_cfg["dataset"]["name"]], sort_keys=True)


def gather(
  config, workdir: str, points: Sequence[tuple[str, int, int]], init_accuracy: bool = False
) -> list[dict]:
  """The records of every completed point, in grid order (fields: module docstring).

  With ``init_accuracy``, ``init_test_accuracy`` is evaluated once per initialisation
  (:func:`_initialisation_key`: model and seed) and shared by that model's runs at every size;
  else None."""
  records = []
  at_init: dict[str, float] = {}
  for model, size, seed in points:
    path = run_dir(workdir, model, size, seed)
    summary = _completed(path)
    if summary is None:
      continue
    run_cfg = json.loads((path / "config.json").read_text())
    metrics = read_jsonl(path / "metrics.jsonl")
    init_acc = None
    if init_accuracy:
      key = _initialisation_key(run_cfg)
      if key not in at_init:
        at_init[key] = init_test_accuracy(path)
      init_acc = at_init[key]
    records.append(
      {
        "model": model,
        "train_size": int(summary.get("num_train_examples", size)),
        "seed": seed,
        "test_accuracy": summary["final_test_accuracy"],
        "init_test_accuracy": init_acc,
        "val_accuracy": summary["best_val_accuracy"],
        "steps": summary["steps"],
        "epochs": round(float(summary["epochs"]), 3) if "epochs" in summary else None,
        "final_train_accuracy": _last_train_accuracy(metrics),
        "late_val_gain": late_validation_gain(path, rows=metrics),
        "params": summary["num_params"],
        "train_seconds": _rounded(summary["train_seconds"]),
        "cpu_seconds": _rounded(summary.get("cpu_seconds")),
        "device": _device(summary),
        "dataset": run_cfg["dataset"]["name"],
      }
    )
  return records


def compute(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per model and in ``"total"``: ``{"runs", "train_hours", "cpu_hours"}``, the sums of the
  records' wall (``train_seconds``) and process CPU (``cpu_seconds``) times in hours;
  ``cpu_hours`` is None when a record lacks its CPU time."""
  out: dict[str, dict[str, Any]] = {}
  for key in [*dict.fromkeys(r["model"] for r in records), "total"]:
    rows = [r for r in records if key in ("total", r["model"])]
    cpu = [r.get("cpu_seconds") for r in rows]
    out[key] = {
      "runs": len(rows),
      "train_hours": round(sum(r["train_seconds"] for r in rows) / 3600, 3),
      "cpu_hours": None if None in cpu else round(sum(cpu) / 3600, 3),
    }
  return out


def load_records(path: str | os.PathLike) -> list[dict]:
  """The records of a results file: ``{"records": [...], ...}`` or a plain list of records."""
  data = json.loads(pathlib.Path(path).read_text())
  if isinstance(data, list):
    return data
  if isinstance(data, Mapping) and isinstance(data.get("records"), list):
    return data["records"]
  raise ValueError(
    f"path: expected a JSON list of records or an object with 'records', got {type(data).__name__}"
  )


# ----------------------------------------------------------------------------------------------
# Analysis.


def _has_init(record: Mapping[str, Any]) -> bool:
  return record.get("init_test_accuracy") is not None


def _by_point(
  records: Sequence[Mapping[str, Any]], field: str = "test_accuracy"
) -> dict[str, dict[int, dict[int, float]]]:
  """``model -> train_size -> seed -> record[field]``; records whose ``field`` is None are left out."""
  table: dict[str, dict[int, dict[int, float]]] = {}
  for r in records:
    if r.get(field) is not None:
      table.setdefault(r["model"], {}).setdefault(int(r["train_size"]), {})[int(r["seed"])] = float(
        r[field]
      )
  return table


def paired_differences(
  records: Sequence[dict], model: str, reference: str, *, relative: bool = False
) -> dict[int, list[float]]:
  """Per size, the seed-paired ``acc_model - acc_ref`` (``relative``: divided by ``acc_ref``).

  Only seeds run for both models at that size are paired; sizes with none are left out.
  """
  table = _by_point(records)
  out: dict[int, list[float]] = {}
  for size, accs in sorted(table.get(model, {}).items()):
    ref = table.get(reference, {}).get(size, {})
    seeds = sorted(set(accs) & set(ref))
    if seeds:
      out[size] = [(accs[s] - ref[s]) / ref[s] if relative else accs[s] - ref[s] for s in seeds]
  return out


def gap_trends(
  records: Sequence[dict], reference: str = REFERENCE, confidence: float = CONFIDENCE
) -> dict[str, dict[str, Any]]:
  """Does each model's gap to ``reference`` shrink with data? A mechanical answer.

  For every model and seed, the least-squares slope of the paired gap ``acc_model - acc_ref``
  against ``log10(train_size)`` (accuracy points per decade of data); the slopes of the seeds
  give a t interval (n - 1 degrees of freedom). Verdict: ``"shrinks"`` if the interval excludes
  0 and the slope's sign is opposite to the mean gap at the smallest size (the gap moves towards
  0), ``"grows"`` if it excludes 0 with the same sign, ``"no detectable trend"`` if it contains 0,
  ``"undetermined"`` with fewer than 2 seeds of at least 2 sizes. Models paired with the
  reference at fewer than 2 sizes are left out. ``crossover_size``: the first
  size (interpolated linearly in log size) where the mean gap changes sign, else None.

  Returns:
    ``model -> {"slope_per_decade": t_interval dict, "verdict", "shrinks" (bool or None),
    "gap_at_smallest", "gap_at_largest", "crossover_size", "sizes"}``.
  """
  import numpy as np

  table = _by_point(records)
  out: dict[str, dict[str, Any]] = {}
  for model in table:
    if model == reference:
      continue
    gaps = paired_differences(records, model, reference)
    if len(gaps) < 2:  # A trend needs two sizes.
      continue
    sizes = sorted(gaps)
    per_seed: dict[int, list[tuple[float, float]]] = {}
    for size in sizes:
      ref = table[reference][size]
      for seed in sorted(set(table[model][size]) & set(ref)):
        gap = table[model][size][seed] - ref[seed]
        per_seed.setdefault(seed, []).append((math.log10(size), gap))
    slopes = []
    for points in per_seed.values():
      if len(points) >= 2:
        x, y = np.asarray(points).T
        slopes.append(float(np.polyfit(x, y, 1)[0]))
    means = [float(np.mean(gaps[n])) for n in sizes]
    slope = t_interval(slopes, confidence) if slopes else None
    verdict, shrinks = "undetermined", None
    if slope is not None and slope["low"] is not None:
      if slope["low"] > 0 or slope["high"] < 0:
        toward_zero = math.copysign(1.0, slope["mean"]) != math.copysign(1.0, means[0])
        shrinks = bool(toward_zero and means[0] != 0.0)
        verdict = "shrinks" if shrinks else "grows"
      else:
        verdict, shrinks = "no detectable trend", False
    crossover = None
    for (n0, g0), (n1, g1) in zip(zip(sizes, means), zip(sizes[1:], means[1:])):
      if g0 * g1 < 0:
        l0, l1 = math.log10(n0), math.log10(n1)
        crossover = float(10 ** (l0 + (0.0 - g0) / (g1 - g0) * (l1 - l0)))
        break
    out[model] = {
      "slope_per_decade": slope,
      "verdict": verdict,
      "shrinks": shrinks,
      "gap_at_smallest": means[0],
      "gap_at_largest": means[-1],
      "crossover_size": crossover,
      "sizes": sizes,
    }
  return out


def best_prior(
  records: Sequence[dict],
  exclude: Sequence[str] = (REFERENCE, BASELINE),
  confidence: float = CONFIDENCE,
) -> dict[str, dict[str, Any]]:
  """Which prior helps most at each size? The models other than ``exclude`` ranked by mean test
  accuracy; the leader's seed-paired difference to the runner-up, with its t interval.

  Verdict: ``"leads"`` when the interval lies above 0, ``"tied"`` when it contains 0,
  ``"undetermined"`` with fewer than 2 paired seeds.

  Returns:
    ``size (str) -> {"best", "runner_up", "difference": t_interval of acc_best -
    acc_runner_up, "verdict"}`` for sizes with at least two such models.
  """
  import numpy as np

  table = {m: v for m, v in _by_point(records).items() if m not in exclude}
  out: dict[str, dict[str, Any]] = {}
  for size in sorted({n for by_size in table.values() for n in by_size}):
    at = {m: by_size[size] for m, by_size in table.items() if size in by_size}
    if len(at) < 2:
      continue
    best, runner_up = sorted(at, key=lambda m: -float(np.mean(list(at[m].values()))))[:2]
    seeds = sorted(set(at[best]) & set(at[runner_up]))
    if not seeds:
      continue
    diff = t_interval([at[best][s] - at[runner_up][s] for s in seeds], confidence)
    verdict = "undetermined" if diff["low"] is None else ("leads" if diff["low"] > 0 else "tied")
    out[str(size)] = {
      "best": best,
      "runner_up": runner_up,
      "difference": diff,
      "verdict": verdict,
    }
  return out


def analyze(
  records: Sequence[dict],
  reference: str = REFERENCE,
  baseline: str = BASELINE,
  confidence: float = CONFIDENCE,
) -> dict[str, Any]:
  """Per size and model: accuracy, paired gap to ``reference``, paired relative gain over
  ``baseline``, and :func:`gap_trends`. JSON-ready (sizes as string keys).

  Returns:
    ``{"confidence", "reference", "baseline",
    "accuracy": {model: {size: t_interval of test accuracy over seeds}},
    "init_accuracy": the same for ``init_test_accuracy`` (models whose records all have it),
    "gap_to_reference": {model: {size: t_interval of acc - acc_ref, paired by seed}},
    "gain_over_baseline": {model: {size: t_interval of (acc - acc_base) / acc_base, paired}},
    "trends": gap_trends(...) of the gaps to ``reference``, "baseline_trends": the same for the
    differences to ``baseline`` (does a prior's lead over ``vit`` fade with data?),
    "best_prior": best_prior(...) (which prior leads at each size?)}``; a comparison is left
    out when its reference model has no run.
  """

  def per_size(table: dict[str, dict[int, dict[int, float]]]) -> dict[str, dict[str, Any]]:
    return {
      m: {str(n): t_interval(list(seeds.values()), confidence) for n, seeds in sorted(s.items())}
      for m, s in table.items()
    }

  table = _by_point(records)
  accuracy = per_size(table)
  complete = {m for m in table if all(_has_init(r) for r in records if r["model"] == m)}
  init_accuracy = per_size(
    _by_point([r for r in records if r["model"] in complete], "init_test_accuracy")
  )

  def compare(ref: str, relative: bool) -> dict[str, dict[str, Any]]:
    if ref not in table:
      return {}
    out = {}
    for m in table:
      if m == ref:
        continue
      diffs = paired_differences(records, m, ref, relative=relative)
      if diffs:
        out[m] = {str(n): t_interval(d, confidence) for n, d in diffs.items()}
    return out

  return {
    "confidence": confidence,
    "reference": reference,
    "baseline": baseline,
    "accuracy": accuracy,
    "init_accuracy": init_accuracy,
    "gap_to_reference": compare(reference, False),
    "gain_over_baseline": compare(baseline, True),
    "trends": gap_trends(records, reference, confidence) if reference in table else {},
    "baseline_trends": gap_trends(records, baseline, confidence) if baseline in table else {},
    "best_prior": best_prior(records, (reference, baseline), confidence),
  }


def budget_effect(
  records: Sequence[dict], base_records: Sequence[dict], confidence: float = CONFIDENCE
) -> dict[str, dict[str, Any]]:
  """Is a point limited by its budget? The seed-paired change of test accuracy from the runs of
  ``base_records`` to the longer runs of ``records`` (the same model, size and seed).

  Verdict: ``"compute-limited"`` when the change's t interval lies above 0 (the longer budget
  helps), ``"not compute-limited"`` when it contains 0 or lies below, ``"undetermined"`` with
  fewer than 2 paired seeds.

  Returns:
    ``model -> size (str) -> {"change": t_interval of acc - acc_base, "steps": [base, longer]
    (means over the paired seeds), "final_train_accuracy": [base, longer] (means; None if a
    record lacks it), "verdict"}``; points without a paired base run are left out.

  Raises:
    ValueError: if a paired base run is not shorter than its longer run.
  """
  import numpy as np

  def key(r: Mapping[str, Any]) -> tuple[str, int, int]:
    return r["model"], int(r["train_size"]), int(r["seed"])

  base = {key(r): r for r in base_records}
  pairs: dict[str, dict[int, list[tuple[dict, dict]]]] = {}
  for r in records:
    if key(r) in base:
      b = base[key(r)]
      if int(b["steps"]) >= int(r["steps"]):
        raise ValueError(
          f"base_records: expected runs shorter than {r['steps']} steps for {key(r)}, got "
          f"{b['steps']}"
        )
      pairs.setdefault(r["model"], {}).setdefault(int(r["train_size"]), []).append((b, r))

  def mean_of(rows: Sequence[Mapping[str, Any]], field: str) -> float | None:
    values = [row.get(field) for row in rows]
    return None if None in values else float(np.mean(values))

  out: dict[str, dict[str, Any]] = {}
  for model, by_size in pairs.items():
    out[model] = {}
    for size, rows in sorted(by_size.items()):
      change = t_interval([r["test_accuracy"] - b["test_accuracy"] for b, r in rows], confidence)
      verdict = "undetermined"
      if change["low"] is not None:
        verdict = "compute-limited" if change["low"] > 0 else "not compute-limited"
      bases, longers = [b for b, _ in rows], [r for _, r in rows]
      out[model][str(size)] = {
        "change": change,
        "steps": [mean_of(bases, "steps"), mean_of(longers, "steps")],
        "final_train_accuracy": [
          mean_of(bases, "final_train_accuracy"),
          mean_of(longers, "final_train_accuracy"),
        ],
        "verdict": verdict,
      }
  return out


def format_summary(summary: Mapping[str, Any]) -> str:
  """The analysis as text tables (the command line's output)."""
  cell = interval_text
  conf = int(round(100 * summary["confidence"]))
  lines = []
  tables = (("accuracy", "test accuracy"), ("init_accuracy", "test accuracy at initialisation"))
  for key, title in tables:
    if key == "init_accuracy" and not summary.get(key):
      continue
    lines.append(f"{title}: mean +- std over seeds (n), by training-set size")
    for model, sizes in summary[key].items():
      row = "  ".join(
        f"{n}: {v['mean']:.4f}+-{(v['std'] or 0.0):.4f} ({v['n']})" for n, v in sizes.items()
      )
      lines.append(f"  {model:26s} {row}")
  lines.append(f"gap to {summary['reference']} (accuracy points), paired {conf}% CI")
  for model, sizes in summary["gap_to_reference"].items():
    row = "  ".join(f"{n}: {cell(v, 100, '+.2f')}" for n, v in sizes.items())
    lines.append(f"  {model:26s} {row}")
  lines.append(f"relative gain over {summary['baseline']} (%), paired {conf}% CI")
  for model, sizes in summary["gain_over_baseline"].items():
    row = "  ".join(f"{n}: {cell(v, 100, '+.2f')}" for n, v in sizes.items())
    lines.append(f"  {model:26s} {row}")
  if summary.get("best_prior"):
    lines.append(
      f"best prior at each size: paired difference to the runner-up (points), {conf}% CI"
    )
    for n, b in summary["best_prior"].items():
      lines.append(
        f"  {n:>6s}: {b['best']} over {b['runner_up']} {cell(b['difference'], 100, '+.2f')} "
        f"({b['verdict']})"
      )
  if summary.get("budget_effect"):
    lines.append(f"change of test accuracy with the longer budget (points), paired {conf}% CI")
    for model, sizes in summary["budget_effect"].items():
      row = "  ".join(
        f"{n}: {cell(v['change'], 100, '+.2f')} ({v['steps'][0]:.0f} -> {v['steps'][1]:.0f} "
        f"steps, {v['verdict']})"
        for n, v in sizes.items()
      )
      lines.append(f"  {model:26s} {row}")
  for key, ref in (("trends", "reference"), ("baseline_trends", "baseline")):
    if not summary.get(key):
      continue
    lines.append(f"does the difference to {summary[ref]} shrink with data?")
    for model, t in summary[key].items():
      s = t["slope_per_decade"]
      slope = "n/a" if s is None else cell(s, 100, "+.2f")
      cross = "none" if t["crossover_size"] is None else f"{t['crossover_size']:.0f} images"
      lines.append(
        f"  {model:26s} {t['verdict']:20s} slope {slope} points/decade; difference "
        f"{100 * t['gap_at_smallest']:+.2f} -> {100 * t['gap_at_largest']:+.2f}; crossover "
        f"{cross}"
      )
  return "\n".join(lines)


def _size_label(size: str | int) -> str:
  return f"{int(size):,}"


def format_markdown(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
  """The analysis as Markdown tables (``--markdown``; the form ``docs/experiments.md`` quotes).

  Tables: test accuracy (mean +- std over seeds, the parameter count and the accuracy at
  initialisation, shared by the sizes); the mean final training accuracy (a point near 1 has fit
  its subset; one well below it is limited by its budget); the paired gap to the reference in
  accuracy points and the paired relative gain over the baseline in %, mean [interval]; the
  trend of the gap with data.
  """
  import numpy as np

  conf = int(round(100 * summary["confidence"]))
  sizes = sorted({int(n) for by_size in summary["accuracy"].values() for n in by_size})
  header = "| model | " + " | ".join(_size_label(n) for n in sizes) + " |"
  rule = "|---" * (len(sizes) + 1) + "|"

  def row(model: str, cells: Mapping[int, str], extra: Sequence[str] = ()) -> str:
    return f"| `{model}` | " + " | ".join([*extra, *(cells.get(n, "") for n in sizes)]) + " |"

  params = {r["model"]: r.get("params") for r in records}
  lines = [
    "Test accuracy, mean ± std over seeds (seeds), by training-set size; at initialisation: "
    "mean ± std over the seeds' initial networks.",
    "",
    "| model | params | at initialisation | " + header[len("| model | ") :],
    "|---|---" + rule,
  ]
  for model, by_size in summary["accuracy"].items():
    init = summary.get("init_accuracy", {}).get(model)
    init_cell = ""
    if init:  # One initialisation per model and seed: the first size's values stand for all.
      v = next(iter(init.values()))
      init_cell = f"{v['mean']:.3f} ± {(v['std'] or 0.0):.3f}"
    cells = {
      int(n): f"{v['mean']:.3f} ± {(v['std'] or 0.0):.3f} ({v['n']})" for n, v in by_size.items()
    }
    count = params.get(model)
    lines.append(row(model, cells, ["" if count is None else f"{count:,}", init_cell]))
  train = _by_point(records, "final_train_accuracy")
  if train:
    lines += ["", "Final training accuracy (last logged, augmented batches), mean over seeds."]
    lines += ["", header, rule]
  for model, by_size in train.items():
    lines.append(row(model, {n: f"{np.mean(list(v.values())):.3f}" for n, v in by_size.items()}))
  late = _by_point(records, "late_val_gain")
  if late:
    lines += [
      "",
      "Validation accuracy gained over the last 30 % of each run (accuracy points), mean over "
      "seeds: near 0 when a run has converged.",
      "",
      header,
      rule,
    ]
  for model, by_size in late.items():
    cells = {n: f"{100 * np.mean(list(v.values())):+.2f}" for n, v in by_size.items()}
    lines.append(row(model, cells))
  for key, title, scale in (
    ("gap_to_reference", f"Gap to `{summary['reference']}`, accuracy points", 100.0),
    ("gain_over_baseline", f"Relative gain over `{summary['baseline']}`, %", 100.0),
  ):
    lines += ["", f"{title}, mean [{conf} % interval, paired over seeds].", "", header, rule]
    for model, by_size in summary[key].items():
      lines.append(
        row(model, {int(n): interval_text(v, scale, "+.2f") for n, v in by_size.items()})
      )
  if summary.get("best_prior"):
    lines += [
      "",
      f"The best prior at each size (highest mean test accuracy, `{summary['reference']}` and "
      f"`{summary['baseline']}` aside) and its paired difference to the runner-up, accuracy "
      f"points, mean [{conf} % interval].",
      "",
      "| training images | best | runner-up | difference | verdict |",
      "|---|---|---|---|---|",
    ]
    for n, b in summary["best_prior"].items():
      lines.append(
        f"| {_size_label(n)} | `{b['best']}` | `{b['runner_up']}` | "
        f"{interval_text(b['difference'], 100.0, '+.2f')} | {b['verdict']} |"
      )
  if summary.get("budget_effect"):
    lines += [
      "",
      f"Change of test accuracy with the longer budget, accuracy points, mean [{conf} % "
      "interval, paired over seeds]; final training accuracy, mean over seeds.",
      "",
      "| model | training images | steps | final training accuracy | change | verdict |",
      "|---|---|---|---|---|---|",
    ]
    for model, by_size in summary["budget_effect"].items():
      for n, v in by_size.items():
        train = " → ".join("" if a is None else f"{a:.3f}" for a in v["final_train_accuracy"])
        lines.append(
          f"| `{model}` | {_size_label(n)} | {v['steps'][0]:.0f} → {v['steps'][1]:.0f} | "
          f"{train} | {interval_text(v['change'], 100.0, '+.2f')} | {v['verdict']} |"
        )
  for key, ref in (("trends", "reference"), ("baseline_trends", "baseline")):
    if not summary.get(key):
      continue
    lines += [
      "",
      f"Trend of the difference to `{summary[ref]}` with data (accuracy points): slope in "
      f"points per decade of training images, mean [{conf} % interval over seeds].",
      "",
      "| model | difference, smallest → largest size | slope | verdict | crossover |",
      "|---|---|---|---|---|",
    ]
    for model, t in summary[key].items():
      slope = (
        "n/a"
        if t["slope_per_decade"] is None
        else interval_text(t["slope_per_decade"], 100.0, "+.2f")
      )
      cross = "none" if t["crossover_size"] is None else f"{t['crossover_size']:,.0f} images"
      lines.append(
        f"| `{model}` | {100 * t['gap_at_smallest']:+.2f} → {100 * t['gap_at_largest']:+.2f} | "
        f"{slope} | {t['verdict']} | {cross} |"
      )
  return "\n".join(lines) + "\n"


def plot(records: Sequence[dict], path: str | os.PathLike) -> None:
  """Test accuracy (mean, 95% t interval over seeds), the paired gap to the CNN in accuracy
  points and the paired relative gain over the ViT in % (mean, 95% interval) against the
  training-set size (log scale), one line per model; the interval as an error bar wherever a
  point has one, each model's bars shifted slightly along the size axis so they do not overlap."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = analyze(records)
  panels = [("accuracy", "test accuracy (model selected on validation)", 1.0)]
  if summary["gap_to_reference"]:
    panels.append(("gap_to_reference", f"test accuracy - {REFERENCE}, points (paired)", 100.0))
  if summary["gain_over_baseline"]:
    panels.append(("gain_over_baseline", f"relative gain over {BASELINE}, % (paired)", 100.0))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
  models = list(summary["accuracy"])
  colors = {m: f"C{i}" for i, m in enumerate(models)}
  # Multiplicative shifts on the log axis: about +-5% of the size between the outermost models.
  shift = {m: 10.0 ** (0.01 * (i - (len(models) - 1) / 2)) for i, m in enumerate(models)}
  for ax, (key, label, scale) in zip(axes[0], panels):
    for model, sizes in summary[key].items():
      n = [int(k) * shift[model] for k in sizes]
      mean = [scale * v["mean"] for v in sizes.values()]
      ax.plot(n, mean, marker="o", ms=3, color=colors[model], label=model)
      bars = [(x, m, v) for x, m, v in zip(n, mean, sizes.values()) if v["low"] is not None]
      if bars:
        ax.errorbar(
          [x for x, _, _ in bars],
          [m for _, m, _ in bars],
          yerr=[
            [m - scale * v["low"] for _, m, v in bars],
            [scale * v["high"] - m for _, m, v in bars],
          ],
          fmt="none",
          ecolor=colors[model],
          elinewidth=1.0,
          capsize=2,
          alpha=0.8,
        )
    if key != "accuracy":
      ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()  # every model, one colour each
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
  dataset = records[0].get("dataset", "") if records else ""
  seeds = len({r["seed"] for r in records})
  fig.suptitle(
    f"Data efficiency on {dataset}: mean and 95% t interval over {seeds} seeds", fontsize=10
  )
  fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
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
  flags.DEFINE_string("out", "experiments/results/data_scaling.json", "Records and analysis.")
  flags.DEFINE_string("plot", "experiments/results/data_scaling.png", "Plot ('' for none).")
  flags.DEFINE_string("markdown", "", "Also write the analysis as Markdown tables here.")
  flags.DEFINE_bool("aggregate_only", False, "Only gather finished runs into --out and --plot.")
  flags.DEFINE_bool("init_accuracy", True, "Evaluate each run's initialisation on the test set.")
  flags.DEFINE_string(
    "base", "", "Results of the same points with a shorter budget: adds budget_effect."
  )
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
  records = gather(config, FLAGS.workdir, points, init_accuracy=FLAGS.init_accuracy)
  summary = analyze(records)
  if FLAGS.base:
    summary["budget_effect"] = budget_effect(records, load_records(FLAGS.base))
  pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(FLAGS.out).write_text(
    json.dumps({"records": records, "summary": summary, "compute": compute(records)}, indent=1)
    + "\n"
  )
  print(format_summary(summary), flush=True)
  if FLAGS.markdown:
    pathlib.Path(FLAGS.markdown).write_text(format_markdown(records, summary))
  if FLAGS.plot and records:
    plot(records, FLAGS.plot)
  print(f"{len(records)} records -> {FLAGS.out}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
