"""Claims behind the finite-alpha bound (``attnconv.bounds``, ``proofs/finite_alpha_bound.md``)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import sympy as sp

from attnconv import bounds
from proofs._registry import claim


@claim(
  "bound.offtarget_term_le_exp_minus_alpha",
  "symbolic",
  "for alpha > 0 and an integer squared distance d >= 1: e^{-alpha d} <= e^{-alpha}, so "
  "S = sum_{k != k*} e^{-alpha d_k} <= (M - 1) e^{-alpha}",
)
def _term_bound() -> str:
  alpha = sp.Symbol("alpha", positive=True)
  t = sp.Symbol("t", nonnegative=True)  # d = 1 + t
  # e^{-alpha} - e^{-alpha(1+t)} = e^{-alpha} (1 - e^{-alpha t}); alpha t >= 0 => e^{-alpha t} <= 1
  diff = sp.exp(-alpha) - sp.exp(-alpha * (1 + t))
  factored = sp.exp(-alpha) * (1 - sp.exp(-alpha * t))
  assert sp.simplify(diff - factored) == 0
  assert (-alpha * t).is_nonpositive is True
  assert sp.exp(-alpha).is_positive is True
  # exp is increasing and exp(0) = 1: u <= 0 => exp(u) <= 1, i.e. 1 - exp(u) >= 0
  u = sp.Symbol("u", nonpositive=True)
  assert sp.diff(sp.exp(u), u).is_positive is True and sp.exp(0) == 1
  # summing M - 1 such terms
  m = sp.Symbol("M", integer=True, positive=True)
  k = sp.Symbol("k", integer=True)
  total = sp.summation(sp.exp(-alpha), (k, 1, m - 1))
  assert sp.simplify(total - (m - 1) * sp.exp(-alpha)) == 0
  return "e^{-alpha} - e^{-alpha(1+t)} = e^{-alpha}(1 - e^{-alpha t}) >= 0"


@claim(
  "bound.offtarget_mass",
  "symbolic",
  "the off-target softmax mass is eps = S / (1 + S), increasing in S >= 0, and eps <= S; hence "
  "eps <= s/(1+s) <= s for s = (M - 1) e^{-alpha}",
)
def _mass() -> str:
  s_sym = sp.Symbol("S", nonnegative=True)
  # target logit 0 (after the constant shift), others -alpha d_k: p_target = 1 / (1 + S)
  eps = 1 - 1 / (1 + s_sym)
  assert sp.simplify(eps - s_sym / (1 + s_sym)) == 0
  deriv = sp.simplify(sp.diff(s_sym / (1 + s_sym), s_sym))
  assert sp.simplify(deriv - 1 / (1 + s_sym) ** 2) == 0 and deriv.is_positive is True
  gap = sp.simplify(s_sym - s_sym / (1 + s_sym))
  assert sp.simplify(gap - s_sym**2 / (1 + s_sym)) == 0 and gap.is_nonnegative is True
  return "eps = S/(1+S); d/dS = 1/(1+S)^2 > 0; S - eps = S^2/(1+S) >= 0"


@claim(
  "bound.error_identity",
  "symbolic",
  "with sum_k p_k = 1: sum_k p_k v_k - v_{k*} = sum_{k != k*} p_k (v_k - v_{k*}) for symbolic "
  "p, v (M = 2..6)",
)
def _error_identity() -> str:
  for m in range(2, 7):
    p = sp.symbols(f"p0:{m}", nonnegative=True)
    v = sp.symbols(f"v0:{m}", real=True)
    star = 0
    subs = {p[star]: 1 - sum(p[k] for k in range(m) if k != star)}
    lhs = sum(p[k] * v[k] for k in range(m)) - v[star]
    rhs = sum(p[k] * (v[k] - v[star]) for k in range(m) if k != star)
    assert sp.expand(lhs.subs(subs) - rhs) == 0, f"M={m}"
  return "identity for M = 2..6 after substituting p_k* = 1 - sum of the others"


@claim(
  "bound.alpha_for_tolerance_inverts",
  "exact arithmetic",
  "softmax_emulation_error_bound(alpha_for_tolerance(tol)) <= tol and > tol just below; the "
  "closed form solves C s/(1+s) = tol symbolically",
)
def _inverts() -> str:
  a, c, tol, m = sp.symbols("alpha C tol M", positive=True)
  s = (m - 1) * sp.exp(-a)
  sol = sp.solve(sp.Eq(c * s / (1 + s), tol), a)
  assert len(sol) == 1
  assert sp.simplify(sp.exp(sol[0]) - (m - 1) * (c - tol) / tol) == 0, sol
  rng = np.random.default_rng(0)
  checked = 0
  for shape in ((3, 2, 4), (3, 3, 2, 4), (2, 2, 2, 1, 2), (1, 1, 1)):
    kernel = rng.normal(size=shape)
    for groups in (1, 2) if shape[-1] % 2 == 0 else (1,):
      for tol in (1e-1, 1e-3, 1e-6):
        for bnd, keys in ((1.0, 49), (3.5, 10), (0.25, 1000)):
          kw = dict(input_bound=bnd, num_keys=keys, feature_group_count=groups)
          alpha = bounds.alpha_for_tolerance(kernel, tol, **kw)
          got = bounds.softmax_emulation_error_bound(kernel, alpha, **kw)
          assert got <= tol, (shape, tol, alpha, got)
          if alpha > bounds.MIN_ALPHA:
            below = bounds.softmax_emulation_error_bound(kernel, alpha * (1 - 1e-9), **kw)
            assert below > tol * (1 - 1e-6), (shape, tol, alpha, below)
            # exact rational re-evaluation with rigorous bracketing of exp
            c_exact = max(
              sum(Fraction(2) * Fraction(bnd) * Fraction(float(v)) for v in col)
              for col in bounds.head_column_norms(kernel, groups).T
            )
            s_hi = (keys - 1) * Fraction(math.exp(-alpha)) * (1 + Fraction(1, 2**50))
            assert c_exact * s_hi / (1 + s_hi) <= Fraction(tol) * (1 + Fraction(1, 10**9))
          checked += 1
  # degenerate inputs: every alpha > 0 works
  assert bounds.alpha_for_tolerance(np.zeros((3, 1, 1)), 1e-3, input_bound=1, num_keys=5) == (
    bounds.MIN_ALPHA
  )
  assert bounds.alpha_for_tolerance(np.ones((3, 1, 1)), 1e-3, input_bound=1, num_keys=1) == (
    bounds.MIN_ALPHA
  )
  return f"alpha = log((M-1)(C-tol)/tol); {checked} numeric cases"
