"""Attention as pure functions: logits -> probabilities -> aggregated values.

Shapes (row-major flattened grids): ``Nq`` queries, ``Nk`` keys, ``H`` heads, ``C`` channels.

* Position-only probabilities have **no batch axis**: ``(H, Nq, Nk)``, computed once per layer and
  shared by the batch. Content probabilities are ``(B, H, Nq, Nk)``.
* Values are either shared by all heads, ``(B, Nk, C)`` -- the paper's choice ``D_h = D_in``: every
  head aggregates the full input and the per-head matrices ``W^(h) = W_val^(h) W_out^(h)`` are
  applied afterwards -- or per head, ``(B, Nk, H, C)``.
* Aggregation contracts the key axis directly (a matmul); no ``(B, Nq, Nk, C)`` tensor is formed.

The key grid may be larger than the query grid: :func:`key_grid` builds it from the input by zero,
circular or reflect padding and input dilation, in the coordinate system of
:mod:`attnconv.encodings` (input pixel ``i`` sits at ``i * input_dilation``, padded keys at negative
or larger coordinates).

References:
  Cordonnier, Loukas & Jaggi, ICLR 2020, Eq. (MHSA) and Lemma 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnconv import matmul as mm
from attnconv import rng as rng_lib

Array = jax.Array

PADDING_MODES = ("zeros", "circular", "reflect")

# Largest im2col block (query rows x H C channels) that gather_project builds at once (see there):
# 2**20 entries, 4 MiB in float32, the fastest block size measured on a 2-core CPU.
IM2COL_MAX_ELEMENTS = 1 << 20


def softmax(logits: Array, axis: int = -1) -> Array:
  """Softmax over keys, computed in at least float32 and returned in the logits' dtype."""
  dt = logits.dtype
  compute = jnp.promote_types(dt, jnp.float32)
  return jax.nn.softmax(logits.astype(compute), axis=axis).astype(dt)


def hard_attention(logits: Array, axis: int = -1) -> Array:
  """The ``alpha -> infinity`` limit of ``softmax(alpha * logits)``: uniform over the argmax set.

  With a unique maximum (the quadratic encoding on the integer lattice) this is exactly one-hot,
  with entries exactly 0.0 and 1.0.
  """
  is_max = logits == jnp.max(logits, axis=axis, keepdims=True)
  is_max = is_max.astype(logits.dtype)
  return is_max / jnp.sum(is_max, axis=axis, keepdims=True)


def aggregate(probs: Array, values: Array, *, precision=None) -> Array:
  """Attention-weighted sum of values over keys.

  Args:
    probs: ``(H, Nq, Nk)`` (position-only, shared by the batch) or ``(B, H, Nq, Nk)``.
    values: ``(B, Nk, C)`` (shared by all heads) or ``(B, Nk, H, C)`` (per head).
    precision: ``jax.lax.Precision`` of the contraction.

  Returns:
    ``(B, Nq, H, C)``.
  """
  if probs.ndim not in (3, 4):
    raise ValueError(f"probs: expected rank 3 or 4, got shape {probs.shape}")
  if values.ndim not in (3, 4):
    raise ValueError(f"values: expected rank 3 or 4, got shape {values.shape}")
  nk = probs.shape[-1]
  if values.shape[1] != nk:
    raise ValueError(f"values: expected {nk} keys on axis 1 (as probs), got shape {values.shape}")
  if values.ndim == 4 and values.shape[2] != probs.shape[-3]:
    raise ValueError(
      f"values: expected {probs.shape[-3]} heads on axis 2 (as probs), got shape {values.shape}"
    )
  if probs.ndim == 3:
    v = "bkc" if values.ndim == 3 else "bkhc"
    return jnp.einsum(f"hqk,{v}->bqhc", probs, values, precision=precision)
  # Per-image probabilities: one row-major batched product per image (attnconv.matmul.bmm; the
  # einsum "bhqk,bkc->bqhc" runs at a third of its rate on the CPU), heads moved after.
  b, h, nq, _ = probs.shape
  if values.ndim == 3:
    y = mm.bmm(probs.reshape(b, h * nq, nk), values, precision=precision)
    y = y.reshape(b, h, nq, values.shape[-1])
  else:
    y = mm.bmm(probs, mm.row_major(values, (0, 2, 1, 3)), precision=precision)
  return y.transpose(0, 2, 1, 3)


def combine_axis_probs(axis_probs: Sequence[Array]) -> Array:
  """Full probabilities ``(H, Nq, Nk)`` from per-axis factors ``[(H, Nq_a, Nk_a)]`` (outer product)."""
  d = len(axis_probs)
  h = axis_probs[0].shape[0]
  total = None
  for a, p in enumerate(axis_probs):
    shape = [h] + [1] * (2 * d)
    shape[1 + a], shape[1 + d + a] = p.shape[1:]
    total = p.reshape(shape) if total is None else total * p.reshape(shape)
  nq = int(np.prod([p.shape[1] for p in axis_probs]))
  nk = int(np.prod([p.shape[2] for p in axis_probs]))
  q_shape = tuple(p.shape[1] for p in axis_probs)
  k_shape = tuple(p.shape[2] for p in axis_probs)
  return jnp.broadcast_to(total, (h, *q_shape, *k_shape)).reshape(h, nq, nk)


def aggregate_separable(
  axis_probs: Sequence[Array], values: Array, key_shape: Sequence[int], *, precision=None
) -> Array:
  """Aggregation with probabilities that factorise over axes, ``P = P_0 (x) ... (x) P_{d-1}``.

  Contracts one key axis at a time, first axis first, costing ``B H C N (sum_a Nk_a)`` instead of
  ``B H C N Nk``: in a keys-first ``(K_0, ..., B C)`` layout the first axis is one
  ``(H Q_0, K_0) @ (K_0, ...)`` product, each later axis ``a`` a batched product over the
  ``H Q_0 ... Q_{a-1}`` rows done so far, so the only transposes are of the input and the output.

  Args:
    axis_probs: per-axis ``(H, Nq_a, Nk_a)``.
    values: ``(B, Nk, C)`` or ``(B, Nk, H, C)`` with ``Nk = prod(key_shape)``.
    key_shape: the key grid shape ``(Nk_0, ..., Nk_{d-1})``.

  Returns:
    ``(B, Nq, H, C)``.
  """
  d = len(axis_probs)
  key_shape = tuple(int(k) for k in key_shape)
  if tuple(p.shape[2] for p in axis_probs) != key_shape:
    raise ValueError(
      f"key_shape: expected the key sizes of axis_probs "
      f"{tuple(p.shape[2] for p in axis_probs)}, got {key_shape}"
    )
  b = values.shape[0]
  per_head = values.ndim == 4
  if values.shape[1] != int(np.prod(key_shape)):
    raise ValueError(
      f"values: expected {int(np.prod(key_shape))} keys on axis 1, got {values.shape}"
    )
  h, c = axis_probs[0].shape[0], values.shape[-1]
  if per_head and values.shape[2] != h:
    raise ValueError(f"values: expected {h} heads on axis 2 (as axis_probs), got {values.shape}")
  # Keys-first layout: every contraction below is a plain or batched row-major product
  # (attnconv.matmul), with the contracted key axis leading what is left of the keys.
  x = values.reshape(b, *key_shape, *values.shape[2:])
  if per_head:  # (H, K_0, ..., K_{d-1}, B C), heads as the batch of the first product
    x = jnp.moveaxis(jnp.moveaxis(x, 1 + d, 0), 1, 1 + d).reshape(h, key_shape[0], -1)
    y = mm.bmm(axis_probs[0], x, precision=precision)  # (H, Q_0, K_1 ... B C)
  else:  # (K_0, ..., K_{d-1}, B C), shared by the heads: one (H Q_0, K_0) @ (K_0, ...) product
    x = jnp.moveaxis(x, 0, d).reshape(key_shape[0], -1)
    q0 = axis_probs[0].shape[1]
    y = mm.matmul(axis_probs[0].reshape(h * q0, key_shape[0]), x, precision=precision)
  lead = [h, axis_probs[0].shape[1]]  # (H, Q_0, ..., Q_{a-1}) done so far
  for a in range(1, d):
    g = int(np.prod(lead))
    y = y.reshape(g, key_shape[a], -1)  # (H Q_<a, K_a, K_>a B C)
    p = axis_probs[a]  # the same (Q_a, K_a) matrix for every query position already contracted
    p = jnp.broadcast_to(p.reshape(h, *[1] * (len(lead) - 1), *p.shape[1:]), (*lead, *p.shape[1:]))
    y = mm.bmm(p.reshape(g, *axis_probs[a].shape[1:]), y, precision=precision)
    lead.append(axis_probs[a].shape[1])
  nq = int(np.prod(lead[1:]))
  return y.reshape(h, nq, b, c).transpose(2, 1, 0, 3)


def dropout_probs(rng: Array, probs: Array, rate: float, batch_size: int | None) -> Array:
  """Dropout on attention probabilities with an independent mask per example.

  Position-only probabilities ``(H, Nq, Nk)`` are broadcast to ``(B, H, Nq, Nk)`` first, unless
  ``batch_size`` is None: then one mask ``(H, Nq, Nk)`` is shared by every example of the batch
  (B times fewer random bits, and the probabilities keep no batch axis, so the fused
  aggregation still applies).

  The mask is stored once (``rng.bernoulli(..., materialize=True)``): fused into the select that
  broadcasts the probabilities (or multiplies per-axis factors) LLVM left the hash unvectorised,
  and the forward and backward passes each recomputed it. Side by side (``compare_commits``,
  several runs): paper quadratic 0.99-1.03x per step at batch 8 (the pass mostly overlapped a
  product on the other core), 1.02x at 16; learned 1.02-1.04x at batch 8.

  The backward pass keeps only the boolean mask (one byte per entry) and sums the per-example
  cotangents of broadcast probabilities over the batch in float32; left to autodiff, XLA:CPU
  kept the raw 32-bit random words of ``bernoulli`` and re-derived the mask inside a slow
  batch reduction (40 ms per layer for the paper's learned model at batch 8).
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate: expected 0 <= rate < 1, got {rate}")
  shape = probs.shape
  broadcast = probs.ndim == 3 and batch_size is not None
  if broadcast:
    shape = (batch_size, *shape)
  keep = rng_lib.bernoulli(rng, 1.0 - rate, shape, materialize=True)
  return _masked(probs, keep, 1.0 - rate, broadcast)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _masked(probs: Array, keep: Array, keep_prob: float, broadcast: bool) -> Array:
  p = probs[None] if broadcast else probs
  return jnp.where(keep, p / keep_prob, jnp.zeros((), probs.dtype)).astype(probs.dtype)


def _masked_fwd(probs, keep, keep_prob, broadcast):
  return _masked(probs, keep, keep_prob, broadcast), keep


def _masked_bwd(keep_prob, broadcast, keep, g):
  acc = jnp.promote_types(g.dtype, jnp.float32)
  d = jnp.where(keep, g.astype(acc), jnp.zeros((), acc))
  if broadcast:
    d = jnp.sum(d, axis=0)
  return (d / keep_prob).astype(g.dtype), None


_masked.defvjp(_masked_fwd, _masked_bwd)


# ----------------------------------------------------------------------------------------------
# Key grids (padding / input dilation) and query grids (strides)
# ----------------------------------------------------------------------------------------------


def key_grid(
  x: Array,
  padding: Sequence[tuple[int, int]],
  *,
  mode: str = "zeros",
  input_dilation: Sequence[int] | int = 1,
) -> tuple[Array, tuple[Array, ...]]:
  """Builds the key/value grid from the input and returns it with its per-axis coordinates.

  Input pixel ``i`` (per axis) sits at coordinate ``i * input_dilation``; the dilated input is
  padded by ``(low, high)`` per axis (negative values crop), so key index ``j`` sits at coordinate
  ``j - low``.

  Args:
    x: ``(B, *spatial, C)`` channels-last input.
    padding: ``(low, high)`` per spatial axis.
    mode: ``'zeros'`` (keys on a zero-padded grid), ``'circular'`` (keys on a torus) or
      ``'reflect'`` (keys on the mirrored grid; the border pixel is not repeated). Circular and
      reflect need ``input_dilation == 1`` and non-negative padding.
    input_dilation: zeros interleaved between input pixels (transposed-convolution style).

  Returns:
    ``(keys, key_positions)`` with keys ``(B, *key_shape, C)`` and per-axis int32 coordinates (static numpy arrays).
  """
  d = x.ndim - 2
  if d not in (1, 2, 3):
    raise ValueError(f"x: expected rank 3 to 5 (batch, 1-3 spatial axes, channels), got {x.shape}")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(padding) != d:
    raise ValueError(f"padding: expected {d} (low, high) pairs, got {padding}")
  dil = (input_dilation,) * d if isinstance(input_dilation, int) else tuple(input_dilation)
  if len(dil) != d or any(int(v) < 1 for v in dil):
    raise ValueError(f"input_dilation: expected {d} integers >= 1, got {input_dilation}")
  if mode not in PADDING_MODES:
    raise ValueError(f"mode: expected one of {PADDING_MODES}, got {mode!r}")
  if mode == "zeros":
    cfg = [(0, 0, 0)] + [(lo, hi, v - 1) for (lo, hi), v in zip(padding, dil)] + [(0, 0, 0)]
    keys = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  else:
    if any(v != 1 for v in dil):
      raise ValueError(f"input_dilation: expected 1 with {mode!r} padding, got {dil}")
    if any(lo < 0 or hi < 0 for lo, hi in padding):
      raise ValueError(f"padding: expected non-negative pairs with {mode!r} padding, got {padding}")
    np_mode = {"circular": "wrap", "reflect": "reflect"}[mode]
    keys = jnp.pad(x, [(0, 0), *padding, (0, 0)], mode=np_mode)
  if any(s < 1 for s in keys.shape[1:-1]):
    raise ValueError(f"padding: the key grid would be empty, got key grid shape {keys.shape[1:-1]}")
  positions = tuple(np.arange(keys.shape[1 + a], dtype=np.int32) - padding[a][0] for a in range(d))
  return keys, positions


def query_grid(
  key_shape: Sequence[int],
  padding: Sequence[tuple[int, int]],
  *,
  strides: Sequence[int],
  window: Sequence[int],
) -> tuple[Array, ...]:
  """Per-axis query coordinates: one query per output position of a convolution.

  Output ``o`` reads the keys of index ``o * stride ... o * stride + window - 1``; its query sits
  at the centre of that window, coordinate ``o * stride - low + (window - 1) // 2``. Hence a
  kernel offset ``kappa * dilation`` is the relative shift ``Delta = kappa * dilation -
  (window - 1) // 2`` for every input size (for 'SAME' and odd kernels, ``Delta`` ranges over
  ``{-K//2, ..., K//2}``, the paper's set of shifts). With the defaults (no padding,
  ``window = stride = 1``) the queries are all input positions. There are
  ``floor((Nk_a - window_a) / stride_a) + 1`` queries per axis.
  """
  out = []
  for a, (nk, (lo, _), s, w) in enumerate(zip(key_shape, padding, strides, window)):
    n = (nk - w) // s + 1
    if n < 1:
      raise ValueError(
        f"window: expected at most {nk} keys on axis {a} (key grid {tuple(key_shape)}), got {w}"
      )
    out.append((np.arange(n, dtype=np.int32) * s - lo + (w - 1) // 2).astype(np.int32))
  return tuple(out)


class _ViewGrid(NamedTuple):
  """Where the hard limit's views start (per head and key axis) and their query grid."""

  starts: list[list[Array]]  # [H][d]: key index read by query 0 (ints, traced when centres are)
  strides: list[int]  # query stride per axis
  num_queries: list[int]  # queries per axis


def _view_grid(
  key_positions: Sequence[Array], query_positions: Sequence[Array], centers: Array
) -> _ViewGrid:
  q_np = [np.asarray(q) for q in query_positions]
  k0 = [int(np.asarray(k)[0]) for k in key_positions]
  strides = [int(q[1] - q[0]) if q.shape[0] > 1 else 1 for q in q_np]
  shift = jnp.round(centers).astype(jnp.int32)
  starts = [
    [int(q[0]) - k0[a] + shift[h, a] for a, q in enumerate(q_np)] for h in range(centers.shape[0])
  ]
  return _ViewGrid(starts, strides, [int(q.shape[0]) for q in q_np])


def _gather_views(
  keys: Array, grid: _ViewGrid, images: tuple = (0, None), rows: tuple = (0, None)
) -> list[Array]:
  """Per head, the strided view of the key grid that the hard limit reads, for ``images = (first,
  count)`` and query ``rows = (first, count)`` of the first axis (count ``None``: all):
  ``[(count_images, count_rows, *num_queries[1:], C)]``."""
  b0, nb = images[0], keys.shape[0] if images[1] is None else images[1]
  r0, nr = rows[0], grid.num_queries[0] if rows[1] is None else rows[1]
  size = [(m - 1) * s + 1 for m, s in zip([nr, *grid.num_queries[1:]], grid.strides)]
  views = []
  for start in grid.starts:
    first = [start[0] + r0 * grid.strides[0], *start[1:]]
    win = lax.dynamic_slice(keys, [b0, *first, 0], (nb, *size, keys.shape[-1]))
    views.append(win[(slice(None), *(slice(None, None, s) for s in grid.strides), slice(None))])
  return views


def gather_hard(
  keys: Array, key_positions: Sequence[Array], query_positions: Sequence[Array], centers: Array
) -> Array:
  """The hard-attention limit as shifted, strided views of the key grid.

  Head ``h`` at query ``q`` reads the key at coordinate ``q + round(Delta_h)``, which must lie on
  the key grid (true for the convolution construction). Queries must form a regular grid
  ``q_a = q_a[0] + o * s_a``. Equal to ``aggregate(hard_attention(quadratic logits), values)``
  when the centres are integers; the cost is that of an im2col convolution.

  Args:
    keys: ``(B, *key_shape, C)``.
    key_positions, query_positions: per-axis coordinates (regular grids).
    centers: ``(H, d)`` (rounded to the nearest integer; traced values are allowed).

  Returns:
    ``(B, Nq, H, C)``.
  """
  b, c = keys.shape[0], keys.shape[-1]
  views = _gather_views(keys, _view_grid(key_positions, query_positions, centers))
  return jnp.stack([v.reshape(b, -1, c) for v in views], axis=2)


def _chunks(n: int, cap: int) -> tuple[int, int, int]:
  """``n = full * size + rest`` with ``size <= max(cap, 1)`` as even as possible, ``rest < size``."""
  cap = max(1, min(n, cap))
  size = -(-n // -(-n // cap))
  return size, n // size, n % size


def _blocks(fn, size: int, full: int, rest: int, axis: int) -> Array:
  """``fn(first, count)`` over ``[0, full * size + rest)`` in ``full`` equal blocks (``lax.map``)
  and a remainder, concatenated along ``axis`` (0 or 1) of the blocks' outputs."""
  if full == 1 and not rest:
    return fn(0, size)
  out = lax.map(lambda first: fn(first, size), jnp.arange(full, dtype=jnp.int32) * size)
  out = jnp.moveaxis(out, 0, axis)  # (..., full, size, ...)
  out = out.reshape(*out.shape[:axis], full * size, *out.shape[axis + 2 :])
  if rest:
    out = jnp.concatenate([out, fn(full * size, rest)], axis=axis)
  return out


def gather_project(
  keys: Array,
  key_positions: Sequence[Array],
  query_positions: Sequence[Array],
  centers: Array,
  kernel: Array,
  *,
  precision=None,
) -> Array:
  """``sum_h view_h W^(h)``: :func:`gather_hard` followed by the per-head projection.

  An im2col convolution computed in blocks: for a block of query rows (first query axis) of a
  block of images, the H views are concatenated along channels and projected by one
  ``(rows, H C) @ (H C, D)`` product -- row by row the dense path's projection. A block holds at
  most ``IM2COL_MAX_ELEMENTS`` im2col entries (one query row of one image at least), so it stays
  in cache; equal blocks run in sequence under ``lax.map``, the remainder as one more block.
  (One whole-batch buffer ran 3-7x slower than ``flax.linen.Conv`` from 64x64 images on, where
  the blocks run within 2x; ``bench_conv.json``.)

  Args:
    keys: ``(B, *key_shape, C)``.
    key_positions, query_positions: per-axis coordinates (regular grids).
    centers: ``(H, d)`` (rounded to the nearest integer).
    kernel: ``(H, C, D)`` per-head matrices ``W^(h)``.

  Returns:
    ``(B, Nq, D)``.
  """
  b, c = keys.shape[0], keys.shape[-1]
  h, _, d = kernel.shape
  grid = _view_grid(key_positions, query_positions, centers)
  n0 = grid.num_queries[0]
  w = kernel.reshape(h * c, d)
  row = int(np.prod(grid.num_queries[1:])) * h * c  # im2col entries of one query row, one image

  def block(b0, nb, r0, nr):  # -> (nb, nr, *num_queries[1:], D)
    views = _gather_views(keys, grid, (b0, nb), (r0, nr))
    return mm.matmul(jnp.concatenate(views, axis=-1), w, precision=precision)

  def images(b0, nb):  # every query row of images [b0, b0 + nb)
    rows = _chunks(n0, IM2COL_MAX_ELEMENTS // (nb * row))
    return _blocks(lambda r0, nr: block(b0, nb, r0, nr), *rows, axis=1)

  out = _blocks(images, *_chunks(b, IM2COL_MAX_ELEMENTS // row), axis=0)
  return out.reshape(b, -1, d).astype(keys.dtype)


# ----------------------------------------------------------------------------------------------
# Fused aggregation + per-head output projection (no (B, Nq, H, C) tensor)
# ----------------------------------------------------------------------------------------------


def _heads(x: Array) -> list[Array]:
  """Per-head slices ``x[h]`` as ``jnp.split`` pieces: their gradients are concatenated once,
  where indexing ``x[h]`` would pad every slice's gradient to the full stack and add them."""
  return [piece[0] for piece in jnp.split(x, x.shape[0], axis=0)]


def _concat_project(heads: list[Array], kernel: Array, precision) -> Array:
  """``sum_h heads[h] @ kernel[h]`` as one ``(..., H C) @ (H C, D)`` product -> ``(..., D)``.

  One large product keeps the CPU's matrix units busy (nine ``(..., C) @ (C, D)`` products ran
  at half the rate); it costs one ``(..., H C)`` buffer.
  """
  h, c, d = kernel.shape
  return mm.matmul(jnp.concatenate(heads, axis=-1), kernel.reshape(h * c, d), precision=precision)


def _project_heads(heads: list[Array], kernel: Array, nq: int, b: int, precision) -> Array:
  """:func:`_concat_project` of per-head ``(Nq B, C)`` rows, returned as ``(B, Nq, D)``."""
  y = _concat_project(heads, kernel, precision)
  return y.reshape(nq, b, -1).transpose(1, 0, 2)


def aggregate_project(probs: Array, values: Array, kernel: Array, *, precision=None) -> Array:
  """``sum_h (P_h V) W_h`` for position-only (batch-free) probabilities, as two large products.

  Equal to ``einsum('bqhc,hcd->bqd', aggregate(probs, values), kernel)``: all heads aggregate in
  one ``(H Nq, Nk) @ (Nk, B C)`` product, whose ``(H, Nq B, C)`` result is moved to ``(Nq B, H C)``
  rows (on the CPU in bfloat16, in the same pass that rounds the float32 product) and projected
  by one ``(Nq B, H C) @ (H C, D)`` product. (Per-head products concatenated had XLA:CPU round
  through float32 around the concatenation and its gradient's split.)

  Args:
    probs: ``(H, Nq, Nk)`` position-only probabilities.
    values: ``(B, Nk, C)``.
    kernel: ``(H, C, D)`` per-head matrices ``W^(h)``.

  Returns:
    ``(B, Nq, D)``.
  """
  h, nq, nk = probs.shape
  b, _, c = values.shape
  if values.shape[1] != nk or kernel.shape[:2] != (h, c):
    raise ValueError(
      f"kernel: expected shape ({h}, {c}, D) with values (B, {nk}, {c}), got kernel "
      f"{kernel.shape} and values {values.shape}"
    )
  xt = values.transpose(1, 0, 2).reshape(nk, b * c)
  a = mm.matmul(probs.reshape(h * nq, nk), xt, precision=precision)  # (H Nq, B C)
  # (Nq B, H C) rows for one projection product; moving whole C-rows costs no more than the
  # float32 -> bfloat16 conversion it is fused with (a batch-major order would cost 40 % more)
  a = mm.row_major(a.reshape(h, nq * b, c), (1, 0, 2)).reshape(nq * b, h * c)
  y = mm.matmul(a, kernel.reshape(h * c, -1), precision=precision)
  return y.reshape(nq, b, -1).transpose(1, 0, 2)


def aggregate_project_separable(
  axis_probs: Sequence[Array],
  values: Array,
  key_shape: Sequence[int],
  kernel: Array,
  *,
  precision=None,
) -> Array:
  """:func:`aggregate_project` for probabilities that factorise over axes (separable path).

  Per head, the key axes are contracted one at a time, last axis first, each as a (batched)
  matmul that keeps the axis order (cost ``B C N sum_a Nk_a`` per head), then projected by
  ``W^(h)``; no ``(B, Nq, H, C)`` tensor is formed.

  Args:
    axis_probs: per-axis ``(H, Nq_a, Nk_a)``.
    values: ``(B, Nk, C)`` with ``Nk = prod(key_shape)``.
    key_shape: key grid shape.
    kernel: ``(H, C, D)``.

  Returns:
    ``(B, Nq, D)``.
  """
  d = len(axis_probs)
  key_shape = tuple(int(k) for k in key_shape)
  h = axis_probs[0].shape[0]
  b, nk, c = values.shape
  if nk != int(np.prod(key_shape)) or tuple(p.shape[2] for p in axis_probs) != key_shape:
    raise ValueError(
      f"key_shape: expected {tuple(p.shape[2] for p in axis_probs)} matching values with "
      f"{nk} keys, got {key_shape}"
    )
  q_shape = tuple(p.shape[1] for p in axis_probs)
  nq = int(np.prod(q_shape))
  # keys-first layout (k_0, ..., k_{d-1}, B * C)
  x0 = values.reshape(b, *key_shape, c)
  x0 = jnp.moveaxis(x0, 0, d).reshape(*key_shape, b * c)
  heads = []
  head_axis_probs = [_heads(p) for p in axis_probs]
  for i in range(h):
    x = x0
    # Contract the last key axis first; invariant: x has axes (k_0, ..., k_a, q_{a+1}, ..., n),
    # so each contraction keeps the axis order (no transposes between them).
    for a in reversed(range(d)):
      lead = int(np.prod(key_shape[:a]))
      x = x.reshape(lead, key_shape[a], -1)
      if lead == 1:
        x = mm.matmul(head_axis_probs[a][i], x[0], precision=precision)
      else:
        x = jnp.einsum("qk,pkr->pqr", head_axis_probs[a][i], x, precision=precision)
    heads.append(x.reshape(nq * b, c))
  return _project_heads(heads, kernel, nq, b, precision)
