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


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
) -> bool:
  """Starts JAX's distributed runtime if asked; call it before anything touches the devices.

  Args:
    coordinator_address: ``"HOST:PORT"`` of process 0's coordinator service.
    num_processes: number of processes, >= 1.
    process_id: this process's index in ``[0, num_processes)``.
    auto: let ``jax.distributed.initialize`` detect the cluster (the three arguments above,
      where given, override what it detects).

  Returns:
    Whether the runtime was started (False: a plain single-process run, nothing given).

  Raises:
    ValueError: if only some of the three explicit arguments are given without ``auto``, or one
      is out of range.
  """
  given = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  if not auto and all(v is None for v in given.values()):
    return False
  if not auto:
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise ValueError(
        f"{missing[0]}: expected a value when any of coordinator_address, num_processes and "
        f"process_id is given (or use --distributed to detect the cluster), got None"
      )
  if coordinator_address is not None:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"coordinator_address: expected 'HOST:PORT', got {coordinator_address!r}")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes: expected an integer >= 1, got {num_processes}")
  if process_id is not None:
    upper = num_processes if num_processes is not None else None
    if process_id < 0 or (upper is not None and process_id >= upper):
      bound = f"[0, {upper})" if upper is not None else ">= 0"
      raise ValueError(f"process_id: expected an integer in {bound}, got {process_id}")

  import jax

  # Cross-process collectives of the CPU backend (the default of recent jaxlib, set explicitly).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  return True


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # quiet orbax INFO lines unless -v is given
    absl_logging.set_verbosity(absl_logging.WARNING)
  import json

  initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
  )

  import jax

  from experiments.train import train_and_evaluate

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
