"""Low-precision matrix products that run on the CPU's bfloat16 units, forward and backward.

On x86 CPUs with ``avx512_bf16`` (AMD Zen 4, Intel Sapphire Rapids), XLA:CPU runs a bfloat16
product at about twice the float32 rate **only** when it accumulates in float32
(``preferred_element_type=float32``) and the left operand is contracted on its last axis, the
right one on its first ("NN") or its last ("NT") axis, both row-major. A plain bfloat16 ``x @ w``
(bfloat16 result) and the gradient products autodiff derives from it (``a^T g`` contracts the
first axes: "TN") fall back to paths slower than float32. Measured on a 2-core EPYC
(``python -m experiments.benchmarks.matmul_rates``, ``experiments/results/bench_matmul.json``).

:func:`matmul` is ``a @ b`` with a custom VJP that keeps all three products on the fast forms:

* forward ``y = a @ b``, accumulated in float32, rounded once to ``out_dtype``;
* ``da = g b^T`` as an "NT" product (no copy);
* ``db = a^T g`` with the smaller of ``a`` and ``g`` transposed in memory first (a copy XLA
  cannot fold into the product), as ``(pt(a)) @ g`` or ``(pt(g) @ a)^T``.

The cotangent ``g`` is rounded to the operands' dtype first (as mixed-precision training does for
every bfloat16 activation). For float32 (or any non-16-bit) operands, and off the CPU, it is
exactly ``jnp.matmul`` -- bitwise the same program as before. :func:`dot_general` wraps it in the
signature of ``flax.linen.Dense(dot_general=...)`` / ``DenseGeneral``.

:func:`bmm` is the batched form, ``(G..., M, K) @ (G..., K, N)`` (or ``@ (G..., N, K)^T``) with
the same batch axes on both sides, for attention's per-image products (probabilities times
values, queries times keys). The usual ``einsum('bhqk,bkc->bqhc')`` runs at about 100 GFLOP/s in
bfloat16 and 80 in float32 on the 2-core EPYC; as a row-major batched product with float32
accumulation it runs at about 330 (float32, where :func:`bmm` is ``jnp.matmul``: 134) for
(8, 9 * 256, 256) @ (8, 256, 400).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def low_precision_cpu(*arrays: Array) -> bool:
  """Whether the arrays share one low-precision dtype (bfloat16/float16) and run on the CPU:
  the case this module's (and :mod:`attnconv.normalization`'s) hand-written paths serve."""
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  return len(dtypes) == 1 and dtypes <= set(LOW_PRECISION) and jax.default_backend() == "cpu"


def leading_sum(x: Array, n: int) -> Array:
  """``x`` summed over all but its last ``n`` axes, in float32 -- the bias-style gradient sums.

  The barrier keeps XLA from fusing the sum into its consumer (the optimiser update), where it
  becomes a slow strided loop (~6 ms at 6400 x 512 bfloat16 entries) instead of a vectorised
  reduction (~0.7 ms)."""
  return lax.optimization_barrier(jnp.sum(x.astype(jnp.float32), axis=tuple(range(x.ndim - n))))


def _use_fast_path(a: Array, b: Array) -> bool:
  return low_precision_cpu(a, b) and a.ndim >= 2 and b.ndim == 2


def _materialise(y: Array) -> Array:
  """``y`` as a real row-major buffer: reshaping it to 1-D behind an optimisation barrier keeps
  XLA from folding a preceding transpose into the layout of the product that consumes it."""
  return lax.optimization_barrier(y.reshape(-1)).reshape(y.shape)


def physical_transpose(x: Array) -> Array:
  """``x.T`` for a matrix, as a real copy in row-major order (:func:`physical_swap` of a matrix).

  XLA folds a plain transpose into the layout of the product that consumes it, which selects
  the slow kernel; the copy is forced by :func:`_materialise`.
  """
  if x.ndim != 2:
    raise ValueError(f"x: expected a matrix, got shape {x.shape}")
  return physical_swap(x)


def _dot(a: Array, b: Array, transpose_b: bool = False) -> Array:
  """``a @ b`` (or ``a @ b^T``) for matrices or ``(G, ., .)`` stacks, accumulated in float32.

  Both forms XLA:CPU runs on its fast bfloat16 kernel: the left operand contracted on its last
  axis, the right one on its first ("NN") or on its last ("NT", ``transpose_b``)."""
  batch = ((0,), (0,)) if a.ndim == 3 else ((), ())
  rc = b.ndim - 1 if transpose_b else b.ndim - 2
  return lax.dot_general(a, b, (((a.ndim - 1,), (rc,)), batch), preferred_element_type=jnp.float32)


def _left_transpose_product(a: Array, g: Array) -> Array:
  """``a^T @ g`` for ``a (G?, M, K)``, ``g (G?, M, N)`` -> ``(G?, K, N)`` in float32.

  The "TN" form (contracting the first axes) runs at half rate, so one operand is transposed
  in memory first: ``a`` when it is the smaller (``K <= N``), else ``g``, computing
  ``(g^T @ a)^T`` -- the barrier keeps XLA from folding the small transpose of the result into
  the product's output layout (which it cannot run in bfloat16)."""
  if a.shape[-1] <= g.shape[-1]:
    return _dot(physical_swap(a), g)
  return jnp.swapaxes(lax.optimization_barrier(_dot(physical_swap(g), a)), -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _product(a: Array, b: Array, out_dtype, transpose_b: bool) -> Array:
  return _dot(a, b, transpose_b).astype(out_dtype)


def _product_fwd(a, b, out_dtype, transpose_b):
  return _product(a, b, out_dtype, transpose_b), (a, b)


def _product_bwd(out_dtype, transpose_b, res, g):
  a, b = res
  g = g.astype(a.dtype)
  if transpose_b:  # y = a b^T: da = g b, db = g^T a
    da = _dot(g, b)
    db = _left_transpose_product(g, a)
  else:  # y = a b: da = g b^T ("NT", no copy), db = a^T g
    da = _dot(g, b, transpose_b=True)
    db = _left_transpose_product(a, g)
  return da.astype(a.dtype), db.astype(b.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def matmul(a: Array, b: Array, *, out_dtype=None, precision=None) -> Array:
  """``a @ b`` for ``a (..., k)`` and a matrix ``b (k, n)``; returns ``(..., n)`` in ``out_dtype``.

  Low-precision operands on the CPU take the custom-VJP path of the module docstring (float32
  accumulation, one rounding to ``out_dtype``, default ``a.dtype``); everything else is
  ``jnp.matmul(a, b, preferred_element_type=out_dtype)``.
  """
  if not _use_fast_path(a, b):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)
  if a.shape[-1] != b.shape[0]:
    raise ValueError(
      f"b: expected {a.shape[-1]} rows to match a of shape {a.shape}, got shape {b.shape}"
    )
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  lead = a.shape[:-1]
  y = _product(a.reshape(-1, a.shape[-1]), b, out_dtype, False)
  return y.reshape(*lead, b.shape[1])


def physical_swap(x: Array) -> Array:
  """``swapaxes(x, -1, -2)`` as a real copy in row-major order (batched :func:`physical_transpose`)."""
  return _materialise(jnp.swapaxes(x, -1, -2))


def row_major(x: Array, axes: tuple[int, ...]) -> Array:
  """``jnp.transpose(x, axes)``; for low-precision arrays on the CPU a real row-major copy (an
  operand of :func:`bmm` whose transpose XLA folds into the product selects the slow kernel)."""
  if not low_precision_cpu(x):
    return jnp.transpose(x, axes)
  return _permute(x, tuple(int(a) for a in axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _permute(x: Array, axes: tuple[int, ...]) -> Array:
  return _materialise(jnp.transpose(x, axes))


def _permute_fwd(x, axes):
  return _permute(x, axes), None


def _permute_bwd(axes, _, g):
  return (_materialise(jnp.transpose(g, tuple(int(a) for a in np.argsort(axes)))),)


_permute.defvjp(_permute_fwd, _permute_bwd)


def bmm(a: Array, b: Array, *, transpose_b: bool = False, out_dtype=None, precision=None) -> Array:
  """Batched product ``(G..., M, K) @ (G..., K, N) -> (G..., M, N)`` in ``out_dtype``.

  With ``transpose_b`` the right operand is given as ``(G..., N, K)`` and the result is
  ``a @ b^T`` (scores ``q . k`` from queries and keys in the same layout, no copy). Both operands
  carry the same batch axes ``G...`` (at least one). Low-precision operands on the CPU take the
  custom-VJP path of :func:`matmul` (float32 accumulation, one rounding to ``out_dtype``, default
  ``a.dtype``; gradient products in the fast forms); everything else is ``jnp.matmul``.
  """
  if a.ndim < 3 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(
      f"b: expected the batch axes of a {a.shape[:-2]} (rank >= 3 on both sides), got shapes "
      f"a {a.shape} and b {b.shape}"
    )
  k_axis = -1 if transpose_b else -2
  if a.shape[-1] != b.shape[k_axis]:
    raise ValueError(
      f"b: expected {a.shape[-1]} entries on axis {b.ndim + k_axis} to match a of shape "
      f"{a.shape}, got shape {b.shape}"
    )
  if not low_precision_cpu(a, b):
    bt = jnp.swapaxes(b, -1, -2) if transpose_b else b
    return jnp.matmul(a, bt, precision=precision, preferred_element_type=out_dtype)
  out_dtype = jnp.dtype(out_dtype or a.dtype)
  lead = a.shape[:-2]
  g = int(np.prod(lead))
  y = _product(
    a.reshape(g, *a.shape[-2:]), b.reshape(g, *b.shape[-2:]), out_dtype, bool(transpose_b)
  )
  return y.reshape(*lead, *y.shape[-2:])


def add_bias(y: Array, bias: Array) -> Array:
  """``y + bias`` for a ``bias`` of the trailing axes of ``y``, whose gradient for ``bias`` sums
  over the leading axes in float32.

  For bfloat16/float16 on the CPU autodiff sums the cotangent in the low precision, rounding
  after every add, and XLA:CPU rewrites that reduction as a slow ``reduce-window`` (29 ms per
  query/key projection of the learned + content model at batch 8, 12 % of its step); summing in
  float32 is exact to float32 and takes under a millisecond. Other dtypes and backends:
  ``y + bias`` (float32 programs unchanged).
  """
  n = bias.ndim
  if n > y.ndim or tuple(y.shape[y.ndim - n :]) != tuple(bias.shape):
    raise ValueError(
      f"bias: expected the trailing shape of y {tuple(y.shape[y.ndim - n :])}, got "
      f"{tuple(bias.shape)} (y {tuple(y.shape)})"
    )
  if y.ndim == n or not low_precision_cpu(y, bias):
    return y + bias
  return _bias_add(y, bias, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_add(y: Array, bias: Array, n: int) -> Array:
  return y + bias


def _bias_add_fwd(y, bias, n):
  return y + bias, None


def _bias_add_bwd(n, _, g):
  return g, leading_sum(g, n).astype(g.dtype)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def dot_general(
  lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None
) -> Array:
  """``lax.dot_general`` that routes ``Dense``/``DenseGeneral``-style products through
  :func:`matmul`: the last ``n`` axes of ``lhs`` against the first ``n`` of ``rhs``, no batch
  axes (``rhs`` of any rank: a ``DenseGeneral`` kernel ``(D_in, H, D_h)`` is used as the matrix
  ``(D_in, H D_h)``). Pass as ``flax.linen.Dense(dot_general=dot_general)``."""
  (lc, rc), (lb, rb) = dimension_numbers
  n = len(tuple(lc))
  if (
    n >= 1
    and tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim))
    and tuple(rc) == tuple(range(n))
    and rhs.ndim > n
    and not tuple(lb)
    and not tuple(rb)
    and low_precision_cpu(lhs, rhs)
  ):
    k = int(np.prod(lhs.shape[lhs.ndim - n :]))
    lead, rest = lhs.shape[: lhs.ndim - n], rhs.shape[n:]
    y = matmul(
      lhs.reshape(*lead, k),
      rhs.reshape(k, -1),
      out_dtype=preferred_element_type,
      precision=precision,
    )
    return y.reshape(*lead, *rest)
  return lax.dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
