"""Module calls compiled as one program.

A module called outside ``jax.jit`` dispatches (and compiles) every operation on its own, which
dominates the run time of small tests; under ``jax.jit`` the whole call is one XLA program.
Array arguments (and ``rngs``) are traced, every other keyword is static.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def init(model: nn.Module, rngs: Any, *args: Any, **static: Any) -> Any:
  """``model.init(rngs, *args, **static)`` under ``jax.jit``."""
  return jax.jit(lambda r, a: model.init(r, *a, **static))(rngs, args)


def apply(model: nn.Module, variables: Any, *args: Any, rngs: Any = None, **static: Any) -> Any:
  """``model.apply(variables, *args, rngs=rngs, **static)`` under ``jax.jit``."""
  return jax.jit(lambda v, a, r: model.apply(v, *a, rngs=r, **static))(variables, args, rngs)
