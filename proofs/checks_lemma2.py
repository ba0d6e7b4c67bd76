"""Symbolic claims: Lemma 2 (Eq. 9), the generalized quadratic encoding, the lattice gap, and the
``D_h < D_out`` rank remark. All hold for every value of the symbols (SymPy)."""

from __future__ import annotations

import itertools

import sympy as sp

from proofs._registry import claim


def _vec(name: str, d: int, **assumptions) -> list[sp.Symbol]:
  return list(sp.symbols(f"{name}1:{d + 1}", **assumptions))


def _quadratic_identity(d: int) -> str:
  delta = _vec("delta", d, real=True)
  center = _vec("Delta", d, real=True)
  alpha = sp.Symbol("alpha", positive=True)
  r = [sum(x**2 for x in delta), *delta]  # r_delta = (||delta||^2, delta_1..delta_d)
  v = [-alpha, *[-alpha * (-2 * c) for c in center]]  # v = -alpha (1, -2 Delta)
  lhs = sum(a * b for a, b in zip(v, r))
  dist2 = sum((x - c) ** 2 for x, c in zip(delta, center))
  norm2 = sum(c**2 for c in center)
  diff = sp.expand(lhs - (-alpha * (dist2 - norm2)))
  assert diff == 0, f"v.r - (-alpha(||delta-Delta||^2 - ||Delta||^2)) = {diff}"
  return f"d={d}: v.r_delta == -alpha(||delta-Delta||^2 - ||Delta||^2) identically"


for _d in (1, 2, 3):
  claim(
    f"lemma2.quadratic_identity_{_d}d",
    "symbolic",
    f"Eq. 9 in {_d}-D: v.r_delta = -alpha(||delta - Delta||^2 - ||Delta||^2) for all delta, Delta, "
    "alpha",
  )(lambda _d=_d: _quadratic_identity(_d))


def _generalized(d: int) -> str:
  delta = sp.Matrix(_vec("delta", d, real=True))
  center = sp.Matrix(_vec("Delta", d, real=True))
  a = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"A{i + 1}{j + 1}", real=True))
  prec = a * a.T  # Sigma^{-1} = A A^T
  assert sp.simplify(prec - prec.T) == sp.zeros(d, d), "A A^T is not symmetric"
  # encoding r = (delta_i, delta_i delta_j for i <= j), size d + d(d+1)/2
  pairs = [(i, j) for i in range(d) for j in range(i, d)]
  r = [delta[i] for i in range(d)] + [delta[i] * delta[j] for i, j in pairs]
  assert len(r) == d + d * (d + 1) // 2
  # v: linear part Sigma^{-1} Delta; quadratic part -1/2 P_ii, -P_ij (i < j)
  lin = prec * center
  v = [lin[i] for i in range(d)] + [
    -sp.Rational(1, 2) * prec[i, i] if i == j else -prec[i, j] for i, j in pairs
  ]
  score = sum(x * y for x, y in zip(v, r))
  target = -sp.Rational(1, 2) * ((delta - center).T * prec * (delta - center))[0, 0]
  const = sp.expand(score - target)
  assert not (const.free_symbols & set(delta)), f"score - target depends on delta: {const}"
  # the constant is 1/2 Delta^T Sigma^{-1} Delta (cancels in the softmax)
  assert sp.expand(const - sp.Rational(1, 2) * (center.T * prec * center)[0, 0]) == 0
  # PSD: x^T A A^T x = ||A^T x||^2 (a sum of squares)
  x = sp.Matrix(_vec("x", d, real=True))
  quad = (x.T * prec * x)[0, 0]
  sos = sum(e**2 for e in (a.T * x))
  assert sp.expand(quad - sos) == 0, "x^T A A^T x != ||A^T x||^2"
  return f"d={d}: v.r = -1/2 (delta-Delta)^T AA^T (delta-Delta) + const; AA^T is a sum of squares"


for _d in (1, 2, 3):
  claim(
    f"lemma2.generalized_quadratic_{_d}d",
    "symbolic",
    f"{_d}-D encoding r = (delta, delta_i delta_j) of size {_d + _d * (_d + 1) // 2} gives "
    "-1/2 (delta-Delta)^T A A^T (delta-Delta) up to a delta-free constant; A A^T is PSD",
  )(lambda _d=_d: _generalized(_d))


@claim(
  "lattice.nonzero_integer_square_ge_1",
  "symbolic",
  "for every nonzero integer n, n^2 >= 1 (and n^2 >= |n|)",
)
def _nonzero_square() -> str:
  t = sp.Symbol("t", integer=True, nonnegative=True)
  # a nonzero integer n has |n| = 1 + t with t a nonnegative integer
  n_abs = 1 + t
  assert (sp.expand(n_abs**2 - 1)).is_nonnegative is True  # t^2 + 2t >= 0
  assert (sp.expand(n_abs**2 - n_abs)).is_nonnegative is True  # t^2 + t >= 0
  return "|n| = 1 + t, t in Z>=0: n^2 - 1 = t^2 + 2t >= 0"


def _lattice_gap(d: int) -> str:
  # delta - Delta = e != 0 in Z^d: some coordinate, say the first after relabelling, is nonzero
  t = sp.Symbol("t", integer=True, nonnegative=True)
  others = _vec("e", d - 1, integer=True) if d > 1 else []
  alpha = sp.Symbol("alpha", positive=True)
  for sign in (1, -1):
    first = sign * (1 + t)  # any nonzero integer
    dist2 = first**2 + sum(e**2 for e in others)
    # ||e||^2 - 1 = (t^2 + 2t) + sum of squares >= 0
    excess = sp.expand(dist2 - 1)
    assert excess.is_nonnegative is True, f"cannot show {excess} >= 0"
    # the logit gap: logit(Delta) - logit(delta) = alpha ||delta - Delta||^2 >= alpha
    gap = sp.expand(alpha * dist2 - alpha)
    assert gap.is_nonnegative is True, f"cannot show {gap} >= 0"
  return f"d={d}: integer delta != Delta => ||delta-Delta||^2 >= 1, logit gap >= alpha"


for _d in (1, 2, 3):
  claim(
    f"lattice.unique_max_gap_{_d}d",
    "symbolic",
    f"on Z^{_d}, -alpha||delta - Delta||^2 is maximal only at delta = Delta, with gap >= alpha",
  )(lambda _d=_d: _lattice_gap(_d))


@claim(
  "remark.rank_dh_lt_dout",
  "symbolic",
  "W^(h) = W_val^(h) W_out^(h) through D_h dims has rank <= D_h (all (D_h+1)-minors vanish), and "
  "rank D_h = min(D_h, D_out) is attained generically",
)
def _rank_remark() -> str:
  details = []
  for d_in, d_h, d_out in ((3, 1, 3), (3, 2, 3), (4, 2, 3)):
    wv = sp.Matrix(d_in, d_h, lambda i, j: sp.Symbol(f"v{i}{j}"))
    wo = sp.Matrix(d_h, d_out, lambda i, j: sp.Symbol(f"o{i}{j}"))
    w = wv * wo
    k = d_h + 1
    for rows in itertools.combinations(range(d_in), k):
      for cols in itertools.combinations(range(d_out), k):
        minor = sp.expand(w.extract(list(rows), list(cols)).det())
        assert minor == 0, f"({d_in},{d_h},{d_out}) minor {rows},{cols} = {minor}"
    # a D_h x D_h minor is a nonzero polynomial: rank D_h is attained for generic weights
    top = sp.expand(w.extract(list(range(d_h)), list(range(d_h))).det())
    assert top != 0
    details.append(f"({d_in},{d_h},{d_out})")
  return "all (D_h+1)-minors vanish identically for (D_in, D_h, D_out) in " + ", ".join(details)
