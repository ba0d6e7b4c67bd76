"""Property tests of :mod:`attnconv.encodings` against naive float64 references.

Tolerances are derived from the dtype rather than tuned. A float32 sum of ``n`` rounded products
is within ``n u sum|terms|`` of the exact sum (``u = eps / 2`` the unit roundoff; Higham, Eq.
3.5); the bounds below use ``eps`` where the analysis gives ``u``, a factor-2 slack. Where the
arithmetic is exact -- integer grids, integer centres and power-of-two sharpness, whose squared
offsets and products are small integers representable in float32; gathers; integer shifts --
equality is exact.

Grids are drawn from a few shapes (:data:`GRID_SHAPES`) with free coordinates (start, step);
the coordinates are traced arguments of module-level jitted functions wherever the function
accepts traced positions, so each shape compiles once for all examples.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from attnconv import encodings as enc
from attnconv import grids

F32_EPS = float(jnp.finfo(jnp.float32).eps)

# (query grid, key grid, heads): 1-D to 3-D, with unit axes and key grids larger or smaller
# than the query grid.
GRID_SHAPES = (
  ((3,), (5,), 2),
  ((1,), (3,), 1),
  ((2, 3), (4, 3), 3),
  ((3, 1), (2, 2), 2),
  ((2, 1, 2), (3, 2, 2), 2),
)


class Problem(NamedTuple):
  """Query and key coordinates (static int32 numpy), a number of heads and a seed for values."""

  qpos: tuple[np.ndarray, ...]
  kpos: tuple[np.ndarray, ...]
  heads: int
  seed: int

  @property
  def d(self) -> int:
    return len(self.qpos)

  @property
  def nq(self) -> int:
    return int(np.prod([len(q) for q in self.qpos]))

  @property
  def nk(self) -> int:
    return int(np.prod([len(k) for k in self.kpos]))

  def rng(self) -> np.random.Generator:
    return np.random.default_rng(self.seed)


@st.composite
def problems(draw):
  """A :class:`Problem`: one of :data:`GRID_SHAPES`, strided queries, shifted keys."""
  q_shape, k_shape, heads = draw(st.sampled_from(GRID_SHAPES))
  d = len(q_shape)
  qpos = grids.grid_positions(
    q_shape,
    start=tuple(draw(st.integers(-2, 2)) for _ in range(d)),
    step=tuple(draw(st.integers(1, 2)) for _ in range(d)),
  )
  kpos = grids.grid_positions(
    k_shape,
    start=tuple(draw(st.integers(-3, 1)) for _ in range(d)),
    step=tuple(draw(st.integers(1, 2)) for _ in range(d)),
  )
  return Problem(qpos, kpos, heads, draw(st.integers(0, 2**32 - 1)))


def float_heads(p: Problem) -> tuple[np.ndarray, np.ndarray]:
  """Float centres ``(H, d)`` in [-3, 3] and sharpness ``(H,)`` in [1/16, 4]."""
  rng = p.rng()
  centers = rng.uniform(-3, 3, size=(p.heads, p.d)).astype(np.float32)
  alpha = (2.0 ** rng.uniform(-4, 2, size=p.heads)).astype(np.float32)
  return centers, alpha


def naive_offsets(qpos, kpos) -> np.ndarray:
  """``delta[i, j] = k_j - q_i`` over the row-major flattened grids, ``(Nq, Nk, d)``."""
  qs = np.stack(np.meshgrid(*qpos, indexing="ij"), -1).reshape(-1, len(qpos))
  ks = np.stack(np.meshgrid(*kpos, indexing="ij"), -1).reshape(-1, len(kpos))
  return (ks[None, :, :] - qs[:, None, :]).astype(np.int64)


def np_softmax(logits: np.ndarray) -> np.ndarray:
  """Float64 softmax over the last axis."""
  z = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
  return z / np.sum(z, axis=-1, keepdims=True)


def naive_quadratic(delta: np.ndarray, centers: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """``-alpha_h ||delta - Delta_h||^2`` in float64, ``(H, Nq, Nk)``."""
  c = centers.astype(np.float64)[:, None, None, :]
  return -alpha.astype(np.float64)[:, None, None] * np.sum((delta[None] - c) ** 2, -1)


@jax.jit
def quadratic(qpos, kpos, centers, alpha):
  """The per-axis terms and their combination (positions traced: one compile per shape)."""
  terms = enc.quadratic_logits(qpos, kpos, centers, alpha)
  return terms, enc.combine_axis_logits(terms)


@jax.jit
def offsets(qpos, kpos):
  return enc.relative_offsets(qpos, kpos), enc.axis_offsets(qpos, kpos)


@jax.jit
def lemma2(centers, alpha, delta):
  v = enc.quadratic_head_vectors(centers, alpha)
  return v, jnp.einsum("hi,qki->hqk", v, enc.quadratic_encoding(delta))


generalized = jax.jit(enc.generalized_quadratic_logits)
combine = jax.jit(enc.combine_axis_logits)
content = jax.jit(enc.content_logits)
query_relative = jax.jit(enc.query_relative_logits, static_argnums=1)


# ----------------------------------------------------------------------------------------------
# offsets and the combination of per-axis terms
# ----------------------------------------------------------------------------------------------


@given(problems())
def test_relative_offsets_match_naive(p):
  full, axis = offsets(p.qpos, p.kpos)
  chex.assert_shape(full, (p.nq, p.nk, p.d))
  chex.assert_type(full, jnp.int32)
  np.testing.assert_array_equal(np.asarray(full), naive_offsets(p.qpos, p.kpos))
  assert len(axis) == p.d
  for a, o in enumerate(axis):
    np.testing.assert_array_equal(np.asarray(o), p.kpos[a][None, :] - p.qpos[a][:, None])


def test_static_positions_give_static_offsets():
  """Static coordinates stay numpy, so shifts derived from them are static under jit."""
  qpos = grids.grid_positions((2, 3))
  kpos = grids.grid_positions((3, 3), start=-1)
  for o in enc.axis_offsets(qpos, kpos):
    assert isinstance(o, np.ndarray)
  seen = []

  def traced(x):
    seen.extend(isinstance(o, np.ndarray) for o in enc.axis_offsets(qpos, kpos))
    return x

  jax.jit(traced)(1.0)
  assert seen == [True, True]


@given(problems())
def test_combine_axis_logits_is_the_broadcast_sum(p):
  """``A[h, q, k] = sum_a A_a[h, q_a, k_a]`` over row-major flattened grids."""
  rng = p.rng()
  q_shape = tuple(len(q) for q in p.qpos)
  k_shape = tuple(len(k) for k in p.kpos)
  terms = [
    rng.normal(size=(p.heads, nq, nk)).astype(np.float32) for nq, nk in zip(q_shape, k_shape)
  ]
  got = np.asarray(combine(terms))
  chex.assert_shape(got, (p.heads, p.nq, p.nk))
  want = np.zeros(got.shape)
  absw = np.zeros(got.shape)
  for i, qi in enumerate(np.ndindex(*q_shape)):
    for j, kj in enumerate(np.ndindex(*k_shape)):
      for a, t in enumerate(terms):
        want[:, i, j] += t[:, qi[a], kj[a]]
        absw[:, i, j] += np.abs(t[:, qi[a], kj[a]])
  # d - 1 float32 additions
  np.testing.assert_array_less(np.abs(got - want), (p.d - 1) * F32_EPS * absw + 1e-30)


# ----------------------------------------------------------------------------------------------
# Eq. 9 / Lemma 2
# ----------------------------------------------------------------------------------------------


def test_quadratic_encoding_layout():
  got = enc.quadratic_encoding(jnp.array([[1, -2], [0, 3]]))
  np.testing.assert_array_equal(np.asarray(got), [[5, 1, -2], [9, 0, 3]])
  v = enc.quadratic_head_vectors(jnp.array([[1.0, -2.0]]), jnp.array([0.5]))
  # -alpha (1, -2 Delta)
  np.testing.assert_array_equal(np.asarray(v), [[-0.5, 1.0, -2.0]])


@given(problems())
def test_lemma2_head_vectors_dot_encoding(p):
  """``v_h . r_delta = -alpha_h (||delta - Delta_h||^2 - ||Delta_h||^2)`` (Lemma 2)."""
  centers, alpha = float_heads(p)
  delta = naive_offsets(p.qpos, p.kpos)
  v, got = lemma2(centers, alpha, delta.astype(np.float32))
  chex.assert_shape(v, (p.heads, 1 + p.d))
  c64, a64 = centers.astype(np.float64), alpha.astype(np.float64)
  want = naive_quadratic(delta, centers, alpha) + (a64 * np.sum(c64**2, -1))[:, None, None]
  # r_delta is exact (small integers); v_h rounds once; the (1 + d)-term dot product rounds each
  # product and d sums: (d + 2) u sum|terms|, sum|terms| = alpha (|delta|^2 + 2 |Delta| . |delta|).
  absw = a64[:, None, None] * (
    np.sum(delta**2, -1)[None] + 2 * np.einsum("hi,qki->hqk", np.abs(c64), np.abs(delta))
  )
  np.testing.assert_array_less(np.abs(np.asarray(got) - want), (p.d + 2) * F32_EPS * absw + 1e-30)


@given(problems())
def test_quadratic_logits_match_naive_per_axis_and_combined(p):
  centers, alpha = float_heads(p)
  terms, full = quadratic(p.qpos, p.kpos, centers, alpha)
  assert len(terms) == p.d
  c64, a64 = centers.astype(np.float64), alpha.astype(np.float64)
  for a, t in enumerate(terms):
    chex.assert_shape(t, (p.heads, len(p.qpos[a]), len(p.kpos[a])))
    chex.assert_type(t, jnp.float32)
    o = (p.kpos[a][None, :] - p.qpos[a][:, None]).astype(np.float64)
    want = -a64[:, None, None] * (o[None] - c64[:, a, None, None]) ** 2
    # the subtraction's u, doubled by the square, the square's and the product's: 4 u.
    np.testing.assert_allclose(np.asarray(t), want, rtol=2 * F32_EPS, atol=0)
  want = naive_quadratic(naive_offsets(p.qpos, p.kpos), centers, alpha)
  chex.assert_shape(full, want.shape)
  chex.assert_type(full, jnp.float32)
  # d terms of one sign, each within 4 u relatively, summed with d - 1 roundings: (d + 3) u.
  np.testing.assert_allclose(np.asarray(full), want, rtol=(p.d + 3) * F32_EPS / 2, atol=0)


@given(problems())
def test_quadratic_logits_equal_eq9_up_to_a_per_query_constant(p):
  """The per-axis scores sum to ``v_h . r_delta`` minus ``alpha_h ||Delta_h||^2``, the same for
  every key of a query: the same softmax as Eq. 9."""
  centers, alpha = float_heads(p)
  delta = naive_offsets(p.qpos, p.kpos)
  _, full = quadratic(p.qpos, p.kpos, centers, alpha)
  _, eq9 = lemma2(centers, alpha, delta.astype(np.float32))
  full, eq9 = np.asarray(full, np.float64), np.asarray(eq9, np.float64)
  c64, a64 = centers.astype(np.float64), alpha.astype(np.float64)
  const = -a64 * np.sum(c64**2, -1)
  # error of each side (see the two tests above), in terms of the exact magnitudes
  absw = a64[:, None, None] * (
    np.sum(delta**2, -1)[None] + 2 * np.einsum("hi,qki->hqk", np.abs(c64), np.abs(delta))
  )
  bound = (p.d + 2) * F32_EPS * (absw + np.abs(naive_quadratic(delta, centers, alpha)))
  np.testing.assert_array_less(np.abs(full - eq9 - const[:, None, None]), bound + 1e-30)
  # Logits that differ by a per-query constant plus e have softmaxes within e^(2 max|e|) - 1.
  e = np.broadcast_to(np.max(bound, axis=-1, keepdims=True), bound.shape)
  np.testing.assert_array_less(np.abs(np_softmax(full) - np_softmax(eq9)), 2.5 * e + 1e-30)


@given(problems())
def test_quadratic_logits_exact_for_integer_centres(p):
  """Integer grids, integer centres and alpha = 2^k: every operation is exact in float32; the
  target key ``q + Delta_h``, when on the key grid, has logit exactly 0, every other key at most
  ``-alpha_h`` (the unique maximum of Lemma 2)."""
  rng = p.rng()
  centers = rng.integers(-3, 4, size=(p.heads, p.d)).astype(np.float32)
  alpha = rng.choice(np.float32([0.25, 0.5, 1.0, 2.0]), size=p.heads)
  _, full = quadratic(p.qpos, p.kpos, centers, alpha)
  full = np.asarray(full)
  delta = naive_offsets(p.qpos, p.kpos)
  np.testing.assert_array_equal(full, naive_quadratic(delta, centers, alpha).astype(np.float32))
  on_target = np.all(delta[None] == centers[:, None, None, :].astype(np.int64), axis=-1)
  assert np.all(on_target.sum(-1) <= 1)
  np.testing.assert_array_equal(full[on_target], 0.0)
  assert np.all(full <= np.where(on_target, 0.0, -alpha[:, None, None]))


@given(problems(), st.tuples(st.integers(-50, 50), st.integers(-50, 50), st.integers(-50, 50)))
def test_translation_invariance_of_logits(p, shift):
  """Scores depend on ``k - q`` only: shifting both grids by ``t`` changes nothing (exactly:
  the same compiled program sees the same integer offsets)."""
  centers, alpha = float_heads(p)
  factors = p.rng().normal(size=(p.heads, p.d, p.d)).astype(np.float32)
  moved_q = tuple(q + t for q, t in zip(p.qpos, shift))
  moved_k = tuple(k + t for k, t in zip(p.kpos, shift))
  a, b = (quadratic(qp, kp, centers, alpha) for qp, kp in ((p.qpos, p.kpos), (moved_q, moved_k)))
  chex.assert_trees_all_equal(a, b)
  a, b = (
    generalized(qp, kp, centers, factors) for qp, kp in ((p.qpos, p.kpos), (moved_q, moved_k))
  )
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# generalized quadratic encoding
# ----------------------------------------------------------------------------------------------


@given(problems())
def test_generalized_with_scaled_identity_equals_isotropic(p):
  """``A_h = sqrt(2 alpha_h) I`` gives ``-1/2 (delta - Delta)^T 2 alpha I (delta - Delta)``."""
  centers, alpha = float_heads(p)
  factors = np.sqrt(2 * alpha.astype(np.float64))[:, None, None] * np.eye(p.d)
  gen = np.asarray(generalized(p.qpos, p.kpos, centers, factors.astype(np.float32)))
  _, iso = quadratic(p.qpos, p.kpos, centers, alpha)
  chex.assert_equal_shape([gen, iso])
  chex.assert_type(gen, jnp.float32)
  # Per axis: sqrt(2 alpha) rounds once and the subtraction once (both doubled by the square),
  # the product (the zero products and their sums are exact) and the square once each: 6 u,
  # then d - 1 sums (the halving is exact): (d + 5) u; the isotropic side (d + 3) u.
  np.testing.assert_allclose(gen, np.asarray(iso), rtol=(2 * p.d + 8) * F32_EPS / 2, atol=0)


@given(problems())
def test_generalized_matches_naive_and_is_non_positive(p):
  """``-1/2 ||(delta - Delta_h)^T A_h||^2``: a Gaussian with precision ``A_h A_h^T`` (PSD)."""
  centers, _ = float_heads(p)
  factors = p.rng().normal(size=(p.heads, p.d, p.d)).astype(np.float32)
  got = np.asarray(generalized(p.qpos, p.kpos, centers, factors))
  chex.assert_shape(got, (p.heads, p.nq, p.nk))
  diff = naive_offsets(p.qpos, p.kpos)[None] - centers.astype(np.float64)[:, None, None, :]
  a64 = factors.astype(np.float64)
  precision = np.einsum("hij,hkj->hik", a64, a64)
  want = -0.5 * np.einsum("hqki,hij,hqkj->hqk", diff, precision, diff)
  # Each projection (delta - Delta)^T A_{:, e} is within (d + 1) u P_e of its exact value, with
  # P_e = sum_i |delta_i - Delta_i| |A_ie|; squaring and the d-term sum add (d + 2) u P_e^2 more.
  p_abs = np.einsum("hqki,hie->hqke", np.abs(diff), np.abs(a64))
  bound = 0.5 * (3 * p.d + 4) * F32_EPS * np.sum(p_abs**2, -1)
  np.testing.assert_array_less(np.abs(got - want), bound + 1e-30)
  assert np.all(got <= 0)


# ----------------------------------------------------------------------------------------------
# learned relative embeddings, content and query-relative terms
# ----------------------------------------------------------------------------------------------


def make_tables(p: Problem, width: int, extra: int = 0) -> list[np.ndarray]:
  """Per-axis tables with ``extra`` rows beyond the largest shift on each side."""
  rng = p.rng()
  need = [int(np.max(np.abs(k[None, :] - q[:, None]))) + 1 + extra for q, k in zip(p.qpos, p.kpos)]
  return [rng.normal(size=(2 * m - 1, width)).astype(np.float32) for m in need]


def full_relative_embeddings(qpos, kpos, tables) -> np.ndarray:
  """``r(q, k) = concat_a table_a[delta_a + M_a - 1]`` for every (query, key) pair, float64."""
  delta = naive_offsets(qpos, kpos)
  parts = [t[delta[..., a] + (t.shape[0] - 1) // 2] for a, t in enumerate(tables)]
  return np.concatenate(parts, axis=-1).astype(np.float64)  # (Nq, Nk, d P)


@given(problems(), st.integers(1, 3), st.integers(0, 1))
def test_learned_per_axis_logits_equal_full_table_lookup(p, width, extra):
  """The per-axis terms sum to ``w_h . r_delta`` with ``r_delta`` the concatenated embeddings;
  :func:`relative_embeddings` gathers exactly."""
  tables = make_tables(p, width, extra)
  kernels = [p.rng().normal(size=(width, p.heads)).astype(np.float32) for _ in range(p.d)]
  # Static positions (the table lookup is static): eager, compiled per shape only.
  embs = enc.relative_embeddings(p.qpos, p.kpos, tables)
  terms = enc.learned_logits(p.qpos, p.kpos, tables, kernels)
  assert len(terms) == len(embs) == p.d
  for a, (e, t) in enumerate(zip(embs, terms)):
    offs = p.kpos[a][None, :] - p.qpos[a][:, None]
    np.testing.assert_array_equal(np.asarray(e), tables[a][offs + (tables[a].shape[0] - 1) // 2])
    chex.assert_shape(t, (p.heads, len(p.qpos[a]), len(p.kpos[a])))
  got = np.asarray(combine(terms))
  r = full_relative_embeddings(p.qpos, p.kpos, tables)
  w = np.concatenate(kernels, axis=0).astype(np.float64)  # (d P, H)
  want = np.einsum("qkp,ph->hqk", r, w)
  absw = np.einsum("qkp,ph->hqk", np.abs(r), np.abs(w))
  # a P-term dot product per axis, then d - 1 sums
  np.testing.assert_array_less(np.abs(got - want), (width + p.d) * F32_EPS * absw + 1e-30)


# (batch, queries, keys, heads, D_k) of the content-score tests
CONTENT_SHAPES = ((1, 1, 1, 1, 1), (2, 3, 5, 2, 4), (1, 4, 2, 3, 7))


@given(st.sampled_from(CONTENT_SHAPES), st.integers(0, 2**32 - 1))
def test_content_logits_match_naive(shape, seed):
  b, nq, nk, h, dk = shape
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, nq, h, dk)).astype(np.float32)
  k = rng.normal(size=(b, nk, h, dk)).astype(np.float32)
  got = np.asarray(content(q, k))
  chex.assert_shape(got, (b, h, nq, nk))
  chex.assert_type(got, jnp.float32)
  want = np.zeros((b, h, nq, nk))
  absw = np.zeros((b, h, nq, nk))
  for bi, hi, i, j in np.ndindex(b, h, nq, nk):
    prod = q[bi, i, hi].astype(np.float64) * k[bi, j, hi]
    want[bi, hi, i, j] = prod.sum() / np.sqrt(dk)
    absw[bi, hi, i, j] = np.abs(prod).sum() / np.sqrt(dk)
  # 1 / sqrt(D_k) and the scaled query round once each, then a D_k-term dot product.
  np.testing.assert_array_less(np.abs(got - want), (dk + 2) * F32_EPS * absw + 1e-30)


@given(problems(), st.integers(1, 2), st.integers(1, 3))
def test_query_relative_logits_match_naive_loop(p, b, width):
  """``q_h . r_delta / sqrt(d P)`` with the query split in ``d`` chunks of ``P``, chunk ``a``
  meeting the axis-``a`` embedding."""
  q_shape = tuple(len(q) for q in p.qpos)
  tables = make_tables(p, width)
  query = p.rng().normal(size=(b, p.nq, p.heads, p.d * width)).astype(np.float32)
  rel = enc.relative_embeddings(p.qpos, p.kpos, tables)
  got = np.asarray(query_relative(query, q_shape, rel))
  chex.assert_shape(got, (b, p.heads, p.nq, p.nk))
  chex.assert_type(got, jnp.float32)
  r = full_relative_embeddings(p.qpos, p.kpos, tables)  # (Nq, Nk, d P)
  scale = 1.0 / np.sqrt(p.d * width)
  want = np.zeros(got.shape)
  absw = np.zeros(got.shape)
  for bi, hi, i, j in np.ndindex(*got.shape[:1], p.heads, p.nq, p.nk):
    prod = query[bi, i, hi].astype(np.float64) * r[i, j]
    want[bi, hi, i, j] = prod.sum() * scale
    absw[bi, hi, i, j] = np.abs(prod).sum() * scale
  # the scale and the scaled query round once each, a P-term dot product per axis, d - 1 sums
  np.testing.assert_array_less(np.abs(got - want), (width + p.d + 2) * F32_EPS * absw + 1e-30)


# ----------------------------------------------------------------------------------------------
# gradients (float64, finite differences)
# ----------------------------------------------------------------------------------------------

GRAD_Q = grids.grid_positions((2, 3), start=(0, -1), step=(2, 1))
GRAD_K = grids.grid_positions((3, 2), start=-1)


def _grad_case(name: str, rng: np.random.Generator):
  h, d = 2, 2
  centers = rng.uniform(-2, 2, size=(h, d))
  if name == "quadratic":
    alpha = rng.uniform(0.2, 2, size=h)
    return lambda c, a: enc.combine_axis_logits(enc.quadratic_logits(GRAD_Q, GRAD_K, c, a)), (
      centers,
      alpha,
    )
  if name == "generalized":
    factors = rng.normal(size=(h, d, d))
    return lambda c, f: enc.generalized_quadratic_logits(GRAD_Q, GRAD_K, c, f), (centers, factors)
  if name == "learned":
    tables = [rng.normal(size=(9, 2)), rng.normal(size=(7, 2))]
    kernels = [rng.normal(size=(2, h)), rng.normal(size=(2, h))]
    return lambda t, w: enc.combine_axis_logits(enc.learned_logits(GRAD_Q, GRAD_K, t, w)), (
      tables,
      kernels,
    )
  if name == "content":
    return enc.content_logits, (rng.normal(size=(2, 6, h, 3)), rng.normal(size=(2, 6, h, 3)))
  tables = [rng.normal(size=(9, 2)), rng.normal(size=(7, 2))]
  rel = enc.relative_embeddings(GRAD_Q, GRAD_K, tables)
  return lambda q, r: enc.query_relative_logits(q, (2, 3), r), (rng.normal(size=(2, 6, h, 4)), rel)


@pytest.mark.parametrize("name", ["quadratic", "generalized", "learned", "content", "q.r"])
def test_gradients_match_finite_differences(name):
  with jax.enable_x64(True):
    fn, args = _grad_case(name, np.random.default_rng(0))
    args = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), args)
    assert jax.jit(fn)(*args).dtype == jnp.float64
    check_grads(jax.jit(fn), args, order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# invalid arguments
# ----------------------------------------------------------------------------------------------

Q1 = grids.grid_positions((3,))
Q2 = grids.grid_positions((3, 3))


@pytest.mark.parametrize(
  "call, error, match",
  [
    (
      lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), 0.0),
      ValueError,
      r"alpha: expected every sharpness > 0",
    ),
    (
      lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), np.array([1.0, -1.0])),
      ValueError,
      r"alpha: expected every sharpness > 0, got \[ 1. -1.\]",
    ),
    (
      lambda: enc.quadratic_logits(Q1, Q1, np.zeros((2, 1)), np.ones(3)),
      ValueError,
      r"alpha: expected shape \(2,\) or a scalar, got \(3,\)",
    ),
    (
      lambda: enc.quadratic_head_vectors(np.zeros((2, 2)), np.array([1.0, 0.0])),
      ValueError,
      r"alpha: expected every sharpness > 0",
    ),
    (
      lambda: enc.quadratic_logits(Q2, Q2, np.zeros((2, 1)), 1.0),
      ValueError,
      r"centers: expected shape \(num_heads, 2\), got \(2, 1\)",
    ),
    (
      lambda: enc.quadratic_logits(Q2, Q2, np.zeros((2,)), 1.0),
      ValueError,
      r"centers: expected shape \(num_heads, 2\), got \(2,\)",
    ),
    (
      lambda: enc.quadratic_logits(Q1, Q2, np.zeros((2, 1)), 1.0),
      ValueError,
      r"key_positions: expected 1 axes \(as query_positions\), got 2",
    ),
    (
      lambda: enc.axis_offsets(np.arange(3), Q1),
      TypeError,
      r"query_positions: expected a non-empty tuple of 1-D coordinate arrays",
    ),
    (lambda: enc.axis_offsets((), Q1), TypeError, r"query_positions: expected a non-empty tuple"),
    (
      lambda: enc.axis_offsets(Q1, (np.zeros((2, 2)),)),
      ValueError,
      r"key_positions\[0\]: expected a non-empty 1-D array, got shape \(2, 2\)",
    ),
    (
      lambda: enc.axis_offsets(Q1, (np.zeros((0,)),)),
      ValueError,
      r"key_positions\[0\]: expected a non-empty 1-D array, got shape \(0,\)",
    ),
    (
      lambda: enc.axis_offsets((np.arange(2),) * 4, (np.arange(2),) * 4),
      ValueError,
      r"query_positions: expected 1, 2 or 3 axes, got 4",
    ),
    (
      lambda: enc.generalized_quadratic_logits(Q2, Q2, np.zeros((2, 2)), np.zeros((3, 2, 2))),
      ValueError,
      r"factors: expected shape \(2, 2, 2\), got \(3, 2, 2\)",
    ),
    (
      lambda: enc.generalized_quadratic_logits(Q2, Q2, np.zeros((2, 2)), np.zeros((2, 3, 3))),
      ValueError,
      r"factors: expected shape \(2, 2, 2\), got \(2, 3, 3\)",
    ),
    (
      lambda: enc.generalized_quadratic_logits(Q2, Q2, np.zeros((2, 3)), np.zeros((2, 2, 2))),
      ValueError,
      r"centers: expected shape \(num_heads, 2\), got \(2, 3\)",
    ),
    (
      lambda: enc.relative_embeddings(Q1, Q1, [np.zeros((3, 2))]),
      ValueError,
      r"tables\[0\]: expected an odd number >= 5 of rows \(shifts up to 2\), got shape \(3, 2\)",
    ),
    (
      lambda: enc.relative_embeddings(Q1, Q1, [np.zeros((6, 2))]),
      ValueError,
      r"tables\[0\]: expected an odd number >= 5",
    ),
    (
      lambda: enc.relative_embeddings(Q2, Q2, [np.zeros((5, 2))]),
      ValueError,
      r"tables: expected 2 per-axis tables, got 1",
    ),
    (
      lambda: enc.relative_embeddings(Q2, Q2, [np.zeros((5, 2)), np.zeros((3, 2))]),
      ValueError,
      r"tables\[1\]: expected an odd number >= 5",
    ),
    (
      lambda: enc.learned_logits(Q1, Q1, [np.zeros((5, 2))], []),
      ValueError,
      r"head_kernels: expected 1 per-axis kernels, got 0",
    ),
    (
      lambda: enc.learned_logits(Q1, Q1, [np.zeros((5, 2))], [np.zeros((3, 4))]),
      ValueError,
      r"head_kernels\[0\]: expected shape \(2, H\), got \(3, 4\)",
    ),
    (
      lambda: enc.learned_logits(Q1, Q1, [np.zeros((5, 2))], [np.zeros((2,))]),
      ValueError,
      r"head_kernels\[0\]: expected shape \(2, H\), got \(2,\)",
    ),
    (
      lambda: enc.content_logits(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 1, 4))),
      ValueError,
      r"query/key: expected rank 4 \(batch, tokens, heads, dim\)",
    ),
    (
      lambda: enc.content_logits(jnp.zeros((2, 3, 1, 4)), jnp.zeros((2, 3, 1, 5))),
      ValueError,
      r"key: expected batch, heads and dim matching query \(2, 3, 1, 4\), got \(2, 3, 1, 5\)",
    ),
    (
      lambda: enc.content_logits(jnp.zeros((2, 3, 1, 4)), jnp.zeros((1, 3, 1, 4))),
      ValueError,
      r"key: expected batch, heads and dim matching query",
    ),
    (
      lambda: enc.query_relative_logits(jnp.zeros((1, 3, 1, 3)), (3,), [jnp.zeros((3, 3, 2))]),
      ValueError,
      r"query: expected shape \(B, 3, H, 2\), got \(1, 3, 1, 3\)",
    ),
    (
      lambda: enc.query_relative_logits(jnp.zeros((1, 4, 1, 2)), (3,), [jnp.zeros((3, 3, 2))]),
      ValueError,
      r"query: expected shape \(B, 3, H, 2\), got \(1, 4, 1, 2\)",
    ),
  ],
)
def test_invalid_arguments_raise_named_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_alpha_check_is_skipped_under_tracing():
  """Under jit the sign of alpha is unknown; the traced path must not raise."""
  f = jax.jit(lambda a: enc.combine_axis_logits(enc.quadratic_logits(Q1, Q1, jnp.zeros((1, 1)), a)))
  chex.assert_shape(f(jnp.ones((1,))), (1, 3, 3))
