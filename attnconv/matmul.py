"""Low-precision matrix products that run on the CPU's bfloat16 units, forward and backward.

On x86 CPUs with ``avx512_bf16`` (AMD Zen 4, Intel Sapphire Rapids), XLA:CPU runs a bfloat16
product at about twice the float32 rate **only** when it accumulates in float32
(``preferred_element_type=float32``) and both operands are row-major with the left one contracted
on its last axis. A plain bfloat16 ``x @ w`` (bfloat16 result) and the gradient products autodiff
derives from it (transposed operands folded into the product) fall back to a path slower than
float32. Measured on a 2-core EPYC for the paper model's largest product (2048 x 3600 @ 3600 x 400,
``python -m experiments.benchmarks.matmul_rates``, ``experiments/results/bench_matmul.json``):
forward 381 GFLOP/s with this module against 137 for plain bfloat16 and 190 for float32; forward
plus both gradients 307 against 151 and 189.

:func:`matmul` is ``a @ b`` with a custom VJP that keeps all three products on the fast form:

* forward ``y = a @ b``, accumulated in float32, rounded once to ``out_dtype``;
* ``da = g @ (b^T)`` and ``db = (a^T) @ g``, with ``b^T`` and ``a^T`` materialised in row-major
  order (copies that XLA cannot fold into the products: a folded transpose selects the slow path).

The cotangent ``g`` is rounded to the operands' dtype first (as mixed-precision training does for
every bfloat16 activation). For float32 (or any non-16-bit) operands, and off the CPU, it is
exactly ``jnp.matmul`` -- bitwise the same program as before. :func:`dot_general` wraps it in the
signature of ``flax.linen.Dense(dot_general=...)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _use_fast_path(a: Array, b: Array) -> bool:
  return (
    jnp.dtype(a.dtype) in LOW_PRECISION
    and jnp.dtype(b.dtype) == jnp.dtype(a.dtype)
    and a.ndim >= 2
    and b.ndim == 2
    and jax.default_backend() == "cpu"
  )


def physical_transpose(x: Array) -> Array:
  """``x.T`` for a matrix, as a real copy in row-major order.

  XLA folds a plain transpose into the layout of the product that consumes it; reshaping the
  transposed array to 1-D behind an optimisation barrier forces the row-major copy.
  """
  m, n = x.shape
  return lax.optimization_barrier(x.T.reshape(m * n)).reshape(n, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(a: Array, b: Array, out_dtype) -> Array:
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _matmul_2d_fwd(a, b, out_dtype):
  return _matmul_2d(a, b, out_dtype), (a, b)


def _matmul_2d_bwd(out_dtype, res, g):
  a, b = res
  g = g.astype(a.dtype)
  da = jnp.dot(g, physical_transpose(b), preferred_element_type=jnp.float32).astype(a.dtype)
  db = jnp.dot(physical_transpose(a), g, preferred_element_type=jnp.float32).astype(b.dtype)
  return da, db


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(a: Array, b: Array, *, out_dtype=None, precision=None) -> Array:
  """``a @ b`` for ``a (..., k)`` and a matrix ``b (k, n)``; returns ``(..., n)`` in ``out_dtype``.

  Low-precision operands on the CPU take the custom-VJP path of the module docstring (float32
  accumulation, one rounding to ``out_dtype``, default ``a.dtype``); everything else is
  ``jnp.matmul(a, b, preferred_element_type=out_dtype)``.
  """
  if not _use_fast_path(a, b):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)
  if a.shape[-1] != b.shape[0]:
    raise ValueError(
      f"b: expected {a.shape[-1]} rows to match a of shape {a.shape}, got shape {b.shape}"
    )
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  lead = a.shape[:-1]
  y = _matmul_2d(a.reshape(-1, a.shape[-1]), b, out_dtype)
  return y.reshape(*lead, b.shape[1])


def dot_general(
  lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None
) -> Array:
  """``lax.dot_general`` that routes ``Dense``-style products (last axis of ``lhs`` against the
  first of a matrix ``rhs``, no batch axes) through :func:`matmul`. Pass as
  ``flax.linen.Dense(dot_general=dot_general)``."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (
    tuple(lc) == (lhs.ndim - 1,)
    and tuple(rc) == (0,)
    and not tuple(lb)
    and not tuple(rb)
    and _use_fast_path(lhs, rhs)
  ):
    return matmul(lhs, rhs, out_dtype=preferred_element_type, precision=precision)
  return lax.dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
