"""A CNN run exactly as self-attention (Theorem 1 in practice), then fine-tuned as free attention.

Usage::

  python -m experiments.conversion --config=experiments/configs/conversion.py \
    --workdir=runs/conversion [--out=experiments/results/conversion.json]

See ``experiments/configs/conversion.py`` for the stages. Every training stage is a
:func:`experiments.train.train_and_evaluate` run in its own sub-directory, so rerunning the command
after a kill resumes the unfinished stage and skips the finished ones.
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
  """``{'params', 'batch_stats'}`` of the best-validation checkpoint of a trainer run."""
  from experiments.evaluate import restore_variables

  return restore_variables(workdir, which="best")[1]


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


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "Root directory of the stages' runs.")
  flags.DEFINE_string("out", "experiments/results/conversion.json", "Where to copy the results.")
  config_flags.DEFINE_config_file("config", None, "experiments/configs/conversion.py")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  results = run(FLAGS.config, FLAGS.workdir)
  text = json.dumps(results, indent=1) + "\n"
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(text)
  print(json.dumps({k: v for k, v in results.items() if k != "finetune"}, indent=1))
  for stage, record in results["finetune"].items():
    print(
      f"{stage:18s} start {record['start_test_accuracy']:.4f} -> test "
      f"{record['final_test_accuracy']:.4f} (val {record['best_val_accuracy']:.4f})"
    )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
