"""The 'quadratic_content' encoding: Eq. 9 positions plus content, on convolution-style grids."""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import construction
from attnconv.layers import MultiHeadRelativeAttention


def _converted(kernel, strides, alpha):
  """conv_to_attention's layer and the same layer with content (W_qry = 0, random W_key)."""
  module, variables = construction.conv_to_attention(
    kernel, strides=strides, padding="SAME", alpha=alpha
  )
  content = module.clone(encoding="quadratic_content", qk_features=4)
  return module, variables, content


@given(
  h=st.integers(3, 7),
  w=st.integers(3, 7),
  stride=st.integers(1, 2),
  seed=st.integers(0, 2**16),
)
def test_zero_query_is_the_quadratic_layer(h, w, stride, seed):
  """With W_qry = 0 and b_qry = 0 the content logits are exactly 0, so the layer equals the
  position-only quadratic layer (same centres, alpha, out) on padded, strided grids."""
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  kernel = jax.random.normal(k0, (3, 3, 2, 3))
  x = jax.random.normal(k1, (2, h, w, 2))
  module, variables, content = _converted(kernel, stride, alpha=2.0)
  cparams = flax.core.unfreeze(content.init(k2, x)["params"])
  chex.assert_trees_all_equal_shapes(
    {k: cparams[k] for k in ("centers", "alpha", "out")}, variables["params"]
  )
  cparams.update(variables["params"])
  cparams["query"] = jax.tree_util.tree_map(jnp.zeros_like, cparams["query"])
  y = content.apply({"params": cparams}, x)
  ref = module.apply(variables, x)
  chex.assert_trees_all_close(y, ref, atol=1e-5 * float(jnp.abs(ref).max()), rtol=0)
  # Gradients reach the query (the key is random), so training can switch content on.
  grad = jax.grad(lambda p: content.apply({"params": p}, x).sum())(cparams)
  assert float(jnp.abs(grad["query"]["kernel"]).max()) > 0


def test_queries_read_the_key_grid_at_their_centres():
  """Content logits use the input feature at the query's own position: with one head centred at
  0 and alpha tiny, a query whose features equal key k's attends most to k."""
  layer = MultiHeadRelativeAttention(
    num_heads=1,
    encoding="quadratic_content",
    strides=2,
    padding="SAME",
    query_window=3,
    qk_features=5,
    out_features=5,
    sharpness_param="alpha",
    use_bias=False,
  )
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 5))
  params = flax.core.unfreeze(layer.init(jax.random.key(1), x)["params"])
  params["alpha"] = jnp.full((1,), 1e-6)
  params["centers"] = jnp.zeros((1, 2))
  eye = jnp.eye(5)[:, None, :] * 10.0
  params["query"] = {"kernel": eye, "bias": jnp.zeros((1, 5))}
  params["key"] = {"kernel": eye, "bias": jnp.zeros((1, 5))}
  _, state = layer.apply({"params": params}, x, mutable="intermediates")
  (probs,) = state["intermediates"]["attention_probs"]
  assert probs.shape == (1, 1, 9, 49)  # 3x3 strided queries, 7x7 padded keys
  keys = layer.apply({"params": params}, x, method=layer.key_values)[0]
  qpos = [(0, 0), (0, 2), (4, 4)]
  for qy, qx in qpos:
    q_index = (qy // 2) * 3 + qx // 2
    scores = keys @ (x[0, qy, qx] * 100.0)
    assert int(jnp.argmax(probs[0, 0, q_index])) == int(jnp.argmax(scores))
    assert int(jnp.argmax(probs[0, 0, q_index])) == (qy + 1) * 7 + (qx + 1)


def test_errors():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="hard"):
    MultiHeadRelativeAttention(num_heads=1, encoding="quadratic_content", hard=True).init(
      jax.random.key(0), x
    )
  with pytest.raises(ValueError, match="separable"):
    MultiHeadRelativeAttention(
      num_heads=1, encoding="quadratic_content", implementation="separable"
    ).init(jax.random.key(0), x)
  # The position-only map does not exist for content encodings.
  layer = MultiHeadRelativeAttention(num_heads=1, encoding="quadratic_content")
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="content"):
    layer.apply(params, (4, 4), method=layer.position_probabilities)
