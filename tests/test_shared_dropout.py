"""Attention dropout with one mask per step shared by the batch (position-only encodings)."""

from __future__ import annotations

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
  "name, shared",
  [
    ("paper_quadratic", True),
    ("paper_generalized", True),
    ("paper_many_heads", True),
    ("paper_learned", False),
    ("paper_learned_content", False),
    ("fashion_paper_quadratic", True),
    ("fashion_paper_learned", False),
  ],
)
def test_paper_configs_share_the_mask_as_the_authors(name, shared):
  """The authors' Gaussian attention shares one dropout mask by the batch; learned does not."""
  import importlib

  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  assert config.model.shared_dropout_mask is shared
