"""SMT (z3) and exhaustive exact-arithmetic claims: the unique maximum on the lattice, the grids of
the library, and the finite-alpha error bound over a box of inputs."""

from __future__ import annotations

import itertools
import os
from fractions import Fraction

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import z3  # noqa: E402

from proofs._registry import claim  # noqa: E402


@claim(
  "smt.lattice_gap_all_integers",
  "SMT",
  "z3: no integer delta != Delta in Z^d (d = 1, 2, 3, unbounded) has ||delta - Delta||^2 < 1",
)
def _lattice_gap() -> str:
  out = []
  for d in (1, 2, 3):
    s = z3.Solver()
    s.set("timeout", 60_000)
    delta = [z3.Int(f"delta{i}") for i in range(d)]
    center = [z3.Int(f"Delta{i}") for i in range(d)]
    s.add(z3.Or(*[a != b for a, b in zip(delta, center)]))
    s.add(z3.Sum([(a - b) * (a - b) for a, b in zip(delta, center)]) < 1)
    res = s.check()
    assert res == z3.unsat, f"d={d}: {res}"
    out.append(f"d={d} unsat")
  return ", ".join(out)


@claim(
  "exhaustive.library_grids_unique_target",
  "exact arithmetic",
  "for every 2-D grid up to 6x6, kernel up to 3x3, dilation <= 2, stride <= 2 and padding in "
  "SAME/VALID/CIRCULAR/REFLECT, with the library's query grid and head centres: every head's "
  "target key q + Delta is on the key grid and is the unique maximiser of -||delta - Delta||^2, "
  "with gap >= 1",
)
def _exhaustive() -> str:
  from attnconv import grids
  from attnconv.construction import conv_head_offsets

  configs = 0
  for n in itertools.product(range(1, 7), repeat=2):
    for ks in itertools.product((1, 2, 3), repeat=2):
      for dil in (1, 2):
        for stride in (1, 2):
          for padding in ("SAME", "VALID", "CIRCULAR", "REFLECT"):
            window = [(k - 1) * dil + 1 for k in ks]
            if padding == "VALID" and any(w > ni for w, ni in zip(window, n)):
              continue
            # padding pairs as flax resolves them (see proofs/reference_conv.py)
            if padding == "VALID":
              pads = ((0, 0), (0, 0))
            elif padding in ("CIRCULAR", "REFLECT"):
              pads = tuple(((w - 1) // 2, w // 2) for w in window)
            else:
              out = [-(-ni // stride) for ni in n]
              pads = tuple(
                (t // 2, t - t // 2)
                for t in (max((o - 1) * stride + w - ni, 0) for o, w, ni in zip(out, window, n))
              )
            key_shape = [ni + lo + hi for ni, (lo, hi) in zip(n, pads)]
            # key coordinates as attnconv.grids.key_positions defines them: index - low
            kpos = [np.arange(m, dtype=np.int64) - lo for m, (lo, _) in zip(key_shape, pads)]
            qpos = grids.query_grid(key_shape, pads, strides=(stride, stride), window=window)
            centers = conv_head_offsets(ks, (dil, dil)).astype(np.int64)
            # exact integer logits -||delta - Delta||^2, (H, Nq, Nk)
            d0 = kpos[0][None, None, :] - qpos[0][None, :, None] - centers[:, 0, None, None]
            d1 = kpos[1][None, None, :] - qpos[1][None, :, None] - centers[:, 1, None, None]
            logits = -(d0[:, :, None, :, None] ** 2 + d1[:, None, :, None, :] ** 2)
            h = centers.shape[0]
            logits = logits.reshape(h, -1, key_shape[0] * key_shape[1])
            top = logits.max(axis=-1)
            assert np.all(top == 0), (n, ks, dil, stride, padding, "target not on the key grid")
            assert np.all((logits == 0).sum(axis=-1) == 1), (n, ks, dil, stride, padding)
            second = np.where(logits == 0, np.iinfo(np.int64).min, logits).max(axis=-1)
            assert logits.shape[-1] == 1 or np.all(second <= -1)
            configs += 1
  return f"{configs} configurations"


@claim(
  "exhaustive.library_logits_are_eq9",
  "exact arithmetic",
  "the library's float32 quadratic logits (encodings.quadratic_logits summed over axes, the Eq. 9 "
  "head vectors "
  "applied to the Eq. 9 encoding) equal -alpha ||delta - Delta||^2 (resp. minus alpha||Delta||^2) "
  "exactly on integer grids",
)
def _library_logits() -> str:
  import jax.numpy as jnp

  from attnconv import encodings as enc
  from attnconv.construction import conv_head_offsets

  n = 0
  for shape, ks, dil in (((5, 4), (3, 3), 1), ((6, 6), (3, 2), 2), ((4,), (3,), 1)):
    kpos = tuple(np.arange(-2, s + 2, dtype=np.int32) for s in shape)
    qpos = tuple(np.arange(s, dtype=np.int32) for s in shape)
    centers = conv_head_offsets(ks, dil)
    for alpha in (1.0, 3.0):
      terms = enc.quadratic_logits(
        qpos, kpos, jnp.asarray(centers, jnp.float32), jnp.float32(alpha)
      )
      lg = np.asarray(enc.combine_axis_logits(terms))
      delta = np.asarray(enc.relative_offsets(qpos, kpos)).astype(np.int64)  # (Nq, Nk, d)
      dist2 = ((delta[None] - centers[:, None, None, :].astype(np.int64)) ** 2).sum(-1)
      assert np.array_equal(lg.astype(np.float64), -alpha * dist2), (shape, ks)
      vr = np.asarray(
        jnp.einsum(
          "he,qke->hqk",
          enc.quadratic_head_vectors(jnp.asarray(centers, jnp.float32), jnp.float32(alpha)),
          enc.quadratic_encoding(jnp.asarray(delta, jnp.float32)),
        )
      )
      norm2 = (centers.astype(np.int64) ** 2).sum(-1)[:, None, None]
      assert np.array_equal(vr.astype(np.float64), -alpha * (dist2 - norm2)), (shape, ks)
      n += 1
  return f"{n} grids"


def _exp_upper(x: Fraction, terms: int = 40) -> Fraction:
  """Rigorous rational upper bound of e^x for x <= 0: 1 / (Taylor lower bound of e^{-x})."""
  y = -x
  assert y >= 0
  # e^y >= sum_{i<terms} y^i / i!  (all terms positive)
  lower, term = Fraction(0), Fraction(1)
  for i in range(terms):
    lower += term
    term = term * y / (i + 1)
  return 1 / lower


@claim(
  "smt.error_bound_over_box",
  "SMT",
  "z3 (nonlinear reals): for all inputs in [-B, B] and all probabilities whose off-target mass is "
  "at most the rational bound at alpha_for_tolerance(tol), two heads over 3 keys stay within tol "
  "of the hard-attention output",
)
def _error_bound_box() -> str:
  from attnconv import bounds

  # 1-D, 2 heads, 3 keys per query, 1 input channel, 2 output channels
  kernel = np.array([[[0.75, -1.5]], [[2.0, 0.5]]])  # (K=2, C_in=1, C_out=2)
  b_val, m, tol = 2.0, 3, 1e-2
  alpha = bounds.alpha_for_tolerance(kernel, tol, input_bound=b_val, num_keys=m)
  s_up = (m - 1) * _exp_upper(-Fraction(alpha))
  eps = s_up / (1 + s_up)  # rational upper bound of the off-target mass
  bnd = Fraction(b_val)
  solver = z3.Solver()
  solver.set("timeout", 120_000)
  x = [z3.Real(f"x{k}") for k in range(m)]
  for xk in x:
    solver.add(xk >= -bnd, xk <= bnd)
  err = {}
  targets = (0, 2)  # the key each head targets
  p = [[z3.Real(f"p{h}_{k}") for k in range(m)] for h in range(2)]
  for h in range(2):
    solver.add(*[pk >= 0 for pk in p[h]])
    solver.add(z3.Sum(p[h]) == 1)
    solver.add(z3.Sum([p[h][k] for k in range(m) if k != targets[h]]) <= eps)
  worst = []
  for j in range(2):
    w = [Fraction(float(kernel[h, 0, j])) for h in range(2)]
    soft = z3.Sum([z3.Sum([p[h][k] * x[k] for k in range(m)]) * w[h] for h in range(2)])
    hard = z3.Sum([x[targets[h]] * w[h] for h in range(2)])
    err[j] = soft - hard
    worst.append(z3.Or(err[j] > Fraction(tol), err[j] < -Fraction(tol)))
  solver.add(z3.Or(*worst))
  res = solver.check()
  assert res == z3.unsat, f"z3: {res}" + (f" {solver.model()}" if res == z3.sat else "")
  return f"alpha = {alpha:.6f}, eps <= {float(eps):.3e}: unsat"
