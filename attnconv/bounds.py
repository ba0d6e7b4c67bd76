"""Finite-``alpha`` error bound of the Theorem-1 construction and the float32 one-hot threshold.

Pure functions on numpy arrays and Python numbers (no Flax, no JAX), so that :mod:`proofs` can
check them with exact arithmetic.

The construction (:func:`attnconv.conv_to_attention`) has one head ``h`` per kernel offset with
position logits ``-alpha_h ||delta - Delta_h||^2`` over the keys (``delta = key - query`` on the
integer lattice) and per-head matrices ``W^(h)``. The target key ``delta = Delta_h`` is always on
the key grid; every other key has ``||delta - Delta_h||^2 >= 1`` (an integer). Hence, with ``M``
keys per query, the attention mass off the target is

.. math::

  \\varepsilon_h = \\frac{S_h}{1 + S_h}, \\qquad
  S_h = \\sum_{k \\ne k^*} e^{-\\alpha_h \\|\\delta_k - \\Delta_h\\|^2} \\le s_h := (M - 1) e^{-\\alpha_h},

and since ``S -> S / (1 + S)`` increases, ``eps_h <= s_h / (1 + s_h)``. The output error of head
``h`` is ``sum_{k != k*} p_k (x_k - x_{k*}) W^(h)``, so for output channel ``j``

.. math::

  |\\mathrm{MHSA}_\\alpha(x)_{q,j} - \\mathrm{Conv}(x)_{q,j}|
  \\le \\sum_h \\frac{s_h}{1 + s_h} \\cdot 2B \\cdot \\|W^{(h)}_{:,j}\\|_1 ,

``B >= max |x|`` over the keys (padding zeros included). The proof is in
``proofs/finite_alpha_bound.md``; the claims ``bound.*`` check every step.

References:
  Cordonnier, Loukas & Jaggi, ICLR 2020: Lemma 2 (the limit ``alpha -> infinity``) and the remark
  on the magnitude of ``alpha`` in float32 (``alpha = 46``), analysed in ``proofs/float32.md``.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import numpy as np

#: The value returned by :func:`alpha_for_tolerance` when every ``alpha > 0`` meets the tolerance
#: (a single key, a zero kernel, or a tolerance above the largest possible error). ``alpha`` must be
#: strictly positive, so the infimum 0 is not attainable; this small positive value stands for it.
MIN_ALPHA = 1e-6

#: Unit roundoff of float32 (round to nearest): ``2**-24``.
FLOAT32_UNIT_ROUNDOFF = Fraction(1, 2**24)
#: Smallest positive normal float32 ``2**-126`` and smallest positive subnormal ``2**-149``.
FLOAT32_MIN_NORMAL = Fraction(1, 2**126)
FLOAT32_MIN_SUBNORMAL = Fraction(1, 2**149)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_kernel(kernel: Any, feature_group_count: Any) -> np.ndarray:
  if (
    isinstance(kernel, (str, bytes))
    or not hasattr(kernel, "__len__")
    and not hasattr(kernel, "shape")
  ):
    raise TypeError(f"kernel: expected an array of rank >= 3, got {type(kernel).__name__}")
  arr = np.asarray(kernel)
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"kernel: expected a real numeric array, got dtype {arr.dtype}")
  if arr.ndim < 3:
    raise ValueError(
      f"kernel: expected rank >= 3 (*kernel_size, in_features // groups, features), got shape "
      f"{arr.shape}"
    )
  if arr.size == 0:
    raise ValueError(f"kernel: expected non-empty axes, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError("kernel: expected finite entries, got inf or nan")
  if isinstance(feature_group_count, (bool, np.bool_)) or not isinstance(
    feature_group_count, (int, np.integer)
  ):
    raise TypeError(f"feature_group_count: expected a positive int, got {feature_group_count!r}")
  if feature_group_count < 1 or arr.shape[-1] % feature_group_count:
    raise ValueError(
      f"feature_group_count: expected a positive divisor of features={arr.shape[-1]}, got "
      f"{feature_group_count}"
    )
  return arr


def _check_nonneg_real(name: str, value: Any, *, positive: bool = False) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (int, float, np.integer, np.floating, Fraction)
  ):
    raise TypeError(f"{name}: expected a real number, got {value!r}")
  v = float(value)
  if not math.isfinite(v) or v < 0 or (positive and v == 0):
    expected = "a finite number > 0" if positive else "a finite number >= 0"
    raise ValueError(f"{name}: expected {expected}, got {value!r}")
  return v


def _check_num_keys(num_keys: Any) -> int:
  if isinstance(num_keys, (bool, np.bool_)) or not isinstance(num_keys, (int, np.integer)):
    raise TypeError(f"num_keys: expected an int >= 1, got {num_keys!r}")
  if num_keys < 1:
    raise ValueError(f"num_keys: expected an int >= 1, got {num_keys}")
  return int(num_keys)


# ----------------------------------------------------------------------------------------------
# the bound
# ----------------------------------------------------------------------------------------------


def head_column_norms(kernel: Any, feature_group_count: int = 1) -> np.ndarray:
  """``||W^(h)_{:, j}||_1`` for every head ``h`` and output channel ``j``: ``(H, features)``.

  ``W^(h)`` is the block-diagonal expansion of the kernel slice for grouped convolutions; the
  zero blocks add nothing to a column's 1-norm, so this is the 1-norm of the kernel slice's column.

  Args:
    kernel: ``flax.linen.Conv`` layout ``(*kernel_size, in_features // groups, features)``.
    feature_group_count: number of groups (a divisor of ``features``).

  Returns:
    float64 array ``(prod(kernel_size), features)``.
  """
  arr = _check_kernel(kernel, feature_group_count)
  cin_g, cout = arr.shape[-2:]
  flat = np.abs(arr.astype(np.float64)).reshape(-1, cin_g, cout)
  return flat.sum(axis=1)


def _alpha_per_head(alpha: Any, num_heads: int) -> np.ndarray:
  if isinstance(alpha, (bool, np.bool_)):
    raise TypeError(f"alpha: expected a float > 0 or an array of {num_heads} floats, got {alpha!r}")
  try:
    arr = np.asarray(alpha, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(
      f"alpha: expected a float > 0 or an array of {num_heads} floats, got {alpha!r}"
    ) from None
  if arr.ndim == 0:
    arr = np.full((num_heads,), float(arr))
  if arr.shape != (num_heads,):
    raise ValueError(
      f"alpha: expected a scalar or shape ({num_heads},) (one per head), got shape {arr.shape}"
    )
  if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise ValueError(f"alpha: expected finite values > 0, got {alpha!r}")
  return arr


def offtarget_mass_bound(alpha: float, num_keys: int) -> float:
  """Upper bound ``s / (1 + s)``, ``s = (M - 1) e^{-alpha}``, on a head's off-target mass."""
  s = (num_keys - 1) * math.exp(-alpha)
  return s / (1.0 + s)


def softmax_emulation_error_bound(
  kernel: Any,
  alpha: Any,
  *,
  input_bound: float,
  num_keys: int,
  feature_group_count: int = 1,
) -> float:
  """Rigorous bound on ``max_{q, j} |MHSA_alpha(x)_{q, j} - Conv(x)_{q, j}|`` (exact arithmetic).

  .. math::

    \\max_j \\sum_h \\frac{s_h}{1 + s_h} \\, 2B \\, \\|W^{(h)}_{:,j}\\|_1,
    \\qquad s_h = (M - 1) e^{-\\alpha_h}.

  The floating-point rounding of either side is not included. Proof:
  ``proofs/finite_alpha_bound.md``.

  Args:
    kernel: ``flax.linen.Conv`` layout ``(*kernel_size, in_features // groups, features)``.
    alpha: the sharpness, a float ``> 0`` shared by all heads, or one per head (array of shape
      ``(prod(kernel_size),)``, heads in row-major kernel-offset order).
    input_bound: ``B >= max |x|`` over the keys (padding zeros included), ``>= 0``.
    num_keys: ``M``, the number of keys each query attends over, ``>= 1``.
    feature_group_count: number of groups of the convolution.

  Returns:
    The bound as a Python float (0.0 for a single key, a zero kernel or ``B = 0``).

  Raises:
    TypeError / ValueError: naming the argument, for invalid input.
  """
  norms = head_column_norms(kernel, feature_group_count)
  b = _check_nonneg_real("input_bound", input_bound)
  m = _check_num_keys(num_keys)
  alphas = _alpha_per_head(alpha, norms.shape[0])
  eps = np.array([offtarget_mass_bound(float(a), m) for a in alphas])
  per_channel = 2.0 * b * (eps[:, None] * norms).sum(axis=0)
  return float(per_channel.max())


def alpha_for_tolerance(
  kernel: Any,
  tolerance: float,
  *,
  input_bound: float,
  num_keys: int,
  feature_group_count: int = 1,
) -> float:
  """The smallest shared ``alpha`` at which :func:`softmax_emulation_error_bound` is ``<= tolerance``.

  With ``C = max_j sum_h 2B ||W^(h)_{:,j}||_1`` the bound is ``C s / (1 + s)``,
  ``s = (M - 1) e^{-alpha}``, decreasing in ``alpha``; solving ``C s / (1 + s) = tol`` gives

  .. math::

    \\alpha = \\log\\frac{(M - 1)(C - \\mathrm{tol})}{\\mathrm{tol}}
    \\;\\approx\\; \\log\\frac{(M - 1) C}{\\mathrm{tol}} \\quad (\\mathrm{tol} \\ll C).

  When every ``alpha > 0`` already meets the tolerance (``M = 1``, ``C = 0``, or the formula gives
  a value ``<= MIN_ALPHA``), :data:`MIN_ALPHA` is returned: ``alpha`` must be positive, so the
  infimum is not attained. The result is rounded up by a relative ``1e-12`` so that the bound,
  evaluated in float64, is ``<= tolerance``.

  Args:
    kernel: ``flax.linen.Conv`` layout kernel.
    tolerance: the wanted bound, a finite float ``> 0``.
    input_bound: ``B >= max |x|`` over the keys.
    num_keys: ``M``, keys per query.
    feature_group_count: number of groups.

  Returns:
    ``alpha`` as a Python float.
  """
  norms = head_column_norms(kernel, feature_group_count)
  tol = _check_nonneg_real("tolerance", tolerance, positive=True)
  b = _check_nonneg_real("input_bound", input_bound)
  m = _check_num_keys(num_keys)
  c = float((2.0 * b * norms).sum(axis=0).max())
  if m == 1 or c == 0.0 or tol >= c:
    return MIN_ALPHA
  alpha = math.log((m - 1) * (c - tol) / tol)
  alpha = alpha + 1e-12 * max(abs(alpha), 1.0)
  return max(alpha, MIN_ALPHA)


# ----------------------------------------------------------------------------------------------
# float32: when is the construction's softmax exactly one-hot?
# ----------------------------------------------------------------------------------------------


def ln2_bounds(terms: int = 80) -> tuple[Fraction, Fraction]:
  """Rigorous rational bounds ``lo < ln 2 < hi`` from ``ln 2 = sum_{k>=1} 1 / (k 2^k)``.

  The tail after ``n`` terms is positive and below ``sum_{k>n} 1 / ((n+1) 2^k) = 1 / ((n+1) 2^n)``.
  """
  if terms < 1:
    raise ValueError(f"terms: expected an int >= 1, got {terms}")
  lo = sum((Fraction(1, k * 2**k) for k in range(1, terms + 1)), Fraction(0))
  return lo, lo + Fraction(1, (terms + 1) * 2**terms)


def float32_successor(value: Fraction) -> Fraction:
  """The smallest float32 strictly greater than the positive rational ``value`` (exactly)."""
  if value <= 0:
    raise ValueError(f"value: expected a positive rational, got {value}")
  f = np.float32(float(value))
  # float() and the float32 cast round; step until the float32 is strictly above ``value``.
  while Fraction(float(f)) <= value:
    f = np.nextafter(f, np.float32(np.inf))
  while True:
    prev = np.nextafter(f, np.float32(0))
    if Fraction(float(prev)) > value:
      f = prev
    else:
      return Fraction(float(f))


@dataclasses.dataclass(frozen=True)
class Float32OneHotThreshold:
  """The float32 one-hot threshold of the construction's softmax (see :func:`float32_one_hot_alpha`).

  Attributes:
    alpha: the smallest float32 ``alpha`` giving exactly one-hot probabilities, as an exact rational.
    alpha_float: the same value as a Python float (exactly representable).
    underflow_exponent: ``e^{-alpha d}`` must be below ``2**-underflow_exponent`` (126 when
      subnormal results are flushed to zero, 150 with gradual underflow and round to nearest).
    log_bound: ``underflow_exponent * ln 2 / min_sq_distance``, the real threshold, as rational
      bounds ``(lo, hi)``.
    flush_subnormals: which float32 exp model was used.
    margin: relative distance of ``e^{-alpha d}`` (at the threshold) and of the float32 below it from
      the underflow boundary, as ``(above, below)`` lower bounds; a faithful exp (error < 1 ulp,
      ``2**-23`` relative) cannot move either across the boundary when both exceed ``2**-23``.
    paper_alpha: the paper's value 46.
    explanation: a short text.
  """

  alpha: Fraction
  alpha_float: float
  underflow_exponent: int
  log_bound: tuple[Fraction, Fraction]
  flush_subnormals: bool
  margin: tuple[float, float]
  paper_alpha: int
  explanation: str


def float32_one_hot_alpha(
  min_sq_distance: int = 1, *, flush_subnormals: bool = True
) -> Float32OneHotThreshold:
  """Smallest float32 ``alpha`` for which the float32 softmax of the construction is one-hot.

  The probabilities are ``jax.nn.softmax`` of the logits ``fl(-alpha * d)``, ``d`` the integer
  squared distance ``||delta - Delta||^2`` (0 for the target; the library also uses the per-axis
  factorisation, whose per-axis squared distances obey the same rule). The maximum logit is the
  target's ``-0.0``, so ``exp(l - max) = exp(l)`` exactly; the target's unnormalised weight is
  ``exp(0) = 1``. Every off-target weight is ``fl(exp(fl(-alpha d)))``, decreasing in ``d``, and the
  result is one-hot iff the weight of the smallest ``d`` (``min_sq_distance``, 1 whenever a
  lattice neighbour of the target is a key) is exactly 0.0: then the sum is exactly 1 and the
  target probability ``1 / 1 = 1.0``; otherwise that key's probability ``w / sum`` is nonzero
  (the sum is < 2, so the quotient of a nonzero float32 ``w >= 2**-149`` does not vanish unless it
  is a subnormal flushed to zero -- which is the same ``2**-126`` boundary under FTZ).

  The float32 exp of a real ``e^{-a}`` is 0.0 iff

  * ``flush_subnormals=True`` (XLA on CPU, verified by the claim ``float32.xla_cpu_flushes``):
    ``e^{-a} < 2**-126``, i.e. ``a > 126 ln 2 = 87.33654...``;
  * ``flush_subnormals=False`` (gradual underflow, correctly rounded exp): ``e^{-a} < 2**-150``
    (half the smallest subnormal; at exactly ``2**-150`` the tie rounds to even, 0, but ``e^{-a}``
    is irrational for rational ``a != 0``), i.e. ``a > 150 ln 2 = 103.97207...``.

  ``a = fl(alpha d)`` is exact for ``d = 1``; for ``d > 1`` it is at least ``alpha`` anyway.

  Args:
    min_sq_distance: the smallest off-target ``||delta - Delta||^2`` on the grid (an int >= 1).
    flush_subnormals: the exp model, see above.

  Returns:
    A :class:`Float32OneHotThreshold`.
  """
  if isinstance(min_sq_distance, (bool, np.bool_)) or not isinstance(
    min_sq_distance, (int, np.integer)
  ):
    raise TypeError(f"min_sq_distance: expected an int >= 1, got {min_sq_distance!r}")
  if min_sq_distance < 1:
    raise ValueError(f"min_sq_distance: expected an int >= 1, got {min_sq_distance}")
  if not isinstance(flush_subnormals, (bool, np.bool_)):
    raise TypeError(f"flush_subnormals: expected a bool, got {flush_subnormals!r}")
  e = 126 if flush_subnormals else 150
  d = int(min_sq_distance)
  lo2, hi2 = ln2_bounds()
  lo, hi = e * lo2 / d, e * hi2 / d
  alpha = float32_successor(hi)
  # Only the float32 grid point above the interval qualifies; it must also lie above ``lo``'s
  # successor, i.e. no float32 falls inside [lo, hi] (the interval is ~1e-24 wide).
  if float32_successor(lo) != alpha:
    raise ArithmeticError(
      "ln 2 bounds too loose to decide the float32 threshold"
    )  # pragma: no cover
  prev = Fraction(float(np.nextafter(np.float32(float(alpha)), np.float32(0))))
  # relative distances from the boundary: e^{-d alpha} = 2^-e e^{-d(alpha - x*)}, x* = e ln2 / d
  above = -math.expm1(-d * float(alpha - hi))  # 1 - e^{-d (alpha - x*)} >= this
  below = math.expm1(d * float(lo - prev))  # e^{d (x* - prev)} - 1 >= this
  paper = 46
  explanation = (
    f"float32 softmax of logits -alpha*d is one-hot iff fl(exp(-alpha*{d})) == 0, i.e. "
    f"e^(-alpha*{d}) < 2^-{e} ({'subnormals flushed to zero' if flush_subnormals else 'gradual underflow, round to nearest'}); "
    f"alpha > {e} ln2 / {d} = {float(lo):.12f}...; smallest float32: {float(alpha)!r}. "
    f"The paper's alpha = {paper} gives e^-{paper} = {math.exp(-paper):.3g}, a normal float32 "
    f"(not one-hot, although the target weight already rounds to 1.0); {paper} is the smallest "
    f"integer with 10^-alpha < 2^-150 (10^-46 underflows, 10^-45 rounds to 2^-149), i.e. the "
    f"remark's argument in base 10 (log10 of the smallest float32, 1.4e-45) instead of base e."
  )
  return Float32OneHotThreshold(
    alpha=alpha,
    alpha_float=float(alpha),
    underflow_exponent=e,
    log_bound=(lo, hi),
    flush_subnormals=bool(flush_subnormals),
    margin=(above, below),
    paper_alpha=paper,
    explanation=explanation,
  )


__all__ = [
  "FLOAT32_MIN_NORMAL",
  "FLOAT32_MIN_SUBNORMAL",
  "FLOAT32_UNIT_ROUNDOFF",
  "MIN_ALPHA",
  "Float32OneHotThreshold",
  "alpha_for_tolerance",
  "float32_one_hot_alpha",
  "float32_successor",
  "head_column_norms",
  "ln2_bounds",
  "offtarget_mass_bound",
  "softmax_emulation_error_bound",
]
