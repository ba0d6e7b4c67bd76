"""Tests of attnconv.models.conv_init: attention networks that start as convolutions."""

from __future__ import annotations

import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnconv import construction
from attnconv.layers import MultiHeadRelativeAttention
from attnconv.models import build_model
from attnconv.models.conv_init import init_attention_as_convolution


def _fixed(kernel):
  def init(key, shape, dtype=jnp.float32):
    del key
    assert tuple(shape) == kernel.shape, (shape, kernel.shape)
    return kernel.astype(dtype)

  return init


@pytest.mark.parametrize("sharpness_param", ["spread", "alpha"])
def test_layer_equals_convolution_away_from_the_border(sharpness_param):
  """At alpha = 30 every head keeps all but (sum_{s != 0} e^{-30 |s|^2}) < 1e-12 of its mass on
  its shift, so at queries whose 3x3 window lies inside the grid the layer is the SAME
  convolution up to float32 rounding of the 9-term sums (tolerance from eps and |w||x|)."""
  c_in, c_out, alpha = 3, 5, 30.0
  kernel = jax.random.normal(jax.random.key(0), (3, 3, c_in, c_out))
  bias = jax.random.normal(jax.random.key(1), (c_out,))
  layer = MultiHeadRelativeAttention(
    num_heads=9, encoding="quadratic", out_features=c_out, sharpness_param=sharpness_param
  )
  x = jax.random.normal(jax.random.key(2), (2, 7, 6, c_in))
  params = layer.init(jax.random.key(3), x)["params"]
  params = flax.core.unfreeze(params)
  params["out"]["bias"] = bias
  new = init_attention_as_convolution(
    params, jax.random.key(4), alpha=alpha, kernel_init=_fixed(kernel)
  )
  out = layer.apply({"params": new}, x)
  ref = nn.Conv(c_out, (3, 3), padding="SAME").apply(
    {"params": {"kernel": kernel, "bias": bias}}, x
  )
  scale = (
    jax.lax.conv_general_dilated(
      jnp.abs(x), jnp.abs(kernel), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + jnp.abs(bias)[None, None, None]
  )
  leak = 8 * math.exp(-alpha)  # mass off the target, times the values' scale, is below this
  tol = (2 * 9 * c_in * np.finfo(np.float32).eps + leak) * scale
  inner = (slice(None), slice(1, -1), slice(1, -1))
  chex.assert_trees_all_equal_shapes(out, ref)
  assert np.all(np.abs(out - ref)[inner] <= tol[inner])
  # Structure: centres on the kernel grid, one sharpness for every head, bias kept.
  np.testing.assert_array_equal(new["centers"], construction.conv_head_offsets((3, 3)))
  if sharpness_param == "spread":
    np.testing.assert_allclose(new["spreads"] ** 2 / 2, alpha, rtol=1e-6)
  else:
    np.testing.assert_array_equal(new["alpha"], np.full(9, alpha, np.float32))
  np.testing.assert_array_equal(new["out"]["bias"], bias)


def test_attention_net_every_layer_converted_other_leaves_untouched():
  model = build_model(
    "attention_net", num_layers=2, num_heads=9, hidden_size=8, mlp_dim=8, downsample=2
  )
  x = jnp.zeros((1, 8, 8, 1))
  params = model.init(jax.random.key(0), x)["params"]
  new = init_attention_as_convolution(params, jax.random.key(1), alpha=1.0)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, new)
  assert isinstance(new, type(params))
  grid = construction.conv_head_offsets((3, 3))
  kernels = []
  for i in range(2):
    attn = new[f"block_{i}"]["attention"]
    np.testing.assert_array_equal(attn["centers"], grid)
    np.testing.assert_allclose(attn["spreads"], np.full(9, math.sqrt(2.0)), rtol=1e-7)
    kernels.append(np.asarray(attn["out"]["kernel"]))
    # Not the layer's own init: a fresh convolution kernel (fan-in 9 * 8, U(+-1/sqrt(72))).
    assert np.abs(kernels[-1]).max() <= 1 / math.sqrt(72) + 1e-7
    assert not np.array_equal(kernels[-1], params[f"block_{i}"]["attention"]["out"]["kernel"])
    np.testing.assert_array_equal(
      attn["out"]["bias"], params[f"block_{i}"]["attention"]["out"]["bias"]
    )
  assert not np.array_equal(kernels[0], kernels[1])  # one kernel per layer
  flat_old = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat_new = flax.traverse_util.flatten_dict(flax.core.unfreeze(new))
  for path, value in flat_old.items():
    if path[-2:] != ("out", "kernel") and path[-1] not in ("centers", "spreads"):
      np.testing.assert_array_equal(flat_new[path], value, err_msg=str(path))
  # Deterministic in the key, and traceable (the trainer calls it inside jit).
  again = jax.jit(lambda p, k: init_attention_as_convolution(p, k, alpha=1.0))(
    params, jax.random.key(1)
  )
  chex.assert_trees_all_close(again, new, rtol=0, atol=0)


def test_attention_mass_on_the_shift_at_alpha_1():
  """At alpha = 1 a head at an interior query puts 1 / sum_s e^{-|s|^2} of its mass on its shift
  (the lattice theta-function sum over the 7x7 grid's offsets)."""
  model = build_model(
    "attention_net", num_layers=1, num_heads=9, hidden_size=4, mlp_dim=4, downsample=1
  )
  x = jnp.zeros((1, 7, 7, 1))
  params = init_attention_as_convolution(
    model.init(jax.random.key(0), x)["params"], jax.random.key(1), alpha=1.0
  )
  layer = MultiHeadRelativeAttention(num_heads=9, encoding="quadratic", out_features=4)
  probs = layer.apply(
    {"params": params["block_0"]["attention"]}, (7, 7), method=layer.position_probabilities
  )
  probs = np.asarray(probs).reshape(9, 7, 7, 7, 7)
  centers = np.asarray(params["block_0"]["attention"]["centers"]).astype(int)
  for h in range(9):
    dy, dx = centers[h]
    q = (3, 3)
    # The key grid seen from the centre query: offsets -3..3 on each axis.
    offs = np.arange(-3, 4)
    z = sum(math.exp(-((a - dy) ** 2 + (b - dx) ** 2)) for a in offs for b in offs)
    np.testing.assert_allclose(probs[h, q[0], q[1], 3 + dy, 3 + dx], 1 / z, rtol=1e-5)


def test_errors():
  layer = MultiHeadRelativeAttention(num_heads=8, encoding="quadratic", out_features=2)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))["params"]
  with pytest.raises(ValueError, match=r"K\^2 heads.*\(8, 2\)"):
    init_attention_as_convolution(params, jax.random.key(0), alpha=1.0)
  cnn = build_model("small_cnn", features=(4,))
  cnn_params = cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  with pytest.raises(ValueError, match="found none"):
    init_attention_as_convolution(cnn_params, jax.random.key(0), alpha=1.0)
  for bad in (0.0, -1.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="alpha"):
      init_attention_as_convolution(params, jax.random.key(0), alpha=bad)
  for bad in (True, "1", None):
    with pytest.raises(TypeError, match="alpha"):
      init_attention_as_convolution(params, jax.random.key(0), alpha=bad)
