"""Command-line entry point (flags only); the loop is :func:`experiments.train.train_and_evaluate`.

Usage::

  python -m experiments.main --config=experiments/configs/<name>.py --workdir=<dir> \
    [--config.<key>=<value> ...]

Re-running the same command after an interruption resumes from the latest checkpoint in
``<workdir>/checkpoints``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary and plots.")
config_flags.DEFINE_config_file(
  "config", None, "Path to an experiment config file (experiments/configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # quiet orbax INFO lines unless -v is given
    absl_logging.set_verbosity(absl_logging.WARNING)
  import json

  import jax

  from experiments.train import train_and_evaluate

  print(f"JAX devices: {jax.devices()}", flush=True)
  summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(json.dumps(summary, indent=2, default=str), flush=True)


if __name__ == "__main__":
  app.run(main)
