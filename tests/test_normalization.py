"""``attnconv.normalization.layer_norm`` / ``layers.LayerNorm`` against ``flax.linen.LayerNorm``
(bitwise where the arithmetic is the same) and the closed-form bfloat16 gradient against a float64
reference (tolerance from the dtypes' machine epsilons)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import normalization
from attnconv.layers import LayerNorm

BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
F32_EPS = float(jnp.finfo(jnp.float32).eps)


def _inputs(seed, lead, d, dtype):
  rng = np.random.default_rng(seed)
  # rows with |mean| <= 3 std: the float32 E[x^2] - E[x]^2 cancellation stays below 10 eps_f32
  x = rng.normal(size=(*lead, d)) * rng.uniform(0.5, 4.0) + rng.uniform(-3, 3)
  g = rng.normal(size=x.shape)
  scale, bias = rng.normal(size=d), rng.normal(size=d)
  return (
    jnp.asarray(a, t)
    for a, t in ((x, dtype), (g, dtype), (scale, jnp.float32), (bias, jnp.float32))
  )


def _variables(scale, bias):
  return {"params": {"scale": scale, "bias": bias}}


@given(
  st.lists(st.integers(1, 5), min_size=1, max_size=3),
  st.integers(2, 48),
  st.sampled_from([1e-12, 1e-6, 1e-3]),
  st.sampled_from([jnp.float32, jnp.bfloat16]),
  st.integers(0, 2**31 - 1),
)
def test_forward_and_float32_gradients_are_flax(lead, d, eps, dtype, seed):
  x, g, scale, bias = _inputs(seed, lead, d, dtype)
  variables = _variables(scale, bias)
  ref, mine = nn.LayerNorm(epsilon=eps, dtype=dtype), LayerNorm(epsilon=eps, dtype=dtype)
  chex.assert_trees_all_equal(mine.init(jax.random.key(0), x), ref.init(jax.random.key(0), x))
  out = mine.apply(variables, x)
  chex.assert_trees_all_equal(out, ref.apply(variables, x))
  if dtype == jnp.float32:
    grads = [
      jax.grad(lambda v, x, m=m: jnp.vdot(m.apply(v, x), g), argnums=(0, 1))(variables, x)
      for m in (ref, mine)
    ]
    chex.assert_trees_all_equal(*grads)


@given(
  st.lists(st.integers(1, 5), min_size=1, max_size=3),
  st.integers(2, 64),
  st.sampled_from([1e-12, 1e-6]),
  st.integers(0, 2**31 - 1),
)
def test_bfloat16_gradient_is_the_closed_form(lead, d, eps, seed):
  """bfloat16 on the CPU: the custom backward equals the exact float64 derivative of the layer
  at the same bfloat16 inputs, within ``eps_bf16 / 2`` (one rounding of dx) plus the float32
  arithmetic: ``c D eps_f32`` relative on each term (row means, the statistics, rstd)."""
  x, g, scale, bias = _inputs(seed, lead, d, jnp.bfloat16)
  dx, dscale, dbias = jax.grad(
    lambda x, s, b: jnp.vdot(
      normalization.layer_norm(x, s, b, epsilon=eps).astype(jnp.float32), g.astype(jnp.float32)
    ),
    argnums=(0, 1, 2),
  )(x, scale, bias)
  chex.assert_trees_all_equal_dtypes((dx, dscale, dbias), (x, scale, bias))
  x64, g64, s64 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, g, scale))
  mean = x64.mean(-1, keepdims=True)
  var = x64.var(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(var + eps)
  x_hat = (x64 - mean) * rstd
  g_hat = g64 * s64
  c1, c2 = g_hat.mean(-1, keepdims=True), (g_hat * x_hat).mean(-1, keepdims=True)
  want = rstd * (g_hat - c1 - x_hat * c2)
  size = rstd * (
    np.abs(g_hat)
    + np.abs(g_hat).mean(-1, keepdims=True)
    + np.abs(x_hat) * np.abs(g_hat * x_hat).mean(-1, keepdims=True)
  )
  rel = 4 * (d + 10 + (mean**2 / np.maximum(var, 1e-30)).max()) * F32_EPS
  err = np.abs(np.asarray(dx.astype(jnp.float32), np.float64) - want)
  assert np.all(err <= BF16_EPS / 2 * np.abs(want) + rel * size)
  rows = tuple(range(x64.ndim - 1))
  n = int(np.prod(x64.shape[:-1]))
  np.testing.assert_array_less(
    np.abs(np.asarray(dbias) - g64.sum(rows)), 2 * n * F32_EPS * np.abs(g64).sum(rows) + 1e-30
  )
  want_s = (g64 * x_hat).sum(rows)
  bound_s = (2 * n + rel / F32_EPS) * F32_EPS * np.abs(g64 * x_hat).sum(rows) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(dscale) - want_s), bound_s)


def test_layer_norm_rejects_a_scale_of_the_wrong_shape():
  with pytest.raises(
    ValueError, match=r"scale: expected shape \(4,\) for x of shape \(2, 4\), got \(3,\)"
  ):
    normalization.layer_norm(jnp.zeros((2, 4)), jnp.ones(3), jnp.zeros(4))
