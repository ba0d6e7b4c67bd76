"""Command-line entry point (flags only); the loop is :func:`experiments.train.train_and_evaluate`.

Usage::

  python -m experiments.main --config=experiments/configs/<name>.py --workdir=<dir> \
    [--config.<key>=<value> ...]

Re-running the same command after an interruption resumes from the latest checkpoint in
``<workdir>/checkpoints``.

Multi-process training (JAX's distributed runtime; one process per host, or per GPU, each with
the same command line):

* ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``: explicit cluster (process
  ``I`` of ``N``; ``HOST`` is process 0's address, ``PORT`` a free port there).
* ``--distributed``: ``jax.distributed.initialize()`` finds the cluster itself (Cloud TPU pod
  slices, SLURM, Open MPI); explicitly given flags among the three above still take precedence.

On CPU, cross-process collectives go through gloo. ``<workdir>`` must be on a file system every
process sees. The global batch of a step, hence the run's results, do not depend on the number of
processes (see :mod:`experiments.train`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, metrics, summary, plots and TensorBoard events (shared by all "
  "processes).",
)
config_flags.DEFINE_config_file(
  "config", None, "Path to an experiment config file (experiments/configs/*.py).", lock_config=True
)
flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process, in [0, num_processes).")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() and let JAX detect the cluster (TPU pods, SLURM, Open MPI).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # quiet orbax INFO lines unless -v is given
    absl_logging.set_verbosity(absl_logging.WARNING)
  import json

  from experiments.train import initialize_distributed, train_and_evaluate  # touches no device

  initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
  )

  import jax

  print(
    f"JAX process {jax.process_index()} of {jax.process_count()}: local devices "
    f"{jax.local_devices()}, {jax.device_count()} in all",
    flush=True,
  )
  summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2, default=str), flush=True)


if __name__ == "__main__":
  app.run(main)
