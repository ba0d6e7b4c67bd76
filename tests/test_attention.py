"""Property tests of :mod:`attnconv.attention`: softmax, hard attention, aggregation, grids.

Tolerances come from the dtype: a sum of ``n`` float terms computed in any order is within
``n * eps * sum|terms|`` of the exact sum (Higham, Eq. 3.5, with ``eps = 2u``, a factor-2 slack),
and a value rounded to a dtype is within ``eps / 2`` relatively. Hard attention and the gather
path involve no rounding at all (probabilities are exactly 0.0 and 1.0), so they are compared
exactly.
"""

from __future__ import annotations

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from attnconv import attention as attn
from attnconv import encodings as enc

F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
DTYPES = {"float32": (jnp.float32, F32_EPS), "bfloat16": (jnp.bfloat16, BF16_EPS)}


def run(fn, *args):
  """``jax.jit(fn)(*args)`` as numpy: one compilation per example instead of one per primitive."""
  return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def dropout_key(seed: int) -> jax.Array:
  """An ``rbg`` PRNG key: its Bernoulli sampler compiles in well under a second on CPU, against
  several seconds per shape for the default threefry (the dropout code is key-agnostic)."""
  return jax.random.key(seed, impl="rbg")


def rng_for(*seeds) -> np.random.Generator:
  """A numpy generator seeded from a (process-independent) digest of ``seeds``."""
  return np.random.default_rng(zlib.crc32(repr(seeds).encode()))


@st.composite
def axis_shapes(draw, max_size: int = 4):
  """Per-axis ``(Nq_a, Nk_a)`` for a 1-D, 2-D or 3-D grid."""
  d = draw(st.integers(1, 3))
  size = max_size if d < 3 else 3
  return [(draw(st.integers(1, size)), draw(st.integers(1, size))) for _ in range(d)]


def random_axis_probs(rng, h, shapes):
  """Row-stochastic per-axis factors ``[(H, Nq_a, Nk_a)]``."""
  out = []
  for nq, nk in shapes:
    p = rng.random((h, nq, nk)).astype(np.float32) + 0.01
    out.append((p / p.sum(-1, keepdims=True)).astype(np.float32))
  return out


# ----------------------------------------------------------------------------------------------
# softmax and hard attention
# ----------------------------------------------------------------------------------------------


@given(
  st.sampled_from(sorted(DTYPES)),
  st.integers(1, 3),
  st.integers(1, 5),
  st.integers(1, 40),
  st.floats(0.1, 30.0),
)
def test_softmax_is_a_distribution_over_keys(dtype_name, h, nq, nk, scale):
  dtype, eps = DTYPES[dtype_name]
  logits = (rng_for(h, nq, nk).normal(size=(h, nq, nk)) * scale).astype(np.float32)
  probs = run(lambda x: attn.softmax(x.astype(dtype)), logits)
  chex.assert_type(probs, dtype)
  chex.assert_shape(probs, (h, nq, nk))
  p64 = probs.astype(np.float64)
  assert np.all(p64 >= 0) and np.all(np.isfinite(p64))
  # float32 softmax: exp, sum and divide each round, (nk + 4) eps; the result rounded to dtype:
  # every probability within eps/2 relatively, so the float64 sum within eps/2 of the f32 sum.
  tol = (nk + 4) * F32_EPS + eps / 2
  np.testing.assert_allclose(p64.sum(-1), 1.0, atol=tol, rtol=0)
  # Against a float64 reference (the logits rounded to dtype first).
  x = np.asarray(jnp.asarray(logits, dtype)).astype(np.float64)
  ref = np.exp(x - x.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(p64, ref, atol=tol, rtol=0)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 9), st.sampled_from(sorted(DTYPES)))
def test_hard_attention_is_exactly_one_hot_for_unique_maxima(h, nq, nk, dtype_name):
  dtype, _ = DTYPES[dtype_name]
  rng = rng_for(h, nq, nk)
  # Distinct small integers are exact in bfloat16 too.
  logits = np.stack([rng.permutation(nk) for _ in range(h * nq)]).reshape(h, nq, nk)
  logits = logits.astype(np.float32) - 4.0
  probs = run(lambda x: attn.hard_attention(x.astype(dtype)), logits)
  chex.assert_type(probs, dtype)
  want = np.eye(nk, dtype=np.float32)[np.argmax(logits, -1)]
  np.testing.assert_array_equal(probs.astype(np.float32), want)


@given(st.integers(2, 6), st.data())
def test_hard_attention_is_uniform_over_ties(nk, data):
  ties = data.draw(st.integers(1, nk))
  logits = np.zeros((1, 1, nk), np.float32)
  logits[..., ties:] = -1.0
  probs = run(attn.hard_attention, logits)
  want = np.zeros((1, 1, nk), np.float32)
  want[..., :ties] = np.float32(1.0) / np.float32(ties)
  np.testing.assert_array_equal(probs, want)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_softmax_gradients_match_finite_differences(shape):
  with jax.enable_x64(True):
    x = jnp.asarray(rng_for(*shape).normal(size=shape), jnp.float64)
    check_grads(attn.softmax, (x,), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-7, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


@given(
  st.booleans(),
  st.booleans(),
  st.integers(1, 2),
  st.integers(1, 3),
  st.integers(1, 4),
  st.integers(1, 6),
  st.integers(1, 3),
)
def test_aggregate_matches_naive(batched_probs, per_head_values, b, h, nq, nk, c):
  rng = rng_for(batched_probs, per_head_values, b, h, nq, nk, c)
  p = rng.random((b, h, nq, nk) if batched_probs else (h, nq, nk)).astype(np.float32)
  v = rng.normal(size=(b, nk, h, c) if per_head_values else (b, nk, c)).astype(np.float32)
  got = run(attn.aggregate, p, v)
  chex.assert_shape(got, (b, nq, h, c))
  p64 = p.astype(np.float64)
  p64 = p64 if batched_probs else np.broadcast_to(p64, (b, h, nq, nk))
  v64 = v.astype(np.float64)
  v64 = v64 if per_head_values else np.broadcast_to(v64[:, :, None, :], (b, nk, h, c))
  want = np.einsum("bhqk,bkhc->bqhc", p64, v64)
  bound = nk * F32_EPS * np.einsum("bhqk,bkhc->bqhc", np.abs(p64), np.abs(v64))
  np.testing.assert_array_less(np.abs(got - want), bound + 1e-30)


@given(axis_shapes(), st.integers(1, 3), st.integers(1, 2), st.booleans())
def test_aggregate_separable_equals_dense(shapes, h, c, per_head):
  rng = rng_for(str(shapes), h, c, per_head)
  axis_probs = random_axis_probs(rng, h, shapes)
  key_shape = tuple(nk for _, nk in shapes)
  nk = int(np.prod(key_shape))
  nq = int(np.prod([n for n, _ in shapes]))
  b = 2
  v = rng.normal(size=(b, nk, h, c) if per_head else (b, nk, c)).astype(np.float32)
  sep, full, dense = run(
    lambda ps, vals: (
      attn.aggregate_separable(ps, vals, key_shape),
      attn.combine_axis_probs(ps),
      attn.aggregate(attn.combine_axis_probs(ps), vals),
    ),
    axis_probs,
    v,
  )
  chex.assert_shape([sep, dense], (b, nq, h, c))
  chex.assert_shape(full, (h, nq, nk))
  # combine_axis_probs is the Kronecker (outer) product of the factors in row-major order.
  kron = axis_probs[0].astype(np.float64)
  for p in axis_probs[1:]:
    kron = np.stack([np.kron(kron[i], p[i]) for i in range(h)])
  d = len(shapes)
  np.testing.assert_allclose(full, kron, rtol=2 * d * F32_EPS, atol=0)
  np.testing.assert_allclose(full.astype(np.float64).sum(-1), 1.0, atol=(nk + 2 * d) * F32_EPS)
  v64 = v.astype(np.float64) if per_head else np.broadcast_to(v[:, :, None, :], (b, nk, h, c))
  absum = np.einsum("hqk,bkhc->bqhc", np.abs(kron), np.abs(v64))
  bound = (nk + sum(k for _, k in shapes) + 4 * d) * F32_EPS * absum
  np.testing.assert_array_less(np.abs(sep - dense), bound + 1e-30)


def test_aggregate_gradients_match_finite_differences():
  rng = rng_for(7)
  with jax.enable_x64(True):
    p = jnp.asarray(rng.random((2, 3, 4)))
    v = jnp.asarray(rng.normal(size=(2, 4, 5)))
    pb = jnp.asarray(rng.random((2, 2, 3, 4)))
    vh = jnp.asarray(rng.normal(size=(2, 4, 2, 5)))
    for args in ((p, v), (pb, vh)):
      check_grads(attn.aggregate, args, order=1, modes=("fwd", "rev"), eps=1e-6)


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------


@given(st.sampled_from([0.1, 0.25, 0.5, 0.8]), st.integers(0, 3))
def test_dropout_masks_differ_per_example_and_preserve_mean(rate, seed):
  b, h, nq, nk = 4, 2, 8, 16
  probs = rng_for(seed).random((h, nq, nk)).astype(np.float32)
  out = run(lambda k, p: attn.dropout_probs(k, p, rate, b), dropout_key(seed), probs)
  chex.assert_shape(out, (b, h, nq, nk))
  chex.assert_type(out, jnp.float32)
  scaled = probs / np.float32(1.0 - rate)
  kept = out != 0
  # Every entry is either dropped or the probability scaled by 1 / (1 - rate).
  np.testing.assert_allclose(
    np.where(kept, out, scaled[None]), np.broadcast_to(scaled, out.shape), rtol=F32_EPS, atol=0
  )
  # Independent masks: 256 Bernoulli draws per example; two coincide with probability
  # <= max(rate, 1 - rate)^256 < 1e-24.
  for i in range(b):
    for j in range(i):
      assert np.any(kept[i] != kept[j]), f"examples {i} and {j} share a dropout mask"
  # The keep fraction is 1 - rate within 6 binomial standard deviations.
  n = kept.size
  assert abs(kept.mean() - (1 - rate)) <= 6 * np.sqrt(rate * (1 - rate) / n)


def test_dropout_expected_value_is_preserved():
  probs = jnp.full((2, 16, 64), 1.0 / 64, jnp.float32)
  rate = 0.3
  out = run(lambda k: attn.dropout_probs(k, probs, rate, 8), dropout_key(3))
  n = out.size
  # mean(out) * 64 is the kept fraction / (1 - rate): expectation 1, std sqrt(rate / (1-rate) / n).
  assert abs(out.mean() * 64 - 1.0) <= 6 * np.sqrt(rate / (1 - rate) / n)


def test_dropout_rate_zero_is_identity_and_batched_probs_keep_shape():
  probs = rng_for(1).random((2, 3, 4, 5)).astype(np.float32)
  out = run(lambda k: attn.dropout_probs(k, probs, 0.0, 2), dropout_key(0))
  np.testing.assert_array_equal(out, probs)


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_dropout_rate_out_of_range(rate):
  with pytest.raises(ValueError, match=r"rate: expected 0 <= rate < 1, got"):
    attn.dropout_probs(jax.random.key(0), jnp.ones((1, 2, 2)), rate, 2)


# ----------------------------------------------------------------------------------------------
# key and query grids
# ----------------------------------------------------------------------------------------------


@st.composite
def paddings(draw, d, allow_negative=False):
  lo = -1 if allow_negative else 0
  return [(draw(st.integers(lo, 2)), draw(st.integers(lo, 2))) for _ in range(d)]


@given(st.integers(1, 3), st.sampled_from(["zeros", "circular", "reflect"]), st.data())
def test_key_grid_matches_numpy_pad(d, mode, data):
  spatial = tuple(data.draw(st.integers(3, 4)) for _ in range(d))
  pads = data.draw(paddings(d))
  x = rng_for(d, mode, spatial).normal(size=(2, *spatial, 2)).astype(np.float32)
  keys, kpos = attn.key_grid(jnp.asarray(x), pads, mode=mode)
  np_mode = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}[mode]
  np.testing.assert_array_equal(np.asarray(keys), np.pad(x, [(0, 0), *pads, (0, 0)], mode=np_mode))
  for a in range(d):
    np.testing.assert_array_equal(kpos[a], np.arange(keys.shape[1 + a]) - pads[a][0])
    assert kpos[a].dtype == np.int32


@given(st.integers(1, 3), st.data())
def test_key_grid_input_dilation_places_pixels_at_dilated_coordinates(d, data):
  spatial = tuple(data.draw(st.integers(1, 4)) for _ in range(d))
  dil = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
  pads = data.draw(paddings(d, allow_negative=True))
  x = rng_for(d, spatial, dil).normal(size=(1, *spatial, 1)).astype(np.float32) + 10.0
  try:
    keys, kpos = attn.key_grid(jnp.asarray(x), pads, input_dilation=dil)
  except ValueError as err:
    assert "key grid would be empty" in str(err)
    return
  keys = np.asarray(keys)
  coords = np.meshgrid(*kpos, indexing="ij")
  for idx in np.ndindex(*keys.shape[1:-1]):
    c = [coords[a][idx] for a in range(d)]
    on_pixel = all(c[a] % dil[a] == 0 and 0 <= c[a] // dil[a] < spatial[a] for a in range(d))
    want = x[(0, *(c[a] // dil[a] for a in range(d)), 0)] if on_pixel else 0.0
    assert keys[(0, *idx, 0)] == want


@given(st.integers(1, 3), st.data())
def test_query_grid_counts_and_coordinates(d, data):
  key_shape = tuple(data.draw(st.integers(1, 7)) for _ in range(d))
  pads = data.draw(paddings(d))
  strides = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
  window = tuple(data.draw(st.integers(1, k)) for k in key_shape)
  qpos = attn.query_grid(key_shape, pads, strides=strides, window=window)
  for a in range(d):
    n = (key_shape[a] - window[a]) // strides[a] + 1
    want = np.arange(n) * strides[a] - pads[a][0] + (window[a] - 1) // 2
    np.testing.assert_array_equal(qpos[a], want)
    # The window of every query lies on the key grid.
    assert qpos[a][-1] - (window[a] - 1) // 2 + window[a] - 1 <= key_shape[a] - 1 - pads[a][0]


@given(st.integers(1, 3), st.data())
def test_gather_hard_equals_dense_hard_aggregation_exactly(d, data):
  spatial = tuple(data.draw(st.integers(2, 4)) for _ in range(d))
  h = data.draw(st.integers(1, 4))
  r = 1  # integer centres in {-r..r}^d, keys padded by r so every target exists
  centers = np.asarray(
    data.draw(st.lists(st.integers(-r, r), min_size=h * d, max_size=h * d)), np.float32
  ).reshape(h, d)
  # Non-integer parts below 1/2 round to the same shift.
  jitter = np.float32(data.draw(st.sampled_from([0.0, 0.25, -0.375])))
  strides = tuple(data.draw(st.integers(1, 2)) for _ in range(d))
  pads = [(r, r)] * d
  x = rng_for(d, spatial, h).normal(size=(2, *spatial, 3)).astype(np.float32)
  keys, kpos = attn.key_grid(jnp.asarray(x), pads)
  qpos = attn.query_grid(keys.shape[1:-1], pads, strides=strides, window=(2 * r + 1,) * d)
  gathered, dense = run(
    lambda kk, c: (
      attn.gather_hard(kk, kpos, qpos, c + jitter),
      attn.aggregate(
        attn.hard_attention(enc.quadratic_logits(qpos, kpos, c, 1.0)),
        kk.reshape(kk.shape[0], -1, kk.shape[-1]),
      ),
    ),
    keys,
    centers,
  )
  nq = int(np.prod([len(q) for q in qpos]))
  chex.assert_shape(gathered, (2, nq, h, 3))
  np.testing.assert_array_equal(gathered, dense)
  # And it is the shifted input, read directly.
  q_grid = np.stack(np.meshgrid(*qpos, indexing="ij"), -1).reshape(-1, d)
  padded = np.asarray(keys)
  for hi in range(h):
    idx = q_grid + centers[hi].astype(int) + r  # key index = coordinate + low padding
    want = padded[(slice(None), *idx.T, slice(None))]
    np.testing.assert_array_equal(gathered[:, :, hi], want)


@given(st.integers(1, 3), st.data())
def test_gather_project_blocks_equal_the_float64_sum(d, data):
  """Every block schedule (blocks of query rows, of images, with remainders) computes
  ``sum_h view_h W_h``: within ``H C eps sum|terms|`` of the float64 sum, as the single block."""
  spatial = tuple(data.draw(st.integers(2, 5)) for _ in range(d))
  b, h, c, dout = (data.draw(st.integers(1, n)) for n in (3, 4, 3, 2))
  centers = np.asarray(
    data.draw(st.lists(st.integers(-1, 1), min_size=h * d, max_size=h * d)), np.float32
  ).reshape(h, d)
  strides = tuple(data.draw(st.integers(1, 2)) for _ in range(d))
  rng = rng_for("blocks", d, spatial, b, h, c)
  x = rng.normal(size=(b, *spatial, c)).astype(np.float32)
  kernel = rng.normal(size=(h, c, dout)).astype(np.float32)
  keys, kpos = attn.key_grid(jnp.asarray(x), [(1, 1)] * d)
  qpos = attn.query_grid(keys.shape[1:-1], [(1, 1)] * d, strides=strides, window=(3,) * d)
  views = np.asarray(attn.gather_hard(keys, kpos, qpos, jnp.asarray(centers)), np.float64)
  want = np.einsum("bqhc,hcd->bqd", views, kernel.astype(np.float64))
  bound = h * c * F32_EPS * np.einsum("bqhc,hcd->bqd", np.abs(views), np.abs(kernel))
  entries = b * views.shape[1] * h * c  # the whole im2col buffer
  limit = data.draw(st.integers(0, entries + 1))
  saved = attn.IM2COL_MAX_ELEMENTS
  try:
    outs = {}
    for name, value in (("blocks", limit), ("single", entries)):
      attn.IM2COL_MAX_ELEMENTS = value  # read at trace time: a fresh jit per schedule
      fn = jax.jit(lambda kk, k: attn.gather_project(kk, kpos, qpos, jnp.asarray(centers), k))
      outs[name] = np.asarray(fn(keys, jnp.asarray(kernel)))
  finally:
    attn.IM2COL_MAX_ELEMENTS = saved
  chex.assert_shape(outs["blocks"], want.shape)
  assert np.all(np.abs(outs["blocks"] - want) <= bound)
  assert np.all(np.abs(outs["single"] - want) <= bound)


# ----------------------------------------------------------------------------------------------
# invalid arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "call, match",
  [
    (
      lambda: attn.aggregate(jnp.ones((2, 3)), jnp.ones((1, 3, 2))),
      r"probs: expected rank 3 or 4, got shape \(2, 3\)",
    ),
    (
      lambda: attn.aggregate(jnp.ones((1, 2, 3)), jnp.ones((3, 2))),
      r"values: expected rank 3 or 4, got shape \(3, 2\)",
    ),
    (
      lambda: attn.aggregate(jnp.ones((1, 2, 3)), jnp.ones((1, 4, 2))),
      r"values: expected 3 keys on axis 1 \(as probs\), got shape \(1, 4, 2\)",
    ),
    (
      lambda: attn.aggregate(jnp.ones((2, 2, 3)), jnp.ones((1, 3, 3, 2))),
      r"values: expected 2 heads on axis 2 \(as probs\), got shape \(1, 3, 3, 2\)",
    ),
    (
      lambda: attn.aggregate_separable([jnp.ones((1, 2, 3))], jnp.ones((1, 3, 2)), (4,)),
      r"key_shape: expected the key sizes of axis_probs \(3,\), got \(4,\)",
    ),
    (
      lambda: attn.aggregate_separable([jnp.ones((1, 2, 3))], jnp.ones((1, 4, 2)), (3,)),
      r"values: expected 3 keys on axis 1",
    ),
    (
      lambda: attn.key_grid(jnp.ones((2, 3)), [(0, 0)]),
      r"x: expected rank 3 to 5 .*got \(2, 3\)",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 2, 2, 2, 2, 1)), [(0, 0)] * 4),
      r"x: expected rank 3 to 5",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(0, 0), (0, 0)]),
      r"padding: expected 1 \(low, high\) pairs",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], mode="edge"),
      r"mode: expected one of \('zeros', 'circular', 'reflect'\), got 'edge'",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], input_dilation=0),
      r"input_dilation: expected 1 integers >= 1, got 0",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], mode="circular", input_dilation=2),
      r"input_dilation: expected 1 with 'circular' padding, got \(2,\)",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(-1, 0)], mode="reflect"),
      r"padding: expected non-negative pairs with 'reflect' padding",
    ),
    (
      lambda: attn.key_grid(jnp.ones((1, 3, 1)), [(-2, -1)]),
      r"padding: the key grid would be empty",
    ),
    (
      lambda: attn.query_grid((3, 4), [(0, 0), (0, 0)], strides=(1, 1), window=(3, 5)),
      r"window: expected at most 4 keys on axis 1 \(key grid \(3, 4\)\), got 5",
    ),
  ],
)
def test_invalid_arguments_raise_named_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
