"""Property tests of :mod:`attnconv.encodings` against naive numpy references.

Tolerances are derived from the dtype rather than tuned: for a float32 result built from terms
of magnitude at most ``S`` by ``n`` roundings, the error is at most ``n * eps * S`` (``eps`` the
machine epsilon of the dtype, twice the unit roundoff, so this bound has a factor-2 slack).
Where arithmetic is exact -- integer grids, integer centres and power-of-two sharpness, whose
squared offsets and products are small integers representable exactly in float32 -- equality is
exact.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import encodings as enc

F32_EPS = float(jnp.finfo(jnp.float32).eps)


def run(fn, *args):
  """``jax.jit(fn)(*args)`` as numpy: one compilation per example instead of one per primitive."""
  return jax.tree.map(np.asarray, jax.jit(fn)(*args))


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------


@st.composite
def grids(draw, max_size: int = 4):
  """A (query_positions, key_positions) pair of 1-D, 2-D or 3-D regular integer grids.

  The key grid may be larger (padded) and the query grid strided, as in a convolution.
  """
  d = draw(st.integers(1, 3))
  size = max_size if d < 3 else 3
  q_shape = draw(st.tuples(*[st.integers(1, size) for _ in range(d)]))
  k_shape = draw(st.tuples(*[st.integers(1, size + 1) for _ in range(d)]))
  q_step = draw(st.tuples(*[st.integers(1, 2) for _ in range(d)]))
  k_start = draw(st.tuples(*[st.integers(-2, 1) for _ in range(d)]))
  qpos = enc.grid_positions(q_shape, step=q_step)
  kpos = enc.grid_positions(k_shape, start=k_start)
  return qpos, kpos


def heads(d: int, max_heads: int = 3):
  """Strategy of ``(centres (H, d), alpha (H,))`` with float centres and positive sharpness."""
  return st.integers(1, max_heads).flatmap(
    lambda h: st.tuples(
      st.lists(
        st.lists(st.floats(-3, 3, width=32), min_size=d, max_size=d), min_size=h, max_size=h
      ).map(lambda c: np.asarray(c, np.float32)),
      st.lists(st.floats(0.0625, 4.0, width=32), min_size=h, max_size=h).map(
        lambda a: np.asarray(a, np.float32)
      ),
    )
  )


def np_softmax(logits: np.ndarray) -> np.ndarray:
  """Float64 softmax over the last axis."""
  z = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return z / np.sum(z, axis=-1, keepdims=True)


def naive_offsets(qpos, kpos) -> np.ndarray:
  """``delta[i, j] = k_j - q_i`` over the row-major flattened grids, ``(Nq, Nk, d)``."""
  qs = np.stack(np.meshgrid(*[np.asarray(q) for q in qpos], indexing="ij"), -1).reshape(
    -1, len(qpos)
  )
  ks = np.stack(np.meshgrid(*[np.asarray(k) for k in kpos], indexing="ij"), -1).reshape(
    -1, len(kpos)
  )
  return (ks[None, :, :] - qs[:, None, :]).astype(np.int64)


def assert_constant_over_keys(diff: np.ndarray, atol: float) -> None:
  """Asserts that ``diff (H, Nq, Nk)`` is constant along keys (a per-query constant)."""
  spread = np.max(diff, axis=-1) - np.min(diff, axis=-1)
  assert np.all(spread <= atol), f"not constant over keys: spread {np.max(spread)} > {atol}"


# ----------------------------------------------------------------------------------------------
# grids and offsets
# ----------------------------------------------------------------------------------------------


def test_grid_positions_values_and_dtype():
  qpos = enc.grid_positions((3, 2), start=(-1, 4), step=(2, 3))
  assert len(qpos) == 2
  np.testing.assert_array_equal(qpos[0], [-1, 1, 3])
  np.testing.assert_array_equal(qpos[1], [4, 7])
  assert all(q.dtype == np.int32 for q in qpos)


@given(grids())
def test_relative_offsets_match_naive(grid):
  qpos, kpos = grid
  offs, axis = run(lambda: (enc.relative_offsets(qpos, kpos), enc.axis_offsets(qpos, kpos)))
  nq = int(np.prod([len(q) for q in qpos]))
  nk = int(np.prod([len(k) for k in kpos]))
  chex.assert_shape(offs, (nq, nk, len(qpos)))
  np.testing.assert_array_equal(np.asarray(offs), naive_offsets(qpos, kpos))
  for a, o in enumerate(axis):
    np.testing.assert_array_equal(
      np.asarray(o), np.asarray(kpos[a])[None, :] - np.asarray(qpos[a])[:, None]
    )


def test_quadratic_encoding_layout():
  offsets = jnp.array([[1, -2], [0, 3]])
  np.testing.assert_array_equal(
    np.asarray(enc.quadratic_encoding(offsets)), [[5, 1, -2], [9, 0, 3]]
  )
  r = enc.generalized_quadratic_encoding(jnp.array([[2.0, 3.0, 5.0]]))
  # (d1, d2, d3, d1d1, d1d2, d1d3, d2d2, d2d3, d3d3)
  np.testing.assert_array_equal(np.asarray(r), [[2, 3, 5, 4, 6, 10, 9, 15, 25]])


# ----------------------------------------------------------------------------------------------
# Eq. 9 / Lemma 2
# ----------------------------------------------------------------------------------------------


@given(grids(), st.data())
def test_lemma2_head_vectors_dot_encoding(grid, data):
  """``v_h . r_delta = -alpha_h (||delta - Delta_h||^2 - ||Delta_h||^2)`` (Lemma 2)."""
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  delta = naive_offsets(qpos, kpos)
  v, got = run(
    lambda c, a, dl: (
      enc.quadratic_head_vectors(c, a),
      jnp.einsum("hi,qki->hqk", enc.quadratic_head_vectors(c, a), enc.quadratic_encoding(dl)),
    ),
    centers,
    alpha,
    delta.astype(np.float32),
  )
  chex.assert_shape(v, (centers.shape[0], 1 + d))
  c64 = centers.astype(np.float64)
  a64 = alpha.astype(np.float64)
  dist = np.sum((delta[None] - c64[:, None, None, :]) ** 2, -1)
  want = -a64[:, None, None] * (dist - np.sum(c64**2, -1)[:, None, None])
  # Terms of the (1 + d)-term dot product have magnitude <= alpha (|delta|^2 + 2 |Delta| |delta|).
  scale = a64[:, None, None] * (
    np.sum(delta**2, -1)[None] + 2 * np.sum(np.abs(c64), -1)[:, None, None] * np.abs(delta).max()
  )
  np.testing.assert_array_less(np.abs(got - want), 4 * (d + 2) * F32_EPS * scale + 1e-30)


@given(grids(), st.data())
def test_quadratic_logits_equal_eq9_up_to_per_query_constant(grid, data):
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  logits, v = run(
    lambda c, a: (enc.quadratic_logits(qpos, kpos, c, a), enc.quadratic_head_vectors(c, a)),
    centers,
    alpha,
  )
  logits, v = logits.astype(np.float64), v.astype(np.float64)
  r = run(enc.quadratic_encoding, naive_offsets(qpos, kpos).astype(np.float32)).astype(np.float64)
  eq9 = np.einsum("hi,qki->hqk", v, r)
  diff = logits - eq9
  # The constant is -alpha ||Delta||^2, the same for every query and key.
  const = -alpha.astype(np.float64) * np.sum(centers.astype(np.float64) ** 2, -1)
  mag = np.max(np.abs(logits)) + np.max(np.abs(eq9)) + 1.0
  np.testing.assert_allclose(
    diff, np.broadcast_to(const[:, None, None], diff.shape), atol=8 * d * F32_EPS * mag
  )
  # Hence the same softmax.
  np.testing.assert_allclose(np_softmax(logits), np_softmax(eq9), atol=16 * d * F32_EPS * mag)


@given(grids(), st.data())
def test_quadratic_logits_match_naive_and_axis_terms(grid, data):
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  logits, full = run(
    lambda c, a: (
      enc.quadratic_logits(qpos, kpos, c, a),
      enc.combine_axis_logits(enc.quadratic_axis_logits(qpos, kpos, c, a)),
    ),
    centers,
    alpha,
  )
  delta = naive_offsets(qpos, kpos)
  want = -alpha.astype(np.float64)[:, None, None] * np.sum(
    (delta[None] - centers.astype(np.float64)[:, None, None, :]) ** 2, -1
  )
  chex.assert_shape(logits, want.shape)
  chex.assert_type(logits, jnp.float32)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=4 * (d + 2) * F32_EPS, atol=1e-30)
  np.testing.assert_array_equal(full, logits)


@given(grids(), st.data())
def test_quadratic_logits_exact_for_integer_centres(grid, data):
  """Integer grids, integer centres and alpha = 2^k: every operation is exact in float32."""
  qpos, kpos = grid
  d = len(qpos)
  h = data.draw(st.integers(1, 3))
  centers = np.asarray(data.draw(st.lists(st.integers(-3, 3), min_size=h * d, max_size=h * d)))
  centers = centers.reshape(h, d).astype(np.float32)
  alpha = np.asarray(
    data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=h, max_size=h)), np.float32
  )
  logits = run(lambda c, a: enc.quadratic_logits(qpos, kpos, c, a), centers, alpha)
  delta = naive_offsets(qpos, kpos)
  want = -alpha[:, None, None] * np.sum((delta[None] - centers[:, None, None, :]) ** 2, -1)
  np.testing.assert_array_equal(logits, want.astype(np.float32))
  # The target key (delta == Delta) has logit exactly 0 and is the unique maximum.
  assert np.all(logits <= 0)


@given(grids(), st.data())
def test_translation_invariance_of_logits(grid, data):
  """Logits depend on ``k - q`` only: shifting both grids by t changes nothing (exactly)."""
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  t = data.draw(st.tuples(*[st.integers(-5, 5) for _ in range(d)]))
  shifted_q = tuple(q + s for q, s in zip(qpos, t))
  shifted_k = tuple(k + s for k, s in zip(kpos, t))
  # One compiled program for both grids (coordinates as traced arguments), so that the only
  # difference is the coordinates; with constant coordinates XLA may fold one grid's arithmetic
  # at compile time and contract the other's differently (1-ulp differences).
  f = jax.jit(lambda qp, kp, c, al: enc.quadratic_logits(qp, kp, c, al))
  a = np.asarray(f(qpos, kpos, centers, alpha))
  b = np.asarray(f(shifted_q, shifted_k, centers, alpha))
  np.testing.assert_array_equal(a, b)


@given(grids(), st.data())
def test_generalized_with_scaled_identity_equals_isotropic(grid, data):
  """``A = sqrt(2 alpha) I`` gives ``-1/2 (delta - Delta)^T 2 alpha I (delta - Delta)``."""
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  factors = np.sqrt(2 * alpha.astype(np.float64))[:, None, None] * np.eye(d)
  gen, iso = run(
    lambda c, f, a: (
      enc.generalized_quadratic_logits(qpos, kpos, c, f),
      enc.quadratic_logits(qpos, kpos, c, a),
    ),
    centers,
    factors.astype(np.float32),
    alpha,
  )
  chex.assert_equal_shape([gen, iso])
  # sqrt and its square each round once, so the relative error is a few eps per term.
  np.testing.assert_allclose(
    np.asarray(gen), np.asarray(iso), rtol=8 * (d + 2) * F32_EPS, atol=1e-30
  )


def _generalized_head_vectors(centers: np.ndarray, precision: np.ndarray) -> np.ndarray:
  """``v`` with ``v . r_delta = -1/2 (delta - Delta)^T M (delta - Delta) + 1/2 Delta^T M Delta``."""
  h, d = centers.shape
  lin = np.einsum("hij,hj->hi", precision, centers)
  quad = [
    -0.5 * precision[:, i, i] if i == j else -precision[:, i, j]
    for i in range(d)
    for j in range(i, d)
  ]
  return np.concatenate([lin, np.stack(quad, -1)], -1)


@given(grids(), st.data())
def test_generalized_encoding_dot_vector_equals_generalized_logits(grid, data):
  qpos, kpos = grid
  d = len(qpos)
  centers, _ = data.draw(heads(d))
  h = centers.shape[0]
  flat = data.draw(st.lists(st.floats(-1.5, 1.5, width=32), min_size=h * d * d, max_size=h * d * d))
  factors = np.asarray(flat, np.float32).reshape(h, d, d)
  precision, logits = run(
    lambda c, f: (
      enc.precision_from_factor(f),
      enc.generalized_quadratic_logits(qpos, kpos, c, f),
    ),
    centers,
    factors,
  )
  precision, logits = precision.astype(np.float64), logits.astype(np.float64)
  np.testing.assert_allclose(
    precision, np.einsum("hij,hkj->hik", factors.astype(np.float64), factors), rtol=1e-5, atol=1e-6
  )
  v = _generalized_head_vectors(centers.astype(np.float64), precision)
  r = run(enc.generalized_quadratic_encoding, naive_offsets(qpos, kpos).astype(np.float32))
  r = r.astype(np.float64)  # small integers: exact
  chex.assert_shape(r, (*r.shape[:2], d + d * (d + 1) // 2))
  via_encoding = np.einsum("hi,qki->hqk", v, r)
  diff = logits - via_encoding
  const = -0.5 * np.einsum("hi,hij,hj->h", centers.astype(np.float64), precision, centers)
  mag = np.max(np.abs(via_encoding)) + np.max(np.abs(logits)) + np.max(np.abs(const)) + 1.0
  np.testing.assert_allclose(
    diff, np.broadcast_to(const[:, None, None], diff.shape), atol=16 * d * d * F32_EPS * mag
  )


@given(grids(), st.data())
def test_diagonal_quadratic_terms_equal_diagonal_generalized(grid, data):
  qpos, kpos = grid
  d = len(qpos)
  centers, prec = data.draw(heads(d))
  precisions = np.broadcast_to(prec[:, None], (prec.shape[0], d)).astype(np.float32)
  factors = np.sqrt(precisions.astype(np.float64))[:, :, None] * np.eye(d)
  total, gen = run(
    lambda c, p, f: (
      enc.combine_axis_logits(enc.diagonal_quadratic_axis_logits(qpos, kpos, c, p)),
      enc.generalized_quadratic_logits(qpos, kpos, c, f),
    ),
    centers,
    precisions,
    factors.astype(np.float32),
  )
  np.testing.assert_allclose(
    np.asarray(total), np.asarray(gen), rtol=8 * (d + 2) * F32_EPS, atol=1e-30
  )


# ----------------------------------------------------------------------------------------------
# Transformer-XL relative score
# ----------------------------------------------------------------------------------------------


@given(grids(max_size=3), st.data())
def test_transformer_xl_with_zero_content_reproduces_quadratic_softmax(grid, data):
  """W_qry = W_key = 0, W^ = I, r = quadratic encoding, v = Eq. 9 vector: Lemma 2's reduction."""
  qpos, kpos = grid
  d = len(qpos)
  centers, alpha = data.draw(heads(d))
  h = centers.shape[0]
  nq = int(np.prod([len(q) for q in qpos]))
  nk = int(np.prod([len(k) for k in kpos]))
  u0 = data.draw(st.floats(-2, 2, width=32))

  def scores_and_quad(c, a, u0):
    delta = enc.relative_offsets(qpos, kpos).astype(jnp.float32)
    r = enc.quadratic_encoding(delta)  # (Nq, Nk, 1 + d)
    rel_keys = jnp.broadcast_to(r[:, :, None, :], (nq, nk, h, 1 + d))  # W^ = I
    zeros_q = jnp.zeros((2, nq, h, 1 + d), jnp.float32)  # X W_qry, W_qry = 0
    zeros_k = jnp.zeros((2, nk, h, 1 + d), jnp.float32)  # X W_key, W_key = 0
    u = u0 * jnp.ones((h, 1 + d))  # meets k = 0: irrelevant
    v = enc.quadratic_head_vectors(c, a)
    return (
      enc.transformer_xl_logits(zeros_q, zeros_k, rel_keys, u, v),
      enc.quadratic_logits(qpos, kpos, c, a),
    )

  scores, quad = run(scores_and_quad, centers, alpha, np.float32(u0))
  chex.assert_shape(scores, (2, h, nq, nk))
  scores, quad = scores.astype(np.float64), quad.astype(np.float64)
  mag = np.max(np.abs(scores)) + np.max(np.abs(quad)) + 1.0
  assert_constant_over_keys(scores[0] - quad, 16 * d * F32_EPS * mag)
  np.testing.assert_array_equal(scores[0], scores[1])
  np.testing.assert_allclose(np_softmax(scores[0]), np_softmax(quad), atol=32 * d * F32_EPS * mag)


@given(
  st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4)
)
def test_transformer_xl_matches_naive(b, nq, nk, h, dk):
  rng = np.random.default_rng(b * 1000 + nq * 100 + nk * 10 + h)
  q = rng.normal(size=(b, nq, h, dk)).astype(np.float32)
  k = rng.normal(size=(b, nk, h, dk)).astype(np.float32)
  rel = rng.normal(size=(nq, nk, h, dk)).astype(np.float32)
  u = rng.normal(size=(h, dk)).astype(np.float32)
  v = rng.normal(size=(h, dk)).astype(np.float32)
  got = run(enc.transformer_xl_logits, q, k, rel, u, v)
  want = np.zeros((b, h, nq, nk))
  absw = np.zeros((b, h, nq, nk))
  for bi in range(b):
    for hi in range(h):
      for i in range(nq):
        for j in range(nk):
          terms = np.concatenate(
            [
              q[bi, i, hi] * k[bi, j, hi],
              q[bi, i, hi] * rel[i, j, hi],
              u[hi] * k[bi, j, hi],
              v[hi] * rel[i, j, hi],
            ]
          ).astype(np.float64)
          want[bi, hi, i, j] = terms.sum()
          absw[bi, hi, i, j] = np.abs(terms).sum() + np.abs(q[bi, i, hi]).sum() * (
            np.abs(k[bi, j, hi]).sum() + np.abs(rel[i, j, hi]).sum()
          )
  np.testing.assert_array_less(np.abs(got - want), 4 * (2 * dk + 2) * F32_EPS * absw + 1e-30)


# ----------------------------------------------------------------------------------------------
# content and learned terms
# ----------------------------------------------------------------------------------------------


# (batch, queries, keys, heads, D_k) of the content-score tests
content_sizes = (
  st.integers(1, 2),
  st.integers(1, 5),
  st.integers(1, 5),
  st.integers(1, 3),
  st.integers(1, 6),
)


@given(*content_sizes)
def test_content_logits_match_naive(b, nq, nk, h, dk):
  rng = np.random.default_rng(nq * 31 + nk * 7 + h * 3 + dk)
  q = rng.normal(size=(b, nq, h, dk)).astype(np.float32)
  k = rng.normal(size=(b, nk, h, dk)).astype(np.float32)
  got = run(enc.content_logits, q, k)
  chex.assert_shape(got, (b, h, nq, nk))
  want = np.zeros((b, h, nq, nk))
  absw = np.zeros((b, h, nq, nk))
  for bi in range(b):
    for hi in range(h):
      for i in range(nq):
        for j in range(nk):
          prod = q[bi, i, hi].astype(np.float64) * k[bi, j, hi]
          want[bi, hi, i, j] = prod.sum() / np.sqrt(dk)
          absw[bi, hi, i, j] = np.abs(prod).sum() / np.sqrt(dk)
  np.testing.assert_array_less(np.abs(got - want), 2 * (dk + 2) * F32_EPS * absw + 1e-30)


@given(*content_sizes, st.integers(1, 6))
def test_folded_content_logits_equal_projected_keys_up_to_per_query_constant(b, nq, nk, h, dk, c):
  """``(q W_k^T) . x = q . (x W_k + b_k) - q . b_k``: the removed term is one constant per query
  (so the softmax over keys is unchanged)."""
  rng = np.random.default_rng(nq * 31 + nk * 7 + h * 3 + dk + 101 * c)
  q = rng.normal(size=(b, nq, h, dk)).astype(np.float32)
  x = rng.normal(size=(b, nk, c)).astype(np.float32)
  w = rng.normal(size=(c, h, dk)).astype(np.float32)
  bias = rng.normal(size=(h, dk)).astype(np.float32)
  got = run(enc.content_logits_folded, q, x, w)
  chex.assert_shape(got, (b, h, nq, nk))
  q64, x64, w64, b64 = (a.astype(np.float64) for a in (q, x, w, bias))
  keys = np.einsum("bkc,chd->bkhd", x64, w64) + b64
  full = np.einsum("bqhd,bkhd->bhqk", q64, keys) / np.sqrt(dk)
  constant = np.einsum("bqhd,hd->bhq", q64, b64)[..., None] / np.sqrt(dk)
  # |error| <= (c + dk + 2) eps times the sum of |terms| of the folded product
  absw = np.einsum("bqhd,chd,bkc->bhqk", np.abs(q64), np.abs(w64), np.abs(x64)) / np.sqrt(dk)
  np.testing.assert_array_less(
    np.abs(got - (full - constant)), 2 * (c + dk + 2) * F32_EPS * absw + 1e-30
  )
  # the same probabilities: a logit error of at most delta moves each probability by at most
  # p (e^(2 delta) - 1) <= 3 delta for delta <= 1/2, plus the float32 softmax's own rounding
  delta = float((2 * (c + dk + 2) * F32_EPS * absw).max())
  p_full = jax.nn.softmax(full, axis=-1)
  np.testing.assert_allclose(
    jax.nn.softmax(got, axis=-1), p_full, rtol=0, atol=3 * delta + 8 * (nk + 2) * F32_EPS
  )


def _tables(rng, qpos, kpos, width, extra=0):
  need = [
    int(np.max(np.abs(np.asarray(k)[None, :] - np.asarray(q)[:, None]))) + 1 + extra
    for q, k in zip(qpos, kpos)
  ]
  return [rng.normal(size=(2 * m - 1, width)).astype(np.float32) for m in need]


def _full_relative_embeddings(qpos, kpos, tables) -> np.ndarray:
  """``r(q, k) = concat_a table_a[delta_a + M_a - 1]`` for every (query, key) pair."""
  delta = naive_offsets(qpos, kpos)
  parts = []
  for a, t in enumerate(tables):
    m = (t.shape[0] + 1) // 2
    parts.append(t[delta[..., a] + m - 1])
  return np.concatenate(parts, axis=-1).astype(np.float64)  # (Nq, Nk, d * P)


@given(grids(max_size=3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1))
def test_learned_separable_logits_equal_full_table_lookup(grid, h, width, extra):
  qpos, kpos = grid
  d = len(qpos)
  rng = np.random.default_rng(h * 10 + width + extra)
  tables = _tables(rng, qpos, kpos, width, extra)
  kernels = [rng.normal(size=(width, h)).astype(np.float32) for _ in range(d)]
  got, embs = run(
    lambda t, w: (enc.learned_logits(qpos, kpos, t, w), enc.relative_embeddings(qpos, kpos, t)),
    tables,
    kernels,
  )
  r = _full_relative_embeddings(qpos, kpos, tables)
  w = np.concatenate(kernels, axis=0).astype(np.float64)  # (d * P, H)
  want = np.einsum("qkp,ph->hqk", r, w)
  absw = np.einsum("qkp,ph->hqk", np.abs(r), np.abs(w))
  chex.assert_shape(got, want.shape)
  np.testing.assert_array_less(np.abs(got - want), 2 * (d * width + d) * F32_EPS * absw + 1e-30)
  # relative_embeddings gathers exactly.
  for a, e in enumerate(embs):
    m = (tables[a].shape[0] + 1) // 2
    offs = np.asarray(kpos[a])[None, :] - np.asarray(qpos[a])[:, None]
    np.testing.assert_array_equal(np.asarray(e), tables[a][offs + m - 1])


@given(grids(max_size=3), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3))
def test_query_relative_logits_match_naive(grid, b, h, width):
  qpos, kpos = grid
  d = len(qpos)
  q_shape = tuple(len(q) for q in qpos)
  nq = int(np.prod(q_shape))
  rng = np.random.default_rng(b * 100 + h * 10 + width)
  tables = _tables(rng, qpos, kpos, width)
  query = rng.normal(size=(b, nq, h, d * width)).astype(np.float32)

  def scores(qu, t):
    rel = enc.relative_embeddings(qpos, kpos, t)
    return (
      enc.query_relative_logits(qu, q_shape, rel),
      enc.query_relative_logits(qu, q_shape, rel, scale=1.0),
    )

  got, got2 = run(scores, query, tables)
  r = _full_relative_embeddings(qpos, kpos, tables)  # (Nq, Nk, d * P)
  scale = 1.0 / np.sqrt(d * width)
  want = np.einsum("bqhp,qkp->bhqk", query.astype(np.float64), r) * scale
  absw = np.einsum("bqhp,qkp->bhqk", np.abs(query.astype(np.float64)), np.abs(r)) * scale
  chex.assert_shape(got, want.shape)
  np.testing.assert_array_less(np.abs(got - want), 2 * (d * width + 2) * F32_EPS * absw + 1e-30)
  # An explicit scale multiplies the scores.
  np.testing.assert_allclose(got2 * scale, got, rtol=4 * F32_EPS, atol=1e-30)


@given(grids(max_size=3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4))
def test_query_relative_logits_bfloat16_accumulate_in_float32(grid, b, h, width):
  """bfloat16 queries and tables (the bf16 fast path on the CPU) with float32 scores: the
  products of bfloat16 numbers are exact in float32, so the scores are within the float32
  accumulation bound of the float64 result at the same (rounded) inputs -- the query is not
  rounded a second time; also the gradient of the query matches autodiff of the float64 einsum
  within one bfloat16 rounding plus the accumulation."""
  qpos, kpos = grid
  d = len(qpos)
  q_shape = tuple(len(q) for q in qpos)
  nq = int(np.prod(q_shape))
  rng = np.random.default_rng(b * 100 + h * 10 + width)
  tables = [jnp.asarray(t, jnp.bfloat16) for t in _tables(rng, qpos, kpos, width)]
  query = jnp.asarray(rng.normal(size=(b, nq, h, d * width)), jnp.bfloat16)
  nk = int(np.prod([len(k) for k in kpos]))
  cot = rng.normal(size=(b, h, nq, nk))

  def scores(qu, t):
    rel = enc.relative_embeddings(qpos, kpos, t)
    out = enc.query_relative_logits(qu, q_shape, rel, out_dtype=jnp.float32)
    return out, jax.grad(
      lambda q: jnp.vdot(
        enc.query_relative_logits(q, q_shape, rel, out_dtype=jnp.float32),
        jnp.asarray(cot, jnp.float32),
      )
    )(qu)

  got, grad = run(scores, query, tables)
  assert got.dtype == np.float32 and grad.dtype == jnp.bfloat16
  r = _full_relative_embeddings(qpos, kpos, [np.asarray(t, np.float32) for t in tables])
  q64 = np.asarray(query.astype(jnp.float32), np.float64)
  scale = 1.0 / np.sqrt(d * width)
  want = np.einsum("bqhp,qkp->bhqk", q64, r) * scale
  absw = np.einsum("bqhp,qkp->bhqk", np.abs(q64), np.abs(r)) * scale
  np.testing.assert_array_less(np.abs(got - want), 2 * (d * width + 2) * F32_EPS * absw + 1e-30)
  want_g = np.einsum("bhqk,qkp->bqhp", cot, r) * scale
  abs_g = np.einsum("bhqk,qkp->bqhp", np.abs(cot), np.abs(r)) * scale
  bf16_eps = float(jnp.finfo(jnp.bfloat16).eps)
  err = np.abs(np.asarray(grad.astype(jnp.float32), np.float64) - want_g)
  # the cotangent is rounded to bfloat16 first (eps/2 relative on every term), then one rounding
  np.testing.assert_array_less(
    err, bf16_eps / 2 * (np.abs(want_g) + abs_g) + 4 * (nk + 2) * F32_EPS * abs_g + 1e-30
  )


# ----------------------------------------------------------------------------------------------
# invalid arguments
# ----------------------------------------------------------------------------------------------

Q1 = enc.grid_positions((3,))
Q2 = enc.grid_positions((3, 3))


@pytest.mark.parametrize(
  "call, match",
  [
    (
      lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), 0.0),
      r"alpha: expected every sharpness > 0",
    ),
    (lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), -1.0), r"alpha: .*> 0.*got"),
    (
      lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), np.ones(3)),
      r"alpha: expected shape \(2,\) or a scalar, got \(3,\)",
    ),
    (
      lambda: enc.quadratic_head_vectors(np.zeros((2, 2)), np.array([1.0, 0.0])),
      r"alpha: expected every sharpness > 0",
    ),
    (
      lambda: enc.quadratic_logits(Q2, Q2, np.zeros((2, 1)), 1.0),
      r"centers: expected shape \(num_heads, 2\), got \(2, 1\)",
    ),
    (
      lambda: enc.quadratic_logits(Q1, Q2, np.zeros((2, 1)), 1.0),
      r"key_positions: expected 1 axes \(as query_positions\), got 2",
    ),
    (lambda: enc.axis_offsets(np.arange(3), Q1), r"query_positions: expected a non-empty tuple"),
    (lambda: enc.axis_offsets((), Q1), r"query_positions: expected a non-empty tuple"),
    (
      lambda: enc.axis_offsets(Q1, (np.zeros((2, 2)),)),
      r"key_positions\[0\]: expected a non-empty 1-D array, got shape \(2, 2\)",
    ),
    (
      lambda: enc.axis_offsets((np.arange(2),) * 4, (np.arange(2),) * 4),
      r"query_positions: expected 1, 2 or 3 axes, got 4",
    ),
    (lambda: enc.grid_positions((2, 0)), r"shape: expected 1 to 3 positive sizes, got \(2, 0\)"),
    (lambda: enc.grid_positions((1,) * 4), r"shape: expected 1 to 3"),
    (lambda: enc.grid_positions((2, 2), start=(0,)), r"start/step: expected 2 values"),
    (
      lambda: enc.generalized_quadratic_logits(Q2, Q2, np.zeros((2, 2)), np.zeros((3, 2, 2))),
      r"factors: expected leading axis num_heads=2 \(as centers\), got shape \(3, 2, 2\)",
    ),
    (
      lambda: enc.generalized_quadratic_logits(Q2, Q2, np.zeros((2, 2)), np.zeros((2, 3, 3))),
      r"factors: expected shape \(2, 2, 2\), got \(2, 3, 3\)",
    ),
    (
      lambda: enc.diagonal_quadratic_axis_logits(Q2, Q2, np.zeros((2, 2)), np.ones((1, 2))),
      r"precisions: expected leading axis num_heads=2",
    ),
    (
      lambda: enc.check_max_distance(Q1, Q1, [np.zeros((3, 2))]),
      r"tables\[0\]: expected an odd number >= 5 of rows \(shifts up to 2\), got shape \(3, 2\)",
    ),
    (
      lambda: enc.check_max_distance(Q1, Q1, [np.zeros((6, 2))]),
      r"tables\[0\]: expected an odd number >= 5",
    ),
    (
      lambda: enc.check_max_distance(Q2, Q2, [np.zeros((5, 2))]),
      r"tables: expected 2 per-axis tables, got 1",
    ),
    (
      lambda: enc.relative_embeddings(Q2, Q2, [np.zeros((5, 2)), np.zeros((3, 2))]),
      r"tables\[1\]: expected an odd number >= 5",
    ),
    (
      lambda: enc.learned_logits(Q1, Q1, [np.zeros((5, 2))], []),
      r"head_kernels: expected 1 per-axis kernels, got 0",
    ),
    (
      lambda: enc.learned_logits(Q1, Q1, [np.zeros((5, 2))], [np.zeros((3, 4))]),
      r"head_kernels\[0\]: expected shape \(2, H\), got \(3, 4\)",
    ),
    (
      lambda: enc.content_logits(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 1, 4))),
      r"query/key: expected rank 4",
    ),
    (
      lambda: enc.content_logits(jnp.zeros((2, 3, 1, 4)), jnp.zeros((2, 3, 1, 5))),
      r"key: expected batch, heads and dim matching query",
    ),
    (
      lambda: enc.content_logits_folded(
        jnp.zeros((2, 3, 1, 4)), jnp.zeros((2, 5, 6)), jnp.zeros((6, 2, 4))
      ),
      r"key_kernel: expected shape \(6, 1, 4\)",
    ),
    (
      lambda: enc.content_logits_folded(
        jnp.zeros((2, 3, 4)), jnp.zeros((2, 5, 6)), jnp.zeros((6, 1, 4))
      ),
      r"query/inputs/key_kernel: expected ranks 4, 3 and 3",
    ),
    (
      lambda: enc.query_relative_logits(jnp.zeros((1, 3, 1, 3)), (3,), [jnp.zeros((3, 3, 2))]),
      r"query: expected shape \(B, 3, H, 2\), got \(1, 3, 1, 3\)",
    ),
    (
      lambda: enc.query_relative_logits(jnp.zeros((1, 4, 1, 2)), (3,), [jnp.zeros((3, 3, 2))]),
      r"query: expected shape \(B, 3, H, 2\)",
    ),
    (
      lambda: enc.transformer_xl_logits(
        jnp.zeros((1, 2, 3, 4)),
        jnp.zeros((1, 2, 3, 4)),
        jnp.zeros((2, 2, 3, 4)),
        jnp.zeros((3, 4)),
        jnp.zeros((3, 5)),
      ),
      r"u/v: expected shape \(3, 4\)",
    ),
    (
      lambda: enc.transformer_xl_logits(
        jnp.zeros((1, 2, 3, 4)),
        jnp.zeros((1, 2, 3, 4)),
        jnp.zeros((2, 3, 3, 4)),
        jnp.zeros((3, 4)),
        jnp.zeros((3, 4)),
      ),
      r"rel_keys: expected shape \(2, 2, 3, 4\), got \(2, 3, 3, 4\)",
    ),
  ],
)
def test_invalid_arguments_raise_named_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_alpha_check_is_skipped_under_tracing():
  """Under jit the sign of alpha is unknown; the traced path must not raise."""
  f = jax.jit(lambda a: enc.quadratic_logits(Q1, Q1, jnp.zeros((1, 1)), a))
  chex.assert_shape(f(jnp.ones((1,))), (1, 3, 3))
