"""Attention scores as pure functions: one function per equation.

Positions are per-axis coordinates (:mod:`attnconv.grids`): ``query_positions = (q_0, ...,
q_{d-1})`` with ``q_a`` of shape ``(Nq_a,)``, flattened row-major (``Nq = prod(Nq_a)``); the
relative shift of key ``k`` seen from query ``q`` is ``delta = k - q``.

Position scores have no batch axis (they are computed once per layer). Encodings whose score is
a sum over axes (the quadratic and the learned ones) return their ``d`` per-axis terms
``[(H, Nq_a, Nk_a)]``: the full ``(H, Nq, Nk)`` score is their broadcast sum
(:func:`combine_axis_logits`), and its softmax over the key grid is the product of the per-axis
softmaxes, which the separable aggregation uses.

======================================  ==========================================
equation                                function
======================================  ==========================================
Eq. 9, quadratic (Gaussian) encoding    :func:`quadratic_logits`
Eq. 9, its factors ``r_delta``, ``v``   :func:`quadratic_encoding`, :func:`quadratic_head_vectors`
generalized quadratic encoding          :func:`generalized_quadratic_logits`
learned relative encoding               :func:`learned_logits`
content score ``q.k / sqrt(D_k)``       :func:`content_logits`
query-relative score ``q.r_delta``      :func:`query_relative_logits`
======================================  ==========================================

References:
  Cordonnier, Loukas & Jaggi, "On the Relationship between Self-Attention and Convolutional
  Layers", ICLR 2020 (Sec. 2.3 relative encodings; Eq. 9; Sec. 4 learned embeddings).
  Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019 (q.r).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Positions = Sequence[Array]


def _check_positions(name: str, positions: Positions) -> tuple[Array, ...]:
  if not isinstance(positions, (tuple, list)) or not positions:
    raise TypeError(
      f"{name}: expected a non-empty tuple of 1-D coordinate arrays, got {positions!r}"
    )
  # Static (numpy) coordinates stay numpy, so that shifts derived from them are static under jit.
  out = tuple(p if isinstance(p, jax.core.Tracer) else np.asarray(p) for p in positions)
  for a, p in enumerate(out):
    if p.ndim != 1 or p.shape[0] < 1:
      raise ValueError(f"{name}[{a}]: expected a non-empty 1-D array, got shape {p.shape}")
  if len(out) not in (1, 2, 3):
    raise ValueError(f"{name}: expected 1, 2 or 3 axes, got {len(out)}")
  return out


def axis_offsets(query_positions: Positions, key_positions: Positions) -> tuple[Array, ...]:
  """Per-axis relative shifts ``delta_a[i, j] = k_a[j] - q_a[i]``, each ``(Nq_a, Nk_a)``."""
  qp = _check_positions("query_positions", query_positions)
  kp = _check_positions("key_positions", key_positions)
  if len(qp) != len(kp):
    raise ValueError(f"key_positions: expected {len(qp)} axes (as query_positions), got {len(kp)}")
  return tuple(k[None, :] - q[:, None] for q, k in zip(qp, kp))


def _on_full_grid(term: Array, a: int, d: int) -> Array:
  """A per-axis term ``(..., Nq_a, Nk_a)`` reshaped to broadcast on ``(..., Nq_0, ..., Nq_{d-1},
  Nk_0, ..., Nk_{d-1})``."""
  shape = [*term.shape[:-2]] + [1] * (2 * d)
  lead = term.ndim - 2
  shape[lead + a], shape[lead + d + a] = term.shape[-2:]
  return term.reshape(shape)


def combine_axis_logits(axis_logits: Sequence[Array]) -> Array:
  """The full scores ``(H, Nq, Nk)`` of per-axis terms ``[(H, Nq_a, Nk_a)]``: their broadcast sum."""
  d = len(axis_logits)
  total = sum(_on_full_grid(t, a, d) for a, t in enumerate(axis_logits))
  nq = int(np.prod([t.shape[1] for t in axis_logits]))
  return total.reshape(axis_logits[0].shape[0], nq, -1)


def relative_offsets(query_positions: Positions, key_positions: Positions) -> Array:
  """All relative shifts ``delta = k - q``, ``(Nq, Nk, d)`` (row-major flattening)."""
  offsets = axis_offsets(query_positions, key_positions)
  d = len(offsets)
  full = [_on_full_grid(o, a, d) for a, o in enumerate(offsets)]
  shape = np.broadcast_shapes(*(f.shape for f in full))
  nq = int(np.prod(shape[:d]))
  return jnp.stack([jnp.broadcast_to(f, shape).reshape(nq, -1) for f in full], axis=-1)


# ----------------------------------------------------------------------------------------------
# Quadratic encoding (Eq. 9) and its generalisation
# ----------------------------------------------------------------------------------------------


def _check_centers(centers: Array, d: int) -> Array:
  centers = jnp.asarray(centers)
  if centers.ndim != 2 or centers.shape[1] != d:
    raise ValueError(f"centers: expected shape (num_heads, {d}), got {centers.shape}")
  return centers


def _check_alpha(alpha: Array | float, num_heads: int) -> Array:
  # Concrete values are checked with numpy (inside jit, jnp ops on constants are staged too).
  if not isinstance(alpha, jax.core.Tracer) and np.any(np.asarray(alpha) <= 0):
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
    ``(..., 1 + d)``.
  """
  offsets = jnp.asarray(offsets)
  return jnp.concatenate([jnp.sum(offsets**2, axis=-1, keepdims=True), offsets], axis=-1)


def quadratic_head_vectors(centers: Array, alpha: Array) -> Array:
  """The per-head vectors ``v_h = -alpha_h (1, -2 Delta_h)`` of Eq. 9, ``(H, 1 + d)``.

  ``v_h . r_delta = -alpha_h (||delta - Delta_h||^2 - ||Delta_h||^2)`` (Lemma 2).
  """
  centers = jnp.asarray(centers)
  alpha = _check_alpha(alpha, centers.shape[0])
  ones = jnp.ones((centers.shape[0], 1), centers.dtype)
  return -alpha[:, None] * jnp.concatenate([ones, -2.0 * centers], axis=-1)


def quadratic_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, alpha: Array
) -> tuple[Array, ...]:
  """The quadratic encoding's scores ``-alpha_h ||delta - Delta_h||^2`` (Eq. 9), per axis.

  .. math::
    A^{(h)}_{q,k} = v_h^\\top r_{k - q} + \\alpha_h \\|\\Delta_h\\|^2
                  = -\\alpha_h \\|\\delta - \\Delta_h\\|^2
                  = \\sum_a -\\alpha_h (\\delta_a - \\Delta_{h,a})^2

  The ``alpha_h ||Delta_h||^2`` term of ``v_h . r_delta`` is the same for every key of a query
  and cancels in the softmax; without it the target key's score is exactly 0 when it lies on
  the key grid. As ``alpha -> infinity`` the softmax tends to one-hot attention on the key at
  ``q + Delta_h`` (Lemma 2).

  Args:
    query_positions, key_positions: per-axis coordinates (``d`` arrays each).
    centers: ``(H, d)`` attention centres ``Delta_h``.
    alpha: ``(H,)`` or a scalar, sharpness ``alpha_h > 0``.

  Returns:
    ``d`` per-axis terms ``(H, Nq_a, Nk_a)`` (at least float32); their sum
    (:func:`combine_axis_logits`) is the ``(H, Nq, Nk)`` score.
  """
  offsets = axis_offsets(query_positions, key_positions)
  centers = _check_centers(centers, len(offsets))
  alpha = _check_alpha(alpha, centers.shape[0])
  dt = jnp.result_type(centers.dtype, alpha.dtype, jnp.float32)
  alpha, centers = alpha.astype(dt), centers.astype(dt)
  return tuple(
    -alpha[:, None, None] * (o[None].astype(dt) - centers[:, a, None, None]) ** 2
    for a, o in enumerate(offsets)
  )


def generalized_quadratic_logits(
  query_positions: Positions, key_positions: Positions, centers: Array, factors: Array
) -> Array:
  """Anisotropic Gaussian scores ``-1/2 (delta - Delta_h)^T Sigma_h^{-1} (delta - Delta_h)``.

  The generalized quadratic encoding of Cordonnier et al. (Sec. 4), with a learned precision
  ``Sigma_h^{-1} = A_h A_h^T`` (positive semi-definite by construction). With ``A_h = sqrt(2
  alpha_h) I`` it is Eq. 9.

  Args:
    query_positions, key_positions: per-axis coordinates.
    centers: ``(H, d)``.
    factors: ``(H, d, d)``, the matrices ``A_h``.

  Returns:
    ``(H, Nq, Nk)`` (in the dtype of ``factors``, at least float32).
  """
  delta = relative_offsets(query_positions, key_positions)  # (Nq, Nk, d)
  d = delta.shape[-1]
  centers = _check_centers(centers, d)
  factors = jnp.asarray(factors)
  if factors.shape != (centers.shape[0], d, d):
    raise ValueError(f"factors: expected shape ({centers.shape[0]}, {d}, {d}), got {factors.shape}")
  dt = jnp.result_type(factors.dtype, jnp.float32)
  diff = delta[None].astype(dt) - centers[:, None, None, :].astype(dt)
  projected = jnp.einsum("hqkd,hde->hqke", diff, factors.astype(dt))  # (delta - Delta)^T A
  return -0.5 * jnp.sum(projected**2, axis=-1)


# ----------------------------------------------------------------------------------------------
# Learned relative embeddings (per-axis tables, as the authors' row and column embeddings)
# ----------------------------------------------------------------------------------------------


def relative_embeddings(
  query_positions: Positions, key_positions: Positions, tables: Sequence[Array]
) -> tuple[Array, ...]:
  """Per-axis embeddings ``r_a[i, j] = table_a[delta_a + M_a - 1]``, each ``(Nq_a, Nk_a, P)``.

  Args:
    query_positions, key_positions: per-axis coordinates.
    tables: per-axis ``(2 M_a - 1, P)``, one row per shift ``|delta_a| < M_a``.
  """
  offsets = axis_offsets(query_positions, key_positions)
  if len(tables) != len(offsets):
    raise ValueError(f"tables: expected {len(offsets)} per-axis tables, got {len(tables)}")
  out = []
  for a, (o, t) in enumerate(zip(offsets, tables)):
    need = int(np.max(np.abs(np.asarray(o)))) + 1
    if t.shape[0] % 2 != 1 or (t.shape[0] + 1) // 2 < need:
      raise ValueError(
        f"tables[{a}]: expected an odd number >= {2 * need - 1} of rows (shifts up to "
        f"{need - 1}), got shape {t.shape}"
      )
    out.append(jnp.take(t, o + (t.shape[0] - 1) // 2, axis=0))
  return tuple(out)


def learned_logits(
  query_positions: Positions,
  key_positions: Positions,
  tables: Sequence[Array],
  head_kernels: Sequence[Array],
) -> tuple[Array, ...]:
  """Learned relative scores ``w_{a,h} . r_a(delta_a)``, per axis (position only).

  The relative score ``v_h^T W_key-hat r_delta`` of Cordonnier et al. (Sec. 2.3, the query-free
  term) with ``r_delta`` the concatenation of learned per-axis embeddings: it is a sum over axes
  of ``(W_key-hat^T v_h)_a . r_a(delta_a)``, and ``head_kernels`` hold the folded vectors.

  Args:
    query_positions, key_positions: per-axis coordinates.
    tables: per-axis ``(2 M_a - 1, P)`` (see :func:`relative_embeddings`).
    head_kernels: per-axis ``(P, H)``.

  Returns:
    ``d`` per-axis terms ``(H, Nq_a, Nk_a)``.
  """
  if len(head_kernels) != len(tables):
    raise ValueError(
      f"head_kernels: expected {len(tables)} per-axis kernels, got {len(head_kernels)}"
    )
  out = []
  embeddings = relative_embeddings(query_positions, key_positions, tables)
  for a, (e, w) in enumerate(zip(embeddings, head_kernels)):
    if w.ndim != 2 or w.shape[0] != e.shape[-1]:
      raise ValueError(f"head_kernels[{a}]: expected shape ({e.shape[-1]}, H), got {w.shape}")
    out.append(jnp.einsum("qkp,ph->hqk", e, w))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Content terms
# ----------------------------------------------------------------------------------------------


def content_logits(query: Array, key: Array) -> Array:
  """The content score ``q_h . k_h / sqrt(D_k)`` of scaled dot-product attention.

  ``X W_qry^(h) (X W_key^(h))^T / sqrt(D_k)``: the content term of the MHSA scores (Cordonnier
  et al., Eq. 1 and Sec. 2.3). ``jax.nn.dot_product_attention`` computes the same scores
  internally when the probabilities are not needed.

  Args:
    query: ``(B, Nq, H, D_k)``.
    key: ``(B, Nk, H, D_k)``.

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
  scale = jnp.asarray(1.0 / np.sqrt(query.shape[-1]), query.dtype)
  return jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)


def query_relative_logits(
  query: Array, query_shape: Sequence[int], rel_embeddings: Sequence[Array]
) -> Array:
  """The query-relative score ``q_h . r_delta / sqrt(D_k)`` with per-axis embeddings.

  The query's last axis is split into ``d`` chunks of size ``P``; chunk ``a`` meets the axis-``a``
  embedding ``r_a(delta_a)`` and the score is the sum over axes (the authors' learned + content
  model: half of the query meets the row table, half the column table; Ramachandran et al.). Cost
  ``B Nq H P sum_a Nk_a``; no ``(B, Nq, Nk, D)`` tensor is formed.

  Args:
    query: ``(B, Nq, H, d P)``.
    query_shape: the query grid ``(Nq_0, ..., Nq_{d-1})``.
    rel_embeddings: per-axis ``(Nq_a, Nk_a, P)`` from :func:`relative_embeddings`.

  Returns:
    ``(B, H, Nq, Nk)``.
  """
  d = len(rel_embeddings)
  b, nq, h, dk = query.shape
  p = rel_embeddings[0].shape[-1]
  query_shape = tuple(int(n) for n in query_shape)
  if dk != d * p or nq != int(np.prod(query_shape)):
    raise ValueError(
      f"query: expected shape (B, {int(np.prod(query_shape))}, H, {d * p}), got {query.shape}"
    )
  scale = jnp.asarray(1.0 / np.sqrt(dk), query.dtype)
  q = query.reshape(b, *query_shape, h, d, p) * scale
  letters = "uvw"[:d]  # query axes
  keys = "ijk"[:d]  # key axes
  terms = []
  for a, r in enumerate(rel_embeddings):
    # e.g. 2-D, axis 1: "buvhp,vjp->bhuvj", then broadcast over the other key axes
    term = jnp.einsum(
      f"b{letters}hp,{letters[a]}{keys[a]}p->bh{letters}{keys[a]}", q[..., a, :], r.astype(q.dtype)
    )
    shape = [b, h, *query_shape] + [1] * d
    shape[2 + d + a] = r.shape[1]
    terms.append(term.reshape(shape))
  key_shape = tuple(int(r.shape[1]) for r in rel_embeddings)
  total = sum(terms[1:], terms[0])
  return jnp.broadcast_to(total, (b, h, *query_shape, *key_shape)).reshape(b, h, nq, -1)
