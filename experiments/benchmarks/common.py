"""Shared benchmark harness: timing medians after warm-up, peak memory, machine description."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

# Host allocators a benchmark child can run under (see :func:`allocator_env`).
ALLOCATORS = ("system", "tcmalloc", "thp")
TCMALLOC_HINT = "sudo apt-get install libtcmalloc-minimal4"


def find_tcmalloc() -> str | None:
  """The shared-library name of tcmalloc (``libtcmalloc_minimal`` or ``libtcmalloc``), or None."""
  import ctypes.util

  for name in ("tcmalloc_minimal", "tcmalloc"):
    lib = ctypes.util.find_library(name)
    if lib:
      return lib
  return None


def allocator_env(name: str, env: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a child process that runs under host allocator ``name``.

  XLA:CPU allocates a step's temporary buffers (one arena of up to gigabytes) afresh at every
  execution; glibc serves allocations above 32 MiB by ``mmap``, so every step first-touches the
  whole arena again in 4 KiB page faults (``page_faults_per_step`` in the benchmark rows).
  ``tcmalloc`` (``LD_PRELOAD``) keeps freed memory mapped and hands it back to the next step;
  ``thp`` (glibc >= 2.35 ``glibc.malloc.hugetlb=1``) asks for transparent huge pages, 512 times
  fewer faults; ``system`` leaves the environment as it is.

  Args:
    name: one of :data:`ALLOCATORS`.
    env: the environment to extend (default: ``os.environ``).

  Raises:
    ValueError: unknown ``name``.
    FileNotFoundError: ``tcmalloc`` requested but not installed.
  """
  if name not in ALLOCATORS:
    raise ValueError(f"allocator: expected one of {ALLOCATORS}, got {name!r}")
  env = dict(os.environ if env is None else env)
  if name == "tcmalloc":
    lib = find_tcmalloc()
    if lib is None:
      raise FileNotFoundError(f"allocator 'tcmalloc': libtcmalloc not found ({TCMALLOC_HINT})")
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
  elif name == "thp":
    env["GLIBC_TUNABLES"] = ":".join(
      p for p in (env.get("GLIBC_TUNABLES", ""), "glibc.malloc.hugetlb=1") if p
    )
  return env


def machine_info() -> dict[str, Any]:
  """CPU/GPU model, core count, library versions."""
  import flax
  import optax

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "command": " ".join([os.path.basename(sys.executable), "-m", *sys.argv]),
  }


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
  """Median and spread of wall time (seconds) of ``fn()`` (blocking on its result)."""
  return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


def time_interleaved(
  fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 5
) -> dict[str, dict[str, float]]:
  """:func:`time_fn` of several variants with their repeats interleaved (round-robin).

  On a shared machine slow periods last seconds; timing the variants one after another puts
  whole variants into them, interleaving spreads a slow period over all of them, so the ratios
  between variants stay stable.
  """
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


def peak_memory_of(code: str, timeout: float = 1800) -> float | None:
  """Peak resident memory (GiB) of a fresh Python process running ``code`` (CPU runs).

  Measuring in a subprocess isolates each configuration's peak (ru_maxrss of the child).
  """
  wrapper = (
    code
    + "\nimport resource, sys\n"
    + "sys.stdout.write('PEAK_KB=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
  )
  try:
    out = subprocess.run(
      [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout, check=False
    )
  except subprocess.TimeoutExpired:
    return None
  for line in out.stdout.splitlines():
    if line.startswith("PEAK_KB="):
      return int(line.split("=")[1]) / 2**20
  sys.stderr.write(out.stderr[-2000:])
  return None


def device_peak_memory() -> float | None:
  """Peak device memory (GiB) on accelerators that report it, else None."""
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return None


def self_peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
  body = ""
  for r in rows:
    cells = []
    for c in columns:
      v = r.get(c, "")
      cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    body += "| " + " | ".join(cells) + " |\n"
  return head + body
