"""Self-attention as pure functions: scores -> probabilities -> aggregated values -> projection.

:func:`relative_attention` is the multi-head self-attention (MHSA) equation of Cordonnier et al.
(2020, Eq. 1 with relative scores, Sec. 2.3)::

  MHSA(X)_q = sum_h sum_k P_h[q, k] V_h[k] W_out^(h) + b_out,   P_h[q] = softmax_k(A_h[q, k])

with scores ``A`` from :mod:`attnconv.encodings`. Shapes (grids flattened row-major): ``B``
images, ``Nq`` queries, ``Nk`` keys, ``H`` heads, ``C`` value channels, ``D`` output channels.

* Position-only probabilities have **no batch axis**, ``(H, Nq, Nk)``: computed once per layer
  and shared by the batch. Content probabilities are ``(B, H, Nq, Nk)``.
* Values are shared by all heads, ``(B, Nk, C)`` -- the paper's choice for exact
  re-parametrisation: every head aggregates the full input and ``W^(h) = W_val^(h) W_out^(h)``
  is one ``(C, D)`` matrix per head -- or per head, ``(B, Nk, H, C)``.

Which algorithm runs is decided by the inputs (never by whether the probabilities are returned):

* batch-free probabilities and shared values: aggregation and projection as one einsum
  (:func:`aggregate_project`);
* per-axis scores with ``implementation='separable'`` and no attention dropout: the probabilities
  factorise over axes and the aggregation contracts one key axis at a time
  (:func:`aggregate_separable`, ``N (sum_a Nk_a)`` instead of ``N Nk`` per head and channel);
* content scores without attention dropout: :func:`jax.nn.dot_product_attention` (a fused kernel
  where the backend has one);
* the hard limit as shifted views of the key grid (an im2col convolution): :func:`gather_project`.

References:
  Cordonnier, Loukas & Jaggi, ICLR 2020: Eq. 1 (MHSA), Lemma 1 (hard attention), Eq. 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnconv import encodings as enc

Array = jax.Array

IMPLEMENTATIONS = ("dense", "separable", "gather")

# Largest im2col block (query rows x H C channels) that gather_project builds at once: 2**20
# entries (4 MiB in float32), small enough to stay in a core's cache.
IM2COL_MAX_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Probabilities
# ----------------------------------------------------------------------------------------------


def softmax(logits: Array, axis: int = -1) -> Array:
  """Softmax over keys, computed in at least float32 and returned in the logits' dtype."""
  compute = jnp.promote_types(logits.dtype, jnp.float32)
  return jax.nn.softmax(logits.astype(compute), axis=axis).astype(logits.dtype)


def hard_attention(logits: Array, axis: int = -1) -> Array:
  """The ``alpha -> infinity`` limit of ``softmax(alpha * logits)``: uniform over the argmax set.

  Lemma 1's hard attention. With a unique maximum (the quadratic encoding with integer centres
  on the integer lattice, Lemma 2) it is exactly one-hot, with entries exactly 0.0 and 1.0.
  The comparison with the maximum is exact, so the logits must be one computed value: XLA may
  recompute an elementwise producer in each of its consumers, and a producer with many
  roundings (e.g. centres drawn from a PRNG inside the same jitted function as the attention)
  may then round differently in the maximum and in the comparison. Pass such inputs in.
  """
  is_max = (logits == jnp.max(logits, axis=axis, keepdims=True)).astype(logits.dtype)
  return is_max / jnp.sum(is_max, axis=axis, keepdims=True)


def combine_axis_probs(axis_probs: Sequence[Array]) -> Array:
  """Full probabilities ``(H, Nq, Nk)`` of per-axis factors ``[(H, Nq_a, Nk_a)]``: their outer
  product (the softmax of a sum over axes is the product of the per-axis softmaxes)."""
  d = len(axis_probs)
  total = 1.0
  for a, p in enumerate(axis_probs):
    total = total * enc._on_full_grid(p, a, d)
  nq = int(np.prod([p.shape[1] for p in axis_probs]))
  return total.reshape(axis_probs[0].shape[0], nq, -1)


def position_probs(position_logits: Array | Sequence[Array], *, hard: bool = False) -> Array:
  """Probabilities ``(H, Nq, Nk)`` (or ``(B, H, Nq, Nk)``) of position scores: per-axis terms
  ``[(H, Nq_a, Nk_a)]`` are normalised per axis and combined (the softmax of a sum over axes
  is the product of the per-axis softmaxes; the same for the hard limit), full scores are
  normalised directly. Softmax, or :func:`hard_attention` with ``hard=True``."""
  normalize = hard_attention if hard else softmax
  if isinstance(position_logits, (tuple, list)):
    return combine_axis_probs([normalize(t) for t in position_logits])
  return normalize(position_logits)


def dropout_probs(rng: Array, probs: Array, rate: float, batch_size: int | None = None) -> Array:
  """Dropout on attention probabilities: entries zeroed with probability ``rate``, the rest
  scaled so that the expectation is unchanged.

  Each decision uses 16 random bits (two per 32-bit word of ``jax.random.bits``) instead of
  ``jax.random.bernoulli``'s 32: half the random words to generate for the largest mask of a
  training step (``(B, H, Nq, Nk)``). The drop probability is ``rate`` rounded to a multiple of
  ``2^-16`` (``t / 2^16``, ``t = round(2^16 rate)``) and kept entries are scaled by
  ``2^16 / (2^16 - t)``, so the mask is unbiased exactly.

  Args:
    rng: a PRNG key.
    probs: ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)``.
    rate: the drop probability, ``0 <= rate < 1``.
    batch_size: for batch-free ``(H, Nq, Nk)`` probabilities, draw one mask per example and
      return ``(batch_size, H, Nq, Nk)``; ``None`` draws one mask of the probabilities' own
      shape (shared by the batch when they are batch-free, as the authors' Gaussian attention).
  """
  threshold = round(rate * 2**16) if 0.0 <= rate < 1.0 else -1
  if not 0 <= threshold < 2**16:
    raise ValueError(f"rate: expected 0 <= rate < 1 - 2^-17, got {rate}")
  if batch_size is not None and probs.ndim == 3:
    probs = jnp.broadcast_to(probs, (batch_size, *probs.shape))
  n = int(np.prod(probs.shape))
  words = jax.random.bits(rng, (-(-n // 2),), jnp.uint32)
  uniform16 = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(probs.shape)
  scale = jnp.asarray(2**16 / (2**16 - threshold), probs.dtype)
  return jnp.where(uniform16 >= threshold, probs * scale, jnp.zeros((), probs.dtype))


def attention_distance(
  probs: Array, query_positions: Sequence[Any], key_positions: Sequence[Any]
) -> Array:
  """Per-head attention distance: the attention-weighted mean query-key distance.

  The "non-locality" of ConViT (d'Ascoli et al., "ConViT: Improving Vision Transformers with
  Soft Convolutional Inductive Biases", ICML 2021, Sec. 4)::

    D_h = mean_q sum_k P_h[q, k] ||k - q||_2

  with ``||k - q||_2`` the Euclidean norm of the relative shift in grid units (coordinates as in
  :mod:`attnconv.grids`, from :func:`attnconv.encodings.relative_offsets`). Content
  probabilities are also averaged over images. A head attending only to its query has distance
  0; a head attending to a fixed shift ``delta`` from every query has distance ``||delta||``.

  Args:
    probs: ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)`` attention probabilities (rows sum to 1).
    query_positions: per-axis query coordinates ``(q_0, ..., q_{d-1})``, ``Nq = prod(Nq_a)``.
    key_positions: per-axis key coordinates ``(k_0, ..., k_{d-1})``, ``Nk = prod(Nk_a)``.

  Returns:
    ``(H,)`` distances, in at least float32.

  Raises:
    ValueError: naming ``probs`` if it is not ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)`` with the
      positions' ``Nq`` and ``Nk``; naming the positions if they are malformed.
  """
  probs = jnp.asarray(probs)
  offsets = enc.relative_offsets(query_positions, key_positions)  # (Nq, Nk, d)
  if probs.ndim not in (3, 4) or probs.shape[-2:] != offsets.shape[:2]:
    raise ValueError(
      f"probs: expected (H, Nq, Nk) or (B, H, Nq, Nk) with (Nq, Nk) = {offsets.shape[:2]}, got "
      f"{probs.shape}"
    )
  compute = jnp.promote_types(probs.dtype, jnp.float32)
  distances = jnp.linalg.norm(offsets.astype(compute), axis=-1)  # (Nq, Nk)
  per_query = jnp.einsum("...hqk,qk->...hq", probs.astype(compute), distances)
  return jnp.mean(per_query.reshape(-1, *per_query.shape[-2:]), axis=(0, 2))


# ----------------------------------------------------------------------------------------------
# Aggregation and projection
# ----------------------------------------------------------------------------------------------


def aggregate(probs: Array, values: Array, *, precision: Any = None) -> Array:
  """Attention-weighted sum of values over keys, ``sum_k P_h[q, k] V_h[k]``.

  Args:
    probs: ``(H, Nq, Nk)`` (batch-free) or ``(B, H, Nq, Nk)``.
    values: ``(B, Nk, C)`` (shared by the heads) or ``(B, Nk, H, C)`` (per head).
    precision: precision of the contraction.

  Returns:
    ``(B, Nq, H, C)``.
  """
  if probs.ndim not in (3, 4) or values.ndim not in (3, 4):
    raise ValueError(
      f"probs/values: expected ranks 3 or 4, got shapes {probs.shape} and {values.shape}"
    )
  if values.shape[1] != probs.shape[-1]:
    raise ValueError(
      f"values: expected {probs.shape[-1]} keys on axis 1 (as probs), got shape {values.shape}"
    )
  if values.ndim == 4 and values.shape[2] != probs.shape[-3]:
    raise ValueError(
      f"values: expected {probs.shape[-3]} heads on axis 2 (as probs), got shape {values.shape}"
    )
  if probs.ndim == 4 and values.ndim == 3:
    # per image, all heads in one (H Nq, Nk) @ (Nk, C) product
    b, h, nq, nk = probs.shape
    out = jnp.matmul(probs.reshape(b, h * nq, nk), values, precision=precision)
    return out.reshape(b, h, nq, -1).transpose(0, 2, 1, 3)
  p = "hqk" if probs.ndim == 3 else "bhqk"
  v = "bkc" if values.ndim == 3 else "bkhc"
  return jnp.einsum(f"{p},{v}->bqhc", probs, values, precision=precision)


def project(heads: Array, kernel: Array, bias: Array | None = None, *, precision=None) -> Array:
  """The output projection ``sum_h heads_h W^(h) + b``: ``(B, Nq, H, C) -> (B, Nq, D)``.

  ``kernel`` is ``(H, C, D)`` (``flax.linen.DenseGeneral`` over the head and channel axes),
  ``bias`` ``(D,)`` or None.
  """
  y = jnp.einsum("bqhc,hcd->bqd", heads, kernel, precision=precision)
  return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def aggregate_project(probs: Array, values: Array, kernel: Array, *, precision=None) -> Array:
  """``sum_h (P_h V) W^(h)`` for batch-free probabilities and shared values, as two products.

  Equal to ``einsum('hqk,bkc,hcd->bqd', probs, values, kernel)`` = ``project(aggregate(...))``,
  computed in the MHSA equation's order (keys first) with every head and image folded into two
  large matrix products: ``(H Nq, Nk) @ (Nk, B C)`` aggregates, ``(Nq B, H C) @ (H C, D)``
  projects. (With hard attention the aggregation only selects values, and the projection sums
  what an im2col convolution sums.)

  Args:
    probs: ``(H, Nq, Nk)``.
    values: ``(B, Nk, C)``.
    kernel: ``(H, C, D)``.

  Returns:
    ``(B, Nq, D)``.
  """
  h, nq, nk = probs.shape
  if values.ndim != 3 or values.shape[1] != nk or kernel.shape[:2] != (h, values.shape[-1]):
    raise ValueError(
      f"kernel: expected shape ({h}, C, D) with values (B, {nk}, C), got kernel {kernel.shape} "
      f"and values {values.shape}"
    )
  b, _, c = values.shape
  keys_first = values.transpose(1, 0, 2).reshape(nk, b * c)
  heads = jnp.matmul(probs.reshape(h * nq, nk), keys_first, precision=precision)
  rows = heads.reshape(h, nq * b, c).transpose(1, 0, 2).reshape(nq * b, h * c)
  y = jnp.matmul(rows, kernel.reshape(h * c, -1), precision=precision)
  return y.reshape(nq, b, -1).transpose(1, 0, 2)


def aggregate_separable(
  axis_probs: Sequence[Array], values: Array, *, precision: Any = None
) -> Array:
  """:func:`aggregate` for probabilities that factorise over axes, ``P = P_0 (x) ... (x) P_{d-1}``.

  Contracts one key axis at a time: per head and channel ``N (sum_a Nk_a)`` multiply-adds
  instead of ``N Nk`` (``N^1.5`` instead of ``N^2`` on a square grid).

  Args:
    axis_probs: per-axis ``(H, Nq_a, Nk_a)``.
    values: ``(B, Nk, C)`` or ``(B, Nk, H, C)`` with ``Nk = prod(Nk_a)``.

  Returns:
    ``(B, Nq, H, C)``.
  """
  d = len(axis_probs)
  h = axis_probs[0].shape[0]
  key_shape = tuple(int(p.shape[2]) for p in axis_probs)
  b, per_head = values.shape[0], values.ndim == 4
  if values.shape[1] != int(np.prod(key_shape)) or (per_head and values.shape[2] != h):
    raise ValueError(
      f"values: expected (B, {int(np.prod(key_shape))}, [{h},] C) for key grid {key_shape}, got "
      f"{values.shape}"
    )
  keys, queries = "ijk"[:d], "uvw"[:d]
  x = values.reshape(b, *key_shape, *values.shape[2:])
  axes = "b" + keys + ("h" if per_head else "") + "c"
  for a, p in enumerate(axis_probs):
    out = axes.replace(keys[a], queries[a])
    if "h" not in out:
      out = out[:-1] + "hc"
    x = jnp.einsum(f"h{queries[a]}{keys[a]},{axes}->{out}", p, x, precision=precision)
    axes = out
  nq = int(np.prod([p.shape[1] for p in axis_probs]))
  return x.reshape(b, nq, h, -1)


# ----------------------------------------------------------------------------------------------
# The MHSA equation
# ----------------------------------------------------------------------------------------------


def relative_attention(
  values: Array,
  kernel: Array,
  bias: Array | None = None,
  *,
  position_logits: Array | Sequence[Array] | None = None,
  query: Array | None = None,
  key: Array | None = None,
  hard: bool = False,
  implementation: str = "dense",
  dropout_rate: float = 0.0,
  dropout_rng: Array | None = None,
  shared_dropout_mask: bool = False,
  use_dot_product_attention: bool = True,
  gate: Array | None = None,
  return_probs: bool = False,
  precision: Any = None,
) -> Array | tuple[Array, Array]:
  """Multi-head self-attention with relative scores (Cordonnier et al., Eq. 1 and Sec. 2.3).

  .. math::
    \\mathrm{MHSA}(X)_q = \\sum_h \\mathrm{softmax}(A^{(h)}_{q,:}) \\, V_h \\, W^{(h)} + b,
    \\qquad A^{(h)}_{q,k} = \\frac{q_h \\cdot k_h}{\\sqrt{D_k}} + \\mathrm{pos}^{(h)}_{q,k}

  1. scores: the content term ``q.k / sqrt(D_k)`` (if ``query``/``key`` are given) plus the
     position term (``position_logits``);
  2. probabilities: softmax over keys (in at least float32), or with ``hard=True`` Lemma 1's
     hard attention (the ``alpha -> infinity`` limit of the quadratic encoding);
  3. attention dropout (training);
  4. aggregation of the values and the per-head output projection ``W^(h)`` plus ``b``.

  Args:
    values: ``(B, Nk, C)`` shared by the heads, or ``(B, Nk, H, C)``.
    kernel: ``(H, C, D)`` output projection; ``bias`` ``(D,)`` or None.
    position_logits: ``None``; per-axis terms ``[(H, Nq_a, Nk_a)]`` (quadratic, learned); full
      batch-free scores ``(H, Nq, Nk)``; or per-image scores ``(B, H, Nq, Nk)`` (``q.r``).
    query, key: ``(B, Nq, H, D_k)`` and ``(B, Nk, H, D_k)`` for the content term.
    hard: hard attention on position-only scores.
    implementation: ``'dense'`` or ``'separable'`` (per-axis position-only scores without
      attention dropout; otherwise the dense path runs).
    dropout_rate, dropout_rng: attention dropout (``rate > 0`` needs ``dropout_rng``).
    shared_dropout_mask: for batch-free probabilities, one mask shared by the batch (the
      authors' Gaussian attention) instead of one per example.
    use_dot_product_attention: content scores without attention dropout go through
      :func:`jax.nn.dot_product_attention` when the values have the keys' shape per head.
    gate: ``(H,)`` gating parameters ``lambda_h`` of gated positional self-attention (GPSA,
      d'Ascoli et al. 2021; needs content and position scores): the probabilities are
      ``sigmoid(-lambda_h) softmax(content) + sigmoid(lambda_h) softmax(position)``,
      renormalised over keys, instead of the softmax of the sum. The content weight is computed
      as ``sigmoid(-lambda_h)``, not ``1 - sigmoid(lambda_h)``: the same function, but exact in
      the tail, so a large gate (e.g. 17: weight 4e-8, below float32 resolution of the output)
      keeps a non-zero gradient to the gate and the content projections, where ``1 - sigmoid``
      would round to exactly 0 and cut them off for good.
    return_probs: also return the probabilities (before dropout): ``(H, Nq, Nk)`` when the
      scores have no batch axis, else ``(B, H, Nq, Nk)``. The output is computed the same way
      either way.
    precision: precision of the contractions.

  Returns:
    ``(B, Nq, D)``, and the probabilities if ``return_probs``.
  """
  content = query is not None
  if content != (key is not None):
    raise ValueError("query/key: expected both (content scores) or neither")
  if not content and position_logits is None:
    raise ValueError("position_logits: expected scores when query and key are None, got None")
  if hard and content:
    raise ValueError("hard: expected position-only scores (query=None) for hard attention")
  if gate is not None and not (content and position_logits is not None):
    raise ValueError("gate: expected content (query, key) and position scores for GPSA")
  if implementation not in ("dense", "separable"):
    raise ValueError(f"implementation: expected 'dense' or 'separable', got {implementation!r}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate: expected 0 <= rate < 1, got {dropout_rate}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rng: expected a PRNG key with dropout_rate > 0, got None")
  per_axis = isinstance(position_logits, (tuple, list))
  normalize = hard_attention if hard else softmax

  def dropout(p: Array) -> Array:
    if dropout_rate == 0.0:
      return p
    batch = None if shared_dropout_mask else values.shape[0]
    return dropout_probs(dropout_rng, p, dropout_rate, batch)

  probs = None
  if gate is not None:  # GPSA: a per-head convex combination of two softmaxes
    position = position_probs(position_logits)
    position = position.reshape((-1, *position.shape[-3:]))  # (1 | B, H, Nq, Nk)
    lam = gate.astype(jnp.float32).reshape(1, -1, 1, 1)
    content_probs = softmax(enc.content_logits(query, key).astype(jnp.float32))
    # sigmoid(-lam), not 1 - sigmoid(lam): exact in the tail, so the content half of a gate
    # opened to sigmoid(lam) = 1 in float32 still gets (tiny, non-zero) gradients.
    mixed = jax.nn.sigmoid(-lam) * content_probs + jax.nn.sigmoid(lam) * position.astype(
      jnp.float32
    )
    probs = mixed / jnp.sum(mixed, axis=-1, keepdims=True)
    heads = aggregate(dropout(probs).astype(values.dtype), values, precision=precision)
    y = project(heads, kernel, precision=precision)
  elif content:
    pos = enc.combine_axis_logits(position_logits) if per_axis else position_logits
    pos = None if pos is None else pos.reshape((-1, *pos.shape[-3:]))  # (1 | B, H, Nq, Nk)
    per_head_values = (
      values
      if values.ndim == 4
      else jnp.broadcast_to(
        values[:, :, None], (*values.shape[:2], query.shape[2], values.shape[-1])
      )
    )
    fused = use_dot_product_attention and dropout_rate == 0.0 and per_head_values.shape == key.shape
    if return_probs or not fused:
      scores = enc.content_logits(query, key)
      probs = softmax(scores if pos is None else scores + pos.astype(scores.dtype))
    if fused:
      bias_logits = None if pos is None else pos.astype(query.dtype)
      heads = jax.nn.dot_product_attention(query, key, per_head_values, bias=bias_logits)
    else:
      heads = aggregate(dropout(probs).astype(values.dtype), values, precision=precision)
    y = project(heads, kernel, precision=precision)
  elif per_axis and implementation == "separable" and dropout_rate == 0.0:
    axis_probs = [normalize(t).astype(values.dtype) for t in position_logits]
    heads = aggregate_separable(axis_probs, values, precision=precision)
    y = project(heads, kernel, precision=precision)
    if return_probs:
      probs = combine_axis_probs(axis_probs)
  else:
    probs = position_probs(position_logits, hard=hard)
    p = dropout(probs).astype(values.dtype)
    if p.ndim == 3 and values.ndim == 3:
      y = aggregate_project(p, values, kernel, precision=precision)
    else:
      y = project(aggregate(p, values, precision=precision), kernel, precision=precision)
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return (y, probs) if return_probs else y


# ----------------------------------------------------------------------------------------------
# The hard limit as shifted views of the key grid (an im2col convolution)
# ----------------------------------------------------------------------------------------------


class _ViewGrid(NamedTuple):
  """Where the hard limit's views start (per head and key axis) and their query grid."""

  starts: list[list[Array]]  # [H][d]: key index read by query 0 (traced when the centres are)
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
    window = lax.dynamic_slice(keys, [b0, *first, 0], (nb, *size, keys.shape[-1]))
    views.append(window[(slice(None), *(slice(None, None, s) for s in grid.strides), slice(None))])
  return views


def gather_hard(
  keys: Array, key_positions: Sequence[Array], query_positions: Sequence[Array], centers: Array
) -> Array:
  """Lemma 1's hard attention as shifted, strided views of the key grid.

  Head ``h`` at query ``q`` reads the key at ``q + round(Delta_h)``, which must lie on the key
  grid (true for the convolution construction); queries must form a regular grid. Equal to
  ``aggregate(hard_attention(quadratic scores), values)`` for integer centres.

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
  bias: Array | None = None,
  *,
  precision: Any = None,
) -> Array:
  """``project(gather_hard(...), kernel, bias)`` computed in blocks: an im2col convolution.

  For a block of query rows (first query axis) of a block of images, the ``H`` views are
  concatenated along channels and projected by one ``(rows, H C) @ (H C, D)`` product. A block
  holds at most ``IM2COL_MAX_ELEMENTS`` im2col entries (at least one query row of one image);
  equal blocks run in sequence under ``lax.map``, the remainder as one more block, so the
  temporary memory stays bounded for any batch and image size.

  Args:
    keys: ``(B, *key_shape, C)``.
    key_positions, query_positions: per-axis coordinates (regular grids).
    centers: ``(H, d)`` (rounded to the nearest integer).
    kernel: ``(H, C, D)`` per-head matrices ``W^(h)``; ``bias`` ``(D,)`` or None.

  Returns:
    ``(B, Nq, D)``.
  """
  b, c = keys.shape[0], keys.shape[-1]
  h, _, d = kernel.shape
  grid = _view_grid(key_positions, query_positions, centers)
  w = kernel.reshape(h * c, d)
  row = int(np.prod(grid.num_queries[1:])) * h * c  # im2col entries of one query row, one image

  def block(b0, nb, r0, nr):  # -> (nb, nr, *num_queries[1:], D)
    views = _gather_views(keys, grid, (b0, nb), (r0, nr))
    return jnp.matmul(jnp.concatenate(views, axis=-1), w, precision=precision)

  def images(b0, nb):  # every query row of images [b0, b0 + nb)
    rows = _chunks(grid.num_queries[0], IM2COL_MAX_ELEMENTS // (nb * row))
    return _blocks(lambda r0, nr: block(b0, nb, r0, nr), *rows, axis=1)

  out = _blocks(images, *_chunks(b, IM2COL_MAX_ELEMENTS // row), axis=0)
  out = out.reshape(b, -1, d).astype(keys.dtype)
  return out if bias is None else out + jnp.reshape(bias, (1, 1, -1))
