"""Attention distance (ConViT's non-locality): attnconv.attention.attention_distance."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv.attention import attention_distance


@st.composite
def grid_shapes(draw, max_tokens: int = 64):
  """A key grid of 1 to 3 axes, each of 1 to 6 points, with at most ``max_tokens`` tokens."""
  shape = []
  for _ in range(draw(st.integers(1, 3))):
    shape.append(draw(st.integers(1, min(6, max_tokens // int(np.prod(shape, dtype=int))))))
  return tuple(shape)


@st.composite
def shifted_heads(draw):
  """A key grid and one shift per head, every shift's target on the key grid for every query of
  a common query sub-grid: ``|delta_a| <= (n_a - 1) // 2``, so the largest negative and positive
  shifts of an axis together fit in its ``n_a - 1``."""
  shape = draw(grid_shapes())
  heads = draw(st.integers(1, 4))
  shifts = np.array(
    [[draw(st.integers(-((n - 1) // 2), (n - 1) // 2)) for n in shape] for _ in range(heads)],
    dtype=np.int64,
  ).reshape(heads, len(shape))
  return shape, shifts


def _positions(shape):
  return tuple(np.arange(n) for n in shape)


def _one_hot(shape, shifts):
  """``(H, Nq, Nk)`` one-hot maps: head ``h`` sends query ``q`` to key ``q + shifts[h]``. The
  queries are the sub-grid of the key grid where every head's target exists."""
  low = np.maximum(0, -shifts).max(0)  # (d,)
  high = np.array(shape) - 1 - np.maximum(0, shifts).max(0)
  query_positions = tuple(np.arange(lo, hi + 1) for lo, hi in zip(low, high))
  queries = np.array(list(itertools.product(*query_positions)), dtype=np.int64)  # row-major
  nk = int(np.prod(shape))
  probs = np.zeros((shifts.shape[0], queries.shape[0], nk), np.float32)
  for h, delta in enumerate(shifts):
    targets = np.ravel_multi_index(tuple((queries + delta[None, :]).T), shape)
    probs[h, np.arange(queries.shape[0]), targets] = 1.0
  return probs, query_positions


@given(shifted_heads())
def test_one_hot_shift_is_its_length(problem):
  shape, shifts = problem
  probs, query_positions = _one_hot(shape, shifts)
  out = attention_distance(probs, query_positions, _positions(shape))
  assert out.shape == (shifts.shape[0],)
  np.testing.assert_allclose(out, np.linalg.norm(shifts, axis=-1), rtol=1e-6, atol=1e-6)


def _brute_mean_distance(query_positions, key_positions):
  queries = list(itertools.product(*query_positions))
  keys = list(itertools.product(*key_positions))
  total = 0.0
  for q in queries:
    for k in keys:
      total += np.sqrt(sum((float(b) - float(a)) ** 2 for a, b in zip(q, k)))
  return total / (len(queries) * len(keys))


@given(grid_shapes(max_tokens=36), st.integers(1, 3), st.booleans())
def test_uniform_is_mean_pairwise_distance(shape, heads, strided):
  key_positions = _positions(shape)
  # Optionally strided queries (every other token), as a strided layer's query grid.
  query_positions = tuple(p[::2] for p in key_positions) if strided else key_positions
  nq = int(np.prod([p.shape[0] for p in query_positions]))
  nk = int(np.prod(shape))
  probs = np.full((heads, nq, nk), 1.0 / nk, np.float32)
  out = attention_distance(probs, query_positions, key_positions)
  expected = _brute_mean_distance(query_positions, key_positions)
  np.testing.assert_allclose(out, np.full((heads,), expected), rtol=1e-5, atol=1e-6)


@given(grid_shapes(max_tokens=24), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16))
def test_batched_is_mean_of_images(shape, heads, batch, seed):
  positions = _positions(shape)
  n = int(np.prod(shape))
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(n), size=(batch, heads, n)).astype(np.float32)
  out = attention_distance(probs, positions, positions)
  per_image = np.stack([np.asarray(attention_distance(p, positions, positions)) for p in probs])
  assert out.shape == (heads,)
  np.testing.assert_allclose(out, per_image.mean(0), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out) >= 0.0)


def test_known_values_and_jit():
  # 1-D grid of 3 tokens, head 0 attends to itself, head 1 half to each neighbour (ends: one).
  positions = (np.arange(3),)
  probs = np.zeros((2, 3, 3), np.float32)
  probs[0] = np.eye(3)
  probs[1] = [[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]
  out = jax.jit(lambda p: attention_distance(p, positions, positions))(probs)
  np.testing.assert_allclose(out, [0.0, 1.0])
  # 2-D: a diagonal neighbour is at sqrt(2) grid units (Euclidean).
  pos2 = (np.arange(2), np.arange(2))
  diag = np.array([[[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0, 1, 0, 0], [1, 0, 0, 0]]])
  np.testing.assert_allclose(attention_distance(diag, pos2, pos2), [np.sqrt(2.0)], rtol=1e-6)


def test_bad_shapes_raise():
  positions = (np.arange(2), np.arange(3))
  with pytest.raises(ValueError, match="probs"):
    attention_distance(np.ones((6, 6)), positions, positions)
  with pytest.raises(ValueError, match="probs"):
    attention_distance(np.ones((1, 2, 6, 5)), positions, positions)
  with pytest.raises(ValueError, match="probs"):
    attention_distance(np.ones((1, 1, 2, 6, 6)), positions, positions)
  with pytest.raises(ValueError, match="query_positions"):
    attention_distance(np.ones((1, 6, 6)), (np.ones((2, 3)),), positions)
  with pytest.raises(ValueError, match="key_positions"):
    attention_distance(np.ones((1, 6, 6)), positions, (np.arange(6),))
