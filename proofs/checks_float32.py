"""The paper's float32 remark (``alpha = 46``) decided exactly (``proofs/float32.md``)."""

from __future__ import annotations

import math
import os
from fractions import Fraction

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from attnconv import bounds  # noqa: E402
from proofs._registry import claim  # noqa: E402


@claim(
  "float32.xla_cpu_flushes_subnormals",
  "experiment",
  "XLA on CPU flushes subnormal float32 results to zero: exp, products and quotients that would be "
  "subnormal come out as 0.0 (so the one-hot boundary is 2^-126, not 2^-150)",
)
def _ftz() -> str:
  import jax
  import jax.numpy as jnp

  tiny = np.float32(2.0**-126)
  exp_sub = float(jax.jit(jnp.exp)(jnp.float32(-100.0)))  # e^-100 = 3.7e-44: subnormal
  mul_sub = float(jax.jit(lambda a: a * jnp.float32(0.5))(jnp.float32(tiny)))
  div_sub = float(jax.jit(lambda a: a / jnp.float32(4.0))(jnp.float32(tiny)))
  assert exp_sub == 0.0 and mul_sub == 0.0 and div_sub == 0.0, (exp_sub, mul_sub, div_sub)
  # normal results are kept
  assert float(jax.jit(jnp.exp)(jnp.float32(-87.0))) > 0
  return f"platform {jax.devices()[0].platform}: exp(-100) = {exp_sub}, tiny/2 = {mul_sub}"


@claim(
  "float32.one_hot_threshold_exact",
  "exact arithmetic",
  "with subnormals flushed, the smallest float32 alpha making the construction's float32 softmax "
  "one-hot is the float32 successor of 126 ln 2 (87.3365478515625 = 715461/8192); with gradual "
  "underflow and a correctly rounded exp, the successor of 150 ln 2 (103.97208404541016)",
)
def _threshold() -> str:
  lo2, hi2 = bounds.ln2_bounds()
  assert hi2 - lo2 < Fraction(1, 10**20)
  # the ln 2 bounds are consistent with math.log(2) within its float error
  assert abs(float(lo2) - math.log(2)) < 1e-15
  ftz = bounds.float32_one_hot_alpha()
  sub = bounds.float32_one_hot_alpha(flush_subnormals=False)
  assert ftz.alpha == Fraction(715461, 8192), ftz.alpha
  assert sub.alpha == Fraction(13627829, 131072), sub.alpha
  for r, e in ((ftz, 126), (sub, 150)):
    below = Fraction(float(np.nextafter(np.float32(r.alpha_float), np.float32(0))))
    # below < e ln2 < alpha: the float32 just below stays above the boundary, alpha goes under
    assert below < e * lo2 and e * hi2 < r.alpha
    assert np.float32(r.alpha_float) == r.alpha_float  # exactly representable
  # FTZ: margins well beyond exp's rounding error (a faithful exp is within 2^-23 relative)
  assert min(ftz.margin) > 2.0**-23 * 8, ftz.margin
  # d > 1: fl(alpha d) >= alpha, so d = 1 binds; the per-distance thresholds decrease with d
  assert bounds.float32_one_hot_alpha(2).alpha < ftz.alpha
  return f"FTZ {ftz.alpha_float!r}, gradual {sub.alpha_float!r}, margins {ftz.margin}"


@claim(
  "float32.paper_alpha_46",
  "exact arithmetic",
  "alpha = 46 is not one-hot in float32: e^-46 (~1.05e-20) is a normal float32 > 2^-126; it is "
  "the smallest integer with 10^-alpha < 2^-150 (the remark's argument in base 10); at 46 the "
  "target weight already rounds to exactly 1.0 on grids with up to 10^6 keys",
)
def _paper_46() -> str:
  lo2, hi2 = bounds.ln2_bounds()
  # e^-46 > 2^-126  <=>  46 < 126 ln 2
  assert 46 < 126 * lo2
  # 10^-46 < 2^-150 < 10^-45, exactly in rationals
  assert Fraction(1, 10**46) < Fraction(1, 2**150) < Fraction(1, 10**45)
  # 10^-45 rounds to the smallest subnormal 2^-149 (it is above half of it), 10^-46 to 0
  assert Fraction(1, 10**45) > Fraction(1, 2**150)
  # the target weight: with M - 1 <= 10^6 off-target keys, S <= 10^6 e^-46 < 2^-24 * (1 - 2^-20),
  # so fl(1 + S) = 1 under any summation order (accumulated error factor (1 + 2^-24)^M)
  e46_upper = 1 / sum(Fraction(46**i, math.factorial(i)) for i in range(120))
  # (1 + u)^M <= e^{M u} <= 1 / (1 - M u) for M u < 1
  s_upper = 10**6 * e46_upper / (1 - Fraction(10**6, 2**24))
  assert s_upper < Fraction(1, 2**24), float(s_upper)
  # and the base-e answer 87.34 is not 46 under any reading of the remark in base e
  assert abs(float(126 * lo2) - 46) > 40
  return (
    f"e^-46 = {math.exp(-46):.3e} (normal float32); 10^-46 < 2^-150 = {2.0**-150:.3e} < 10^-45; "
    f"S(46) <= {float(s_upper):.2e} < 2^-24"
  )


@claim(
  "float32.threshold_matches_jax_softmax",
  "experiment",
  "jax.nn.softmax (XLA CPU) of the construction's logits on a 5x5 grid (and the library's finite-"
  "alpha layer) is one-hot exactly at the decided threshold and not at the float32 just below",
)
def _matches_jax() -> str:
  import jax
  import jax.numpy as jnp

  from attnconv import conv_to_attention

  ftz = bounds.float32_one_hot_alpha()
  a_hi = np.float32(ftz.alpha_float)
  a_lo = np.nextafter(a_hi, np.float32(0))
  # full 2-D logits -alpha ||delta - Delta||^2 for a centre query on a 5x5 key grid
  grid = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
  dist2 = ((grid - np.array([2, 2])) ** 2).sum(-1).astype(np.float32)

  def probs(alpha):
    return np.asarray(jax.jit(jax.nn.softmax)(-jnp.float32(alpha) * jnp.asarray(dist2)))

  p_hi, p_lo = probs(a_hi), probs(a_lo)
  one_hot = (dist2 == 0).astype(np.float32)
  assert np.array_equal(p_hi, one_hot), p_hi
  assert not np.array_equal(p_lo, one_hot) and p_lo[dist2 == 1].min() > 0
  # the library's layer at finite alpha (per-axis softmax): the same boundary
  kernel = jnp.ones((3, 3, 1, 1), jnp.float32)
  got = []
  for a in (a_lo, a_hi):
    module, variables = conv_to_attention(kernel, alpha=float(a))
    pr = np.asarray(module.apply(variables, (4, 4), method=module.position_probabilities))
    got.append(bool(np.all((pr == 0) | (pr == 1))))
  assert got == [False, True], got
  return f"one-hot at {float(a_hi)!r}, not at {float(a_lo)!r}"
