"""Attention dropout with one mask per step shared by the batch (position-only encodings)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv import attention as attn
from attnconv.layers import MultiHeadRelativeAttention


@pytest.mark.parametrize("encoding", ["quadratic", "learned", "generalized"])
def test_shared_mask_equals_masked_probabilities_and_is_batch_independent(encoding):
  x1 = jax.random.normal(jax.random.key(0), (1, 4, 5, 3))
  x = jnp.concatenate([x1, x1, 2 * x1])  # examples 0 and 1 identical
  layer = MultiHeadRelativeAttention(
    num_heads=2, encoding=encoding, dropout_rate=0.3, shared_dropout_mask=True
  )
  variables = layer.init(jax.random.key(1), x)
  rng = jax.random.key(7)
  y = layer.apply(variables, x, deterministic=False, rngs={"dropout": rng})
  probs = layer.apply(variables, (4, 5), method=layer.position_probabilities)
  np.testing.assert_array_equal(y[0], y[1])  # same input, same mask
  np.testing.assert_allclose(
    y[2] - variables["params"]["out"]["bias"],
    2 * (y[0] - variables["params"]["out"]["bias"]),
    rtol=1e-5,
    atol=1e-5,
  )
  per_example = layer.clone(shared_dropout_mask=False).apply(
    variables, x, deterministic=False, rngs={"dropout": rng}
  )
  assert not np.allclose(per_example[0], per_example[1])  # independent masks
  # Evaluation is unaffected.
  np.testing.assert_array_equal(
    layer.apply(variables, x), layer.clone(shared_dropout_mask=False).apply(variables, x)
  )
  assert probs.shape == (2, 20, 20)


def test_dropout_probs_shared_shape_and_scaling():
  probs = jnp.full((2, 3, 4), 0.25)
  out = attn.dropout_probs(jax.random.key(0), probs, 0.5, None)
  assert out.shape == (2, 3, 4)
  assert set(np.unique(np.asarray(out)).tolist()) <= {0.0, 0.5}
  per_example = attn.dropout_probs(jax.random.key(0), probs, 0.5, 5)
  assert per_example.shape == (5, 2, 3, 4)


@pytest.mark.parametrize(
  "batch_size, probs_shape", [(3, (2, 4, 5)), (None, (2, 4, 5)), (3, (3, 2, 4, 5))]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_probs_gradient_matches_autodiff_of_its_definition(batch_size, probs_shape, dtype):
  """The custom backward pass (boolean mask, float32 batch sum): the forward pass equals
  ``where(keep, p / (1 - rate), 0)`` with the same mask, and the gradient is the exact float64
  one within one rounding to the dtype of a float32 sum."""
  rate, key = 0.3, jax.random.key(7)
  probs = jax.random.uniform(jax.random.key(1), probs_shape).astype(dtype)
  broadcast = len(probs_shape) == 3 and batch_size is not None
  out_shape = (batch_size, *probs_shape) if broadcast else probs_shape
  cot = jax.random.normal(jax.random.key(2), out_shape).astype(dtype)

  def reference(p):
    keep = jax.random.bernoulli(key, 1.0 - rate, out_shape)
    q = jnp.broadcast_to(p[None], out_shape) if broadcast else p
    return jnp.where(keep, q.astype(jnp.float32) / (1.0 - rate), 0.0)

  out, pull = jax.vjp(lambda p: attn.dropout_probs(key, p, rate, batch_size), probs)
  want_out = reference(probs)
  eps = float(jnp.finfo(dtype).eps)
  # the same mask; kept entries p / (1 - rate) within one rounding (division or reciprocal)
  np.testing.assert_allclose(
    np.asarray(out, np.float64), np.asarray(want_out.astype(dtype), np.float64), rtol=eps, atol=0
  )
  (got,) = pull(cot)
  chex.assert_type(got, dtype)
  # exact: sum over the broadcast batch of the kept cotangents / (1 - rate), in float64
  keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, out_shape))
  terms = np.where(keep, np.asarray(cot, np.float64), 0.0) / (1.0 - rate)
  exact = terms.sum(0) if broadcast else terms
  mag = np.abs(terms).sum(0) if broadcast else np.abs(terms)
  # one rounding to dtype of a float32 sum of at most B terms
  bound = 0.5 * eps * np.abs(exact) + (out_shape[0] + 1) * float(jnp.finfo(jnp.float32).eps) * mag
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= bound * (1 + 1e-6) + 1e-30)
