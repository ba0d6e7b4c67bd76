"""Evaluate a run's checkpoint and re-draw its plots on demand.

Usage::

  python -m experiments.evaluate --workdir=<dir> [--which=latest|best|init] [--noplot]

Reads ``<workdir>/config.json``, restores the latest training checkpoint (or the best-validation
weights from ``<workdir>/best``, or rebuilds the trainer's initialisation from the run's seed
with ``--which=init``), evaluates validation and test accuracy, prints them as JSON, writes them
to ``<workdir>/evaluation_<which>.json`` and re-draws ``<workdir>/plots`` (not for ``init``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import pathlib  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

FLAGS = flags.FLAGS


def restore_variables(workdir: str | os.PathLike, *, which: str = "latest") -> tuple[int, dict]:
  """``(step, {'params', ['batch_stats']})`` of a trainer run's latest or best checkpoint."""
  import orbax.checkpoint as ocp

  if which not in ("latest", "best"):
    raise ValueError(f"which: expected 'latest' or 'best', got {which!r}")
  directory = (pathlib.Path(workdir) / ("checkpoints" if which == "latest" else "best")).absolute()
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"workdir: no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  variables = {"params": restored["params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
  return int(step), variables


def evaluate_workdir(
  workdir: str | os.PathLike, *, which: str = "latest", plot: bool = True, dataset: Any = None
) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` and evaluates it on validation and test.

  Args:
    workdir: run directory (holds ``config.json`` and ``checkpoints/`` or ``best/``).
    which: ``"latest"`` (training checkpoint), ``"best"`` (best validation accuracy) or
      ``"init"`` (the trainer's initialisation from the run's seed, step 0:
      :func:`experiments.train.initial_variables`).
    plot: re-draw ``<workdir>/plots`` (ignored for ``"init"``).
    dataset: optional pre-loaded :class:`experiments.input_pipeline.Dataset` (default: from the
      config).

  Returns:
    ``{"step", "which", "val_accuracy", "val_loss", "test_accuracy", "test_loss"}``.
  """
  import jax
  import ml_collections
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from experiments import plots
  from experiments import train as train_lib

  if which not in ("latest", "best", "init"):
    raise ValueError(f"which: expected 'latest', 'best' or 'init', got {which!r}")
  workdir = pathlib.Path(workdir)
  config_path = workdir / train_lib.CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"workdir: expected {config_path} (written by the trainer)")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if dataset is None:
    dataset = train_lib.load_dataset_from_config(config)
  model = train_lib._build_model(config, dataset.num_classes)
  if which == "init":
    step, variables = 0, train_lib.initial_variables(config, model, dataset.image_shape)
  else:
    step, variables = restore_variables(workdir, which=which)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})

  devices = jax.devices()
  batch = int(config.get("eval_batch_size", -1))
  batch = int(config.batch_size) if batch <= 0 else batch
  batch = max(len(devices), batch - batch % len(devices))
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  eval_step = jax.jit(
    train_lib._make_eval_step(model, dataset),
    in_shardings=(replicated, replicated, data_sharding, data_sharding, data_sharding),
    out_shardings=replicated,
  )
  params, batch_stats = jax.device_put((params, batch_stats), replicated)
  result: dict[str, Any] = {"step": int(step), "which": which}
  for split in ("val", "test"):
    metrics = train_lib.evaluate(
      eval_step,
      params,
      batch_stats,
      getattr(dataset, f"{split}_images"),
      getattr(dataset, f"{split}_labels"),
      batch,
      data_sharding,
    )
    result[f"{split}_accuracy"] = metrics["accuracy"]
    result[f"{split}_loss"] = metrics["loss"]
  (workdir / f"evaluation_{which}.json").write_text(json.dumps(result, indent=2) + "\n")
  if plot and which != "init":
    state = types.SimpleNamespace(params=params, batch_stats=batch_stats)
    plots.plot_workdir(workdir, model=model, state=state, dataset=dataset)
  return result


def _define_flags() -> None:
  """Command-line flags (defined only when run as a script, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A run directory written by experiments.main.")
  flags.DEFINE_enum("which", "latest", ["latest", "best", "init"], "Which weights to evaluate.")
  flags.DEFINE_bool("plot", True, "Re-draw the plots into <workdir>/plots.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  result = evaluate_workdir(FLAGS.workdir, which=FLAGS.which, plot=FLAGS.plot)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
