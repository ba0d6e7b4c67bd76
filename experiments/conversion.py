"""Convolutions as attention: a CNN run exactly as self-attention, and T-CNN fine-tuning.

Usage::

  python -m experiments.conversion --config=experiments/configs/conversion.py \
    --workdir=runs/conversion [--out=experiments/results/conversion.json]
  python -m experiments.conversion --config=experiments/configs/conversion.py:finetune \
    --workdir=runs/conversion_finetune

The config's ``conversion.study`` picks the study (``experiments/configs/conversion.py``):

* ``"exactness"`` (:func:`run`): the CNN as hard and soft attention, then fine-tuned as free
  attention; writes ``<workdir>/conversion.json`` and ``--out`` (default
  ``experiments/results/conversion.json``).
* ``"finetune"`` (:func:`run_finetune`): per seed, a SmallCNN, then the arms of
  :data:`FINETUNE_ARMS` (the CNN fine-tuned, the T-CNN -- last stage recast as GPSA -- fine-tuned,
  and the hybrid from scratch), each evaluated clean and under the corruptions of
  :mod:`experiments.corruptions`; paired differences with t intervals. Writes
  ``<workdir>/conversion_finetune.json``, ``--out`` (default
  ``experiments/results/conversion_finetune.json``) and ``--plot`` (default
  ``experiments/results/conversion_finetune.png``).

Every training stage is a :func:`experiments.train.train_and_evaluate` run in its own
sub-directory, so rerunning the command after a kill resumes the unfinished stage and skips the
finished ones.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS

FINETUNE_STAGES = ("cnn_continued", "attention_free", "attention_content")
# The arms of the T-CNN study (run_finetune), each started per seed from the trained CNN or
# (hybrid_scratch) from scratch.
FINETUNE_ARMS = ("cnn_finetune", "tcnn", "tcnn_open_gate", "hybrid_scratch")


def stage_config(config, stage: str):
  """The trainer config of ``stage`` ('cnn' or one of :data:`FINETUNE_STAGES`)."""
  import ml_collections

  run = ml_collections.ConfigDict(config.to_dict())
  del run["conversion"]
  c = config.conversion
  if stage == "cnn":
    if c.cnn_epochs > 0:
      run.num_epochs = c.cnn_epochs
    return run
  if stage not in FINETUNE_STAGES:
    raise ValueError(f"stage: expected 'cnn' or one of {FINETUNE_STAGES}, got {stage!r}")
  epochs = c.finetune_epochs
  if stage == "attention_content":
    epochs = c.get("content_finetune_epochs", epochs)
  if epochs > 0:
    run.num_epochs = epochs
  run.learning_rate = c.finetune_lr
  if stage != "cnn_continued":
    fields = run.model.to_dict()
    fields["name"] = "attention_cnn"
    fields["encoding"] = "quadratic" if stage == "attention_free" else "quadratic_content"
    fields["qk_features"] = c.qk_features
    run.model = ml_collections.ConfigDict(fields)
  return run


def load_best(workdir: str | os.PathLike) -> dict:
  """``{'params', 'batch_stats'}`` of the best-validation checkpoint of a trainer run.

  Read here with orbax rather than through :mod:`experiments.evaluate`, whose command-line flags
  (defined when it is imported) would clash with this module's.

  Raises:
    FileNotFoundError: naming ``workdir`` if it holds no best checkpoint.
  """
  import orbax.checkpoint as ocp

  directory = (pathlib.Path(workdir) / "best").absolute()
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"workdir: no best checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  variables = {"params": restored["params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
  return variables


def predict(model, variables, dataset, images, batch_size: int = 500):
  """float32 logits ``(N, classes)`` of ``images`` (uint8, normalised with the dataset's stats)."""
  import jax
  import numpy as np

  from experiments import input_pipeline

  @jax.jit
  def logits_fn(v, x):
    return model.apply(v, input_pipeline.normalize(x, dataset.mean, dataset.std), train=False)

  out = [
    np.asarray(logits_fn(variables, images[i : i + batch_size]))
    for i in range(0, images.shape[0], batch_size)
  ]
  return np.concatenate(out)


def _compare(logits, reference, labels) -> dict[str, Any]:
  import numpy as np

  pred, ref_pred = logits.argmax(-1), reference.argmax(-1)
  return {
    "test_accuracy": float((pred == labels).mean()),
    "changed_predictions": int((pred != ref_pred).sum()),
    "max_abs_logit_diff": float(np.abs(logits - reference).max()),
  }


def _centre_stats(start: dict, end: dict) -> dict[str, Any]:
  """Per layer: mean and max distance the 9 centres moved, and alpha's min / median / max."""
  import numpy as np

  stats = {}
  for name in sorted(k for k in end if k.startswith("conv")):
    moved = np.linalg.norm(
      np.asarray(end[name]["centers"]) - np.asarray(start[name]["centers"]), axis=-1
    )
    alpha = np.asarray(end[name]["alpha"])
    stats[name] = {
      "centre_moved_mean": float(moved.mean()),
      "centre_moved_max": float(moved.max()),
      "alpha_min": float(alpha.min()),
      "alpha_median": float(np.median(alpha)),
      "alpha_max": float(alpha.max()),
      "centers": np.round(np.asarray(end[name]["centers"]), 3).tolist(),
    }
  return stats


def run(config, workdir: str | os.PathLike, *, dataset=None) -> dict[str, Any]:
  """Runs (or resumes) every stage and returns the results (also ``<workdir>/conversion.json``)."""
  import jax

  from attnconv.construction import convolutions_as_attention
  from attnconv.models.conv_init import attention_cnn_from_cnn
  from experiments import train as train_lib

  workdir = pathlib.Path(workdir)
  cnn_config = stage_config(config, "cnn")
  if dataset is None:
    dataset = train_lib.load_dataset_from_config(cnn_config)
  labels = dataset.test_labels
  results: dict[str, Any] = {
    "dataset": cnn_config.dataset.name,
    "device": jax.devices()[0].platform,
    "device_kind": jax.devices()[0].device_kind,
  }

  # 1. The CNN.
  summary = train_lib.train_and_evaluate(cnn_config, workdir / "cnn", dataset=dataset)
  results["cnn"] = {
    k: summary[k]
    for k in ("num_params", "best_val_accuracy", "final_test_accuracy", "steps", "train_seconds")
  }
  cnn = train_lib._build_model(cnn_config, dataset.num_classes)
  best = load_best(workdir / "cnn")
  reference = predict(cnn, best, dataset, dataset.test_images)
  results["cnn"]["test_accuracy_of_best"] = float((reference.argmax(-1) == labels).mean())

  # 2. Exactness: every nn.Conv as hard attention; then the AttentionCNN at finite alpha.
  results["as_attention"] = {}
  for implementation in ("dense", "gather"):
    start = time.perf_counter()
    with convolutions_as_attention(implementation=implementation):
      logits = predict(cnn, best, dataset, dataset.test_images)
    results["as_attention"][implementation] = {
      **_compare(logits, reference, labels),
      "seconds": round(time.perf_counter() - start, 1),
    }
  sweep = []
  attention_cnn = train_lib._build_model(stage_config(config, "attention_free"), 10)
  for alpha in config.conversion.alphas:
    variables = attention_cnn_from_cnn(best, alpha=float(alpha))
    logits = predict(attention_cnn, variables, dataset, dataset.test_images)
    sweep.append({"alpha": float(alpha), **_compare(logits, reference, labels)})
  results["alpha_sweep"] = sweep

  # 3. Fine-tuning from the best CNN: the CNN itself, free attention, attention with content.
  results["finetune"] = {}
  alpha0 = float(config.conversion.finetune_alpha)
  for stage in FINETUNE_STAGES:
    run_config = stage_config(config, stage)
    if stage == "cnn_continued":
      init = best
    else:
      init = attention_cnn_from_cnn(
        best,
        alpha=alpha0,
        encoding=run_config.model.encoding,
        qk_features=int(config.conversion.qk_features),
        rng=jax.random.key(int(config.seed)),
      )
    start_logits = predict(
      train_lib._build_model(run_config, dataset.num_classes), init, dataset, dataset.test_images
    )
    summary = train_lib.train_and_evaluate(
      run_config, workdir / stage, dataset=dataset, init_variables=init
    )
    record = {
      "start_test_accuracy": float((start_logits.argmax(-1) == labels).mean()),
      **{
        k: summary[k]
        for k in (
          "num_params",
          "best_val_accuracy",
          "final_test_accuracy",
          "steps",
          "epochs",
          "train_seconds",
          "images_per_second",
        )
      },
    }
    if stage != "cnn_continued":
      record["layers"] = _centre_stats(init["params"], load_best(workdir / stage)["params"])
    results["finetune"][stage] = record

  (workdir / "conversion.json").write_text(json.dumps(results, indent=1) + "\n")
  return results


# ----------------------------------------------------------------------------------------------
# The T-CNN study: fine-tuned CNN vs T-CNN vs the hybrid from scratch, clean and corrupted.


def arm_config(config, arm: str, seed: int):
  """The trainer config of ``"cnn"`` or an arm of :data:`FINETUNE_ARMS` for ``seed``.

  ``cnn``: the config's model for ``cnn_epochs`` epochs. ``cnn_finetune``: the same model for
  ``finetune_epochs`` at ``finetune_lr``. ``tcnn``, ``tcnn_open_gate``: an AttentionCNN with the
  ``attention_layers`` as GPSA (the CNN's other fields), ``finetune_epochs`` at ``finetune_lr``.
  ``hybrid_scratch``: that AttentionCNN with ConViT's local initialisation
  (``scratch_locality_strength``, gate ``open_gate_init``) for ``cnn_epochs + finetune_epochs``
  at the CNN's learning rate. Every run has ``seed`` as its seed; the data split is the config's.

  Raises:
    ValueError: if ``arm`` is neither ``"cnn"`` nor an arm of :data:`FINETUNE_ARMS`.
  """
  import ml_collections

  if arm != "cnn" and arm not in FINETUNE_ARMS:
    raise ValueError(f"arm: expected 'cnn' or one of {FINETUNE_ARMS}, got {arm!r}")
  run = ml_collections.ConfigDict(config.to_dict())
  del run["conversion"]
  c = config.conversion
  run.seed = int(seed)
  epochs = {
    "cnn": c.cnn_epochs,
    "hybrid_scratch": c.cnn_epochs + c.finetune_epochs,
  }.get(arm, c.finetune_epochs)
  if epochs > 0:  # else the config's num_train_steps (smoke runs)
    run.num_epochs = epochs
  if arm in ("cnn_finetune", "tcnn", "tcnn_open_gate"):
    run.learning_rate = c.finetune_lr
  if arm in ("tcnn", "tcnn_open_gate", "hybrid_scratch"):
    fields = run.model.to_dict()
    fields.update(
      name="attention_cnn",
      encoding="gpsa",
      attention_layers=tuple(c.attention_layers),
      qk_features=int(c.qk_features),
      gate_init=float(c.gate_init if arm == "tcnn" else c.open_gate_init),
    )
    if arm == "hybrid_scratch":
      fields["locality_strength"] = float(c.scratch_locality_strength)
    run.model = ml_collections.ConfigDict(fields)
  return run


def _gate_stats(params: Any) -> dict[str, Any]:
  """Per GPSA layer: the gates and the content weights ``sigmoid(-gate)`` (mean, max)."""
  import numpy as np

  stats = {}
  for name in sorted(params):
    layer = params[name]
    if isinstance(layer, dict) and "gate" in layer:
      gate = np.asarray(layer["gate"], np.float64)
      weight = 1.0 / (1.0 + np.exp(gate))
      stats[name] = {
        "gate": np.round(gate, 4).tolist(),
        "content_weight_mean": float(weight.mean()),
        "content_weight_max": float(weight.max()),
      }
  return stats


def _accuracy_fn(model, dataset, batch_size: int = 500):
  """``(variables, images uint8, labels) -> accuracy``, one compiled forward pass per model."""
  import jax
  import numpy as np

  from experiments import input_pipeline

  @jax.jit
  def logits_fn(v, x):
    return model.apply(v, input_pipeline.normalize(x, dataset.mean, dataset.std), train=False)

  def accuracy(variables, images, labels) -> float:
    correct = 0
    for i in range(0, images.shape[0], batch_size):
      logits = np.asarray(logits_fn(variables, images[i : i + batch_size]))
      correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / images.shape[0]

  return accuracy


def _paired(per_seed: dict, a: str, b: str, metrics: list[str]) -> dict[str, Any]:
  from experiments.intervals import t_interval

  seeds = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
  if not seeds:
    return {}
  return {m: t_interval([per_seed[a][s][m] - per_seed[b][s][m] for s in seeds]) for m in metrics}


def run_finetune(config, workdir: str | os.PathLike, *, dataset=None) -> dict[str, Any]:
  """Runs (or resumes) the T-CNN study and returns its results (also
  ``<workdir>/conversion_finetune.json``); see ``experiments/configs/conversion.py``.

  Returns:
    ``{"dataset", "device", "device_kind", "settings", "metrics", "runs": {arm: {seed: record}},
    "summary": {arm: {metric or "start_test_accuracy": t_interval}},
    "paired": {"a - b": {metric: t_interval}}}`` with
    ``arm`` in ``("cnn", *arms)`` and a record ``{"clean", "corruptions": {key: accuracy},
    "translations": {key: {direction: accuracy}}, "mean_corrupted", "best_val_accuracy",
    "final_test_accuracy", "steps", "epochs", "train_seconds", "cpu_seconds", "num_params",
    "start_test_accuracy", ...}`` (``start_test_accuracy``: the test accuracy at step 0, of the
    given start for the fine-tuned arms, of the trainer's initialisation from the seed for the
    CNN and ``hybrid_scratch``); GPSA arms add ``gates`` (``start``, ``end``).
  """
  import jax
  import numpy as np

  from attnconv.models.conv_init import transformed_cnn_from_cnn
  from experiments import corruptions
  from experiments import train as train_lib
  from experiments.intervals import t_interval

  c = config.conversion
  arms = tuple(c.arms)
  unknown = [a for a in arms if a not in FINETUNE_ARMS]
  if unknown:
    raise ValueError(f"config.conversion.arms: expected names from {FINETUNE_ARMS}, got {unknown}")
  workdir = pathlib.Path(workdir)
  seeds = [int(s) for s in c.seeds]
  if dataset is None:
    dataset = train_lib.load_dataset_from_config(arm_config(config, "cnn", seeds[0]))
  images, labels = dataset.test_images, dataset.test_labels

  # One model and one compiled forward per arm (the arms' models do not depend on the seed).
  models = {
    arm: train_lib._build_model(arm_config(config, arm, seeds[0]), dataset.num_classes)
    for arm in ("cnn", *arms)
  }
  accuracy = {arm: _accuracy_fn(model, dataset) for arm, model in models.items()}

  def start_of(arm: str, run_config, init: Any, record: dict) -> Any:
    """The step-0 variables (``init``, or the trainer's initialisation from the seed); their
    test accuracy goes into ``record["start_test_accuracy"]``."""
    if init is None:
      init = train_lib.initial_variables(run_config, models[arm], dataset.image_shape)
    record["start_test_accuracy"] = accuracy[arm](init, images, labels)
    return init

  trained: dict[str, dict[int, tuple[Any, dict]]] = {}  # arm -> seed -> (variables, record)
  for seed in seeds:
    cnn_config = arm_config(config, "cnn", seed)
    summary = train_lib.train_and_evaluate(
      cnn_config, workdir / "cnn" / f"s{seed}", dataset=dataset
    )
    best = load_best(workdir / "cnn" / f"s{seed}")
    record = _run_record(summary)
    start_of("cnn", cnn_config, None, record)
    trained.setdefault("cnn", {})[seed] = (best, record)
    for arm in arms:
      run_config = arm_config(config, arm, seed)
      init = None
      if arm == "cnn_finetune":
        init = best
      elif arm in ("tcnn", "tcnn_open_gate"):
        init = transformed_cnn_from_cnn(
          best,
          layers=tuple(c.attention_layers),
          alpha=float(c.alpha),
          gate_init=float(c.gate_init if arm == "tcnn" else c.open_gate_init),
          qk_features=int(c.qk_features),
          rng=jax.random.key(seed),
        )
      path = workdir / arm / f"s{seed}"
      summary = train_lib.train_and_evaluate(run_config, path, dataset=dataset, init_variables=init)
      variables = load_best(path)
      record = _run_record(summary)
      start = start_of(arm, run_config, init, record)
      if arm != "cnn_finetune":
        record["gates"] = {
          "start": _gate_stats(start["params"]),
          "end": _gate_stats(variables["params"]),
        }
      trained.setdefault(arm, {})[seed] = (variables, record)

  # Clean and corrupted test accuracy of every best checkpoint.
  for arm, runs in trained.items():
    for variables, record in runs.values():
      record["clean"] = accuracy[arm](variables, images, labels)
      record["corruptions"], record["translations"] = {}, {}
  order = {name: i for i, name in enumerate(corruptions.CORRUPTIONS)}
  names = sorted(c.corruptions, key=lambda k: order.get(k, -1))  # in CORRUPTIONS' order
  suite = corruptions.corruption_suite({k: tuple(c.corruptions[k]) for k in names})
  keys = list(dict.fromkeys(key for key, *_ in suite))
  for key, name, severity, direction in suite:
    corrupted = corruptions.corrupt(
      images, name, severity, seed=int(c.corruption_seed), direction=direction
    )
    for arm, runs in trained.items():
      for variables, record in runs.values():
        acc = accuracy[arm](variables, corrupted, labels)
        if name == "translate":
          record["translations"].setdefault(key, {})[f"{direction[0]},{direction[1]}"] = acc
        else:
          record["corruptions"][key] = acc
  for runs in trained.values():
    for _, record in runs.values():
      for key, by_direction in record["translations"].items():
        record["corruptions"][key] = float(np.mean(list(by_direction.values())))
      record["corruptions"] = {k: record["corruptions"][k] for k in keys}
      record["mean_corrupted"] = float(np.mean(list(record["corruptions"].values())))

  metrics = ["clean", *keys, "mean_corrupted"]
  per_seed = {
    arm: {
      seed: {
        m: record[m] if m in ("clean", "mean_corrupted") else record["corruptions"][m]
        for m in metrics
      }
      for seed, (_, record) in runs.items()
    }
    for arm, runs in trained.items()
  }
  reference = str(c.reference_arm)
  comparisons = [(a, reference) for a in arms if a != reference]
  comparisons += [tuple(p) for p in c.get("extra_comparisons", ()) if set(p) <= set(arms)]
  device = jax.devices()[0]
  results = {
    "dataset": config.dataset.name,
    "device": f"{device.platform} x{jax.device_count()}",
    "device_kind": device.device_kind,
    "settings": json.loads(json.dumps(c.to_dict())),
    "metrics": metrics,
    "runs": {
      arm: {str(seed): record for seed, (_, record) in runs.items()}
      for arm, runs in trained.items()
    },
    "summary": {
      arm: {
        **{m: t_interval([v[m] for v in seeds_.values()]) for m in metrics},
        "start_test_accuracy": t_interval(
          [record["start_test_accuracy"] for _, record in trained[arm].values()]
        ),
      }
      for arm, seeds_ in per_seed.items()
    },
    "paired": {f"{a} - {b}": _paired(per_seed, a, b, metrics) for a, b in comparisons},
  }
  (workdir / "conversion_finetune.json").write_text(json.dumps(results, indent=1) + "\n")
  return results


def _run_record(summary: dict) -> dict[str, Any]:
  keys = (
    "num_params",
    "best_val_accuracy",
    "final_test_accuracy",
    "steps",
    "epochs",
    "train_seconds",
  )
  # A summary written before the trainer recorded CPU time has none: None, not a KeyError.
  return {**{k: summary[k] for k in keys}, "cpu_seconds": summary.get("cpu_seconds")}


def format_finetune(results: dict[str, Any]) -> str:
  """The T-CNN study's summary and paired differences as text."""

  from experiments.intervals import interval_text

  lines = ["test accuracy (%), mean [95% t interval] over seeds"]
  for arm, metrics in results["summary"].items():
    row = "  ".join(f"{m}: {interval_text(v, 100.0, '.2f')}" for m, v in metrics.items())
    lines.append(f"  {arm:16s} {row}")
  lines.append("paired differences (accuracy points), mean [95% t interval]")
  for name, metrics in results["paired"].items():
    row = "  ".join(f"{m}: {interval_text(v, 100.0, '+.2f')}" for m, v in metrics.items())
    lines.append(f"  {name:34s} {row}")
  return "\n".join(lines)


def format_finetune_markdown(results: dict[str, Any]) -> str:
  """The T-CNN study as Markdown tables (``--markdown``; the form ``docs/experiments.md``
  quotes): per arm the parameter count, epochs, test accuracy at step 0 and of the
  best-validation checkpoint, clean and under each corruption (%, mean +- std over seeds); the
  paired differences (accuracy points, mean [95% t interval]); for the GPSA arms, the content
  weight sigmoid(-gate) per layer at step 0 and at the best checkpoint (mean over heads and
  seeds)."""
  import numpy as np

  metrics = results["metrics"]

  def pct(v: dict[str, Any]) -> str:
    return f"{100 * v['mean']:.2f}" + ("" if v["std"] is None else f" ± {100 * v['std']:.2f}")

  from experiments.intervals import interval_text

  seeds = len(next(iter(results["runs"].values()), {}))
  lines = [
    f"Test accuracy (%), mean ± std over {seeds} seeds; at step 0: the network each arm starts "
    "from.",
    "",
    "| arm | params | epochs | at step 0 | " + " | ".join(metrics) + " |",
    "|---" * (len(metrics) + 4) + "|",
  ]
  for arm, summary in results["summary"].items():
    runs = list(results["runs"][arm].values())
    epochs = np.mean([r["epochs"] for r in runs])
    lines.append(
      f"| `{arm}` | {runs[0]['num_params']:,} | {epochs:g} | "
      f"{pct(summary['start_test_accuracy'])} | "
      + " | ".join(pct(summary[m]) for m in metrics)
      + " |"
    )
  lines += [
    "",
    "Paired differences (accuracy points), mean [95 % t interval over seeds].",
    "",
    "| difference | " + " | ".join(metrics) + " |",
    "|---" * (len(metrics) + 1) + "|",
  ]
  for name, by_metric in results["paired"].items():
    if by_metric:
      lines.append(
        f"| {name} | "
        + " | ".join(interval_text(by_metric[m], 100.0, "+.2f") for m in metrics)
        + " |"
      )
  gated = {
    arm: runs for arm, runs in results["runs"].items() if "gates" in next(iter(runs.values()))
  }
  if gated:
    lines += [
      "",
      "Content weight sigmoid(−gate) per GPSA layer, mean over heads and seeds (max over heads "
      "and seeds): at step 0 → at the best checkpoint.",
      "",
      "| arm | layer | at step 0 | best checkpoint |",
      "|---|---|---|---|",
    ]
    for arm, runs in gated.items():
      for layer in next(iter(runs.values()))["gates"]["start"]:
        cells = []
        for when in ("start", "end"):
          stats = [r["gates"][when][layer] for r in runs.values()]
          mean = np.mean([g["content_weight_mean"] for g in stats])
          high = np.max([g["content_weight_max"] for g in stats])
          cells.append(f"{mean:.3g} ({high:.3g})")
        lines.append(f"| `{arm}` | {layer} | {cells[0]} | {cells[1]} |")
  return "\n".join(lines) + "\n"


def plot_finetune(results: dict[str, Any], path: str | os.PathLike) -> None:
  """Accuracy per metric (clean, each corruption, their mean) for every arm, and the paired
  differences with 95% intervals, into ``path``."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  metrics = results["metrics"]
  x = np.arange(len(metrics))
  fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.7 * len(metrics)), 7.5), sharex=True)
  panels = ((axes[0], results["summary"], "test accuracy"),)
  panels += ((axes[1], results["paired"], "paired difference"),)
  for ax, table, label in panels:
    width = 0.8 / max(len(table), 1)
    for i, (name, by_metric) in enumerate(table.items()):
      if not by_metric:
        continue
      mean = np.array([by_metric[m]["mean"] for m in metrics])
      low = np.array(
        [by_metric[m]["low"] if by_metric[m]["low"] is not None else np.nan for m in metrics]
      )
      high = np.array(
        [by_metric[m]["high"] if by_metric[m]["high"] is not None else np.nan for m in metrics]
      )
      pos = x - 0.4 + width * (i + 0.5)
      err = np.nan_to_num(np.stack([mean - low, high - mean]))
      ax.errorbar(pos, mean, yerr=err, fmt="o", ms=3, capsize=2, label=name)
    if table is results["paired"]:
      ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel(f"{label} (95% t interval)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
  axes[1].set_xticks(x, metrics, rotation=45, ha="right", fontsize=7)
  seeds = len(next(iter(results["runs"].values()), {}))
  fig.suptitle(f"T-CNN fine-tuning on {results['dataset']}: {seeds} seeds", fontsize=10)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "Root directory of the stages' runs.")
  flags.DEFINE_string(
    "out",
    "",
    "Where to copy the results (default: experiments/results/conversion.json, or "
    "conversion_finetune.json for the finetune study).",
  )
  flags.DEFINE_string(
    "plot",
    "",
    "Figure of the finetune study (default experiments/results/conversion_finetune.png).",
  )
  flags.DEFINE_string("markdown", "", "The finetune study's tables as Markdown, written here.")
  config_flags.DEFINE_config_file("config", None, "experiments/configs/conversion.py[:arg]")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  if FLAGS.config.conversion.get("study", "exactness") == "finetune":
    results = run_finetune(FLAGS.config, FLAGS.workdir)
    out = FLAGS.out or "experiments/results/conversion_finetune.json"
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(results, indent=1) + "\n")
    plot_finetune(results, FLAGS.plot or "experiments/results/conversion_finetune.png")
    print(format_finetune(results), flush=True)
    if FLAGS.markdown:
      pathlib.Path(FLAGS.markdown).write_text(format_finetune_markdown(results))
    return
  results = run(FLAGS.config, FLAGS.workdir)
  text = json.dumps(results, indent=1) + "\n"
  out = FLAGS.out or "experiments/results/conversion.json"
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(out).write_text(text)
  print(json.dumps({k: v for k, v in results.items() if k != "finetune"}, indent=1))
  for stage, record in results["finetune"].items():
    print(
      f"{stage:18s} start {record['start_test_accuracy']:.4f} -> test "
      f"{record['final_test_accuracy']:.4f} (val {record['best_val_accuracy']:.4f})"
    )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
