"""Tests of attnconv/models/cnn.py: pinned parameter counts, shapes, BatchNorm, dtypes, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv.models import build_model, count_params
from attnconv.models.cnn import ResNet18, SmallCNN


def _abstract_variables(model, shape):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
  )


# (model name, kwargs, input shape) -> exact parameter count (BatchNorm statistics excluded).
PINNED = {
  ("resnet18", (), (1, 32, 32, 3)): 11_173_962,  # kuangliu CIFAR ResNet18, 10 classes
  ("resnet18", (("num_classes", 100),), (1, 32, 32, 3)): 11_220_132,
  ("resnet18", (("width", 16),), (1, 28, 28, 1)): 701_178,  # closed form, see test below
  ("small_cnn", (), (1, 28, 28, 1)): 94_186,
  ("small_cnn", (("pool", "flatten"),), (1, 28, 28, 1)): 94_186 - 1290 + 7 * 7 * 128 * 10 + 10,
}


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: f"{k[0]}{dict(k[1])}")
def test_pinned_parameter_counts(key):
  name, kwargs, shape = key
  variables = _abstract_variables(build_model(name, **dict(kwargs)), shape)
  assert count_params(variables["params"]) == PINNED[key]


def test_every_cnn_in_the_registry_is_pinned():
  pinned_names = {name for name, _, _ in PINNED}
  assert pinned_names == {"resnet18", "small_cnn"}


def test_resnet18_structure():
  variables = _abstract_variables(ResNet18(), (1, 32, 32, 3))
  params = variables["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
  assert "bias" not in params["stem_conv"]
  for stage, width in zip((1, 2, 3, 4), (64, 128, 256, 512)):
    for block in (1, 2):
      p = params[f"stage{stage}_block{block}"]
      assert p["conv2"]["kernel"].shape == (3, 3, width, width)
      # Projection shortcut only where the shape changes (first block of stages 2-4).
      assert ("shortcut_conv" in p) == (stage > 1 and block == 1)
  assert params["stage2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert params["classifier"]["kernel"].shape == (512, 10)
  bn_stats = count_params(variables["batch_stats"])
  assert bn_stats == 2 * (64 + 4 * 64 + 4 * 128 + 128 + 4 * 256 + 256 + 4 * 512 + 512)


def _conv_call_count(model, shape):
  """How many times stock ``nn.Conv.__call__`` runs in one forward pass."""
  calls = []
  original = nn.Conv.__call__

  def counting(self, x):
    calls.append(x.shape)
    return original(self, x)

  variables = _abstract_variables(model, shape)
  nn.Conv.__call__ = counting
  try:
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  finally:
    nn.Conv.__call__ = original
  return len(calls)


def test_all_convolutions_are_stock_flax_conv():
  # ResNet18: stem + 8 blocks x 2 + 3 projections = 20; SmallCNN: 3.
  assert _conv_call_count(ResNet18(), (1, 32, 32, 3)) == 20
  assert _conv_call_count(SmallCNN(), (1, 28, 28, 1)) == 3


@pytest.mark.parametrize(
  "model,shape",
  [
    (ResNet18(width=8, num_classes=7), (2, 32, 32, 3)),
    (SmallCNN(features=(4, 8), num_classes=7), (2, 28, 28, 1)),
  ],
  ids=["resnet18", "small_cnn"],
)
def test_train_and_eval_apply(model, shape, key):
  images = jax.random.normal(key, shape)
  variables = model.init(key, images, train=False)
  logits, updates = model.apply(
    variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
  )
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Training mode updates the running statistics; eval mode uses them and is deterministic.
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  new_vars = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  eval1 = model.apply(new_vars, images, train=False)
  eval2 = model.apply(new_vars, images[:1], train=False)
  np.testing.assert_allclose(eval1[:1], eval2, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_float32_params(key):
  model = SmallCNN(features=(4, 8), dtype=jnp.bfloat16)
  images = jnp.zeros((2, 12, 12, 1))
  variables = model.init(key, images, train=False)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32
  logits = model.apply(variables, images, train=False)
  assert logits.dtype == jnp.float32


def test_bad_inputs():
  with pytest.raises(ValueError, match="images: expected a rank-4"):
    SmallCNN().init(jax.random.key(0), jnp.zeros((28, 28, 1)), train=False)
  with pytest.raises(ValueError, match="features: expected a positive integer"):
    SmallCNN(features=(4, 0)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  with pytest.raises(ValueError, match="pool: expected 'avg' or 'flatten'"):
    SmallCNN(pool="max").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  with pytest.raises(ValueError, match="num_classes: expected a positive integer"):
    ResNet18(num_classes=0).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  with pytest.raises(ValueError, match="stage_sizes: expected a non-empty"):
    ResNet18(stage_sizes=()).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


def _resnet18_closed_form(width: int, in_channels: int, num_classes: int) -> int:
  w = width
  convs = (
    9 * in_channels * w
    + 4 * 9 * w * w
    + (9 * w * 2 * w + 3 * 9 * 4 * w * w + 2 * w * w)
    + (9 * 2 * w * 4 * w + 3 * 9 * 16 * w * w + 8 * w * w)
    + (9 * 4 * w * 8 * w + 3 * 9 * 64 * w * w + 32 * w * w)
  )
  bn = 2 * (w + 4 * w + 5 * 2 * w + 5 * 4 * w + 5 * 8 * w)  # scale + bias per BN channel
  return convs + bn + 8 * w * num_classes + num_classes


def test_resnet18_closed_form_matches_pins():
  assert _resnet18_closed_form(64, 3, 10) == 11_173_962
  assert _resnet18_closed_form(64, 3, 100) == 11_220_132
  assert _resnet18_closed_form(16, 1, 10) == 701_178


# ----------------------------------------------------------------------------------------------
# AttentionCNN: which convolutions become attention, and the GPSA encoding.


def _attention_cnn(**kwargs):
  from attnconv.models.cnn import AttentionCNN

  return AttentionCNN(features=(4, 8, 8), pool="flatten", downsample=2, **kwargs)


@pytest.mark.parametrize(
  "encoding, layers",
  [("gpsa", ("conv3",)), ("gpsa", ("conv1", "conv3")), ("quadratic", ("conv2",)), ("gpsa", None)],
)
def test_attention_cnn_converts_only_the_chosen_layers(encoding, layers):
  model = _attention_cnn(encoding=encoding, attention_layers=layers)
  params = _abstract_variables(model, (1, 28, 28, 1))["params"]
  cnn_params = _abstract_variables(
    SmallCNN(features=(4, 8, 8), pool="flatten", downsample=2), (1, 28, 28, 1)
  )["params"]
  chosen = ("conv1", "conv2", "conv3") if layers is None else layers
  content = {"query", "key", "gate"} if encoding == "gpsa" else set()
  for name in ("conv1", "conv2", "conv3"):
    if name in chosen:
      assert set(params[name]) == {"centers", "alpha", "out"} | content
      c_in, c_out = cnn_params[name]["kernel"].shape[2:]
      assert params[name]["out"]["kernel"].shape == (9, c_in, c_out)
      if encoding == "gpsa":
        assert params[name]["gate"].shape == (9,)
        assert params[name]["query"]["kernel"].shape == (c_in, 9, 8)
    else:  # a stock convolution with SmallCNN's name and shape: the CNN's kernel loads
      assert params[name] == cnn_params[name]
  for name in ("bn1", "bn2", "bn3", "classifier"):
    assert params[name] == cnn_params[name]
  # Stock nn.Conv runs exactly for the layers left as convolutions.
  assert _conv_call_count(model, (1, 28, 28, 1)) == 3 - len(chosen)


def test_gpsa_attention_cnn_from_scratch_local_init_and_training_step(key):
  model = _attention_cnn(
    encoding="gpsa", attention_layers=("conv3",), locality_strength=1.0, gate_init=1.0
  )
  images = jax.random.normal(key, (4, 28, 28, 1))
  variables = model.init(key, images, train=False)
  layer = variables["params"]["conv3"]
  lattice = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
  np.testing.assert_array_equal(layer["centers"], lattice)
  np.testing.assert_array_equal(layer["alpha"], np.ones(9, np.float32))
  np.testing.assert_array_equal(layer["gate"], np.ones(9, np.float32))
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10) and np.isfinite(np.asarray(logits)).all()
  assert set(updates["batch_stats"]) == {"bn1", "bn2", "bn3"}


def test_attention_cnn_bad_fields():
  x = jnp.zeros((1, 28, 28, 1))
  cases = [
    ({"encoding": "content"}, ValueError, "encoding: expected one of"),
    ({"attention_layers": ("conv4",)}, ValueError, "attention_layers: expected"),
    ({"attention_layers": ()}, ValueError, "attention_layers: expected"),
    ({"attention_layers": "conv3"}, TypeError, "attention_layers: expected"),
  ]
  for kwargs, error, match in cases:
    with pytest.raises(error, match=f"^{match}"):
      _attention_cnn(**kwargs).init(jax.random.key(0), x, train=False)
