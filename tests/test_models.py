"""The paper's attention network: pinned parameter counts and structure (the configs that build it:
tests/test_configs.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv.models import build_model, count_params
from attnconv.models.attention_net import AttentionNet, space_to_depth

# The authors' models at the paper's sizes (6 layers, D = 400, MLP 512, 10 classes, 32x32x3).
PAPER_COUNTS = [
  ("quadratic", 9, 12_086_844),
  ("generalized", 9, 12_087_006),
  ("learned", 9, 12_278_682),
  ("learned_content", 9, 29_484_282),
  ("quadratic", 16, 18_806_970),
]


def _num_params(model, shape):
  x = jnp.zeros(shape)
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))
  return count_params(variables["params"])


@pytest.mark.parametrize(("encoding", "heads", "expected"), PAPER_COUNTS)
def test_paper_parameter_counts(encoding, heads, expected):
  model = build_model("attention_net", encoding=encoding, num_heads=heads)
  assert _num_params(model, (1, 32, 32, 3)) == expected


def test_resnet18_parameter_count():
  assert _num_params(build_model("resnet18", num_classes=10), (1, 32, 32, 3)) == 11_173_962


def test_space_to_depth_is_invertible():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = space_to_depth(x, 2)
  chex.assert_shape(y, (2, 2, 3, 12))
  back = y.reshape(2, 2, 3, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 3)
  np.testing.assert_array_equal(back, x)
  with pytest.raises(ValueError, match="x: expected height and width divisible"):
    space_to_depth(jnp.zeros((1, 5, 4, 1)), 2)


@pytest.mark.parametrize("encoding", ["quadratic", "generalized", "learned", "learned_content"])
def test_small_attention_net_forward_and_maps(encoding):
  model = AttentionNet(
    num_classes=5, num_layers=2, num_heads=4, hidden_size=16, mlp_dim=16, encoding=encoding
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init({"params": jax.random.key(1)}, x)
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  chex.assert_shape(logits, (2, 5))
  chex.assert_tree_all_finite(logits)
  probs = state["intermediates"]["block_0"]["attention"]["attention_probs"][0]
  expected = (2, 4, 16, 16) if encoding == "learned_content" else (4, 16, 16)
  chex.assert_shape(probs, expected)
  train_logits = model.apply(variables, x, True, rngs={"dropout": jax.random.key(2)})
  chex.assert_shape(train_logits, (2, 5))


def test_auto_path_equals_dense_and_remat_bf16():
  kw = dict(num_classes=3, num_layers=1, num_heads=4, hidden_size=8, mlp_dim=8)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  separable = AttentionNet(**kw, implementation="separable")
  variables = separable.init({"params": jax.random.key(1)}, x)
  dense = AttentionNet(**kw, implementation="dense")
  # f32 rounding of two summation orders over <= 16 keys x 8 channels
  chex.assert_trees_all_close(separable.apply(variables, x), dense.apply(variables, x), atol=1e-5)
  # 4 x 4 tokens: 'auto' is the dense path (bitwise the same program)
  auto = AttentionNet(**kw)
  np.testing.assert_array_equal(auto.apply(variables, x), dense.apply(variables, x))
  remat = AttentionNet(**kw, remat=True, dtype=jnp.bfloat16)
  grads = jax.grad(
    lambda p: remat.apply({"params": p}, x, True, rngs={"dropout": jax.random.key(2)}).sum()
  )(variables["params"])
  chex.assert_tree_all_finite(grads)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_bad_encoding_and_rank():
  with pytest.raises(ValueError, match="encoding: expected one of"):
    AttentionNet(encoding="sinusoid").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match="images: expected rank 4"):
    AttentionNet().init(jax.random.key(0), jnp.zeros((4, 4, 1)))


def test_auto_implementation_threshold():
  from attnconv.models.attention_net import SEPARABLE_MIN_TOKENS, auto_implementation

  n = SEPARABLE_MIN_TOKENS
  assert auto_implementation("quadratic", n) == "separable"
  assert auto_implementation("learned", 4 * n) == "separable"
  assert auto_implementation("quadratic", n - 1) == "dense"
  assert auto_implementation("quadratic", 49) == "dense"
  assert auto_implementation("generalized", 4 * n) == "dense"
  assert auto_implementation("learned_content", 4 * n) == "dense"
  # the paper's 16 x 16 grid (32 x 32 images, 2 x 2 space-to-depth) keeps the separable path
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  model = AttentionNet(num_classes=2, num_layers=1, num_heads=2, hidden_size=8, mlp_dim=8)
  variables = model.init({"params": jax.random.key(0)}, x)
  sep = AttentionNet(
    num_classes=2, num_layers=1, num_heads=2, hidden_size=8, mlp_dim=8, implementation="separable"
  )
  np.testing.assert_array_equal(model.apply(variables, x), sep.apply(variables, x))
