"""Tests of :mod:`attnconv.grids`: argument normalisation, padding, key and query grids.

The references are the conventions of ``jax.lax`` and ``flax.linen.Conv``: ``'SAME'``,
``'SAME_LOWER'`` and ``'VALID'`` padding must be ``jax.lax.padtype_to_pads`` of the dilated input,
and for every padding form of ``flax.linen.Conv`` the key grid and the query grid must reproduce
the convolution exactly: the output of a one-hot kernel at offset ``kappa`` is the key at the
query's coordinate plus ``kappa * kernel_dilation - (window - 1) // 2``. All values here are
small integers, so every comparison is exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import grids


def rng_for(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# as_tuple and grid_positions
# ----------------------------------------------------------------------------------------------


def test_as_tuple_broadcasts_ints_and_keeps_sequences():
  assert grids.as_tuple("strides", 2, 3) == (2, 2, 2)
  assert grids.as_tuple("strides", np.int64(2), 2) == (2, 2)
  assert grids.as_tuple("strides", [1, np.int32(3)], 2) == (1, 3)
  assert grids.as_tuple("start", (-4, 0), 2, minimum=-5) == (-4, 0)
  assert all(type(v) is int for v in grids.as_tuple("strides", np.array([1, 2]), 2))


@pytest.mark.parametrize(
  "value, d, minimum, error, match",
  [
    (True, 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints, got True"),
    ((1, 2, 3), 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints"),
    ((1,), 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints"),
    ((1.0, 2), 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints"),
    ((1, False), 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints"),
    (1.5, 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints, got 1\.5"),
    (None, 1, 1, TypeError, r"strides: expected an int or a sequence of 1 ints, got None"),
    ("ab", 2, 1, TypeError, r"strides: expected an int or a sequence of 2 ints"),
    (0, 2, 1, ValueError, r"strides: expected integers >= 1, got 0"),
    ((2, -1), 2, 0, ValueError, r"strides: expected integers >= 0, got \(2, -1\)"),
  ],
)
def test_as_tuple_errors_name_the_argument(value, d, minimum, error, match):
  with pytest.raises(error, match=match):
    grids.as_tuple("strides", value, d, minimum=minimum)


def test_grid_positions_values_and_dtype():
  pos = grids.grid_positions((3, 2), start=(-1, 4), step=(2, 3))
  assert len(pos) == 2
  np.testing.assert_array_equal(pos[0], [-1, 1, 3])
  np.testing.assert_array_equal(pos[1], [4, 7])
  assert all(isinstance(p, np.ndarray) and p.dtype == np.int32 for p in pos)
  # Scalars broadcast over axes.
  pos = grids.grid_positions((2, 1, 2), start=-1, step=2)
  for p, want in zip(pos, ([-1, 1], [-1], [-1, 1])):
    np.testing.assert_array_equal(p, want)


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: grids.grid_positions((2, 0)), ValueError, r"shape: expected 1 to 3 positive sizes"),
    (lambda: grids.grid_positions((1,) * 4), ValueError, r"shape: expected 1 to 3 positive"),
    (lambda: grids.grid_positions(()), ValueError, r"shape: expected 1 to 3 positive sizes"),
    (
      lambda: grids.grid_positions((2, 2), start=(0,)),
      TypeError,
      r"start: expected an int or a sequence of 2 ints",
    ),
    (
      lambda: grids.grid_positions((2, 2), step=(1, 0.5)),
      TypeError,
      r"step: expected an int or a sequence of 2 ints",
    ),
  ],
)
def test_grid_positions_errors_name_the_argument(call, error, match):
  with pytest.raises(error, match=match):
    call()


# ----------------------------------------------------------------------------------------------
# resolve_padding: the conventions of jax.lax
# ----------------------------------------------------------------------------------------------


@st.composite
def padding_problems(draw):
  """Per-axis ``(spatial, strides, input_dilation, window)`` of a 1-D to 3-D convolution; the
  window may exceed the input (``'SAME'`` then pads more than ``window - 1``)."""
  d = draw(st.integers(1, 3))
  spatial = tuple(draw(st.integers(1, 9)) for _ in range(d))
  strides = tuple(draw(st.integers(1, 4)) for _ in range(d))
  dilation = tuple(draw(st.integers(1, 3)) for _ in range(d))
  window = tuple(draw(st.integers(1, 12)) for _ in range(d))
  return spatial, strides, dilation, window


@given(padding_problems(), st.sampled_from(["SAME", "SAME_LOWER", "VALID"]))
def test_resolve_padding_equals_lax_padtype_to_pads(problem, padding):
  spatial, strides, dilation, window = problem
  got = grids.resolve_padding(
    padding, spatial, strides=strides, input_dilation=dilation, window=window
  )
  dilated = [(n - 1) * v + 1 for n, v in zip(spatial, dilation)]
  want = jax.lax.padtype_to_pads(dilated, window, strides, padding)
  assert got == tuple(tuple(int(v) for v in p) for p in want)
  assert all(type(v) is int for p in got for v in p)
  if padding == "VALID":
    return
  # 'SAME' keeps ceil(n / stride) outputs per axis (n the dilated input size), the odd pixel of
  # padding high ('SAME') or low ('SAME_LOWER').
  key_shape = [n + lo + hi for n, (lo, hi) in zip(dilated, got)]
  qpos = grids.query_grid(key_shape, got, strides=strides, window=window)
  assert [len(q) for q in qpos] == [-(-n // s) for n, s in zip(dilated, strides)]
  for lo, hi in got:
    assert (hi - lo) in ((0, 1) if padding == "SAME" else (0, -1))


def test_resolve_padding_none_valid_and_explicit_pairs():
  kw = dict(strides=(1, 2), input_dilation=(1, 1), window=(3, 3))
  assert grids.resolve_padding(None, (4, 5), **kw) == ((0, 0), (0, 0))
  assert grids.resolve_padding("VALID", (4, 5), **kw) == ((0, 0), (0, 0))
  got = grids.resolve_padding([(1, 2), [np.int64(-1), 0]], (4, 5), **kw)
  assert got == ((1, 2), (-1, 0))
  assert all(type(v) is int for p in got for v in p)


@pytest.mark.parametrize(
  "padding, match",
  [
    ("CIRCULAR", r"padding: expected 'SAME', 'SAME_LOWER', 'VALID' or \(low, high\) pairs"),
    ("same", r"padding: expected 'SAME', 'SAME_LOWER', 'VALID' or \(low, high\) pairs"),
    ([(1, 1)], r"padding: expected 2 \(low, high\) pairs"),
    ([(1, 1), (1, 1, 1)], r"padding: expected 2 \(low, high\) pairs"),
    ([1, 1], r"padding: expected 2 \(low, high\) pairs"),
  ],
)
def test_resolve_padding_errors_name_the_argument(padding, match):
  with pytest.raises(ValueError, match=match):
    grids.resolve_padding(padding, (4, 5), strides=(1, 1), input_dilation=(1, 1), window=(3, 3))


# ----------------------------------------------------------------------------------------------
# conv_padding: every padding form of flax.linen.Conv
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "padding, window, want",
  [
    ("SAME", (3, 5), ("SAME", "zeros")),
    ("SAME_LOWER", (3, 5), ("SAME_LOWER", "zeros")),
    ("VALID", (3, 5), ("VALID", "zeros")),
    ("CIRCULAR", (3, 4), (((1, 1), (1, 2)), "circular")),
    ("REFLECT", (1, 6), (((0, 0), (2, 3)), "reflect")),
    ("CAUSAL", (5,), (((4, 0),), "zeros")),
    (2, (3, 3), (((2, 2), (2, 2)), "zeros")),
    (np.int64(1), (3,), (((1, 1),), "zeros")),
    ((1, 0), (3, 3), (((1, 1), (0, 0)), "zeros")),
    ([(1, 2), (0, 3)], (3, 3), (((1, 2), (0, 3)), "zeros")),
    ([2, (0, 1)], (3, 3), (((2, 2), (0, 1)), "zeros")),
    ([[0, 1]], (3,), (((0, 1),), "zeros")),
  ],
)
def test_conv_padding_forms(padding, window, want):
  got = grids.conv_padding(padding, window, (1,) * len(window))
  assert got == want
  if not isinstance(got[0], str):
    assert all(type(v) is int for p in got[0] for v in p)


def test_conv_padding_explicit_pairs_allow_input_dilation():
  assert grids.conv_padding([(1, 0), 2], (3, 3), (2, 1)) == (((1, 0), (2, 2)), "zeros")


@pytest.mark.parametrize(
  "padding, window, dilation, error, match",
  [
    ("FULL", (3,), (1,), ValueError, r"padding: expected one of \('SAME', 'SAME_LOWER'"),
    ("SAME", (3,), (2,), ValueError, r"padding: input_dilation \(2,\) needs explicit"),
    ("CIRCULAR", (3, 3), (1, 2), ValueError, r"padding: input_dilation \(1, 2\) needs explicit"),
    ("CAUSAL", (3, 3), (1, 1), ValueError, r"padding: 'CAUSAL' is only defined for 1-D"),
    ((1, 1, 1), (3, 3), (1, 1), ValueError, r"padding: expected 2 entries \(one per spatial"),
    (None, (3,), (1,), TypeError, r"padding: expected a string, an int or 1 \(low, high\) pairs"),
    (1.5, (3,), (1,), TypeError, r"padding: expected a string, an int or 1 \(low, high\)"),
    ([1.5], (3,), (1,), TypeError, r"padding: expected ints or \(low, high\) pairs of ints"),
    ([(1, 2, 3)], (3,), (1,), TypeError, r"padding: expected ints or \(low, high\) pairs"),
    ([(1.0, 2)], (3,), (1,), TypeError, r"padding: expected ints or \(low, high\) pairs"),
    ([True], (3,), (1,), TypeError, r"padding: expected ints or \(low, high\) pairs"),
  ],
)
def test_conv_padding_errors_name_the_argument(padding, window, dilation, error, match):
  with pytest.raises(error, match=match):
    grids.conv_padding(padding, window, dilation)


# (padding, spatial, kernel_size, strides, kernel_dilation, input_dilation): every padding form
# of flax.linen.Conv, 1-D and 2-D, with strides, dilations and odd and even windows.
CONV_CASES = [
  ("SAME", (7,), (3,), (2,), (1,), (1,)),
  ("SAME", (5, 6), (2, 3), (1, 2), (2, 1), (1, 1)),
  ("SAME_LOWER", (6, 5), (4, 3), (2, 1), (1, 2), (1, 1)),
  ("VALID", (7, 5), (3, 2), (2, 1), (1, 2), (1, 1)),
  ("CIRCULAR", (6, 5), (3, 2), (1, 2), (2, 1), (1, 1)),
  ("REFLECT", (6, 5), (3, 4), (2, 1), (1, 1), (1, 1)),
  ("CAUSAL", (7,), (3,), (1,), (2,), (1,)),
  (2, (5, 4), (3, 3), (1, 2), (1, 1), (1, 1)),
  ((1, 0), (5, 4), (3, 2), (2, 1), (1, 1), (1, 1)),
  ([(2, 0), (-1, 3)], (5, 6), (3, 3), (1, 1), (1, 2), (1, 1)),
  ([(1, 2), (0, 1)], (4, 3), (3, 2), (1, 2), (1, 1), (2, 3)),
  ([(0, 0)], (4,), (2,), (2,), (1,), (3,)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{len(c[1])}d")
def test_key_and_query_grids_reproduce_flax_conv(case):
  """``conv_padding`` -> ``resolve_padding`` -> ``key_grid`` and ``query_grid`` place every
  kernel offset exactly where ``flax.linen.Conv`` reads it: one output channel per offset
  ``kappa`` (a one-hot kernel) equals the key at ``q + kappa * kernel_dilation - (window - 1) //
  2``, on every query of the grid."""
  padding, spatial, ksize, strides, kdil, idil = case
  d = len(spatial)
  window = tuple((k - 1) * v + 1 for k, v in zip(ksize, kdil))
  x = rng_for(17).integers(-8, 9, size=(2, *spatial, 1)).astype(np.float32)
  offsets = list(np.ndindex(*ksize))
  kernel = np.zeros((*ksize, 1, len(offsets)), np.float32)
  for f, kappa in enumerate(offsets):
    kernel[(*kappa, 0, f)] = 1.0
  conv = nn.Conv(
    len(offsets),
    ksize,
    strides=strides,
    padding=padding,
    kernel_dilation=kdil,
    input_dilation=idil,
    use_bias=False,
  )
  y = np.asarray(conv.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x)))

  pads, mode = grids.conv_padding(padding, window, idil)
  pads = grids.resolve_padding(pads, spatial, strides=strides, input_dilation=idil, window=window)
  keys, kpos = grids.key_grid(jnp.asarray(x), pads, mode=mode, input_dilation=idil)
  qpos = grids.query_grid(keys.shape[1:-1], pads, strides=strides, window=window)
  assert y.shape[1:-1] == tuple(len(q) for q in qpos)
  keys = np.asarray(keys)
  for f, kappa in enumerate(offsets):
    # key index of coordinate c on axis a: c - kpos[a][0]
    idx = [
      q + k * v - (w - 1) // 2 - kp[0] for q, k, v, w, kp in zip(qpos, kappa, kdil, window, kpos)
    ]
    want = keys[np.ix_(range(2), *idx, [0])][..., 0]
    np.testing.assert_array_equal(y[..., f], want)
  assert len(kpos) == d


# ----------------------------------------------------------------------------------------------
# key_positions, key_grid and query_grid
# ----------------------------------------------------------------------------------------------


@st.composite
def key_grid_problems(draw):
  """``(spatial, pads, mode, seed)`` with non-negative padding, as the wrapped and mirrored
  modes need; the spatial sizes exceed the padding (numpy's reflect needs no more)."""
  d = draw(st.integers(1, 3))
  spatial = tuple(draw(st.integers(3, 4)) for _ in range(d))
  pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(d))
  mode = draw(st.sampled_from(grids.PADDING_MODES))
  return spatial, pads, mode, draw(st.integers(0, 2**32 - 1))


@given(key_grid_problems())
def test_key_grid_matches_numpy_pad(problem):
  spatial, pads, mode, seed = problem
  d = len(spatial)
  x = rng_for(seed).integers(-9, 10, size=(2, *spatial, 2)).astype(np.float32)
  keys, kpos = grids.key_grid(jnp.asarray(x), pads, mode=mode)
  np_mode = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}[mode]
  np.testing.assert_array_equal(np.asarray(keys), np.pad(x, [(0, 0), *pads, (0, 0)], mode=np_mode))
  assert len(kpos) == d
  for a in range(d):
    np.testing.assert_array_equal(kpos[a], np.arange(keys.shape[1 + a]) - pads[a][0])
    assert isinstance(kpos[a], np.ndarray) and kpos[a].dtype == np.int32


@st.composite
def dilated_problems(draw):
  """``(spatial, input_dilation, pads, seed)``; the padding may crop (negative) and may empty
  the key grid."""
  d = draw(st.integers(1, 3))
  spatial = tuple(draw(st.integers(1, 4)) for _ in range(d))
  dilation = tuple(draw(st.integers(1, 3)) for _ in range(d))
  pads = tuple((draw(st.integers(-1, 2)), draw(st.integers(-1, 2))) for _ in range(d))
  return spatial, dilation, pads, draw(st.integers(0, 2**32 - 1))


@given(dilated_problems())
def test_key_grid_input_dilation_places_pixels_at_dilated_coordinates(problem):
  spatial, dil, pads, seed = problem
  d = len(spatial)
  x = rng_for(seed).integers(1, 10, size=(1, *spatial, 1)).astype(np.float32)
  sizes = [(n - 1) * v + 1 + lo + hi for n, v, (lo, hi) in zip(spatial, dil, pads)]
  if min(sizes) < 1:
    with pytest.raises(ValueError, match=r"padding: the key grid would be empty on axis"):
      grids.key_grid(jnp.asarray(x), pads, input_dilation=dil)
    return
  keys, kpos = grids.key_grid(jnp.asarray(x), pads, input_dilation=dil)
  static = grids.key_positions(spatial, pads, input_dilation=dil)
  for a in range(d):
    np.testing.assert_array_equal(kpos[a], static[a])
  keys = np.asarray(keys)
  assert keys.shape[1:-1] == tuple(sizes)
  coords = np.meshgrid(*kpos, indexing="ij")
  for idx in np.ndindex(*keys.shape[1:-1]):
    c = [int(coords[a][idx]) for a in range(d)]
    on_pixel = all(c[a] % dil[a] == 0 and 0 <= c[a] // dil[a] < spatial[a] for a in range(d))
    want = x[(0, *(c[a] // dil[a] for a in range(d)), 0)] if on_pixel else 0.0
    assert keys[(0, *idx, 0)] == want


@st.composite
def query_grid_problems(draw):
  d = draw(st.integers(1, 3))
  key_shape = tuple(draw(st.integers(1, 7)) for _ in range(d))
  pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(d))
  strides = tuple(draw(st.integers(1, 3)) for _ in range(d))
  window = tuple(draw(st.integers(1, k)) for k in key_shape)
  return key_shape, pads, strides, window


@given(query_grid_problems())
def test_query_grid_counts_and_coordinates(problem):
  key_shape, pads, strides, window = problem
  qpos = grids.query_grid(key_shape, pads, strides=strides, window=window)
  for a in range(len(key_shape)):
    n = (key_shape[a] - window[a]) // strides[a] + 1
    want = np.arange(n) * strides[a] - pads[a][0] + (window[a] - 1) // 2
    np.testing.assert_array_equal(qpos[a], want)
    assert qpos[a].dtype == np.int32
    # The window of every query lies on the key grid (coordinates -low ... Nk - 1 - low).
    first = qpos[a] - (window[a] - 1) // 2
    assert first[0] >= -pads[a][0]
    assert first[-1] + window[a] - 1 <= key_shape[a] - 1 - pads[a][0]
    # One more query would not fit.
    assert first[-1] + strides[a] + window[a] - 1 > key_shape[a] - 1 - pads[a][0]


def test_query_grid_unit_window_and_stride_are_the_input_positions():
  qpos = grids.query_grid((4, 3), ((0, 0), (0, 0)), strides=(1, 1), window=(1, 1))
  kpos = grids.key_positions((4, 3), ((0, 0), (0, 0)), input_dilation=(1, 1))
  for q, k in zip(qpos, kpos):
    np.testing.assert_array_equal(q, k)


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: grids.key_grid(jnp.ones((2, 3)), [(0, 0)]), r"x: expected rank 3 to 5 .*\(2, 3\)"),
    (lambda: grids.key_grid(jnp.ones((1, 2, 2, 2, 2, 1)), [(0, 0)] * 4), r"x: expected rank 3"),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(0, 0), (0, 0)]),
      r"padding: expected 1 \(low, high\) pairs",
    ),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], mode="edge"),
      r"mode: expected one of \('zeros', 'circular', 'reflect'\), got 'edge'",
    ),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], input_dilation=0),
      r"input_dilation: expected integers >= 1, got 0",
    ),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], mode="circular", input_dilation=2),
      r"input_dilation: expected 1 with 'circular' padding, got \(2,\)",
    ),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(-1, 0)], mode="reflect"),
      r"padding: expected non-negative pairs with 'reflect' padding",
    ),
    (
      lambda: grids.key_grid(jnp.ones((1, 3, 1)), [(-2, -1)]),
      r"padding: the key grid would be empty on axis 0",
    ),
    (
      lambda: grids.key_positions((3, 2), ((0, 0), (-1, -1)), input_dilation=(1, 1)),
      r"padding: the key grid would be empty on axis 1",
    ),
    (
      lambda: grids.query_grid((3, 4), [(0, 0), (0, 0)], strides=(1, 1), window=(3, 5)),
      r"window: expected at most 4 keys on axis 1 \(key grid \(3, 4\)\), got 5",
    ),
  ],
)
def test_grid_errors_name_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_key_grid_input_dilation_type_error_names_the_argument():
  with pytest.raises(TypeError, match=r"input_dilation: expected an int or a sequence of 1 ints"):
    grids.key_grid(jnp.ones((1, 3, 1)), [(1, 1)], input_dilation=(1, 2))
