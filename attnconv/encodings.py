"""Relative positional encodings as pure functions of (grid positions, parameters).

A grid is described per axis by the 1-D coordinates of its points, so that query grids may be
strided subsets and key grids may be larger (padded, input-dilated) grids in the same coordinate
system. ``query_positions = (q_0, ..., q_{d-1})`` with ``q_a`` of shape ``(Nq_a,)``; the grid is the
Cartesian product, flattened in row-major order (``Nq = prod(Nq_a)``). The relative shift of a key
``k`` seen from a query ``q`` is ``delta = k - q`` (Cordonnier et al., 2020, Sec. 2.3).

Every ``*_logits`` function returns position logits of shape ``(num_heads, Nq, Nk)`` (no batch
axis: position-only attention is computed once per layer). ``*_axis_logits`` functions return the
per-axis factors ``[(num_heads, Nq_a, Nk_a)]`` of encodings whose logits are a *sum over axes*,
so that the softmax factorises into a product of per-axis softmaxes (the separable fast path).

References:
  Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and Convolutional
  Layers", ICLR 2020 (Eq. 9: quadratic encoding; Sec. 2.3: relative encodings).
  Dai et al., "Transformer-XL", ACL 2019 (four-term relative score).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnconv import matmul as mm

Array = jax.Array
Positions = Sequence[Array]


def _check_positions(name: str, positions: Positions) -> tuple[Array, ...]:
  if not isinstance(positions, (tuple, list)) or not positions:
    raise TypeError(
      f"{name}: expected a non-empty tuple of 1-D coordinate arrays, got {positions!r}"
    )
  out = tuple(jnp.asarray(p) for p in positions)
  for a, p in enumerate(out):
    if p.ndim != 1 or p.shape[0] < 1:
      raise ValueError(f"{name}[{a}]: expected a non-empty 1-D array, got shape {p.shape}")
  if len(out) not in (1, 2, 3):
    raise ValueError(f"{name}: expected 1, 2 or 3 axes, got {len(out)}")
  return out


def _check_pair(query_positions: Positions, key_positions: Positions):
  qp = _check_positions("query_positions", query_positions)
  kp = _check_positions("key_positions", key_positions)
  if len(qp) != len(kp):
    raise ValueError(f"key_positions: expected {len(qp)} axes (as query_positions), got {len(kp)}")
  return qp, kp


def grid_positions(
  shape: Sequence[int], *, start: Sequence[int] | int = 0, step: Sequence[int] | int = 1
) -> tuple[Array, ...]:
  """Per-axis coordinates ``start_a + step_a * arange(shape_a)`` of a regular grid.

  Args:
    shape: number of points per axis, length d in {1, 2, 3}.
    start: coordinate of the first point per axis (int or one per axis).
    step: spacing per axis (int or one per axis).

  Returns:
    A tuple of d static int32 numpy arrays, the a-th of shape ``(shape[a],)``.
  """
  shape = tuple(int(s) for s in shape)
  d = len(shape)
  if d not in (1, 2, 3) or any(s < 1 for s in shape):
    raise ValueError(f"shape: expected 1 to 3 positive sizes, got {shape}")
  start = (start,) * d if isinstance(start, int) else tuple(start)
  step = (step,) * d if isinstance(step, int) else tuple(step)
  if len(start) != d or len(step) != d:
    raise ValueError(f"start/step: expected {d} values, got start={start}, step={step}")
  return tuple((s0 + st * np.arange(n)).astype(np.int32) for n, s0, st in zip(shape, start, step))


def axis_offsets(query_positions: Positions, key_positions: Positions) -> tuple[Array, ...]:
  """Per-axis relative shifts ``delta_a[i, j] = k_a[j] - q_a[i]``, each ``(Nq_a, Nk_a)``."""
  qp, kp = _check_pair(query_positions, key_positions)
  return tuple(k[None, :] - q[:, None] for q, k in zip(qp, kp))


def relative_offsets(query_positions: Positions, key_positions: Positions) -> Array:
  """All relative shifts ``delta = k - q`` of shape ``(Nq, Nk, d)`` (row-major flattening)."""
  offs = axis_offsets(query_positions, key_positions)
  d = len(offs)
  parts = []
  for a, o in enumerate(offs):
    # o: (Nq_a, Nk_a) -> broadcast to (Nq_0..Nq_{d-1}, Nk_0..Nk_{d-1})
    shape = [1] * (2 * d)
    shape[a], shape[d + a] = o.shape
    parts.append(o.reshape(shape))
  full = jnp.broadcast_arrays(*parts)
  nq = int(np.prod([o.shape[0] for o in offs]))
  nk = int(np.prod([o.shape[1] for o in offs]))
  return jnp.stack([f.reshape(nq, nk) for f in full], axis=-1)


def _sum_axis_logits(axis_logits: Sequence[Array]) -> Array:
  """Broadcast-sum per-axis logits ``[(H, Nq_a, Nk_a)]`` into ``(H, Nq, Nk)``."""
  d = len(axis_logits)
  h = axis_logits[0].shape[0]
  q_shape = tuple(lg.shape[1] for lg in axis_logits)
  k_shape = tuple(lg.shape[2] for lg in axis_logits)
  dtype = jnp.result_type(*axis_logits)
  total = jnp.zeros((h, *q_shape, *k_shape), dtype)
  for a, lg in enumerate(axis_logits):
    shape = [h] + [1] * (2 * d)
    shape[1 + a], shape[1 + d + a] = lg.shape[1:]
    total = total + lg.reshape(shape)
  return total.reshape(h, int(np.prod(q_shape)), int(np.prod(k_shape)))


def combine_axis_logits(axis_logits: Sequence[Array]) -> Array:
  """Full logits ``(H, Nq, Nk)`` of a separable encoding from its per-axis terms."""
  return _sum_axis_logits(axis_logits)


# ----------------------------------------------------------------------------------------------
# Quadratic encoding (Eq. 9)
# ----------------------------------------------------------------------------------------------


def _check_heads(centers: Array, d: int, *extra: tuple[str, Array]) -> Array:
  centers = jnp.asarray(centers)
  if centers.ndim != 2 or centers.shape[1] != d:
    raise ValueError(f"centers: expected shape (num_heads, {d}), got {centers.shape}")
  h = centers.shape[0]
  for name, arr in extra:
    if arr.shape[0] != h:
      raise ValueError(
        f"{name}: expected leading axis num_heads={h} (as centers), got shape {arr.shape}"
      )
  return centers


def _check_alpha(alpha, num_heads: int) -> Array:
  # Concrete values are checked with numpy (inside jit, jnp ops on constants are staged too).
  concrete = not isinstance(alpha, jax.core.Tracer)
  if concrete and np.any(np.asarray(alpha) <= 0):
    raise ValueError(f"alpha: expected every sharpness > 0, got {np.asarray(alpha)}")
  alpha = jnp.asarray(alpha)
  if alpha.ndim == 0:
    alpha = jnp.broadcast_to(alpha, (num_heads,))
  if alpha.shape != (num_heads,):
    raise ValueError(f"alpha: expected shape ({num_heads},) or a scalar, got {alpha.shape}")
  return alpha


def quadratic_encoding(offsets: Array) -> Array:
  """The quadratic relative encoding ``r_delta = (||delta||^2, delta_1, ..., delta_d)`` (Eq. 9).

  Args:
    offsets: relative shifts ``(..., d)``.

  Returns:
    ``(..., 1 + d)`` encodings.
  """
  offsets = jnp.asarray(offsets)
  return jnp.concatenate([jnp.sum(offsets**2, axis=-1, keepdims=True), offsets], axis=-1)


def quadratic_head_vectors(centers: Array, alpha: Array) -> Array:
  """Per-head vectors ``v_h = -alpha_h (1, -2 Delta_h)`` of Eq. 9, shape ``(H, 1 + d)``.

  With them ``v_h . r_delta = -alpha_h (||delta - Delta_h||^2 - ||Delta_h||^2)`` (Lemma 2).
  """
  centers = jnp.asarray(centers)
  alpha = _check_alpha(alpha, centers.shape[0])
  ones = jnp.ones(centers.shape[:1] + (1,), centers.dtype)
  return -alpha[:, None] * jnp.concatenate([ones, -2.0 * centers], axis=-1)


def quadratic_axis_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, alpha: Array
) -> tuple[Array, ...]:
  """Per-axis terms ``-alpha_h (delta_a - Delta_{h,a})^2``, each ``(H, Nq_a, Nk_a)``.

  Their sum over axes is :func:`quadratic_logits`; the softmax over the key grid factorises into
  the product of the per-axis softmaxes.
  """
  offs = axis_offsets(query_positions, key_positions)
  centers = _check_heads(centers, len(offs))
  alpha = _check_alpha(alpha, centers.shape[0])
  dt = jnp.result_type(centers.dtype, alpha.dtype, jnp.float32)
  return tuple(
    -alpha[:, None, None].astype(dt)
    * (o[None].astype(dt) - centers[:, a, None, None].astype(dt)) ** 2
    for a, o in enumerate(offs)
  )


def quadratic_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, alpha: Array
) -> Array:
  """Isotropic quadratic logits ``-alpha_h ||delta - Delta_h||^2`` (Eq. 9), ``(H, Nq, Nk)``.

  Eq. 9 gives ``v_h . r_delta = -alpha_h (||delta - Delta_h||^2 - ||Delta_h||^2)``; the
  ``||Delta_h||^2`` term is constant per query and cancels in the softmax, so it is dropped here
  (the logit of the target key is exactly 0 when it lies on the key grid).

  Args:
    query_positions: per-axis query coordinates (d arrays).
    key_positions: per-axis key coordinates (d arrays).
    centers: ``(H, d)`` attention centres ``Delta_h``.
    alpha: ``(H,)`` or scalar sharpness ``alpha_h > 0``.
  """
  return _sum_axis_logits(quadratic_axis_logits(query_positions, key_positions, centers, alpha))


def generalized_quadratic_encoding(offsets: Array) -> Array:
  """Encoding ``r_delta = (delta_1..delta_d, delta_i delta_j for i <= j)`` of size d + d(d+1)/2."""
  offsets = jnp.asarray(offsets)
  d = offsets.shape[-1]
  quad = [offsets[..., i] * offsets[..., j] for i in range(d) for j in range(i, d)]
  return jnp.concatenate([offsets, jnp.stack(quad, axis=-1)], axis=-1)


def precision_from_factor(factors: Array) -> Array:
  """``Sigma^{-1} = A A^T`` (positive semi-definite by construction) from factors ``(H, d, d)``."""
  factors = jnp.asarray(factors)
  return jnp.einsum("hij,hkj->hik", factors, factors)


def generalized_quadratic_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, factors: Array
) -> Array:
  """Logits ``-1/2 (delta - Delta_h)^T Sigma_h^{-1} (delta - Delta_h)``, ``Sigma^{-1} = A A^T``.

  Args:
    query_positions, key_positions: per-axis coordinates.
    centers: ``(H, d)``.
    factors: ``(H, d, d)`` matrices ``A_h``.

  Returns:
    ``(H, Nq, Nk)`` logits.
  """
  qp, kp = _check_pair(query_positions, key_positions)
  d = len(qp)
  factors = jnp.asarray(factors)
  centers = _check_heads(centers, d, ("factors", factors))
  if factors.shape[1:] != (d, d):
    raise ValueError(f"factors: expected shape ({centers.shape[0]}, {d}, {d}), got {factors.shape}")
  delta = relative_offsets(qp, kp)  # (Nq, Nk, d)
  diff = delta[None].astype(factors.dtype) - centers[:, None, None, :].astype(factors.dtype)
  proj = jnp.einsum("hqkd,hde->hqke", diff, factors)  # (delta - Delta)^T A
  return -0.5 * jnp.sum(proj**2, axis=-1)


def diagonal_quadratic_axis_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, precisions: Array
) -> tuple[Array, ...]:
  """Separable terms of an axis-aligned (diagonal ``Sigma^{-1}``) quadratic encoding.

  ``precisions`` ``(H, d)`` holds the diagonal of ``Sigma_h^{-1}``; term a is
  ``-1/2 p_{h,a} (delta_a - Delta_{h,a})^2``.
  """
  offs = axis_offsets(query_positions, key_positions)
  precisions = jnp.asarray(precisions)
  centers = _check_heads(centers, len(offs), ("precisions", precisions))
  return tuple(
    -0.5 * precisions[:, a, None, None] * (o[None] - centers[:, a, None, None]) ** 2
    for a, o in enumerate(offs)
  )


# ----------------------------------------------------------------------------------------------
# Learned relative embeddings (separable per-axis tables)
# ----------------------------------------------------------------------------------------------


def relative_index(offsets: Array, max_distance: int) -> Array:
  """Table index ``delta + max_distance - 1`` of integer shifts with ``|delta| < max_distance``."""
  return jnp.asarray(offsets).astype(jnp.int32) + (max_distance - 1)


def check_max_distance(
  query_positions: Positions, key_positions: Positions, tables: Sequence[Array]
) -> None:
  """Raises ValueError if a table is too small for the shifts of the grid (static shapes only)."""
  qp, kp = _check_pair(query_positions, key_positions)
  if len(tables) != len(qp):
    raise ValueError(f"tables: expected {len(qp)} per-axis tables, got {len(tables)}")
  for a, (q, k, t) in enumerate(zip(qp, kp, tables)):
    if isinstance(q, jax.core.Tracer) or isinstance(k, jax.core.Tracer):
      continue
    need = int(max(np.max(np.abs(np.asarray(k)[None, :] - np.asarray(q)[:, None])), 0)) + 1
    have = (t.shape[0] + 1) // 2
    if t.shape[0] % 2 != 1 or have < need:
      raise ValueError(
        f"tables[{a}]: expected an odd number >= {2 * need - 1} of rows (shifts up to "
        f"{need - 1}), got shape {t.shape}"
      )


def relative_embeddings(
  query_positions: Positions, key_positions: Positions, tables: Sequence[Array]
) -> tuple[Array, ...]:
  """Per-axis gathered embeddings ``r_a[i, j] = table_a[delta_a + M_a - 1]``, ``(Nq_a, Nk_a, P)``."""
  check_max_distance(query_positions, key_positions, tables)
  offs = axis_offsets(query_positions, key_positions)
  return tuple(
    jnp.take(t, relative_index(o, (t.shape[0] + 1) // 2), axis=0) for o, t in zip(offs, tables)
  )


def learned_axis_logits(
  query_positions: Positions,
  key_positions: Positions,
  tables: Sequence[Array],
  head_kernels: Sequence[Array],
) -> tuple[Array, ...]:
  """Per-axis learned logits ``w_{a,h} . r_a(delta_a)``, each ``(H, Nq_a, Nk_a)``.

  Args:
    tables: per-axis embedding tables ``(2 M_a - 1, P)`` (one row per shift).
    head_kernels: per-axis projections ``(P, H)`` (the per-head vectors, ``W_key-hat`` and ``v``
      of the relative score folded together).
  """
  if len(head_kernels) != len(tables):
    raise ValueError(
      f"head_kernels: expected {len(tables)} per-axis kernels, got {len(head_kernels)}"
    )
  embs = relative_embeddings(query_positions, key_positions, tables)
  out = []
  for a, (e, w) in enumerate(zip(embs, head_kernels)):
    if w.ndim != 2 or w.shape[0] != e.shape[-1]:
      raise ValueError(f"head_kernels[{a}]: expected shape ({e.shape[-1]}, H), got {w.shape}")
    out.append(jnp.einsum("qkp,ph->hqk", e, w))
  return tuple(out)


def learned_logits(
  query_positions: Positions,
  key_positions: Positions,
  tables: Sequence[Array],
  head_kernels: Sequence[Array],
) -> Array:
  """Full learned relative logits ``(H, Nq, Nk)`` (sum of :func:`learned_axis_logits`)."""
  return _sum_axis_logits(learned_axis_logits(query_positions, key_positions, tables, head_kernels))


# ----------------------------------------------------------------------------------------------
# Content terms
# ----------------------------------------------------------------------------------------------


def content_logits(query: Array, key: Array, *, out_dtype=None) -> Array:
  """Scaled dot-product scores ``q . k / sqrt(D_k)``.

  Computed as one row-major batched product per image and head (:func:`attnconv.matmul.bmm`:
  bfloat16 operands accumulate in float32 on the CPU).

  Args:
    query: ``(B, Nq, H, D_k)``.
    key: ``(B, Nk, H, D_k)``.
    out_dtype: dtype of the scores; default the query's.

  Returns:
    ``(B, H, Nq, Nk)``.
  """
  if query.ndim != 4 or key.ndim != 4:
    raise ValueError(
      f"query/key: expected rank 4 (batch, tokens, heads, dim), got {query.shape} and {key.shape}"
    )
  if query.shape[0] != key.shape[0] or query.shape[2:] != key.shape[2:]:
    raise ValueError(
      f"key: expected batch, heads and dim matching query {query.shape}, got {key.shape}"
    )
  out_dtype = jnp.dtype(out_dtype or query.dtype)
  scale = 1.0 / np.sqrt(query.shape[-1])
  q = mm.row_major(query, (0, 2, 1, 3))  # (B, H, Nq, D_k)
  k = mm.row_major(key, (0, 2, 1, 3))  # (B, H, Nk, D_k)
  return mm.bmm(q, k, transpose_b=True, out_dtype=out_dtype) * jnp.asarray(scale, out_dtype)


def content_logits_folded(
  query: Array, inputs: Array, key_kernel: Array, *, out_dtype=None, precision=None
) -> Array:
  """:func:`content_logits` for keys ``k = x W_k + b_k``, with ``W_k`` folded into the query.

  ``q_h . k_h = (q_h W_{k,h}^T) . x + q_h . b_{k,h}``; the last term is the same for every key
  of a query, and the softmax over keys removes it, so the scores returned here,
  ``(q_h W_{k,h}^T) . x / sqrt(D_k)``, give exactly the probabilities of :func:`content_logits`
  of the projected keys (and ``b_k`` has zero gradient, as it has in exact arithmetic there).
  The multiply-adds are the same as projecting the keys; the difference is the shape of the
  products: the folded queries ``q~_h = q_h W_{k,h}^T`` are one batched product per head over
  all ``B Nq`` queries, and the scores one ``(H Nq, C) @ (C, Nk)`` product per image, where
  the projected keys need one ``(Nq, D_k) @ (D_k, Nk)`` product per image and head (on the
  2-core EPYC in bfloat16 the paper's learned + content score block, forward and backward at
  batch 16, took 311-322 ms against 355-369 ms; ``tests/test_encodings.py`` checks equality).

  Args:
    query: ``(B, Nq, H, D_k)``.
    inputs: ``(B, Nk, C)``, the key tokens before the key projection.
    key_kernel: ``(C, H, D_k)``, the key projection's kernel (``DenseGeneral`` layout).
    out_dtype: dtype of the scores; default the query's.
    precision: precision of the contractions.

  Returns:
    ``(B, H, Nq, Nk)``: the scores of :func:`content_logits` minus ``q_h . b_{k,h} / sqrt(D_k)``
    per query.
  """
  if query.ndim != 4 or inputs.ndim != 3 or key_kernel.ndim != 3:
    raise ValueError(
      f"query/inputs/key_kernel: expected ranks 4, 3 and 3, got {query.shape}, "
      f"{inputs.shape} and {key_kernel.shape}"
    )
  b, nq, h, dk = query.shape
  c = inputs.shape[-1]
  if key_kernel.shape != (c, h, dk) or inputs.shape[0] != b:
    raise ValueError(
      f"key_kernel: expected shape ({c}, {h}, {dk}) for query {query.shape} and inputs "
      f"{inputs.shape}, got {key_kernel.shape}"
    )
  out_dtype = jnp.dtype(out_dtype or query.dtype)
  nk = inputs.shape[1]
  q = mm.row_major(query, (2, 0, 1, 3)).reshape(h, b * nq, dk)  # head-major queries
  w = mm.row_major(key_kernel.astype(query.dtype), (1, 0, 2))  # (H, C, D_k)
  folded = mm.bmm(q, w, transpose_b=True, precision=precision)  # (H, B Nq, C)
  folded = mm.row_major(folded.reshape(h, b, nq, c), (1, 0, 2, 3)).reshape(b, h * nq, c)
  scores = mm.bmm(
    folded, inputs.astype(query.dtype), transpose_b=True, out_dtype=out_dtype, precision=precision
  )
  return scores.reshape(b, h, nq, nk) * jnp.asarray(1.0 / np.sqrt(dk), out_dtype)


def query_relative_logits(
  query: Array,
  query_shape: Sequence[int],
  rel_embeddings: Sequence[Array],
  *,
  scale: float | None = None,
  out_dtype=None,
) -> Array:
  """Query-against-relative-embedding scores ``q . r_delta`` (Ramachandran et al.; separable).

  The query's last axis is split into d consecutive chunks of size P, chunk a meeting the axis-a
  embedding ``r_a(delta_a)``; the score is the sum over axes (as in the authors' code, where each
  half of the query meets the row or the column table). Cost ``B N H (sum_a Nk_a) P``; no
  ``(B, N, N, D)`` tensor is formed.

  Each axis is one batched product over its query coordinate (:func:`attnconv.matmul.bmm`,
  "NT" form): the chunk as a row-major ``(Nq_a, B (other query axes) H, P)`` copy against
  ``(Nq_a, Nk_a, P)``. (As an ``einsum`` in bfloat16, XLA:CPU converted both to float32 and ran
  the products and their gradients at ~70-95 GFLOP/s through float32 transposes.)

  Args:
    query: ``(B, Nq, H, d * P)``.
    query_shape: the query grid shape ``(Nq_0, ..., Nq_{d-1})``.
    rel_embeddings: per-axis ``(Nq_a, Nk_a, P)`` from :func:`relative_embeddings`.
    scale: multiplier of the scores; default ``1 / sqrt(d * P)``.
    out_dtype: dtype of the scores (default the query's); low-precision operands accumulate in
      float32 and are rounded once to it.

  Returns:
    ``(B, H, Nq, Nk)``.
  """
  d = len(rel_embeddings)
  b, nq, h, dk = query.shape
  p = rel_embeddings[0].shape[-1]
  if dk != d * p or nq != int(np.prod(query_shape)):
    raise ValueError(
      f"query: expected shape (B, {int(np.prod(query_shape))}, H, {d * p}), got {query.shape}"
    )
  query_shape = tuple(int(n) for n in query_shape)
  scale = 1.0 / np.sqrt(dk) if scale is None else scale
  out_dtype = jnp.dtype(out_dtype or query.dtype)
  key_shape = tuple(int(r.shape[1]) for r in rel_embeddings)
  qg = query.reshape((b, *query_shape, h, dk))
  total = None
  for a, r in enumerate(rel_embeddings):
    others = [1 + i for i in range(d) if i != a]
    # (q_a, b, other query axes, h, p) rows, one (rows, p) @ (p, Nk_a) product per q_a
    qa = mm.row_major(qg[..., a * p : (a + 1) * p], (1 + a, 0, *others, d + 1, d + 2))
    term = mm.bmm(
      qa.reshape(query_shape[a], -1, p), r.astype(qa.dtype), transpose_b=True, out_dtype=out_dtype
    )
    term = term.reshape(query_shape[a], b, *[query_shape[i] for i in range(d) if i != a], h, -1)
    # back to (b, h, q_0, ..., q_{d-1}, k_a), with singleton axes for the other key axes
    order = [1, d + 1] + [0 if i == a else (2 + i if i < a else 1 + i) for i in range(d)] + [d + 2]
    term = jnp.transpose(term, order)
    shape = [b, h, *query_shape] + [1] * d
    shape[2 + d + a] = key_shape[a]
    term = term.reshape(shape)
    total = term if total is None else total + term
  full_shape = (b, h, *query_shape, *key_shape)
  scaled = jnp.broadcast_to(total, full_shape) * jnp.asarray(scale, out_dtype)
  return scaled.reshape(b, h, nq, int(np.prod(key_shape)))


def transformer_xl_logits(query: Array, key: Array, rel_keys: Array, u: Array, v: Array) -> Array:
  """The four-term relative score of Transformer-XL (Cordonnier et al., Sec. 2.3).

  ``A_{q,k} = q.k + q.(W^ r_delta) + u.k + v.(W^ r_delta) = (q + u).k + (q + v).(W^ r_delta)``,
  unscaled (the relative-attention convention of the paper).

  Args:
    query: ``(B, Nq, H, D_k)`` = X W_qry.
    key: ``(B, Nk, H, D_k)`` = X W_key.
    rel_keys: ``(Nq, Nk, H, D_k)`` projected relative encodings ``W^_key r_delta`` per head.
    u, v: ``(H, D_k)`` per-head vectors.

  Returns:
    ``(B, H, Nq, Nk)``.
  """
  if u.shape != query.shape[2:] or v.shape != query.shape[2:]:
    raise ValueError(
      f"u/v: expected shape {query.shape[2:]} (heads, key dim), got {u.shape} and {v.shape}"
    )
  if rel_keys.shape != (query.shape[1], key.shape[1], *query.shape[2:]):
    raise ValueError(
      f"rel_keys: expected shape {(query.shape[1], key.shape[1], *query.shape[2:])}, "
      f"got {rel_keys.shape}"
    )
  content = jnp.einsum("bqhd,bkhd->bhqk", query + u, key)
  position = jnp.einsum("bqhd,qkhd->bhqk", query + v, rel_keys)
  return content + position
