"""Layer normalisation over the last axis with a hand-written backward pass for bfloat16 on the CPU.

:func:`layer_norm` computes what ``flax.linen.LayerNorm`` computes with the same float32
operations in the same order (statistics ``E[x]`` and ``E[x^2] - E[x]^2`` in float32, ``y = (x -
mean) * (rsqrt(var + eps) * scale) + bias``, rounded once to the output dtype): on its own it is
bitwise flax's, forward and (float32) backward; inside a larger program XLA may fuse it
differently (e.g. contract a multiply-add), within float32 rounding. For bfloat16/float16 inputs
on the CPU the gradient is the closed form

  ``x_hat = (x - mean) * rstd``, ``g_hat = g * scale``,
  ``dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))``,
  ``dscale = sum_rows(g * x_hat)``, ``dbias = sum_rows(g)``

(two passes over the activations, the statistics recomputed from the saved input) instead of
autodiff's derivative of flax's formula, which XLA:CPU ran as several passes around a
materialised ``(B, N, D)`` broadcast of ``scale``. Other dtypes and backends use autodiff of the
flax formula (float32 programs unchanged).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from attnconv import matmul as mm

Array = jax.Array


def _stats(x: Array) -> tuple[Array, Array]:
  """flax's fast statistics over the last axis, in float32: ``(mean, var)`` with a kept axis."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = lax.square(xf)  # before the mean, as flax orders it (same gradient summation order)
  mean, mean2 = xf.mean(-1), sq.mean(-1)
  var = jnp.maximum(0.0, mean2 - lax.square(mean))
  return jnp.expand_dims(mean, -1), jnp.expand_dims(var, -1)


def _normalize(x: Array, scale: Array, bias: Array, epsilon: float, dtype) -> Array:
  mean, var = _stats(x)
  y = x - mean
  y = y * (lax.rsqrt(var + epsilon) * scale)
  return (y + bias).astype(dtype)


def layer_norm(x: Array, scale: Array, bias: Array, *, epsilon: float = 1e-6, dtype=None) -> Array:
  """Layer normalisation of ``x (..., D)`` over its last axis, with ``scale`` and ``bias (D,)``.

  Returns ``(..., D)`` in ``dtype`` (default: ``x``'s). The forward pass equals
  ``flax.linen.LayerNorm(epsilon=epsilon, dtype=dtype)`` bitwise; see the module docstring for
  the gradient.
  """
  d = x.shape[-1]
  for name, p in (("scale", scale), ("bias", bias)):
    if p.shape != (d,):
      raise ValueError(f"{name}: expected shape ({d},) for x of shape {x.shape}, got {p.shape}")
  dtype = jnp.dtype(dtype or x.dtype)
  if mm.low_precision_cpu(x):
    return _layer_norm(x, scale, bias, epsilon, dtype)
  return _normalize(x, scale, bias, epsilon, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon, dtype):
  return _normalize(x, scale, bias, epsilon, dtype)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  return _normalize(x, scale, bias, epsilon, dtype), (x, scale, bias)


def _layer_norm_bwd(epsilon, dtype, res, g):
  x, scale, bias = res
  mean, var = _stats(x)
  rstd = lax.rsqrt(var + epsilon)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  gf = g.astype(jnp.float32)
  # (a barrier on scale: otherwise XLA shares one materialised (..., D) broadcast of it with the
  # forward pass)
  g_hat = gf * lax.optimization_barrier(scale).astype(jnp.float32)
  c1 = jnp.mean(g_hat, axis=-1, keepdims=True)
  c2 = jnp.mean(g_hat * x_hat, axis=-1, keepdims=True)
  dx = (rstd * (g_hat - c1 - x_hat * c2)).astype(x.dtype)
  dscale, dbias = mm.leading_sum(gf * x_hat, 1), mm.leading_sum(gf, 1)
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
