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
from attnconv import construction, grids
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

  if variables is None:
    # initialised in its own call: centres drawn inside the same jitted function as the hard
    # attention could be recomputed with other roundings (see attention.hard_attention)
    variables = jax.jit(model.init)(key, x)

  @jax.jit
  def f(variables, x):
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


@st.composite
def centres(draw, num_heads: int, d: int, lo: float, hi: float, integer: bool = False):
  """``(num_heads, d)`` float32 centres in ``[lo, hi]`` (integers if ``integer``)."""
  elements = st.integers(int(lo), int(hi)) if integer else st.floats(lo, hi, width=32)
  values = draw(st.lists(elements, min_size=num_heads * d, max_size=num_heads * d))
  return np.asarray(values, np.float32).reshape(num_heads, d)


@st.composite
def heads_and_centres(draw, d: int, lo: float, hi: float, integer: bool = False):
  """``(num_heads, centres)`` with 1-3 heads."""
  h = draw(st.integers(1, 3))
  return h, draw(centres(h, d, lo, hi, integer))


@st.composite
def inputs_and_integer_centres(draw, max_d: int = 2):
  """``((x, num_heads), integer centres in {-1, 0, 1})`` for the hard limit."""
  x, h = draw(layer_inputs(max_d=max_d))
  return (x, h), draw(centres(h, x.ndim - 2, -1, 1, integer=True))


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
  qpos = kpos = grids.grid_positions((4, 3))
  want = jax.jit(
    lambda c, a: attn.softmax(enc.combine_axis_logits(enc.quadratic_logits(qpos, kpos, c, a)))
  )(p["centers"], alpha)
  np.testing.assert_allclose(probs, np.asarray(want), atol=(12 + 8) * F32_EPS, rtol=0)


@st.composite
def sharp_heads(draw):
  """``(d, num_heads, centres in [-0.5, 0.5], shift t in {-1, 0, 1}^d)``."""
  d = draw(st.integers(1, 3))
  h, c = draw(heads_and_centres(d, -0.5, 0.5))
  t = tuple(draw(st.lists(st.integers(-1, 1), min_size=d, max_size=d)))
  return d, h, c, t


@layer_settings
@given(sharp_heads())
def test_quadratic_probability_maps_are_translation_equivariant(case):
  """``P[q + t, k + t] = P[q, k]`` for sharp heads with small centres, away from the borders.

  With alpha = 18 the mass beyond distance 2 of the centre is below ``exp(-18 * 2.5^2)``, far
  under float32 resolution, so interior rows of the map agree up to rounding.
  """
  d, h, c, t = case
  n = {1: 9, 2: 7, 3: 5}[d]
  spatial = (n,) * d
  model = MultiHeadRelativeAttention(h, sharpness_param="alpha")
  x = jnp.zeros((1, *spatial, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params = dict(variables["params"], centers=c, alpha=np.full((h,), 18.0, np.float32))
  variables = {"params": params}
  pos = np.asarray(
    jax.jit(lambda v: model.apply(v, spatial, method=model.position_probabilities))(variables)
  ).reshape(h, *spatial, *spatial)
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
@given(inputs_and_integer_centres(), st.integers(1, 2), st.booleans())
def test_gather_equals_dense_hard(case, stride, integer):
  """The same one-hot probabilities (exactly), and outputs equal up to the order of the
  ``H C``-term sums per output (``2 H C eps sum|terms|``); exactly equal for integer-valued
  inputs and kernels, where every partial sum is exact in float32."""
  (x, h), c = case
  kw = {"padding": "SAME", "query_window": 3, "strides": stride, "hard": True}
  dense = MultiHeadRelativeAttention(h, **kw)
  gather = MultiHeadRelativeAttention(h, implementation="gather", **kw)
  variables = jax.jit(dense.init)(jax.random.key(0), x)
  params = dict(variables["params"], centers=c)
  if integer:
    x = np.round(4 * x)
    params["out"] = jax.tree.map(lambda p: np.round(8 * np.asarray(p)), params["out"])
  variables = {"params": params}
  _, y, p = forward(dense, x, variables)
  _, yg, pg = forward(gather, x, variables)
  np.testing.assert_array_equal(pg, p)
  if integer:
    np.testing.assert_array_equal(yg, y)
  else:
    assert_within(yg, y, 2 * h * x.shape[-1] * F32_EPS * output_scale(variables, x))


def test_gather_in_blocks_equals_one_block(monkeypatch):
  """With ``IM2COL_MAX_ELEMENTS`` below one query row of the batch, the layer's gather path runs
  blocks of rows of single images (nested ``lax.map`` plus remainders): the same sum per output
  (float32: within ``H C eps sum|terms|`` of the single block)."""
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
    monkeypatch.setattr(attn, "IM2COL_MAX_ELEMENTS", limit)
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
  # explicit probabilities instead of jax.nn.dot_product_attention
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
    (
      {"implementation": "gather"},
      X2,
      r"implementation: 'gather' .*expected hard=True .*got hard=False",
    ),
    (
      {"encoding": "learned", "hard": True},
      X2,
      r"hard: expected False unless encoding='quadratic', got True",
    ),
    ({"sharpness_param": "beta"}, X2, r"sharpness_param: expected 'spread' or 'alpha'"),
    ({"dropout_rate": 1.0}, X2, r"dropout_rate: expected 0 <= rate < 1, got 1.0"),
    ({"dropout_rate": -0.5}, X2, r"dropout_rate: expected 0 <= rate < 1"),
    ({"strides": 0}, X2, r"strides: expected integers >= 1, got 0"),
    (
      {"strides": (1, 1, 1)},
      X2,
      r"x: expected rank 5 .*strides=\(1, 1, 1\), got shape \(1, 4, 4, 2\)",
    ),
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
    ({"padding": ((1, 1),)}, X2, r"x: expected rank 3 .*padding=\(\(1, 1\),\), got shape"),
    ({"padding": ((1, 1), 1)}, X2, r"padding: expected 2 \(low, high\) pairs"),
    ({"padding_mode": "edge", "padding": "SAME"}, X2, r"padding_mode: expected one of .*'edge'"),
    (
      {"encoding": "learned", "max_distance": 2},
      X2,
      r"tables\[0\]: expected an odd number >= 7 of rows \(shifts up to 3\), got shape \(3, 2\)",
    ),
    ({"query_window": (5, 1)}, X2, r"window: expected at most 4 keys on axis 0 .*got 5"),
    (
      {"hard": True, "implementation": "gather", "value_features": 2},
      X2,
      r"implementation: 'gather' .*expected hard=True and value_features=None, got .*value_features=2",
    ),
    (
      {"encoding": "learned_content", "qk_features": 3},
      X2,
      r"qk_features: expected rel_features \* 2 .*got qk_features=3",
    ),
    (
      {"encoding": "learned_content", "qk_features": 4, "rel_features": 1},
      X2,
      r"qk_features: expected rel_features \* 2 .*rel_features=1",
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
  with pytest.raises(ValueError, match=r"num_heads: expected a positive int, got -1"):
    MultiHeadRelativeAttention(-1).apply(
      {}, (4,), method=MultiHeadRelativeAttention.position_probabilities
    )


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
  with pytest.raises(
    TypeError, match=r"query_window: expected an int or a sequence of 2 ints, got 1.5"
  ):
    model.init(jax.random.key(0), X2)


def test_head_count_mismatch_on_apply_raises_value_error():
  variables = MultiHeadRelativeAttention(2).init(jax.random.key(0), X2)
  with pytest.raises(ValueError, match=r"num_heads: expected 2 .*got 3"):
    MultiHeadRelativeAttention(3).apply(variables, X2)


# ----------------------------------------------------------------------------------------------
# the layer runs the equations' functions; sowing never changes the computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "encoding, kwargs, functions",
  [
    ("quadratic", {}, ["encodings.quadratic_logits", "attention.relative_attention"]),
    ("quadratic", {"hard": True}, ["attention.hard_attention", "attention.relative_attention"]),
    (
      "quadratic",
      {"hard": True, "implementation": "gather", "padding": "SAME", "query_window": 3},
      ["encodings.quadratic_logits", "attention.gather_project"],
    ),
    ("quadratic", {"implementation": "separable"}, ["attention.aggregate_separable"]),
    ("generalized", {}, ["encodings.generalized_quadratic_logits"]),
    ("learned", {}, ["encodings.learned_logits", "encodings.relative_embeddings"]),
    (
      "learned_content",
      {"qk_features": 4},
      ["encodings.query_relative_logits", "attention.relative_attention"],
    ),
    ("content", {"use_dot_product_attention": False}, ["encodings.content_logits"]),
    ("quadratic_content", {}, ["encodings.quadratic_logits", "attention.relative_attention"]),
    (
      "quadratic_content",
      {"use_dot_product_attention": False},
      ["encodings.quadratic_logits", "encodings.content_logits"],
    ),
  ],
  ids=str,
)
def test_the_layer_runs_the_equation_functions(monkeypatch, encoding, kwargs, functions):
  """Each equation lives in one function of encodings.py / attention.py, and that function is
  the one the layer calls (wrapped here to count the calls)."""
  import attnconv.attention
  import attnconv.encodings

  modules = {"attention": attnconv.attention, "encodings": attnconv.encodings}
  calls = dict.fromkeys(functions, 0)
  for name in functions:
    module, fn_name = name.split(".")
    original = getattr(modules[module], fn_name)

    def counted(*args, _original=original, _name=name, **kw):
      calls[_name] += 1
      return _original(*args, **kw)

    monkeypatch.setattr(modules[module], fn_name, counted)
  model = MultiHeadRelativeAttention(2, encoding=encoding, **kwargs)
  jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  assert all(n > 0 for n in calls.values()), calls


SOW_CONFIGS = [
  ("gpsa", {"qk_features": 2}),
  ("quadratic", {}),
  ("quadratic", {"implementation": "separable"}),
  ("quadratic", {"hard": True, "implementation": "gather", "padding": "SAME", "query_window": 3}),
  ("quadratic", {"shared_dropout_mask": True}),
  ("generalized", {}),
  ("learned", {"implementation": "separable"}),
  ("content", {}),
  ("content", {"use_dot_product_attention": False}),
  ("learned_content", {"qk_features": 4}),
  ("quadratic_content", {"value_features": 2, "qk_features": 2}),
]


PATHS = (
  "aggregate_project",
  "aggregate_separable",
  "aggregate",
  "gather_project",
  "dot_product_attention",
)


@pytest.mark.parametrize("encoding, kwargs", SOW_CONFIGS, ids=str)
@pytest.mark.parametrize("train", [False, True])
def test_sowing_never_changes_the_output(monkeypatch, encoding, kwargs, train):
  """With and without ``mutable=['intermediates']`` the same aggregation path runs (the calls of
  every path function are counted) and the outputs are equal, in evaluation and in training with
  attention dropout (same key). Equal within 2 float32 ulps of the output scale: XLA may fuse
  the extra probabilities output differently and round a few sums otherwise."""
  dropout = {"dropout_rate": 0.25} if train and "gather" not in str(kwargs) else {}
  model = MultiHeadRelativeAttention(2, encoding=encoding, **kwargs, **dropout)
  x = jnp.asarray(rng_for(encoding, str(kwargs)).normal(size=(2, 3, 4, 2)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  rngs = {"dropout": jax.random.key(5)}
  calls = []
  for name in PATHS:
    module = jax.nn if name == "dot_product_attention" else attn
    original = getattr(module, name)

    def counted(*args, _original=original, _name=name, **kw):
      calls.append(_name)
      return _original(*args, **kw)

    monkeypatch.setattr(module, name, counted)

  def run(mutable):
    calls.clear()
    apply = lambda v, x: model.apply(  # noqa: E731
      v, x, deterministic=not train, rngs=rngs, mutable=mutable
    )
    out = jax.jit(apply)(variables, x)
    return out, sorted(calls)

  (y, state), sown_calls = run(["intermediates"])
  plain, plain_calls = run(False)
  assert sown_calls == plain_calls and plain_calls
  assert state["intermediates"]["attention_probs"][0].ndim in (3, 4)
  assert_within(y, plain, 2 * F32_EPS * np.max(np.abs(np.asarray(plain))))


# ----------------------------------------------------------------------------------------------
# content attention through jax.nn.dot_product_attention
# ----------------------------------------------------------------------------------------------

CONTENT = ("content", "learned_content", "quadratic_content")


@st.composite
def content_cases(draw):
  """``(encoding, x, num_heads, value_features, qk_features)`` on a 2-D grid."""
  encoding = draw(st.sampled_from(CONTENT))
  h, w = draw(st.integers(2, 5)), draw(st.integers(2, 5))
  heads = draw(st.integers(1, 3))
  features = draw(st.sampled_from([2, 4]))
  value_features = draw(st.sampled_from([None, 4]))
  dk = features if value_features is None else value_features  # the fused path's condition
  x = rng_for(encoding, h, w, heads, features).normal(size=(2, h, w, features))
  return encoding, x.astype(np.float32), heads, value_features, dk


@layer_settings
@given(content_cases())
def test_dot_product_attention_equals_explicit_probabilities(case):
  """Same scores, float32 softmax and contractions in both paths: equal up to float32 rounding
  of the sums (``n eps sum |p| |v| <= n eps max |v|``, n = keys + features), gradients too."""
  encoding, x, heads, value_features, dk = case
  layer = MultiHeadRelativeAttention(
    num_heads=heads, encoding=encoding, value_features=value_features, qk_features=dk
  )
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  fused = jax.jit(layer.apply)(variables, x)
  explicit_layer = layer.clone(use_dot_product_attention=False)
  explicit = jax.jit(explicit_layer.apply)(variables, x)
  kernel = variables["params"]["out"]["kernel"]
  n = x.shape[1] * x.shape[2] + x.shape[-1] + kernel.shape[1]
  scale = (np.abs(x).max() + 1) * float(jnp.abs(kernel).sum(axis=(0, 1)).max())
  chex.assert_trees_all_close(fused, explicit, atol=n * F32_EPS * scale + 1e-6, rtol=0)

  def grads(model):
    def loss(params):
      out = model.apply({"params": params}, x)
      return jnp.sum(out * jnp.cos(out))

    return jax.jit(jax.grad(loss))(variables["params"])

  chex.assert_trees_all_close(grads(layer), grads(explicit_layer), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("encoding", CONTENT)
def test_dot_product_attention_bfloat16_within_a_few_ulps(encoding):
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 8))
  layer = MultiHeadRelativeAttention(num_heads=3, encoding=encoding, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(1), x)
  fused = layer.apply(variables, x).astype(jnp.float32)
  explicit = layer.clone(use_dot_product_attention=False).apply(variables, x).astype(jnp.float32)
  scale = float(jnp.abs(explicit).max())
  assert float(jnp.abs(fused - explicit).max()) <= 4 * BF16_EPS * max(scale, 1.0)


def test_content_dropout_masks_the_probabilities():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  layer = MultiHeadRelativeAttention(2, encoding="learned_content", qk_features=4, dropout_rate=0.5)
  variables = layer.init(jax.random.key(1), x)
  a = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  b = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(layer.apply(variables, x), layer.apply(variables, x))


# ----------------------------------------------------------------------------------------------
# shared attention-dropout mask (position-only encodings)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["quadratic", "learned", "generalized"])
def test_shared_mask_is_one_mask_for_the_batch(encoding):
  x1 = jax.random.normal(jax.random.key(0), (1, 4, 5, 3))
  x = jnp.concatenate([x1, x1, 2 * x1])  # examples 0 and 1 identical, 2 scaled
  layer = MultiHeadRelativeAttention(
    num_heads=2, encoding=encoding, dropout_rate=0.3, shared_dropout_mask=True
  )
  variables = layer.init(jax.random.key(1), x)
  rng = jax.random.key(7)
  y = layer.apply(variables, x, deterministic=False, rngs={"dropout": rng})
  bias = variables["params"]["out"]["bias"][None, None]
  np.testing.assert_array_equal(y[0], y[1])  # same input, same mask
  # linear in the input with the same probabilities: the scaled example scales its output
  np.testing.assert_allclose(y[2] - bias, 2 * (y[0] - bias), rtol=1e-5, atol=1e-5)
  per_example = layer.clone(shared_dropout_mask=False).apply(
    variables, x, deterministic=False, rngs={"dropout": rng}
  )
  assert not np.allclose(per_example[0], per_example[1])  # independent masks
  np.testing.assert_array_equal(
    layer.apply(variables, x), layer.clone(shared_dropout_mask=False).apply(variables, x)
  )


# ----------------------------------------------------------------------------------------------
# quadratic + content on convolution-style grids
# ----------------------------------------------------------------------------------------------


@st.composite
def conv_grid_cases(draw):
  """``(h, w, stride, seed)`` of a converted 3x3 convolution."""
  return (
    draw(st.integers(3, 6)),
    draw(st.integers(3, 6)),
    draw(st.integers(1, 2)),
    draw(st.integers(0, 2**16)),
  )


@layer_settings
@given(conv_grid_cases())
def test_zero_query_is_the_quadratic_layer(case):
  """With ``W_qry = 0`` and ``b_qry = 0`` the content scores are exactly 0, so the layer equals
  the position-only quadratic layer (same centres, alpha, out) on padded, strided grids, and
  gradients reach the query (training can switch content on)."""
  h, w, stride, seed = case
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  kernel = jax.random.normal(k0, (3, 3, 2, 3))
  x = jax.random.normal(k1, (2, h, w, 2))
  module, variables = construction.conv_to_attention(
    kernel, strides=stride, padding="SAME", alpha=2.0
  )
  content = module.clone(encoding="quadratic_content", qk_features=4)
  cparams = flax.core.unfreeze(jax.jit(content.init)(k2, x)["params"])
  chex.assert_trees_all_equal_shapes(
    {k: cparams[k] for k in ("centers", "alpha", "out")}, variables["params"]
  )
  cparams.update(variables["params"])
  cparams["query"] = jax.tree.map(jnp.zeros_like, cparams["query"])
  y = jax.jit(content.apply)({"params": cparams}, x)
  ref = jax.jit(module.apply)(variables, x)
  chex.assert_trees_all_close(y, ref, atol=1e-5 * float(jnp.abs(ref).max()), rtol=0)
  grad = jax.jit(jax.grad(lambda p: content.apply({"params": p}, x).sum()))(cparams)
  assert float(jnp.abs(grad["query"]["kernel"]).max()) > 0


def test_queries_read_the_key_grid_at_their_centres():
  """Content scores use the input feature at the query's own position: with one head centred at
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
  for qy, qx in [(0, 0), (0, 2), (4, 4)]:
    q_index = (qy // 2) * 3 + qx // 2
    scores = keys @ (x[0, qy, qx] * 100.0)
    assert int(jnp.argmax(probs[0, 0, q_index])) == int(jnp.argmax(scores))
    assert int(jnp.argmax(probs[0, 0, q_index])) == (qy + 1) * 7 + (qx + 1)


def test_quadratic_content_errors():
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match="hard: expected False"):
    MultiHeadRelativeAttention(1, encoding="quadratic_content", hard=True).init(
      jax.random.key(0), x
    )
  with pytest.raises(ValueError, match="implementation: 'separable' needs"):
    MultiHeadRelativeAttention(1, encoding="quadratic_content", implementation="separable").init(
      jax.random.key(0), x
    )
  layer = MultiHeadRelativeAttention(1, encoding="quadratic_content")
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="encoding: 'quadratic_content' is content-dependent"):
    layer.apply(params, (4, 4), method=layer.position_probabilities)


# ----------------------------------------------------------------------------------------------
# gated positional self-attention (GPSA, ConViT) and ConViT's local initialisation
# ----------------------------------------------------------------------------------------------


def _gpsa_and_halves(h=4, dk=2):
  """A GPSA layer and the quadratic and content layers whose parameters it holds."""
  gpsa = MultiHeadRelativeAttention(h, encoding="gpsa", qk_features=dk)
  quadratic = MultiHeadRelativeAttention(h, encoding="quadratic")
  content = MultiHeadRelativeAttention(
    h, encoding="content", qk_features=dk, use_dot_product_attention=False
  )
  return gpsa, quadratic, content


def test_gpsa_parameters_are_the_quadratic_and_content_ones_plus_the_gate():
  gpsa, quadratic, content = _gpsa_and_halves()
  x = jnp.zeros((1, 3, 4, 2))
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x))  # noqa: E731
  g, q, c = shapes(gpsa)["params"], shapes(quadratic)["params"], shapes(content)["params"]
  assert g == {**q, **c, "gate": (4,)}
  params = jax.jit(gpsa.init)(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(params["gate"], np.ones(4, np.float32))  # ConViT's init


@pytest.mark.parametrize("limit", ["positional", "content"])
def test_gpsa_limits_are_the_quadratic_and_the_content_layer(limit):
  """sigmoid(gate) = 1 (gate = 30 in float32) is the quadratic layer, sigmoid(gate) = 0 the
  content layer, with the same parameters: equal up to float32 rounding of the aggregation."""
  gpsa, quadratic, content = _gpsa_and_halves()
  x = jnp.asarray(rng_for("gpsa", limit).normal(size=(2, 3, 4, 2)), jnp.float32)
  params = flax.core.unfreeze(jax.jit(gpsa.init)(jax.random.key(1), x)["params"])
  params["gate"] = jnp.full((4,), 30.0 if limit == "positional" else -30.0)
  y = jax.jit(gpsa.apply)({"params": params}, x)
  half = quadratic if limit == "positional" else content
  names = ("centers", "spreads", "out") if limit == "positional" else ("query", "key", "out")
  want = jax.jit(half.apply)({"params": {k: params[k] for k in names}}, x)
  bound = 4 * (n_keys(x) + 4 * 2 + 4) * F32_EPS * output_scale({"params": params}, x)
  assert_within(y, want, bound)


@st.composite
def gates(draw):
  """4 gate values in [-8, 8] (float32)."""
  return np.asarray(draw(st.lists(st.floats(-8, 8, width=32), min_size=4, max_size=4)), np.float32)


@layer_settings
@given(gates())
def test_gpsa_rows_sum_to_one_for_any_gate_and_gradients_reach_the_gate(gate):
  gpsa, _, _ = _gpsa_and_halves()
  x = jnp.asarray(rng_for("gpsa rows").normal(size=(2, 3, 4, 2)), jnp.float32)
  params = dict(jax.jit(gpsa.init)(jax.random.key(2), x)["params"], gate=jnp.asarray(gate))
  _, _, probs = forward(gpsa, x, {"params": params})
  chex.assert_shape(probs, (2, 4, 12, 12))  # (B, H, Nq, Nk)
  assert np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=(12 + 8) * F32_EPS, rtol=0)

  def loss(g):
    return jnp.sum(gpsa.apply({"params": dict(params, gate=g)}, x) ** 2)

  grad = jax.jit(jax.grad(loss))(jnp.asarray(gate))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("sharpness_param, name", [("spread", "spreads"), ("alpha", "alpha")])
def test_local_initialisation_puts_centres_on_the_lattice(sharpness_param, name):
  """ConViT's local init: 9 heads on the 3x3 lattice {-1, 0, 1}^2, sharpness = strength."""
  layer = MultiHeadRelativeAttention(
    9, encoding="gpsa", locality_strength=2.0, sharpness_param=sharpness_param
  )
  params = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))["params"]
  want = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], np.float32)
  np.testing.assert_array_equal(params["centers"], want)
  alpha = params[name] if name == "alpha" else 0.5 * params[name] ** 2
  np.testing.assert_allclose(alpha, 2.0, rtol=2 * F32_EPS)
  with pytest.raises(
    ValueError, match=r"num_heads: expected a 2-th power for local centres, got 8"
  ):
    MultiHeadRelativeAttention(8, locality_strength=1.0).init(
      jax.random.key(0), jnp.zeros((1, 5, 5, 2))
    )
  with pytest.raises(ValueError, match=r"locality_strength: expected None or a float > 0"):
    MultiHeadRelativeAttention(9, locality_strength=-1.0).init(
      jax.random.key(0), jnp.zeros((1, 5, 5, 2))
    )


def test_relative_attention_gate_needs_both_halves():
  v, w = jnp.ones((1, 4, 2)), jnp.ones((1, 2, 2))
  with pytest.raises(ValueError, match=r"gate: expected content .* and position scores"):
    attn.relative_attention(v, w, position_logits=jnp.zeros((1, 4, 4)), gate=jnp.zeros((1,)))
