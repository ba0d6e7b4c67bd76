"""Shared test configuration.

Hypothesis profiles (select with ``ATTNCONV_HYPOTHESIS_PROFILE``):

* ``ci`` (default): deterministic (derandomized, no example database), few
  examples, no deadline -- the same examples on every run.
* ``dev``: more examples, still no deadline, random seeds.
* ``sweep``: long local sweeps (hundreds of examples per property).

Several fake CPU devices are requested so that sharding code paths run on CPU. The numerics
policy is strict: implicit rank promotion raises (``jax_numpy_rank_promotion="raise"``), and
every warning is an error (``filterwarnings`` in pyproject.toml, with commented ignores for
third-party noise).
"""

import os

# 4 CPU devices for the sharding tests; LLVM optimisation level 0 for the many tiny programs the
# tests compile (compilation dominates their run time and drops by about a third; every
# comparison in a test is between programs compiled under the same flags).
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
  "ci",
  max_examples=12,
  derandomize=True,
  database=None,
  deadline=None,
  print_blob=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
  "dev",
  max_examples=60,
  deadline=None,
  print_blob=True,
  suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
  "sweep",
  max_examples=500,
  deadline=None,
  print_blob=True,
  suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("ATTNCONV_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
  if os.environ.get("ATTNCONV_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: set ATTNCONV_SLOW=1 to run")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent compilation cache per test process (each xdist worker has its own).

  Many tests compile the same programs: a trainer run and its resumption, the grid runner's
  models, the receptive-field and evaluation passes over one trained run. The cache keys on the
  compiled program, so a hit returns the same executable and never changes a result.
  """
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in old.items():
    jax.config.update(name, value)


@pytest.fixture
def key():
  return jax.random.key(0)
