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
from attnconv.models.conv_init import init_attention_as_convolution, low_rank_factors


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


@pytest.mark.parametrize(("c_in", "c_out", "rank"), [(4, 5, 2), (4, 5, 4), (3, 5, 6)])
def test_low_rank_factors_are_the_truncated_svd(c_in, c_out, rank):
  """W_val W_out is the best rank-r approximation: its error is the tail of the singular values
  (Eckart-Young), exact from r >= min(C_in, C_out) on (zero-padded factors beyond it)."""
  m = jax.random.normal(jax.random.key(0), (9, c_in, c_out))
  w_val, w_out = low_rank_factors(m, rank)
  assert w_val.shape == (9, c_in, rank) and w_out.shape == (9, rank, c_out)
  approx = np.einsum("hir,hro->hio", np.asarray(w_val, np.float64), np.asarray(w_out, np.float64))
  s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
  tail = np.sqrt((s[:, rank:] ** 2).sum(-1))
  err = np.linalg.norm(approx - np.asarray(m, np.float64), axis=(1, 2))
  tol = 50 * np.finfo(np.float32).eps * s[:, 0]
  np.testing.assert_allclose(err, tail, atol=float(tol.max()))
  for bad in (0, -1, True, 2.0):
    with pytest.raises(ValueError, match="rank"):
      low_rank_factors(m, bad)


def test_value_projected_layer_starts_as_its_low_rank_convolution():
  """A quadratic layer with a value projection (D_v = 2 < C_in = 4) becomes, at alpha = 30 and
  away from the border, the SAME convolution whose slices are W_val^(h) W_out^(h) (rank 2), the
  truncated SVD of the fresh kernel's slices; tolerance as the full-rank test above."""
  c_in, c_out, alpha = 4, 5, 30.0
  kernel = jax.random.normal(jax.random.key(0), (3, 3, c_in, c_out))
  layer = MultiHeadRelativeAttention(
    num_heads=9, encoding="quadratic", value_features=2, out_features=c_out
  )
  x = jax.random.normal(jax.random.key(2), (2, 7, 6, c_in))
  params = flax.core.unfreeze(layer.init(jax.random.key(3), x)["params"])
  new = init_attention_as_convolution(
    params, jax.random.key(4), alpha=alpha, kernel_init=_fixed(kernel)
  )
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(new["value"]["bias"], 0.0)
  w_val, w_out = low_rank_factors(kernel.reshape(9, c_in, c_out), 2)
  np.testing.assert_allclose(new["out"]["kernel"], w_out, rtol=1e-6)
  low_rank = jnp.einsum("hir,hro->hio", w_val, w_out).reshape(3, 3, c_in, c_out)
  out = layer.apply({"params": new}, x)
  ref = nn.Conv(c_out, (3, 3), padding="SAME").apply(
    {"params": {"kernel": low_rank, "bias": new["out"]["bias"]}}, x
  )
  scale = (
    jax.lax.conv_general_dilated(
      jnp.abs(x), jnp.abs(low_rank), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + jnp.abs(new["out"]["bias"])[None, None, None]
  )
  tol = (4 * 9 * c_in * np.finfo(np.float32).eps + 8 * math.exp(-alpha)) * scale
  inner = (slice(None), slice(1, -1), slice(1, -1))
  assert np.all(np.abs(out - ref)[inner] <= tol[inner])


def test_shared_backbone_quadratic_vit_converts():
  """The shared backbone with Eq. 9 attention: every block's centres land on the 3x3 shifts."""
  model = build_model("vit", num_classes=10, num_heads=9, hidden_size=18, encoding="quadratic")
  x = jnp.zeros((1, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  new = init_attention_as_convolution(params, jax.random.key(1), alpha=4.0)
  shifts = construction.conv_head_offsets((3, 3))
  for i in range(4):
    np.testing.assert_array_equal(new[f"block_{i}"]["attention"]["centers"], shifts)
    assert new[f"block_{i}"]["attention"]["value"]["kernel"].shape == (18, 9, 2)
  chex.assert_trees_all_equal(new["classifier"], params["classifier"])
  assert np.isfinite(model.apply({"params": new}, x)).all()
