"""Shared benchmark helpers: interleaved timing medians after warm-up, the machine, JSON, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine_info() -> dict[str, Any]:
  """The machine and library versions a benchmark ran on.

  Returns:
    ``cpu`` (model name), ``cores``, ``devices`` (``platform:kind`` of each JAX device),
    ``accelerator`` (the first non-CPU device's kind, e.g. the GPU name, or None), the versions
    of python, jax, jaxlib, flax and optax, and the ``command`` line.
  """
  import flax
  import jaxlib
  import optax

  devices = jax.devices()
  accelerators = [d.device_kind for d in devices if d.platform != "cpu"]
  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
    "accelerator": accelerators[0] if accelerators else None,
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "command": " ".join([os.path.basename(sys.executable), "-m", *sys.argv]),
  }


def time_interleaved(
  fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 5
) -> dict[str, dict[str, float]]:
  """Median and spread of the wall time (seconds) of each ``fn()``, blocking on its result.

  Every variant first runs ``warmup`` times (compilation, caches); then the variants' repeats are
  interleaved (round-robin). On a shared machine slow periods last seconds; timing the variants
  one after another puts whole variants into them, interleaving spreads a slow period over all of
  them, so the ratios between variants stay stable.

  Args:
    fns: name -> a function of no arguments returning JAX arrays.
    warmup: untimed calls of each variant first.
    repeats: timed calls of each variant.

  Returns:
    name -> ``{"median_s", "min_s", "max_s"}``.
  """
  if repeats < 1:
    raise ValueError(f"repeats: expected a positive integer, got {repeats!r}")
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {
    name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
    for name, ts in times.items()
  }


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` as indented JSON, creating the parent directory."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """A Markdown table of ``rows`` (floats to 3 significant digits, missing columns empty)."""
  head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
  body = ""
  for r in rows:
    cells = []
    for c in columns:
      v = r.get(c, "")
      cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    body += "| " + " | ".join(cells) + " |\n"
  return head + body
