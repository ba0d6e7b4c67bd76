"""Property tests of :mod:`attnconv.attention`: probabilities, aggregation, the MHSA equation.

Tolerances come from the dtype. A sum of ``n`` rounded float32 products, in any order, is within
``n u sum|terms|`` of the exact sum (Higham, Eq. 3.5; ``u = eps / 2``, and the bounds below use
``eps``: a factor-2 slack). Logits within ``delta`` of the exact ones move each softmax
probability by at most ``p (e^(2 delta) - 1) <= 2.5 delta p`` (for ``delta`` below 0.1), and the
float32 softmax adds ``(Nk + 4) u`` relatively. Hard attention and the gather path multiply by
exact zeros and ones, so they are compared exactly.

:func:`attnconv.attention.relative_attention` is compared with a float64 evaluation of the MHSA
equation, ``y_q = sum_h softmax(A_h)[q] V_h W_h + b``, for every combination of scores (per-axis,
full, per-image position scores, content scores) and algorithm (dense, separable, fused,
dropout, hard) it supports. The arrays have a few fixed shapes and seeded values, so each
algorithm compiles once or twice for all examples.
"""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

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
from attnconv import grids

F32_EPS = float(jnp.finfo(jnp.float32).eps)
F32_TINY = float(jnp.finfo(jnp.float32).tiny)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
DTYPES = {"float32": (jnp.float32, F32_EPS), "bfloat16": (jnp.bfloat16, BF16_EPS)}
SEEDS = st.integers(0, 2**32 - 1)


def rng_for(*seeds) -> np.random.Generator:
  """A numpy generator seeded from a (process-independent) digest of ``seeds``."""
  return np.random.default_rng(zlib.crc32(repr(seeds).encode()))


def dropout_key(seed: int) -> jax.Array:
  """An ``rbg`` PRNG key: its Bernoulli sampler compiles in well under a second on CPU, against
  seconds per shape for the default threefry (the dropout code is key-agnostic)."""
  return jax.random.key(seed, impl="rbg")


def np_softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return z / np.sum(z, axis=-1, keepdims=True)


def np_hard(logits: np.ndarray) -> np.ndarray:
  """Uniform over the argmax set of the last axis."""
  is_max = (logits == np.max(logits, axis=-1, keepdims=True)).astype(np.float64)
  return is_max / np.sum(is_max, axis=-1, keepdims=True)


def np_combine(terms: list[np.ndarray]) -> np.ndarray:
  """``A[..., q, k] = sum_a A_a[..., q_a, k_a]`` over row-major grids, in float64."""
  d = len(terms)
  lead = terms[0].shape[:-2]
  q_shape = [t.shape[-2] for t in terms]
  k_shape = [t.shape[-1] for t in terms]
  total = np.zeros((*lead, *q_shape, *k_shape))
  for a, t in enumerate(terms):
    shape = [*lead] + [1] * (2 * d)
    shape[len(lead) + a], shape[len(lead) + d + a] = t.shape[-2:]
    total = total + t.astype(np.float64).reshape(shape)
  return total.reshape(*lead, int(np.prod(q_shape)), int(np.prod(k_shape)))


softmax = jax.jit(attn.softmax)
hard_attention = jax.jit(attn.hard_attention)
aggregate = jax.jit(attn.aggregate)
dropout_probs = jax.jit(attn.dropout_probs, static_argnames=("rate", "batch_size"))


# ----------------------------------------------------------------------------------------------
# softmax and hard attention
# ----------------------------------------------------------------------------------------------

PROB_SHAPES = ((1, 1, 1), (3, 2, 17))


@given(st.sampled_from(sorted(DTYPES)), st.sampled_from(PROB_SHAPES), SEEDS, st.floats(0.1, 30))
def test_softmax_is_a_distribution_over_keys(dtype_name, shape, seed, scale):
  dtype, eps = DTYPES[dtype_name]
  nk = shape[-1]
  logits = jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)
  probs = softmax(logits)
  chex.assert_type(probs, dtype)
  chex.assert_shape(probs, shape)
  p64 = np.asarray(probs, np.float64)
  assert np.all(p64 >= 0) and np.all(np.isfinite(p64))
  # float32 softmax: (nk + 4) u; then rounded to dtype: every probability within u_dtype.
  tol = (nk + 4) * F32_EPS + eps / 2
  np.testing.assert_allclose(p64.sum(-1), 1.0, atol=tol, rtol=0)
  np.testing.assert_allclose(p64, np_softmax(np.asarray(logits, np.float64)), atol=tol, rtol=0)


@given(st.sampled_from(sorted(DTYPES)), st.sampled_from(PROB_SHAPES), SEEDS)
def test_hard_attention_is_exactly_one_hot_and_the_sharp_softmax_limit(dtype_name, shape, seed):
  """Distinct integer logits (exact in bfloat16): exactly one-hot on the argmax; and the limit
  of ``softmax(alpha logits)``, within ``Nk e^-alpha`` for gaps of at least 1 (Lemma 1)."""
  dtype, eps = DTYPES[dtype_name]
  h, nq, nk = shape
  rng = np.random.default_rng(seed)
  logits = np.stack([rng.permutation(nk) for _ in range(h * nq)]).reshape(shape) - 4.0
  probs = hard_attention(jnp.asarray(logits, dtype))
  chex.assert_type(probs, dtype)
  want = np.eye(nk)[np.argmax(logits, -1)]
  np.testing.assert_array_equal(np.asarray(probs, np.float64), want)
  alpha = 30.0
  sharp = np.asarray(softmax(jnp.asarray(alpha * logits, jnp.float32)), np.float64)
  np.testing.assert_allclose(sharp, want, atol=nk * np.exp(-alpha) + (nk + 4) * F32_EPS, rtol=0)


@given(st.integers(1, 6))
def test_hard_attention_is_uniform_over_ties(ties):
  logits = np.full((1, 1, 6), -1.0, np.float32)
  logits[..., :ties] = 2.5
  probs = np.asarray(hard_attention(logits))
  want = np.zeros((1, 1, 6), np.float32)
  want[..., :ties] = np.float32(1.0) / np.float32(ties)
  np.testing.assert_array_equal(probs, want)


def test_softmax_gradients_match_finite_differences():
  with jax.enable_x64(True):
    x = jnp.asarray(rng_for(5).normal(size=(2, 3, 4)), jnp.float64)
    fn = jax.jit(attn.softmax)
    assert fn(x).dtype == jnp.float64
    check_grads(fn, (x,), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-7, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# aggregation and projection
# ----------------------------------------------------------------------------------------------

# (batch, heads, queries, keys, channels)
AGG_SHAPES = ((1, 1, 1, 1, 1), (2, 3, 4, 6, 2))


@given(st.booleans(), st.booleans(), st.sampled_from(AGG_SHAPES), SEEDS)
def test_aggregate_matches_naive(batched_probs, per_head_values, shape, seed):
  b, h, nq, nk, c = shape
  rng = np.random.default_rng(seed)
  p = rng.random((b, h, nq, nk) if batched_probs else (h, nq, nk)).astype(np.float32)
  v = rng.normal(size=(b, nk, h, c) if per_head_values else (b, nk, c)).astype(np.float32)
  got = np.asarray(aggregate(p, v))
  chex.assert_shape(got, (b, nq, h, c))
  p64 = np.broadcast_to(p.astype(np.float64), (b, h, nq, nk))
  v64 = v.astype(np.float64)
  v64 = v64 if per_head_values else np.broadcast_to(v64[:, :, None, :], (b, nk, h, c))
  want = np.zeros((b, nq, h, c))
  for bi, qi, hi in np.ndindex(b, nq, h):
    want[bi, qi, hi] = sum(p64[bi, hi, qi, k] * v64[bi, k, hi] for k in range(nk))
  bound = nk * F32_EPS * np.einsum("bhqk,bkhc->bqhc", np.abs(p64), np.abs(v64))
  np.testing.assert_array_less(np.abs(got - want), bound + 1e-30)


@jax.jit
def _separable_and_dense(axis_probs, values):
  full = attn.combine_axis_probs(axis_probs)
  return attn.aggregate_separable(axis_probs, values), full, attn.aggregate(full, values)


# per-axis (queries, keys) of 1-D to 3-D grids
AXIS_SHAPES = (((3, 5),), ((2, 3), (1, 4)), ((2, 2), (1, 3), (3, 2)))


@given(st.sampled_from(AXIS_SHAPES), st.booleans(), SEEDS)
def test_aggregate_separable_equals_dense(shapes, per_head, seed):
  b, h, c = 2, 3, 2
  rng = np.random.default_rng(seed)
  axis_probs = []
  for nq, nk in shapes:
    p = rng.random((h, nq, nk)) + 0.01
    axis_probs.append((p / p.sum(-1, keepdims=True)).astype(np.float32))
  key_shape = tuple(nk for _, nk in shapes)
  nk, nq, d = int(np.prod(key_shape)), int(np.prod([n for n, _ in shapes])), len(shapes)
  v = rng.normal(size=(b, nk, h, c) if per_head else (b, nk, c)).astype(np.float32)
  sep, full, dense = (np.asarray(x) for x in _separable_and_dense(axis_probs, v))
  chex.assert_shape([sep, dense], (b, nq, h, c))
  chex.assert_shape(full, (h, nq, nk))
  # combine_axis_probs is the Kronecker (outer) product of the factors, row-major.
  kron = axis_probs[0].astype(np.float64)
  for p in axis_probs[1:]:
    kron = np.stack([np.kron(kron[i], p[i]) for i in range(h)])
  np.testing.assert_allclose(full, kron, rtol=d * F32_EPS, atol=0)
  np.testing.assert_allclose(full.astype(np.float64).sum(-1), 1.0, atol=(nk + 2 * d) * F32_EPS)
  v64 = v.astype(np.float64) if per_head else np.broadcast_to(v[:, :, None, :], (b, nk, h, c))
  absum = np.einsum("hqk,bkhc->bqhc", kron, np.abs(v64))
  bound = (nk + sum(k for _, k in shapes) + 4 * d) * F32_EPS * absum
  np.testing.assert_array_less(np.abs(sep - dense), bound + 1e-30)


@jax.jit
def _project_paths(probs, values, kernel, bias):
  return (
    attn.project(attn.aggregate(probs, values), kernel, bias),
    attn.aggregate_project(probs, values, kernel),
  )


@given(st.sampled_from(AGG_SHAPES), st.integers(1, 3), SEEDS)
def test_aggregate_project_equals_project_of_aggregate(shape, dout, seed):
  """``sum_h (P_h V) W_h (+ b)`` as one einsum or as aggregate then project: both within the
  float32 bound of the float64 sum (of ``Nk`` keys and ``H C`` channels, in any order)."""
  b, h, nq, nk, c = shape
  rng = np.random.default_rng(seed)
  p = rng.random((h, nq, nk)).astype(np.float32)
  v = rng.normal(size=(b, nk, c)).astype(np.float32)
  w = rng.normal(size=(h, c, dout)).astype(np.float32)
  bias = rng.normal(size=(dout,)).astype(np.float32)
  two_step, fused = (np.asarray(x) for x in _project_paths(p, v, w, bias))
  chex.assert_shape([two_step, fused], (b, nq, dout))
  p64, v64, w64 = (x.astype(np.float64) for x in (p, v, w))
  want = np.einsum("hqk,bkc,hcd->bqd", p64, v64, w64)
  absw = np.einsum("hqk,bkc,hcd->bqd", np.abs(p64), np.abs(v64), np.abs(w64))
  bound = (nk + h * c + 2) * F32_EPS * absw
  np.testing.assert_array_less(np.abs(fused - want), bound + 1e-30)
  np.testing.assert_array_less(
    np.abs(two_step - want - bias), bound + F32_EPS * np.abs(want + bias) + 1e-30
  )


def test_aggregate_gradients_match_finite_differences():
  rng = rng_for(7)
  with jax.enable_x64(True):
    p = jnp.asarray(rng.random((2, 3, 4)))
    v = jnp.asarray(rng.normal(size=(2, 4, 5)))
    pb = jnp.asarray(rng.random((2, 2, 3, 4)))
    vh = jnp.asarray(rng.normal(size=(2, 4, 2, 5)))
    for args in ((p, v), (pb, vh)):
      check_grads(jax.jit(attn.aggregate), args, order=1, modes=("fwd", "rev"), eps=1e-6)
    axis_probs = [jnp.asarray(rng.random((2, 2, 3))), jnp.asarray(rng.random((2, 3, 2)))]
    check_grads(
      jax.jit(attn.aggregate_separable),
      (axis_probs, jnp.asarray(rng.normal(size=(2, 6, 3)))),
      order=1,
      modes=("fwd", "rev"),
      eps=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------


@given(st.sampled_from([0.1, 0.25, 0.5, 0.8]), st.integers(0, 3))
def test_dropout_masks_differ_per_example_and_rescale_kept_entries(rate, seed):
  b, h, nq, nk = 4, 2, 8, 16
  probs = rng_for(seed).random((h, nq, nk)).astype(np.float32)
  out = np.asarray(dropout_probs(dropout_key(seed), probs, rate=rate, batch_size=b))
  chex.assert_shape(out, (b, h, nq, nk))
  chex.assert_type(out, jnp.float32)
  t = round(rate * 2**16)  # the drop probability is t / 2^16, within 2^-17 of rate
  assert abs(t / 2**16 - rate) <= 2.0**-17
  scaled = probs * np.float32(2**16 / (2**16 - t))
  kept = out != 0
  # Every entry is either dropped or the probability scaled by 2^16 / (2^16 - t).
  np.testing.assert_allclose(
    np.where(kept, out, scaled[None]), np.broadcast_to(scaled, out.shape), rtol=F32_EPS, atol=0
  )
  # Independent masks: 256 Bernoulli draws per example; two coincide with probability
  # <= max(rate, 1 - rate)^256 < 1e-24.
  for i in range(b):
    for j in range(i):
      assert np.any(kept[i] != kept[j]), f"examples {i} and {j} share a dropout mask"
  # The keep fraction is 1 - rate within 6 binomial standard deviations.
  assert abs(kept.mean() - (1 - rate)) <= 6 * np.sqrt(rate * (1 - rate) / kept.size)


@given(st.sampled_from([0.1, 0.3, 0.5]), st.integers(0, 3))
def test_dropout_mask_is_16_bit_halves_of_jax_random_bits(rate, seed):
  """The documented mask: the 32-bit words of ``jax.random.bits`` split into 16-bit halves (in
  the platform's byte order, as ``lax.bitcast_convert_type``), an entry kept iff its half is
  ``>= round(2^16 rate)``; odd sizes use the first half of the last word."""
  shape = (3, 5, 7)  # 105 entries: 53 words
  key = dropout_key(seed)
  out = np.asarray(dropout_probs(key, jnp.ones(shape, jnp.float32), rate))
  words = np.asarray(jax.random.bits(key, (53,), jnp.uint32))
  halves = words.view(np.uint16)[:105].reshape(shape)
  np.testing.assert_array_equal(out != 0, halves >= round(rate * 2**16))


@given(st.sampled_from([0.1, 0.5]), st.integers(0, 3))
def test_dropout_without_batch_size_draws_one_mask_of_the_probs_shape(rate, seed):
  """``batch_size=None``: one mask of the probabilities' own shape (shared by the batch when
  they are batch-free); per-image probabilities keep their shape whatever ``batch_size``."""
  probs = rng_for(seed).random((2, 8, 16)).astype(np.float32) + 0.5
  shared = np.asarray(dropout_probs(dropout_key(seed), probs, rate=rate, batch_size=None))
  chex.assert_shape(shared, probs.shape)
  assert np.any(shared == 0) and np.any(shared != 0)
  # The mask depends on the key and the shape only.
  ones = np.asarray(dropout_probs(dropout_key(seed), np.ones_like(probs), rate=rate))
  np.testing.assert_array_equal(shared != 0, ones != 0)
  batched = np.stack([probs, probs])
  per_image = np.asarray(dropout_probs(dropout_key(seed), batched, rate=rate, batch_size=2))
  chex.assert_shape(per_image, batched.shape)


def test_dropout_expected_value_is_preserved():
  probs = jnp.full((2, 16, 64), 1.0 / 64, jnp.float32)
  rate = 0.3
  out = np.asarray(dropout_probs(dropout_key(3), probs, rate=rate, batch_size=8))
  # mean(out) * 64 is the kept fraction / (1 - rate): expectation 1, std sqrt(rate / (1-rate) / n).
  assert abs(out.mean() * 64 - 1.0) <= 6 * np.sqrt(rate / (1 - rate) / out.size)


def test_dropout_rate_zero_is_identity():
  probs = rng_for(1).random((2, 3, 4, 5)).astype(np.float32)
  out = dropout_probs(dropout_key(0), probs, rate=0.0, batch_size=2)
  np.testing.assert_array_equal(np.asarray(out), probs)


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_dropout_rate_out_of_range(rate):
  with pytest.raises(ValueError, match=r"rate: expected 0 <= rate < 1 - 2\^-17, got"):
    attn.dropout_probs(dropout_key(0), jnp.ones((1, 2, 2)), rate, 2)


# ----------------------------------------------------------------------------------------------
# relative_attention: the MHSA equation
# ----------------------------------------------------------------------------------------------

B, H, C, D = 2, 2, 3, 4
# (query grid, key grid)
LAYOUTS = (((3,), (5,)), ((2, 3), (3, 4)), ((2, 1, 2), (2, 2, 3)))
DROPOUT_RATE = 0.25


class Case(NamedTuple):
  """One algorithm of relative_attention: which scores, values and options."""

  position: str | None  # None, "axis" (per-axis terms), "full" (H, Nq, Nk), "image" (B, ...)
  content: bool = False
  hard: bool = False
  implementation: str = "dense"
  per_head_values: bool = False
  dk: int = C  # == C: the fused dot_product_attention path applies
  fused: bool = True  # use_dot_product_attention
  dropout: bool = False
  shared_mask: bool = False
  layout: int = 1  # a second layout besides LAYOUTS[1] (for per-axis scores: another d)


CASES = {
  "axis-dense": Case("axis", layout=2),  # aggregate_project
  "axis-separable": Case("axis", implementation="separable", layout=2),
  "axis-separable-per-head": Case(
    "axis", implementation="separable", per_head_values=True, layout=0
  ),
  "full-per-head": Case("full", per_head_values=True),  # aggregate, then project
  "image": Case("image"),  # per-image position scores
  "hard-axis": Case("axis", hard=True, layout=0),
  "hard-axis-separable": Case("axis", hard=True, implementation="separable", layout=2),
  "hard-full-per-head": Case("full", hard=True, per_head_values=True),
  "content": Case(None, content=True),  # jax.nn.dot_product_attention
  "content-axis": Case("axis", content=True, layout=2),
  "content-image-per-head": Case("image", content=True, per_head_values=True),
  "content-dk": Case("full", content=True, dk=2),  # D_k != C: the explicit path
  "content-axis-explicit": Case("axis", content=True, fused=False, layout=0),
}
DROPOUT_CASES = {
  "dropout-axis-shared": Case("axis", dropout=True, shared_mask=True),
  "dropout-axis-per-example": Case("axis", dropout=True, layout=2),
  "dropout-axis-separable": Case("axis", implementation="separable", dropout=True),
  "dropout-full-per-head-shared": Case(
    "full", per_head_values=True, dropout=True, shared_mask=True
  ),
  "dropout-content-axis": Case("axis", content=True, dropout=True, shared_mask=True),
}
ALL_CASES = {**CASES, **DROPOUT_CASES}


class Inputs(NamedTuple):
  values: np.ndarray
  kernel: np.ndarray
  bias: np.ndarray
  position: np.ndarray | list[np.ndarray] | None
  query: np.ndarray | None
  key: np.ndarray | None
  q_shape: tuple[int, ...]
  k_shape: tuple[int, ...]


def make_inputs(case: Case, layout: int, seed: int) -> Inputs:
  q_shape, k_shape = LAYOUTS[layout]
  nq, nk = int(np.prod(q_shape)), int(np.prod(k_shape))
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)

  values = normal(B, nk, H, C) if case.per_head_values else normal(B, nk, C)
  position = {
    None: None,
    "axis": [normal(H, nq_a, nk_a, scale=2.0) for nq_a, nk_a in zip(q_shape, k_shape)],
    "full": normal(H, nq, nk, scale=2.0),
    "image": normal(B, H, nq, nk, scale=2.0),
  }[case.position]
  query = normal(B, nq, H, case.dk) if case.content else None
  key = normal(B, nk, H, case.dk) if case.content else None
  return Inputs(values, normal(H, C, D), normal(D), position, query, key, q_shape, k_shape)


mhsa = jax.jit(
  attn.relative_attention,
  static_argnames=(
    "hard",
    "implementation",
    "dropout_rate",
    "shared_dropout_mask",
    "use_dot_product_attention",
    "return_probs",
  ),
)


def call(case: Case, x: Inputs, *, return_probs: bool, seed: int = 0, fused: bool | None = None):
  kwargs = {}
  if case.dropout:
    kwargs = dict(
      dropout_rate=DROPOUT_RATE, dropout_rng=dropout_key(seed), shared_dropout_mask=case.shared_mask
    )
  return mhsa(
    x.values,
    x.kernel,
    x.bias,
    position_logits=x.position,
    query=x.query,
    key=x.key,
    hard=case.hard,
    implementation=case.implementation,
    use_dot_product_attention=case.fused if fused is None else fused,
    return_probs=return_probs,
    **kwargs,
  )


def dropout_mask(case: Case, x: Inputs, seed: int) -> np.ndarray:
  """The keep mask relative_attention draws: its key, the probabilities' shape and one mask per
  example unless ``shared_mask`` (batch-free probabilities only)."""
  nq, nk = int(np.prod(x.q_shape)), int(np.prod(x.k_shape))
  batch_free = not case.content and case.position != "image"
  shape = (H, nq, nk) if batch_free else (B, H, nq, nk)
  batch = None if case.shared_mask else B
  kept = dropout_probs(dropout_key(seed), jnp.ones(shape), rate=DROPOUT_RATE, batch_size=batch)
  return np.asarray(kept) != 0


class Reference(NamedTuple):
  y: np.ndarray  # (B, Nq, D)
  probs: np.ndarray  # (1 | B, H, Nq, Nk), before dropout
  bound: np.ndarray  # on |y - y_float32|, (B, Nq, D)
  prob_tol: np.ndarray  # relative, on the probabilities, (1 | B, H, Nq, 1)


def reference(case: Case, x: Inputs, mask: np.ndarray | None = None) -> Reference:
  """``y_q = sum_h P_h[q] V_h W_h + b`` in float64, with the float32 error bound."""
  d = len(x.q_shape)
  nk = int(np.prod(x.k_shape))
  scores, abs_scores, roundings = 0.0, 0.0, 0  # roundings of a float32 logit
  if case.position == "axis":
    scores = np_combine(x.position)[None]
    abs_scores = np_combine([np.abs(t) for t in x.position])[None]
    roundings += d - 1
  elif case.position is not None:
    pos = x.position.astype(np.float64)
    scores, abs_scores = pos.reshape(-1, *pos.shape[-3:]), np.abs(pos).reshape(-1, *pos.shape[-3:])
  if case.content:
    q64, k64 = x.query.astype(np.float64), x.key.astype(np.float64)
    scale = 1.0 / np.sqrt(case.dk)
    scores = scores + np.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    abs_scores = abs_scores + np.einsum("bqhd,bkhd->bhqk", np.abs(q64), np.abs(k64)) * scale
    roundings += case.dk + 3  # the scale, the scaled query, D_k products and sums, + position
  if case.hard:
    probs = np_hard(scores)
    prob_tol = np.zeros((*probs.shape[:-1], 1))  # exact zeros and ones
  else:
    probs = np_softmax(scores)
    delta = roundings * F32_EPS * np.max(abs_scores, axis=-1, keepdims=True)
    prob_tol = 2.5 * delta + (nk + 4 * d + 4) * F32_EPS
  p = np.broadcast_to(probs, (B, *probs.shape[1:]))
  tol = np.broadcast_to(prob_tol, (B, *prob_tol.shape[1:]))
  if mask is not None:
    p = p * mask / (1.0 - DROPOUT_RATE)
    tol = tol + 2 * F32_EPS  # 1 - rate and the division round once each
  v = x.values.astype(np.float64)
  v = v if case.per_head_values else np.broadcast_to(v[:, :, None, :], (B, nk, H, C))
  w = x.kernel.astype(np.float64)
  y = sum(p[:, h] @ v[:, :, h] @ w[h] for h in range(H)) + x.bias
  # Per head: |sum_k p v - float32| <= (tol + Nk eps) sum_k p |v|; then H C channels and (in the
  # one-einsum order) H Nk keys more: n = Nk + H Nk + H C + 2 roundings in all.
  per_head = np.einsum("bhqk,bkhc,hcd->bqhd", p, np.abs(v), np.abs(w))
  n = nk + H * nk + H * C + 2
  bound = np.einsum("bhq,bqhd->bqd", tol[..., 0] + n * F32_EPS, per_head)
  bound = bound + F32_EPS * (np.abs(y) + np.abs(x.bias))  # the bias
  return Reference(y, probs, bound, prob_tol)


def probs_shape(case: Case, x: Inputs) -> tuple[int, ...]:
  nq, nk = int(np.prod(x.q_shape)), int(np.prod(x.k_shape))
  batch_free = not case.content and case.position != "image"
  return (H, nq, nk) if batch_free else (B, H, nq, nk)


@st.composite
def layouts_and_seeds(draw):
  """``(second, seed)``: whether the case runs on its second layout (else LAYOUTS[1], shared by
  every case), and the seed of its values."""
  return draw(st.booleans()), draw(SEEDS)


def check_against_reference(case, x, y, probs, mask=None):
  ref = reference(case, x, mask)
  chex.assert_shape(y, (B, int(np.prod(x.q_shape)), D))
  chex.assert_type(y, jnp.float32)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref.y), ref.bound + 1e-30)
  probs = np.asarray(probs, np.float64)
  chex.assert_shape(probs, probs_shape(case, x))
  want = ref.probs.reshape(probs.shape) if probs.ndim == 3 else ref.probs
  tol = ref.prob_tol.reshape((*probs.shape[:-1], 1)) if probs.ndim == 3 else ref.prob_tol
  if case.hard:
    np.testing.assert_array_equal(probs, want)
  else:
    np.testing.assert_array_less(np.abs(probs - want), tol * want + 2 * F32_TINY)
  d = len(x.q_shape)
  nk = probs.shape[-1]
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=(nk + 4 * d + 4) * F32_EPS, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
@given(layouts_and_seeds())
def test_relative_attention_matches_the_mhsa_equation(name, layout_and_seed):
  """Every algorithm equals the float64 MHSA equation within its float32 bound, and returns
  probabilities of the documented shape that are the float64 softmax (hard: exactly)."""
  case = CASES[name]
  second, seed = layout_and_seed
  layout = case.layout if second else 1
  x = make_inputs(case, layout, seed)
  y, probs = call(case, x, return_probs=True)
  check_against_reference(case, x, y, probs)


@pytest.mark.parametrize("name", sorted(DROPOUT_CASES))
@given(layouts_and_seeds())
def test_relative_attention_dropout_matches_the_masked_mhsa_equation(name, layout_and_seed):
  """Attention dropout multiplies the probabilities by the mask ``dropout_probs`` draws with the
  same key (``1 / (1 - rate)`` on kept entries): one batch-free mask with
  ``shared_dropout_mask=True`` and batch-free probabilities, else one mask per example
  (per-image probabilities always have their own); ``implementation='separable'`` falls back to
  the dense path."""
  case = DROPOUT_CASES[name]
  second, seed = layout_and_seed
  layout = case.layout if second else 1
  x = make_inputs(case, layout, seed)
  mask = dropout_mask(case, x, seed)
  batch_free = not case.content and case.position != "image"
  if case.shared_mask and batch_free:
    assert mask.ndim == 3
  else:
    assert mask.shape[0] == B and np.any(mask[0] != mask[1])
  y, probs = call(case, x, return_probs=True, seed=seed)
  check_against_reference(case, x, y, probs, mask=mask)


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_return_probs_never_changes_the_output(name):
  """Sowing the probabilities changes nothing: bitwise the same output on every path."""
  case = ALL_CASES[name]
  x = make_inputs(case, 1, seed=11)
  y = call(case, x, return_probs=False, seed=5)
  y_sown, probs = call(case, x, return_probs=True, seed=5)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_sown))
  chex.assert_shape(probs, probs_shape(case, x))


@pytest.mark.parametrize("name", ["content", "content-axis", "content-image-per-head"])
@given(seed=SEEDS)
def test_dot_product_attention_path_equals_the_explicit_path(name, seed):
  """``jax.nn.dot_product_attention`` and the explicit scores -> softmax -> aggregate path are
  both within the float32 bound of the MHSA equation, hence within twice of each other."""
  case = CASES[name]
  x = make_inputs(case, 1, seed)
  fused = np.asarray(call(case, x, return_probs=False, fused=True), np.float64)
  explicit = np.asarray(call(case, x, return_probs=False, fused=False), np.float64)
  bound = reference(case, x).bound
  np.testing.assert_array_less(np.abs(fused - explicit), 2 * bound + 1e-30)


GRAD_CASES = {
  "axis-separable": Case("axis", implementation="separable"),
  "content-axis-explicit": Case("axis", content=True, fused=False),
}


def _mhsa_fn(case: Case, fused: bool | None = None):
  """relative_attention of ``(values, kernel, bias, position[, query, key])`` for ``case``."""

  def fn(values, kernel, bias, position, query=None, key=None):
    return attn.relative_attention(
      values,
      kernel,
      bias,
      position_logits=position,
      query=query,
      key=key,
      implementation=case.implementation,
      use_dot_product_attention=case.fused if fused is None else fused,
    )

  return jax.jit(fn)


def _float64_args(case: Case, x: Inputs) -> tuple:
  as64 = lambda a: jax.tree.map(lambda t: jnp.asarray(t, jnp.float64), a)
  args = (x.values, x.kernel, x.bias, x.position) + ((x.query, x.key) if case.content else ())
  return as64(args)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_relative_attention_gradients_match_finite_differences(name):
  """Gradients of every input (values, kernel, bias, scores, query, key), in float64."""
  case = GRAD_CASES[name]
  x = make_inputs(case, 0, seed=3)
  with jax.enable_x64(True):
    fn, args = _mhsa_fn(case), _float64_args(case, x)
    assert fn(*args).dtype == jnp.float64
    check_grads(fn, args, order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_dot_product_attention_gradients_equal_the_explicit_gradients():
  """``jax.nn.dot_product_attention`` takes its softmax in float32 whatever the dtype, so its
  gradients are checked against the explicit path's (checked above by finite differences): within
  ``n eps max|g|``, ``n`` the terms summed forward and backward (keys, ``D_k``, ``H C``, ``D``)."""
  case = CASES["content-axis"]
  x = make_inputs(case, 0, seed=3)
  nk = int(np.prod(x.k_shape))
  with jax.enable_x64(True):
    args = _float64_args(case, x)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=(B, 3, D)))
    grads = {}
    for fused in (True, False):
      fn = _mhsa_fn(case, fused)
      loss = lambda *a, fn=fn: jnp.vdot(fn(*a), cotangent)
      grads[fused] = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  n = 2 * (nk + case.dk + H * C + D)
  for g_fused, g_explicit in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
    g_explicit = np.asarray(g_explicit)
    bound = n * F32_EPS * np.max(np.abs(g_explicit))
    np.testing.assert_array_less(np.abs(np.asarray(g_fused) - g_explicit), bound)


# ----------------------------------------------------------------------------------------------
# the hard limit as shifted views of the key grid
# ----------------------------------------------------------------------------------------------

# (spatial, strides) of the gather tests; keys padded by 1, integer centres in {-1, 0, 1}^d
GATHER_LAYOUTS = (((5,), (2,)), ((4, 3), (1, 2)), ((3, 2, 3), (2, 1, 1)))
GB, GH, GC, GD = 3, 3, 2, 2


def gather_grids(layout: int):
  spatial, strides = GATHER_LAYOUTS[layout]
  d = len(spatial)
  pads = ((1, 1),) * d
  kpos = grids.key_positions(spatial, pads, input_dilation=(1,) * d)
  key_shape = tuple(len(k) for k in kpos)
  qpos = grids.query_grid(key_shape, pads, strides=strides, window=(3,) * d)
  return spatial, pads, kpos, qpos


@st.composite
def gather_problems(draw):
  """``(layout, centres (GH, d), jitter, seed)``: integer centres, possibly off by less than 1/2
  (the same rounded shift)."""
  layout = draw(st.sampled_from(range(len(GATHER_LAYOUTS))))
  d = len(GATHER_LAYOUTS[layout][0])
  centers = draw(st.lists(st.integers(-1, 1), min_size=GH * d, max_size=GH * d))
  jitter = draw(st.sampled_from([0.0, 0.25, -0.375]))
  return layout, np.asarray(centers, np.float32).reshape(GH, d), np.float32(jitter), draw(SEEDS)


@functools.partial(jax.jit, static_argnums=0)
def _gather_and_dense(layout, x, centers, jitter, kernel, bias):
  _, pads, kpos, qpos = gather_grids(layout)
  keys, _ = grids.key_grid(x, pads)
  flat = keys.reshape(keys.shape[0], -1, keys.shape[-1])
  logits = enc.quadratic_logits(qpos, kpos, centers, 1.0)
  return (
    attn.gather_hard(keys, kpos, qpos, centers + jitter),
    attn.aggregate(attn.hard_attention(enc.combine_axis_logits(logits)), flat),
    attn.gather_project(keys, kpos, qpos, centers + jitter, kernel, bias),
    attn.relative_attention(flat, kernel, bias, position_logits=logits, hard=True),
    keys,
  )


@given(gather_problems())
def test_gather_hard_equals_dense_hard_attention_exactly(problem):
  """Lemma 1's hard attention read as shifted views equals the one-hot aggregation exactly, and
  its projection equals relative_attention(hard=True) within the ``H C``-term bound."""
  layout, centers, jitter, seed = problem
  spatial, pads, kpos, qpos = gather_grids(layout)
  d = len(spatial)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(GB, *spatial, GC)).astype(np.float32)
  kernel = rng.normal(size=(GH, GC, GD)).astype(np.float32)
  bias = rng.normal(size=(GD,)).astype(np.float32)
  gathered, dense, projected, hard, keys = (
    np.asarray(a) for a in _gather_and_dense(layout, x, centers, jitter, kernel, bias)
  )
  nq = int(np.prod([len(q) for q in qpos]))
  chex.assert_shape(gathered, (GB, nq, GH, GC))
  np.testing.assert_array_equal(gathered, dense)
  # It is the padded input read at q + Delta_h (key index = coordinate + low padding).
  q_grid = np.stack(np.meshgrid(*qpos, indexing="ij"), -1).reshape(-1, d)
  for h in range(GH):
    idx = q_grid + centers[h].astype(np.int64) + 1
    np.testing.assert_array_equal(gathered[:, :, h], keys[(slice(None), *idx.T, slice(None))])
  want = np.einsum("bqhc,hcd->bqd", gathered.astype(np.float64), kernel) + bias
  absw = np.einsum("bqhc,hcd->bqd", np.abs(gathered), np.abs(kernel)) + np.abs(bias)
  bound = (GH * GC + 2) * F32_EPS * absw
  np.testing.assert_array_less(np.abs(projected - want), bound + 1e-30)
  np.testing.assert_array_less(np.abs(hard - want), bound + 1e-30)


_BLOCKED: dict = {}


def blocked_gather_project(layout: int, limit: int):
  """gather_project traced with ``IM2COL_MAX_ELEMENTS = limit`` (read at trace time), cached
  per schedule so that examples with the same schedule share one compilation."""
  if (layout, limit) not in _BLOCKED:
    _, _, kpos, qpos = gather_grids(layout)
    _BLOCKED[layout, limit] = jax.jit(
      lambda keys, centers, kernel: attn.gather_project(keys, kpos, qpos, centers, kernel)
    )
  return _BLOCKED[layout, limit]


@given(gather_problems(), st.sampled_from(["one-row", "images-with-rest", "rows", "single"]))
def test_gather_project_blocks_equal_the_float64_sum(problem, schedule):
  """Every block schedule (blocks of query rows, of images, with remainders) computes
  ``sum_h view_h W_h`` within ``H C eps sum|terms|`` of the float64 sum."""
  layout, centers, _, seed = problem
  spatial, pads, kpos, qpos = gather_grids(layout)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(GB, *spatial, GC)).astype(np.float32)
  kernel = rng.normal(size=(GH, GC, GD)).astype(np.float32)
  keys = np.pad(x, [(0, 0), *pads, (0, 0)])
  # head h at query q reads the key at q + Delta_h (key index = coordinate + low padding 1)
  q_grid = np.stack(np.meshgrid(*qpos, indexing="ij"), -1).reshape(-1, len(spatial))
  views = np.stack(
    [keys[(slice(None), *(q_grid + centers[h].astype(np.int64) + 1).T)] for h in range(GH)], 2
  ).astype(np.float64)  # (B, Nq, H, C)
  row = int(np.prod([len(q) for q in qpos[1:]])) * GH * GC  # im2col entries of one query row
  image = len(qpos[0]) * row
  limit = {
    "one-row": 0,  # one query row of one image per block (at least one)
    "images-with-rest": 2 * row,  # 2 images of one row, then 1 image of 2 rows (GB = 3)
    "rows": 6 * row,  # all 3 images, 2 rows per block (a remainder when the rows are odd)
    "single": GB * image,
  }[schedule]
  saved = attn.IM2COL_MAX_ELEMENTS
  try:
    attn.IM2COL_MAX_ELEMENTS = limit
    out = np.asarray(blocked_gather_project(layout, limit)(keys, centers, kernel))
  finally:
    attn.IM2COL_MAX_ELEMENTS = saved
  want = np.einsum("bqhc,hcd->bqd", views, kernel.astype(np.float64))
  bound = GH * GC * F32_EPS * np.einsum("bqhc,hcd->bqd", np.abs(views), np.abs(kernel))
  chex.assert_shape(out, want.shape)
  np.testing.assert_array_less(np.abs(out - want), bound + 1e-30)


# ----------------------------------------------------------------------------------------------
# invalid arguments
# ----------------------------------------------------------------------------------------------

V = jnp.ones((2, 4, 3))
W = jnp.ones((2, 3, 5))
P = jnp.ones((2, 3, 4))
QK = jnp.ones((2, 3, 2, 3)), jnp.ones((2, 4, 2, 3))


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: attn.relative_attention(V, W, query=QK[0]), r"query/key: expected both"),
    (lambda: attn.relative_attention(V, W, key=QK[1]), r"query/key: expected both"),
    (lambda: attn.relative_attention(V, W), r"position_logits: expected scores when query"),
    (
      lambda: attn.relative_attention(V, W, query=QK[0], key=QK[1], hard=True),
      r"hard: expected position-only scores",
    ),
    (
      lambda: attn.relative_attention(V, W, position_logits=P, implementation="gather"),
      r"implementation: expected 'dense' or 'separable', got 'gather'",
    ),
    (
      lambda: attn.relative_attention(V, W, position_logits=P, dropout_rate=1.0),
      r"dropout_rate: expected 0 <= rate < 1, got 1.0",
    ),
    (
      lambda: attn.relative_attention(V, W, position_logits=P, dropout_rate=-0.5),
      r"dropout_rate: expected 0 <= rate < 1",
    ),
    (
      lambda: attn.relative_attention(V, W, position_logits=P, dropout_rate=0.1),
      r"dropout_rng: expected a PRNG key with dropout_rate > 0, got None",
    ),
    (
      lambda: attn.aggregate(jnp.ones((2, 3)), jnp.ones((1, 3, 2))),
      r"probs/values: expected ranks 3 or 4, got shapes \(2, 3\) and \(1, 3, 2\)",
    ),
    (
      lambda: attn.aggregate(jnp.ones((1, 2, 3)), jnp.ones((3, 2))),
      r"probs/values: expected ranks 3 or 4",
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
      lambda: attn.aggregate_separable([jnp.ones((1, 2, 3))], jnp.ones((1, 4, 2))),
      r"values: expected \(B, 3, \[1,\] C\) for key grid \(3,\), got \(1, 4, 2\)",
    ),
    (
      lambda: attn.aggregate_separable([jnp.ones((2, 2, 3))], jnp.ones((1, 3, 1, 2))),
      r"values: expected \(B, 3, \[2,\] C\)",
    ),
    (
      lambda: attn.aggregate_project(P, V, jnp.ones((2, 2, 5))),
      r"kernel: expected shape \(2, C, D\) with values \(B, 4, C\)",
    ),
    (
      lambda: attn.aggregate_project(P, jnp.ones((2, 5, 3)), W),
      r"kernel: expected shape \(2, C, D\) with values \(B, 4, C\), got kernel",
    ),
    (
      lambda: attn.dropout_probs(dropout_key(0), P, 1.0),
      r"rate: expected 0 <= rate < 1 - 2\^-17, got 1.0",
    ),
  ],
)
def test_invalid_arguments_raise_named_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
