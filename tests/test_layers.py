"""Property tests of :class:`attnconv.layers.MultiHeadRelativeAttention`.

Tolerances are derived from the dtype. For one output ``y_qo = sum_h sum_c (sum_k P_hqk x_kc)
W_hco + b_o`` any summation order is within ``n eps S`` of the exact value, where ``n`` is the
length of the longest reduction (``Nk`` keys, then ``H C`` products) and ``S`` bounds
``sum |terms|``: since the probabilities sum to one, ``S <= max|x| sum_{h,c} |W_hco| + |b_o|``
(:func:`output_scale`). Two float32 evaluations of the same layer (dense vs. separable, permuted
keys) therefore agree within ``2 n eps S`` plus the probabilities' own rounding. Hard attention
multiplies by exact zeros and ones, so the gather path is compared exactly.

Each example compiles a fresh layer (seconds on CPU), so the hypothesis tests here run a third of
the profile's examples (4 in ``ci``, more in ``dev`` and ``sweep``).
"""

from __future__ import annotations

import zlib

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from attnconv import attention as attn
from attnconv import encodings as enc
from attnconv.layers import ENCODINGS, MultiHeadRelativeAttention

F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
EXAMPLES = max(3, settings().max_examples // 3)
layer_settings = settings(max_examples=EXAMPLES)


def rng_for(*seeds) -> np.random.Generator:
  """A numpy generator seeded from a (process-independent) digest of ``seeds``."""
  return np.random.default_rng(zlib.crc32(repr(seeds).encode()))


def dropout_key(seed: int) -> jax.Array:
  """An ``rbg`` key: its Bernoulli sampler compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="rbg")


def forward(model, x, variables=None, *, key=None, deterministic=True, dropout_seed=0):
  """Jitted ``init`` (if needed) and ``apply`` with sown intermediates: ``(variables, y, probs)``."""
  key = jax.random.key(0) if key is None else key

  @jax.jit
  def f(variables, x):
    if variables is None:
      variables = model.init(key, x)
    rngs = None if deterministic else {"dropout": dropout_key(dropout_seed)}
    y, state = model.apply(
      variables, x, deterministic=deterministic, mutable=["intermediates"], rngs=rngs
    )
    return variables, y, state["intermediates"]["attention_probs"][0]

  return jax.tree.map(np.asarray, f(variables, x))


def output_scale(variables, x) -> np.ndarray:
  """``max|x| sum_{h,c} |W_hco| + |b_o|`` per output feature, for full-input values."""
  out = variables["params"]["out"]
  s = np.max(np.abs(np.asarray(x, np.float64))) * np.sum(np.abs(np.asarray(out["kernel"])), (0, 1))
  return s + np.abs(np.asarray(out.get("bias", 0.0)))


@st.composite
def layer_inputs(draw, max_d: int = 3):
  """``(x, num_heads)`` with a 1-, 2- or 3-D grid, 1-3 heads and 1-3 channels."""
  d = draw(st.integers(1, max_d))
  spatial = tuple(draw(st.integers(2, 5 if d == 1 else (4 if d == 2 else 3))) for _ in range(d))
  c = draw(st.integers(1, 3))
  h = draw(st.integers(1, 3))
  b = draw(st.integers(1, 2))
  x = rng_for(spatial, c, h, b).normal(size=(b, *spatial, c)).astype(np.float32)
  return x, h


def assert_within(got, want, bound) -> None:
  """``|got - want| <= bound`` elementwise (``bound`` broadcast, e.g. per output feature)."""
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  bound = np.broadcast_to(bound, err.shape)
  worst = np.max(err - bound)
  assert worst <= 0, f"error exceeds bound by {worst} (max error {np.max(err)})"


def n_keys(x) -> int:
  return int(np.prod(x.shape[1:-1]))


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize(
  "encoding, kwargs",
  [
    ("quadratic", {}),
    ("quadratic", {"sharpness_param": "alpha"}),
    ("generalized", {}),
    ("learned", {}),
    ("learned_content", {"qk_features": 4}),
    ("content", {"qk_features": 4}),
  ],
)
def test_parameter_shapes_and_counts(d, encoding, kwargs):
  h, c, c_out, n = 3, 2, 5, 4
  model = MultiHeadRelativeAttention(h, encoding=encoding, out_features=c_out, **kwargs)
  x = jnp.zeros((1,) + (n,) * d + (c,))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda a: a.shape, abstract)
  out = {"kernel": (h, c, c_out), "bias": (c_out,)}
  m = 2 * n - 1  # rows of a relative table: shifts -(n-1)..(n-1)
  if encoding == "quadratic":
    sharp = "alpha" if kwargs else "spreads"
    want = {"centers": (h, d), sharp: (h,), "out": out}
    count = h * d + h + h * c * c_out + c_out
  elif encoding == "generalized":
    want = {"centers": (h, d), "spreads": (h, d, d), "out": out}
    count = h * d + h * d * d + h * c * c_out + c_out
  elif encoding == "learned":
    want = {"out": out}
    for a in range(d):
      want[f"rel_table_{a}"] = (m, c)
      want[f"rel_head_{a}"] = (c, h)
    count = d * (m * c + c * h) + h * c * c_out + c_out
  else:
    dk = kwargs["qk_features"]
    dense = {"kernel": (c, h, dk), "bias": (h, dk)}
    want = {"query": dense, "key": dense, "out": out}
    count = 2 * (c * h * dk + h * dk) + h * c * c_out + c_out
    if encoding == "learned_content":
      for a in range(d):
        want[f"rel_table_{a}"] = (m, dk // d)
      count += d * m * (dk // d)
  assert flax.core.unfreeze(params) == want
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)) == count


def test_value_features_and_no_bias_parameters():
  model = MultiHeadRelativeAttention(2, value_features=3, out_features=4, use_bias=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5, 6)))["params"]
  assert shapes["value"]["kernel"].shape == (6, 2, 3)
  assert shapes["out"]["kernel"].shape == (2, 3, 4)
  assert "bias" not in shapes["out"]


def test_paper_initialisation_statistics():
  """Centres ~ N(0, 2^2), spreads ~ 1 + N(0, 0.01^2), factors ~ I + N(0, 0.01^2).

  Bounds are 6 standard errors: the sample mean of n draws of std s has std s / sqrt(n), the
  sample std has relative std ~ 1 / sqrt(2 n).
  """
  h = 2048
  x = jnp.zeros((1, 2, 2, 1))
  quad = jax.jit(MultiHeadRelativeAttention(h).init)(jax.random.key(1), x)["params"]
  centers = np.asarray(quad["centers"], np.float64).ravel()
  n = centers.size
  assert abs(centers.mean()) <= 6 * 2.0 / np.sqrt(n)
  assert abs(centers.std() / 2.0 - 1.0) <= 6 / np.sqrt(2 * n)
  spreads = np.asarray(quad["spreads"], np.float64)
  assert abs(spreads.mean() - 1.0) <= 6 * 0.01 / np.sqrt(h)
  assert abs(spreads.std() / 0.01 - 1.0) <= 6 / np.sqrt(2 * h)
  gen = jax.jit(MultiHeadRelativeAttention(h, encoding="generalized").init)(jax.random.key(2), x)
  noise = np.asarray(gen["params"]["spreads"], np.float64) - np.eye(2)
  assert abs(noise.mean()) <= 6 * 0.01 / np.sqrt(noise.size)
  assert abs(noise.std() / 0.01 - 1.0) <= 6 / np.sqrt(2 * noise.size)
  assert np.max(np.abs(noise)) < 0.01 * 7  # every factor is the identity up to small noise


# ----------------------------------------------------------------------------------------------
# probabilities
# ----------------------------------------------------------------------------------------------

PROB_CONFIGS = [
  ("quadratic", {}),
  ("quadratic", {"hard": True}),
  ("quadratic", {"implementation": "separable"}),
  ("generalized", {}),
  ("learned", {}),
  ("learned_content", {"qk_features": 6}),
  ("content", {}),
]


def check_distributions(encoding, kwargs, x, y, probs, dtype):
  """Sown probabilities ``probs`` are non-negative and sum to one over keys; ``y`` finite."""
  nk = n_keys(x)
  position_only = encoding not in ("content", "learned_content")
  chex.assert_shape(probs, (2, 12, nk) if position_only else (2, 2, 12, nk))
  chex.assert_shape(y, (2, 3, 4, 3))
  assert y.dtype == dtype and np.all(np.isfinite(np.asarray(y, np.float32)))
  p = np.asarray(probs, np.float64)
  assert np.all(p >= 0)
  # float32 softmax: (nk + 4) eps; the per-axis product of the separable path adds 2 d eps;
  # the sown probabilities may be rounded to the compute dtype (eps / 2 relative each).
  tol = (nk + 8) * F32_EPS + float(jnp.finfo(probs.dtype).eps) / 2
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=tol, rtol=0)
  if kwargs.get("hard"):
    assert set(np.unique(p)) <= {0.0, 1.0}


@pytest.mark.parametrize("encoding, kwargs", PROB_CONFIGS, ids=lambda v: str(v))
def test_probabilities_are_distributions_over_keys(encoding, kwargs):
  """float32 here; bfloat16 in :func:`test_bfloat16_close_to_float32`."""
  x = rng_for(encoding).normal(size=(2, 3, 4, 3)).astype(np.float32)
  model = MultiHeadRelativeAttention(2, encoding=encoding, **kwargs)
  _, y, probs = forward(model, x)
  check_distributions(encoding, kwargs, x, y, probs, jnp.float32)


@layer_settings
@given(layer_inputs(), st.sampled_from(["quadratic", "generalized", "learned"]))
def test_position_probabilities_ignore_content(inputs, encoding):
  x, h = inputs
  model = MultiHeadRelativeAttention(h, encoding=encoding)
  variables, _, p1 = forward(model, x)
  x2 = rng_for("other", x.shape).normal(size=x.shape).astype(np.float32) * 3.0
  _, _, p2 = forward(model, x2, variables)
  spatial = x.shape[1:-1]
  pos = jax.jit(lambda v: model.apply(v, spatial, method=model.position_probabilities))(variables)
  nk = n_keys(x)
  chex.assert_shape(pos, (h, nk, nk))  # no batch axis
  np.testing.assert_array_equal(p1, p2)
  np.testing.assert_allclose(np.asarray(pos), p1, atol=2 * F32_EPS, rtol=0)


@pytest.mark.parametrize("sharpness_param", ["spread", "alpha"])
def test_sharpness_parametrisation(sharpness_param):
  """``spreads`` s give alpha = s^2 / 2 (the authors' code); ``alpha`` is used directly."""
  x = jnp.asarray(rng_for(1).normal(size=(1, 4, 3, 2)), jnp.float32)
  model = MultiHeadRelativeAttention(3, sharpness_param=sharpness_param)
  variables, _, probs = forward(model, x)
  p = variables["params"]
  alpha = 0.5 * p["spreads"] ** 2 if sharpness_param == "spread" else p["alpha"]
  qpos = kpos = enc.grid_positions((4, 3))
  want = jax.jit(lambda c, a: attn.softmax(enc.quadratic_logits(qpos, kpos, c, a)))(
    p["centers"], alpha
  )
  np.testing.assert_allclose(probs, np.asarray(want), atol=(12 + 8) * F32_EPS, rtol=0)


@layer_settings
@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_quadratic_probability_maps_are_translation_equivariant(d, h, data):
  """``P[q + t, k + t] = P[q, k]`` for sharp heads with small centres, away from the borders.

  With alpha = 18 the mass beyond distance 2 of the centre is below ``exp(-18 * 2.5^2)``, far
  under float32 resolution, so interior rows of the map agree up to rounding.
  """
  n = {1: 9, 2: 7, 3: 5}[d]
  spatial = (n,) * d
  model = MultiHeadRelativeAttention(h, sharpness_param="alpha")
  x = jnp.zeros((1, *spatial, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  c = np.asarray(data.draw(st.lists(st.floats(-0.5, 0.5), min_size=h * d, max_size=h * d)))
  params = dict(variables["params"], centers=c.reshape(h, d), alpha=np.full((h,), 18.0))
  variables = {"params": params}
  pos = np.asarray(
    jax.jit(lambda v: model.apply(v, spatial, method=model.position_probabilities))(variables)
  ).reshape(h, *spatial, *spatial)
  t = tuple(data.draw(st.integers(-1, 1)) for _ in range(d))
  margin = 3 + 1  # |Delta| <= 0.5 plus the 2.5-wide tail plus |t| <= 1
  inner = [range(margin - 1, n - margin + 1) for _ in range(d)]
  for q in np.ndindex(*[len(r) for r in inner]):
    q = tuple(inner[a][q[a]] for a in range(d))
    qt = tuple(qa + ta for qa, ta in zip(q, t))
    for k in np.ndindex(*spatial):
      kt = tuple(ka + ta for ka, ta in zip(k, t))
      if not all(0 <= v < n for v in kt):
        continue
      a = pos[(slice(None), *q, *k)]
      b = pos[(slice(None), *qt, *kt)]
      np.testing.assert_allclose(a, b, atol=(n**d + 8) * F32_EPS, rtol=0)


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("hard", [True, False])
def test_position_only_outputs_are_translation_equivariant_in_the_interior(d, hard):
  """Shift the input by t: interior outputs shift by t (exactly in the hard limit)."""
  h, c, n = 3, 2, {1: 16, 2: 14}[d]
  model = MultiHeadRelativeAttention(h, sharpness_param="alpha", hard=hard)
  rng = rng_for(d, hard)
  x = rng.normal(size=(1,) + (n,) * d + (c,)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x))
  centers = rng.integers(-1, 2, size=(h, d)).astype(np.float32)
  if not hard:
    centers += rng.uniform(-0.3, 0.3, size=(h, d)).astype(np.float32)
  variables = {"params": dict(variables["params"], centers=centers, alpha=np.full((h,), 18.0))}
  t = (2,) + (-1,) * (d - 1)
  xs = np.roll(x, t, axis=tuple(range(1, d + 1)))
  _, y, _ = forward(model, x, variables)
  _, ys, _ = forward(model, xs, variables)
  margin = 1 + 3 + 2  # centres, soft tail, shift
  sl = tuple(slice(margin, n - margin) for _ in range(d))
  slt = tuple(slice(margin + ta, n - margin + ta) for ta in t)
  a, b = y[(0, *sl)], ys[(0, *slt)]
  if hard:
    np.testing.assert_array_equal(a, b)
  else:
    bound = 2 * (n**d + h * c + 4) * F32_EPS * output_scale(variables, x)
    assert_within(a, b, bound)


@layer_settings
@given(st.integers(3, 8), st.integers(1, 3), st.integers(1, 3), st.randoms(use_true_random=False))
def test_content_attention_is_permutation_equivariant(n, h, c, rnd):
  model = MultiHeadRelativeAttention(h, encoding="content", qk_features=4)
  x = rng_for(n, h, c).normal(size=(2, n, c)).astype(np.float32)
  perm = np.asarray(rnd.sample(range(n), n))
  variables, y, p = forward(model, x)
  _, yp, pp = forward(model, x[:, perm], variables)
  chex.assert_shape(p, (2, h, n, n))
  bound = 2 * (2 * n + h * c + 4) * F32_EPS * output_scale(variables, x)
  assert_within(yp, y[:, perm], bound)
  np.testing.assert_allclose(pp, p[:, :, perm][:, :, :, perm], atol=4 * n * F32_EPS, rtol=0)


@layer_settings
@given(layer_inputs(max_d=2), st.sampled_from(["content", "learned_content", "quadratic_content"]))
def test_folded_key_projection_equals_projected_keys(inputs, encoding):
  """``fold_key_projection`` (scores ``(q W_k^T) . x``) against ``q . (x W_k + b_k)``: the same
  parameters, the same probabilities and outputs, and an exactly zero key-bias gradient.

  Bound: both paths' logits carry at most ``2 (C + D_k + 2) u S`` of rounding, S the largest sum
  of |terms| of a score; a logit error delta moves a probability by at most 3 delta, and the
  output by ``N_k`` times that times ``output_scale``, plus the usual aggregation rounding."""
  x, h = inputs
  d, c, nk = x.ndim - 2, x.shape[-1], n_keys(x)
  dk = 2 * d
  kw = {"qk_features": dk, "use_dot_product_attention": False}
  folded = MultiHeadRelativeAttention(h, encoding=encoding, **kw)
  plain = MultiHeadRelativeAttention(h, encoding=encoding, fold_key_projection=False, **kw)
  variables, y, p = forward(folded, x, key=jax.random.key(3))
  variables_plain = jax.jit(plain.init)(jax.random.key(3), x)
  chex.assert_trees_all_equal(variables, variables_plain)  # same parameters, same initialisation
  # a key bias large enough to matter if it were not a per-query constant
  variables = flax.core.unfreeze(variables)
  variables["params"]["key"]["bias"] = variables["params"]["key"]["bias"] + 3.0
  _, y0, p0 = forward(plain, x, variables)
  _, y, p = forward(folded, x, variables)
  prm = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xf = np.asarray(x, np.float64).reshape(x.shape[0], nk, c)
  q = np.einsum("bnc,chd->bnhd", xf, prm["query"]["kernel"]) + prm["query"]["bias"]
  k = np.einsum("bnc,chd->bnhd", xf, prm["key"]["kernel"]) + prm["key"]["bias"]
  s_plain = np.einsum("bqhd,bkhd->bhqk", np.abs(q), np.abs(k))
  s_fold = np.einsum("bqhd,chd,bkc->bhqk", np.abs(q), np.abs(prm["key"]["kernel"]), np.abs(xf))
  delta = 2 * 2 * (c + dk + 2) * F32_EPS * max(s_plain.max(), s_fold.max()) / np.sqrt(dk)
  p_bound = 3 * delta + 8 * (nk + 2) * F32_EPS
  np.testing.assert_allclose(p, p0, rtol=0, atol=p_bound)
  bound = (nk * p_bound + 2 * (nk + h * c + 4) * F32_EPS) * output_scale(variables, x)
  assert_within(y, y0, bound)

  def key_bias_grad(model):
    def loss(params):
      out = model.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": dropout_key(0)}
      )
      return jnp.sum(out**2)

    return jax.jit(jax.grad(loss))(variables["params"])["key"]["bias"]

  np.testing.assert_array_equal(key_bias_grad(folded.clone(dropout_rate=0.2)), 0.0)


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------


@layer_settings
@given(layer_inputs(), st.sampled_from(["quadratic", "learned"]), st.booleans())
def test_separable_equals_dense(inputs, encoding, padded):
  x, h = inputs
  d = x.ndim - 2
  kw = {"padding": "SAME", "query_window": 3} if padded and encoding == "quadratic" else {}
  dense = MultiHeadRelativeAttention(h, encoding=encoding, **kw)
  sep = MultiHeadRelativeAttention(h, encoding=encoding, implementation="separable", **kw)
  variables, y, p = forward(dense, x)
  _, ys, ps = forward(sep, x, variables)
  nk = int(p.shape[-1])
  chex.assert_equal_shape([y, ys])
  np.testing.assert_allclose(ps, p, atol=(nk + 4 * d) * F32_EPS, rtol=0)
  n = nk + sum(x.shape[1 : 1 + d]) + h * x.shape[-1] + 4 * d
  bound = 2 * n * F32_EPS * output_scale(variables, x)
  assert_within(ys, y, bound)


@layer_settings
@given(layer_inputs(max_d=2), st.integers(1, 2), st.data())
def test_gather_equals_dense_hard_exactly(inputs, stride, data):
  x, h = inputs
  d = x.ndim - 2
  kw = {"padding": "SAME", "query_window": 3, "strides": stride, "hard": True}
  dense = MultiHeadRelativeAttention(h, **kw)
  gather = MultiHeadRelativeAttention(h, implementation="gather", **kw)
  variables = jax.jit(dense.init)(jax.random.key(0), x)
  c = data.draw(st.lists(st.integers(-1, 1), min_size=h * d, max_size=h * d))
  params = dict(variables["params"], centers=np.asarray(c, np.float32).reshape(h, d))
  variables = {"params": params}
  _, y, p = forward(dense, x, variables)
  _, yg, pg = forward(gather, x, variables)
  np.testing.assert_array_equal(pg, p)
  np.testing.assert_array_equal(yg, y)


def test_gather_in_blocks_equals_one_block(monkeypatch):
  """With ``IM2COL_MAX_ELEMENTS`` below one query row of the batch, the layer's gather path runs
  blocks of rows of single images (nested ``lax.map`` plus remainders): the same sum per output
  (float32: within ``H C eps sum|terms|`` of the single block)."""
  from attnconv import attention as attn_lib

  x = jax.random.normal(jax.random.key(0), (3, 7, 5, 3))
  layer = MultiHeadRelativeAttention(
    9, implementation="gather", hard=True, padding="SAME", query_window=3
  )
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  centers = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
  variables = {"params": dict(variables["params"], centers=centers)}
  one_block = layer.apply(variables, x)
  row = 5 * 9 * 3  # one query row of one image: 5 queries x 9 heads x 3 channels
  # Blocks of one row of one image; of images 2 + 1 with 1-2 rows each; of one row of all 3.
  for limit in (0, 2 * row, 3 * row):
    monkeypatch.setattr(attn_lib, "IM2COL_MAX_ELEMENTS", limit)
    blocks = layer.apply(variables, x)
    kernel = np.abs(np.asarray(variables["params"]["out"]["kernel"]))
    scale = np.max(np.abs(np.asarray(x))) * kernel.sum(axis=(0, 1)).max()
    np.testing.assert_allclose(blocks, one_block, rtol=0, atol=27 * F32_EPS * scale)


# ----------------------------------------------------------------------------------------------
# gradients, dtypes, dropout, sow
# ----------------------------------------------------------------------------------------------

GRAD_CONFIGS = [
  ("quadratic", {}),
  ("quadratic", {"implementation": "separable"}),
  ("generalized", {}),
  ("learned", {}),
  ("content", {}),
  ("learned_content", {"qk_features": 2}),
  # explicit probabilities: the key projection folded into the queries
  ("content", {"use_dot_product_attention": False}),
  ("learned_content", {"qk_features": 2, "use_dot_product_attention": False}),
]


@pytest.mark.parametrize("encoding, kwargs", GRAD_CONFIGS, ids=lambda v: str(v))
def test_gradients_match_finite_differences(encoding, kwargs):
  """``check_grads`` (order 1, fwd and rev) w.r.t. the input and every parameter.

  The layer computes attention logits and softmax in float32 even for float64 parameters, so
  the check runs in float32 with a step ``eps = 2^-6``: the central difference then has a
  rounding error ~ ``n u |f| / eps`` (~1e-4 relative for these sizes) and a truncation error
  ~ ``eps^2 |f'''| / 6`` (~1e-4 for unit-scale curvature); ``rtol = atol = 1e-2`` leaves room
  for both on every coordinate direction.
  """
  model = MultiHeadRelativeAttention(2, encoding=encoding, **kwargs)
  x = jnp.asarray(rng_for(encoding).normal(size=(1, 3, 2, 2)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  f = jax.jit(lambda p, x: model.apply({"params": p}, x))
  check_grads(f, (params, x), order=1, modes=("fwd", "rev"), eps=2.0**-6, atol=1e-2, rtol=1e-2)


def test_gradients_wrt_input_in_float64():
  """Position-only outputs are linear in x: float64 finite differences are exact to ~1e-10."""
  with jax.enable_x64(True):
    model = MultiHeadRelativeAttention(
      2, dtype=jnp.float64, param_dtype=jnp.float64, implementation="separable"
    )
    x = jnp.asarray(rng_for(3).normal(size=(1, 4, 3, 2)), jnp.float64)
    variables = model.init(jax.random.key(0), x)
    f = jax.jit(lambda x: model.apply(variables, x))
    check_grads(f, (x,), order=1, modes=("fwd", "rev"), eps=1e-5, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("encoding, kwargs", PROB_CONFIGS, ids=lambda v: str(v))
def test_bfloat16_close_to_float32(encoding, kwargs):
  """bf16 compute with float32 params: finite and within ``(n + 8) eps_bf16 S`` of float32.

  The input, the probabilities, the values and every partial sum may be rounded to bfloat16
  (``eps_bf16 / 2`` relative each) over reductions of length ``n = Nk + H C``.
  """
  x = rng_for(encoding, "bf16").normal(size=(2, 3, 4, 3)).astype(np.float32)
  f32 = MultiHeadRelativeAttention(2, encoding=encoding, **kwargs)
  bf16 = MultiHeadRelativeAttention(2, encoding=encoding, dtype=jnp.bfloat16, **kwargs)
  variables, y, _ = forward(f32, x)
  _, yb, pb = forward(bf16, x, variables)
  check_distributions(encoding, kwargs, x, yb, pb, jnp.bfloat16)
  yb = np.asarray(yb, np.float32)
  assert np.all(np.isfinite(yb))
  n = n_keys(x) + 2 * x.shape[-1]
  scale = output_scale(variables, x)
  if encoding in ("content", "learned_content"):
    # Content logits q.k / sqrt(D) move by ~ n eps_bf16 |q||k| in bf16, which changes the
    # probabilities by up to that much in relative terms (the logits here are O(1)).
    scale = scale * (1 + 4 * np.max(np.abs(x)) ** 2)
  assert_within(yb, y, (n + 8) * BF16_EPS * scale)


def test_dropout_differs_per_example_and_preserves_expectation():
  """Identical examples get different masks; the batch mean matches the deterministic output
  within 6 standard deviations: ``Var = r / (1 - r) sum_{h,k} (P_hqk (x_k W_h)_o)^2``."""
  b, h, n, c, rate = 256, 2, 6, 2, 0.25
  model = MultiHeadRelativeAttention(h, dropout_rate=rate)
  x1 = rng_for("dropout").normal(size=(1, n, c)).astype(np.float32)
  x = np.repeat(x1, b, axis=0)
  variables, y_det, p = forward(model, x)
  _, y_drop, _ = forward(model, x, variables, deterministic=False, dropout_seed=1)
  _, y_drop2, _ = forward(model, x, variables, deterministic=False, dropout_seed=2)
  # deterministic=True ignores dropout: identical examples, identical outputs.
  np.testing.assert_array_equal(y_det, np.broadcast_to(y_det[:1], y_det.shape))
  assert not np.array_equal(y_drop[0], y_drop[1])
  assert not np.array_equal(y_drop, y_drop2)
  kernel = np.asarray(variables["params"]["out"]["kernel"], np.float64)
  z = np.einsum("hqk,kc,hco->hqko", p.astype(np.float64), x1[0].astype(np.float64), kernel)
  std = np.sqrt(rate / (1 - rate) * np.sum(z**2, axis=(0, 2)) / b)
  assert np.all(np.abs(y_drop.mean(0) - y_det[0]) <= 6 * std + 1e-6)


@pytest.mark.parametrize("encoding", ["quadratic", "content"])
def test_dropout_rate_without_rng_or_deterministic(encoding):
  model = MultiHeadRelativeAttention(2, encoding=encoding, dropout_rate=0.5)
  ref = MultiHeadRelativeAttention(2, encoding=encoding)
  x = jnp.asarray(rng_for(9).normal(size=(2, 5, 3)), jnp.float32)
  variables, y, _ = forward(model, x)
  _, y_ref, _ = forward(ref, x, variables)
  np.testing.assert_array_equal(y, y_ref)
  _, y_drop, p = forward(model, x, variables, deterministic=False)
  assert not np.array_equal(y_drop, y)
  # The sown probabilities are the pre-dropout distribution.
  np.testing.assert_allclose(np.asarray(p, np.float64).sum(-1), 1.0, atol=10 * F32_EPS)


@pytest.mark.parametrize(
  "kwargs, shape",
  [
    ({}, (3, 12, 12)),
    ({"implementation": "separable"}, (3, 12, 12)),
    ({"hard": True, "implementation": "gather", "padding": "SAME", "query_window": 3}, None),
    ({"padding": "SAME", "query_window": 3, "strides": 2}, (3, 4, 25)),
    ({"encoding": "content"}, (2, 3, 12, 12)),
    ({"encoding": "learned_content", "qk_features": 2}, (2, 3, 12, 12)),
  ],
  ids=str,
)
def test_sow_attention_probs_shapes(kwargs, shape):
  """Shapes by abstract evaluation (no compilation); values are checked elsewhere."""
  model = MultiHeadRelativeAttention(3, **kwargs)
  x = jnp.ones((2, 3, 4, 2))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  y, state = jax.eval_shape(lambda v: model.apply(v, x, mutable=["intermediates"]), variables)
  (probs,) = state["intermediates"]["attention_probs"]
  if shape is None:  # SAME padding with a 3x3 window: keys on the padded 5 x 6 grid
    shape = (3, 12, 30)
  chex.assert_shape(probs, shape)
  assert probs.dtype == jnp.float32
  # Without mutable intermediates nothing is sown.
  plain = jax.eval_shape(lambda v: model.apply(v, x, mutable=["intermediates"]), variables)
  assert plain[0].shape == y.shape
  assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == y.shape


def test_grid_helpers_padding_strides_and_dilation():
  model = MultiHeadRelativeAttention(
    2, padding="SAME", query_window=3, strides=2, input_dilation=(1, 2)
  )
  assert model.query_shape((5, 4)) == (3, 4)
  x = jnp.ones((1, 5, 4, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  kv = jax.eval_shape(lambda v: model.apply(v, x, method=model.key_values), variables)
  assert kv.shape == (1, 7 * 9, 1)
  pos = jax.eval_shape(
    lambda v: model.apply(v, (5, 4), method=model.position_probabilities), variables
  )
  assert pos.shape == (2, 3 * 4, 7 * 9)
  assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == (1, 3, 4, 1)
  for mode in ("circular", "reflect"):
    m = MultiHeadRelativeAttention(2, padding=((1, 1), (2, 0)), padding_mode=mode)
    chex.assert_shape(jax.eval_shape(m.init_with_output, jax.random.key(0), x)[0], (1, 7, 6, 1))


# ----------------------------------------------------------------------------------------------
# invalid arguments
# ----------------------------------------------------------------------------------------------

X2 = jnp.zeros((1, 4, 4, 2))


@pytest.mark.parametrize(
  "kwargs, x, match",
  [
    ({}, jnp.zeros((4, 2)), r"x: expected rank 3, 4 or 5 .*got shape \(4, 2\)"),
    ({}, jnp.zeros((1, 2, 2, 2, 2, 2)), r"x: expected rank 3, 4 or 5"),
    ({}, [[[0.0]]], r"x: expected an array, got list"),
    ({"num_heads": 0}, X2, r"num_heads: expected a positive int, got 0"),
    ({"encoding": "sinusoid"}, X2, r"encoding: expected one of .*got 'sinusoid'"),
    ({"implementation": "fft"}, X2, r"implementation: expected one of .*got 'fft'"),
    (
      {"encoding": "generalized", "implementation": "separable"},
      X2,
      r"implementation: 'separable' needs encoding 'quadratic' or 'learned', got 'generalized'",
    ),
    ({"implementation": "gather"}, X2, r"implementation: 'gather' .*hard=True, got .*hard=False"),
    ({"encoding": "learned", "hard": True}, X2, r"hard: only the quadratic .*got 'learned'"),
    ({"sharpness_param": "beta"}, X2, r"sharpness_param: expected 'spread' or 'alpha'"),
    ({"dropout_rate": 1.0}, X2, r"dropout_rate: expected 0 <= rate < 1, got 1.0"),
    ({"dropout_rate": -0.5}, X2, r"dropout_rate: expected 0 <= rate < 1"),
    ({"strides": 0}, X2, r"strides: expected positive integers, got \(0, 0\)"),
    ({"strides": (1, 1, 1)}, X2, r"expected .*strides=\(1, 1, 1\), got"),
    (
      {"encoding": "content", "padding": "SAME"},
      X2,
      r"encoding: content attention needs queries == keys .*'content'",
    ),
    (
      {"encoding": "learned_content", "strides": 2},
      X2,
      r"encoding: content attention needs queries == keys",
    ),
    ({"padding": "FULL"}, X2, r"padding: expected 'SAME', 'SAME_LOWER', 'VALID' .*'FULL'"),
    ({"padding": ((1, 1),)}, X2, r"expected .*padding=\(\(1, 1\),\), got"),
    ({"padding": ((1, 1), 1)}, X2, r"padding: expected 2 \(low, high\) pairs"),
    ({"padding_mode": "edge", "padding": "SAME"}, X2, r"mode: expected one of .*'edge'"),
    (
      {"encoding": "learned", "max_distance": 2},
      X2,
      r"tables\[0\]: expected an odd number >= 7 of rows \(shifts up to 3\), got shape \(3, 2\)",
    ),
    ({"query_window": (5, 1)}, X2, r"window: expected at most 4 keys on axis 0 .*got 5"),
    (
      {"hard": True, "implementation": "gather", "value_features": 2},
      X2,
      r"value_features: 'gather' reads the input directly; expected None, got 2",
    ),
    (
      {"encoding": "learned_content", "qk_features": 3},
      X2,
      r"qk_features: expected a multiple of the number of axes 2",
    ),
    (
      {"encoding": "learned_content", "qk_features": 4, "rel_features": 1},
      X2,
      r"rel_features: expected qk_features / d = 2, got 1",
    ),
  ],
  ids=lambda v: str(v)[:40],
)
def test_invalid_arguments_raise_named_errors(kwargs, x, match):
  kwargs = {"num_heads": 2, **kwargs}
  model = MultiHeadRelativeAttention(**kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    model.init(jax.random.key(0), x)


def test_invalid_arguments_on_apply_and_methods():
  model = MultiHeadRelativeAttention(2)
  variables = model.init(jax.random.key(0), X2)
  with pytest.raises(ValueError, match=r"x: expected 2 input features on the last axis"):
    model.apply(variables, jnp.zeros((1, 4, 4, 3)))
  content = MultiHeadRelativeAttention(2, encoding="content")
  with pytest.raises(ValueError, match=r"encoding: 'content' is content-dependent"):
    content.apply({}, (4, 4), method=content.position_probabilities)
  with pytest.raises(ValueError, match=r"num_heads"):
    MultiHeadRelativeAttention(-1).query_shape((4,))


def test_every_encoding_runs_on_every_dimension():
  for encoding in ENCODINGS:
    for d in (1, 2, 3):
      x = jnp.ones((1,) + (2,) * d + (2,))
      kw = {"qk_features": 6} if encoding == "learned_content" else {}
      m = MultiHeadRelativeAttention(2, encoding=encoding, out_features=3, **kw)
      y = jax.eval_shape(m.init_with_output, jax.random.key(0), x)[0]
      assert y.shape == (1,) + (2,) * d + (3,), (encoding, d)


def test_float_grid_argument_names_the_argument():
  model = MultiHeadRelativeAttention(2, query_window=1.5)
  with pytest.raises(TypeError, match=r"query_window: expected an int or 2 ints, got 1.5"):
    model.init(jax.random.key(0), X2)


def test_head_count_mismatch_on_apply_raises_value_error():
  variables = MultiHeadRelativeAttention(2).init(jax.random.key(0), X2)
  with pytest.raises(ValueError, match=r"num_heads: expected 2 .*got 3"):
    MultiHeadRelativeAttention(3).apply(variables, X2)
