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


# ----------------------------------------------------------------------------------------------
# T-CNN: a trained SmallCNN whose last stage becomes GPSA with the content half gated off.
# ----------------------------------------------------------------------------------------------

F32_EPS = float(np.finfo(np.float32).eps)
TCNN_FEATURES = (4, 8, 8)


def _trained_like_cnn(seed: int = 0):
  """A SmallCNN (2x2 space-to-depth, flatten head) with random BatchNorm statistics and affine
  parameters, as after training, and a batch of images."""
  from attnconv.models.cnn import SmallCNN

  cnn = SmallCNN(features=TCNN_FEATURES, pool="flatten", downsample=2)
  x = jax.random.normal(jax.random.key(seed), (6, 28, 28, 1))
  variables = flax.core.unfreeze(cnn.init(jax.random.key(seed + 1), x))
  rng = np.random.default_rng(seed)
  for name, stats in variables["batch_stats"].items():
    n = stats["mean"].shape[0]
    stats["mean"] = jnp.asarray(rng.normal(0.0, 0.3, n), jnp.float32)
    stats["var"] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    variables["params"][name]["scale"] = jnp.asarray(1 + rng.normal(0.0, 0.2, n), jnp.float32)
    variables["params"][name]["bias"] = jnp.asarray(rng.normal(0.0, 0.2, n), jnp.float32)
  return cnn, variables, x


def _tcnn(**kwargs):
  from attnconv.models.cnn import AttentionCNN

  return AttentionCNN(
    features=TCNN_FEATURES,
    pool="flatten",
    downsample=2,
    encoding="gpsa",
    attention_layers=("conv3",),
    **kwargs,
  )


@pytest.mark.parametrize("gate_init", [17.0, 20.0])
def test_transformed_cnn_logits_equal_the_cnns_at_step_0(gate_init):
  """The T-CNN's conv3 output differs from the convolution's by at most

    |dy[b, q, i]| <= (2 (w_c + m) + 2 n eps) A[b, i],   A[b, i] = sum_h max_k (|x_k| |W_h|)_i

  (each head's probabilities are at L1 distance <= 2 (w_c + m) from the one-hot of its shift:
  content weight w_c = sigmoid(-gate), positional off-target mass m <= (M - 1) e^{-alpha} over
  M = 81 keys; both sides' float32 sums of at most n = 9 C + M + 8 terms round by <= n eps of
  their absolute sums). BatchNorm (eval) scales it by |gamma| / sqrt(var + 1e-5) (plus its own
  rounding, 8 eps of its terms per side), ReLU is 1-Lipschitz, the classifier sums |W| |dz| (plus
  its rounding, F + 1 terms per side)."""
  from attnconv.bounds import offtarget_mass_bound
  from attnconv.models.conv_init import transformed_cnn_from_cnn

  cnn, variables, x = _trained_like_cnn()
  alpha = 20.0
  converted = transformed_cnn_from_cnn(variables, alpha=alpha, gate_init=gate_init)
  tcnn = _tcnn()
  ref, inter = cnn.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  got, inter_t = tcnn.apply(converted, x, capture_intermediates=True, mutable=["intermediates"])
  inter, inter_t = inter["intermediates"], inter_t["intermediates"]
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

  # conv3's input, its kernel slices, the layer-level bound.
  x3 = np.maximum(f64(inter["bn2"]["__call__"][0]), 0.0)
  b, c_in = x3.shape[0], x3.shape[-1]
  w = f64(variables["params"]["conv3"]["kernel"]).reshape(9, c_in, -1)
  keys = 81  # the 7x7 map padded by 1
  a = np.einsum("bkc,hco->bkho", np.abs(x3.reshape(b, -1, c_in)), np.abs(w)).max(1).sum(1)
  w_c = 1.0 / (1.0 + math.exp(gate_init))
  m = offtarget_mass_bound(alpha, keys)
  n = 9 * c_in + keys + 8
  dy_bound = (2 * (w_c + m) + 2 * n * F32_EPS) * a[:, None, None, :]
  y_conv, y_att = f64(inter["conv3"]["__call__"][0]), f64(inter_t["conv3"]["__call__"][0])
  assert np.all(np.abs(y_att - y_conv) <= dy_bound)

  # Through BatchNorm (eval), ReLU and the classifier to the logits.
  bn = variables["params"]["bn3"]
  stats = variables["batch_stats"]["bn3"]
  gain = f64(bn["scale"]) / np.sqrt(f64(stats["var"]) + 1e-5)
  z = f64(inter["bn3"]["__call__"][0])
  dz_bound = np.abs(gain) * dy_bound + 2 * 8 * F32_EPS * (
    np.abs(gain) * (np.abs(y_conv) + np.abs(f64(stats["mean"]))) + np.abs(f64(bn["bias"]))
  )
  r = np.maximum(z, 0.0).reshape(b, -1)
  kernel = f64(variables["params"]["classifier"]["kernel"])
  bias = f64(variables["params"]["classifier"]["bias"])
  n2 = kernel.shape[0] + 1
  logit_bound = dz_bound.reshape(b, -1) @ np.abs(kernel) + 2 * n2 * F32_EPS * (
    (r + dz_bound.reshape(b, -1)) @ np.abs(kernel) + np.abs(bias)
  )
  diff = np.abs(f64(got) - f64(ref))
  assert np.all(diff <= logit_bound), (diff.max(), logit_bound.min())
  # The gate's and alpha's leakages are below the float32 rounding of the layer's sums, and the
  # whole bound is small against the logits: the same predictions.
  assert w_c + m <= n * F32_EPS
  assert logit_bound.max() <= 1e-2 * np.abs(f64(ref)).max()
  assert diff.max() <= 1e-5 * np.abs(f64(ref)).max()
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(ref, -1))
  # Structure: positional half from conv_to_attention, the gate, the other layers untouched.
  layer = converted["params"]["conv3"]
  np.testing.assert_array_equal(layer["centers"], construction.conv_head_offsets((3, 3)))
  np.testing.assert_array_equal(layer["alpha"], np.full(9, alpha, np.float32))
  np.testing.assert_array_equal(layer["out"]["kernel"], w.astype(np.float32))
  np.testing.assert_array_equal(layer["gate"], np.full(9, gate_init, np.float32))
  assert layer["query"]["kernel"].shape == layer["key"]["kernel"].shape == (c_in, 9, 8)
  for name in ("conv1", "conv2", "bn3", "classifier"):
    chex.assert_trees_all_equal(converted["params"][name], variables["params"][name])
  chex.assert_trees_all_equal(converted["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("gate_init", [17.0, 20.0])
def test_transformed_cnn_gradients_reach_the_gate_and_the_content(gate_init):
  """sigmoid(20) is exactly 1.0 in float32, yet the gate, the query and the key kernels get
  non-zero gradients (through sigmoid(-gate) = 2e-9), and one Adam step moves them."""
  import optax

  from attnconv.models.conv_init import transformed_cnn_from_cnn

  _, variables, x = _trained_like_cnn(1)
  converted = transformed_cnn_from_cnn(variables, gate_init=gate_init, rng=jax.random.key(3))
  tcnn = _tcnn()
  labels = jnp.arange(x.shape[0]) % 10

  def loss(params):
    logits, _ = tcnn.apply(
      {"params": params, "batch_stats": converted["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  params = converted["params"]
  grads = jax.jit(jax.grad(loss))(params)
  layer = grads["conv3"]
  assert np.all(np.isfinite(layer["gate"])) and np.all(layer["gate"] != 0)
  for name in ("query", "key"):
    assert np.any(layer[name]["kernel"] != 0), name
  tx = optax.adam(1e-3)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.all(new["conv3"]["gate"] != params["conv3"]["gate"])
  for name in ("query", "key"):
    assert np.any(new["conv3"][name]["kernel"] != params["conv3"][name]["kernel"]), name


def test_transformed_cnn_errors():
  from attnconv.models.conv_init import transformed_cnn_from_cnn

  _, variables, _ = _trained_like_cnn()
  cases = [
    ({"layers": ("conv4",)}, ValueError, "layers"),
    ({"layers": ()}, ValueError, "layers"),
    ({"layers": "conv3"}, TypeError, "layers"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"gate_init": float("nan")}, ValueError, "gate_init"),
    ({"gate_init": "17"}, TypeError, "gate_init"),
    ({"qk_features": 0}, ValueError, "qk_features"),
  ]
  for kwargs, error, name in cases:
    with pytest.raises(error, match=f"^{name}: expected"):
      transformed_cnn_from_cnn(variables, **kwargs)
  # Every convolution can be converted; the result loads into the matching AttentionCNN.
  every = transformed_cnn_from_cnn(variables, layers=("conv1", "conv2", "conv3"))
  assert all("gate" in every["params"][f"conv{i}"] for i in (1, 2, 3))
  model = _tcnn().clone(attention_layers=None)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  assert jax.tree.map(jnp.shape, expected) == jax.tree.map(jnp.shape, every)
