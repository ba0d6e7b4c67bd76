"""Content attention through jax.nn.dot_product_attention equals the explicit-softmax path."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv.layers import MultiHeadRelativeAttention

CONTENT = ("content", "learned_content", "quadratic_content")


@given(
  encoding=st.sampled_from(CONTENT),
  h=st.integers(1, 5),
  w=st.integers(2, 6),
  heads=st.integers(1, 3),
  features=st.sampled_from([2, 4, 6]),
  value_features=st.sampled_from([None, 3]),
  seed=st.integers(0, 2**16),
)
def test_fused_equals_explicit_float32(encoding, h, w, heads, features, value_features, seed):
  """Same logits, float32 softmax and contractions in both paths: equal up to float32 rounding
  of the D-term sums (tolerance n * eps * sum |p| |v| <= n * eps * max |v|, n = keys + features)."""
  k0, k1 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k0, (2, h, w, features))
  dk = features if value_features is None else value_features  # the fused path's condition
  if encoding == "learned_content" and dk % 2:
    dk = 2 * dk
  layer = MultiHeadRelativeAttention(
    num_heads=heads, encoding=encoding, value_features=value_features, qk_features=dk
  )
  variables = layer.init(k1, x)
  fused = layer.apply(variables, x)
  explicit = layer.clone(use_dot_product_attention=False).apply(variables, x)
  eps = np.finfo(np.float32).eps
  kernel = variables["params"]["out"]["kernel"]
  n = h * w + features + kernel.shape[1]
  bound = n * eps * (float(jnp.abs(x).max()) + 1) * float(jnp.abs(kernel).sum(axis=(0, 1)).max())
  chex.assert_trees_all_close(fused, explicit, atol=bound + 1e-6, rtol=0)

  def loss(params, use):
    out = layer.clone(use_dot_product_attention=use).apply({"params": params}, x)
    return jnp.sum(out * jnp.cos(out))

  g_fused = jax.grad(loss)(variables["params"], True)
  g_explicit = jax.grad(loss)(variables["params"], False)
  chex.assert_trees_all_close(g_fused, g_explicit, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("encoding", CONTENT)
def test_fused_bfloat16_within_a_few_ulps(encoding):
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 8))
  layer = MultiHeadRelativeAttention(num_heads=3, encoding=encoding, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(1), x)
  fused = layer.apply(variables, x).astype(jnp.float32)
  explicit = layer.clone(use_dot_product_attention=False).apply(variables, x).astype(jnp.float32)
  ulp = 2.0**-7  # bfloat16 has 8 significant bits: spacing 2^-7 in [1, 2)
  scale = float(jnp.abs(explicit).max())
  assert float(jnp.abs(fused - explicit).max()) <= 4 * ulp * max(scale, 1.0)


def test_probabilities_and_dropout_use_the_explicit_path():
  """Sowing needs the probabilities and dropout masks them: both fall back, same outputs."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  layer = MultiHeadRelativeAttention(num_heads=2, encoding="learned_content", qk_features=4)
  variables = layer.init(jax.random.key(1), x)
  y, state = layer.apply(variables, x, mutable="intermediates")
  (probs,) = state["intermediates"]["attention_probs"]
  assert probs.shape == (2, 2, 9, 9)
  np.testing.assert_allclose(y, layer.apply(variables, x), atol=1e-6)
  dropped = layer.clone(dropout_rate=0.5)
  a = dropped.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  b = dropped.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)  # masks applied (the fused path has no dropout)
