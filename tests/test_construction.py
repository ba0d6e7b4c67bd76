"""Theorem 1 as tests: the attention construction computes ``flax.linen.Conv`` (and back).

Rounding tolerances are derived, not tuned. For one output ``y = sum_{i<n} w_i x_i (+ b)`` any
order of floating-point summation satisfies ``|fl(y) - y| <= gamma_n S`` with
``S = sum_i |w_i x_i| (+ |b|)`` and ``gamma_n = n u / (1 - n u)`` (Higham, *Accuracy and Stability
of Numerical Algorithms*, Eq. 3.5), ``u = eps / 2`` the unit roundoff. Two evaluations of the
same sum in different orders (the attention layer vs. ``lax``) therefore differ by at most
``2 gamma_n S``. ``S`` is computed per output element as the convolution of ``|x|`` with ``|w|``
(itself in float32; its own relative error is far below the slack), and ``n`` is the longest
reduction either side performs: ``H * C_in`` products in the attention output projection (all
``H = prod(kernel_size)`` heads, the full input width even for grouped kernels, whose
block-diagonal zeros add exactly) plus the bias. The hard-limit aggregation itself is exact: the
attention probabilities are exactly 0.0 and 1.0, so every query adds one value to zeros.
This elementwise bound is tighter than the brief's ``c eps sqrt(K C_in) max|x| max|w|`` where
the data are small and, unlike it, holds for every order of summation without a constant ``c``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from attnconv import construction
from attnconv.construction import (
  attention_to_conv,
  conv_to_attention,
  convolutions_as_attention,
)

IMPLEMENTATIONS = ("dense", "gather")
F32_U = 2.0**-24  # float32 unit roundoff
BF16_U = 2.0**-8  # bfloat16 unit roundoff
SPATIAL_AXES = "DHW"

# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """One ``flax.linen.Conv`` configuration and its input shape."""

  kernel_size: tuple[int, ...]
  in_features: int
  features: int
  feature_group_count: int
  strides: tuple[int, ...]
  padding: Any
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  use_bias: bool
  batch: int
  spatial: tuple[int, ...]
  seed: int

  @property
  def d(self) -> int:
    return len(self.kernel_size)

  @property
  def x_shape(self) -> tuple[int, ...]:
    return (self.batch, *self.spatial, self.in_features)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return (*self.kernel_size, self.in_features // self.feature_group_count, self.features)

  @property
  def num_heads(self) -> int:
    return math.prod(self.kernel_size)

  def geometry(self) -> dict:
    """The keyword arguments shared by ``flax.linen.Conv`` and ``conv_to_attention``."""
    return dict(
      strides=self.strides,
      padding=self.padding,
      input_dilation=self.input_dilation,
      kernel_dilation=self.kernel_dilation,
      feature_group_count=self.feature_group_count,
    )

  def flax_conv(self) -> nn.Conv:
    return nn.Conv(
      self.features,
      self.kernel_size,
      use_bias=self.use_bias,
      precision="highest",
      **self.geometry(),
    )


def _padding_strategy(d: int, with_strings: bool) -> st.SearchStrategy:
  pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
  explicit = st.one_of(
    st.integers(0, 2),
    st.lists(st.one_of(pair, st.integers(0, 2)), min_size=d, max_size=d).map(tuple),
  )
  if not with_strings:
    return explicit
  names = ["SAME", "VALID", "CIRCULAR", "REFLECT"] + (["CAUSAL"] if d == 1 else [])
  return st.one_of(st.sampled_from(names), explicit)


@st.composite
def conv_configs(
  draw,
  *,
  dims: Sequence[int] = (1, 2, 3),
  max_channels: int = 3,
  unit_dilation: bool = False,
  single_group: bool = False,
) -> ConvConfig:
  """Convolutions that ``flax.linen.Conv`` accepts, with a non-empty output.

  Spatial sizes stay small (<= 8 in 1-D and 2-D, <= 5 in 3-D) and are drawn from a few values so
  that few distinct shapes are compiled.
  """
  d = draw(st.sampled_from(tuple(dims)))
  max_k = 5 if d < 3 else 3
  kernel_size = tuple(draw(st.integers(1, max_k)) for _ in range(d))
  sizes = {1: (1, 2, 3, 5, 8), 2: (1, 2, 3, 5, 8), 3: (1, 2, 3, 5)}[d]
  spatial = tuple(draw(st.sampled_from(sizes)) for _ in range(d))
  groups_kind = "one" if single_group else draw(st.sampled_from(["one", "two", "depthwise"]))
  if groups_kind == "one":
    groups, in_features = 1, draw(st.integers(1, max_channels))
  elif groups_kind == "two":
    groups, in_features = 2, 2 * draw(st.integers(1, max(1, max_channels // 2)))
  else:
    in_features = draw(st.integers(1, max_channels))
    groups = in_features
  features = groups * draw(st.integers(1, 2))
  strides = tuple(draw(st.integers(1, 3)) for _ in range(d))
  if unit_dilation:
    input_dilation = kernel_dilation = (1,) * d
  else:
    input_dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(d))
    kernel_dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(d))
  padding = draw(_padding_strategy(d, with_strings=all(v == 1 for v in input_dilation)))
  cfg = ConvConfig(
    kernel_size=kernel_size,
    in_features=in_features,
    features=features,
    feature_group_count=groups,
    strides=strides,
    padding=padding,
    input_dilation=input_dilation,
    kernel_dilation=kernel_dilation,
    use_bias=draw(st.booleans()),
    batch=draw(st.sampled_from([1, 2])),
    spatial=spatial,
    seed=draw(st.integers(0, 2**16)),
  )
  out = _flax_output_shape(cfg)
  assume(out is not None and all(s >= 1 for s in out[1:-1]))
  return cfg


def _flax_output_shape(cfg: ConvConfig) -> tuple[int, ...] | None:
  """The output shape flax gives, or None where flax itself rejects the configuration."""
  params = {"kernel": jax.ShapeDtypeStruct(cfg.kernel_shape, jnp.float32)}
  if cfg.use_bias:
    params["bias"] = jax.ShapeDtypeStruct((cfg.features,), jnp.float32)
  x = jax.ShapeDtypeStruct(cfg.x_shape, jnp.float32)
  try:
    out = jax.eval_shape(lambda p, v: cfg.flax_conv().apply({"params": p}, v), params, x)
  except Exception:  # flax / lax reject it: not a convolution to emulate
    return None
  return tuple(out.shape)


def _data(cfg: ConvConfig, *, integer: bool = False, dtype=np.float32):
  """``(x, kernel, bias)`` as numpy arrays; integer-valued in [-3, 3] if ``integer``."""
  rng = np.random.default_rng(cfg.seed)
  if integer:
    draw = lambda shape: rng.integers(-3, 4, size=shape).astype(dtype)  # noqa: E731
  else:
    draw = lambda shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
  bias = draw((cfg.features,)) if cfg.use_bias else None
  return draw(cfg.x_shape), draw(cfg.kernel_shape), bias


# ----------------------------------------------------------------------------------------------
# references and tolerances
# ----------------------------------------------------------------------------------------------


def _flax_apply(cfg: ConvConfig, x, kernel, bias):
  params = {"kernel": kernel}
  if bias is not None:
    params["bias"] = bias
  return cfg.flax_conv().apply({"params": params}, x)


def flax_reference(cfg: ConvConfig, x, kernel, bias):
  """``flax.linen.Conv`` (jitted: one compilation per example is cheaper than eager dispatch)."""
  return jax.jit(lambda *a: _flax_apply(cfg, *a))(x, kernel, bias)


def lax_reference(cfg: ConvConfig, x, kernel, bias):
  """``jax.lax.conv_general_dilated`` with the arguments flax.linen.Conv derives."""
  return jax.jit(lambda *a: _lax_apply(cfg, *a))(x, kernel, bias)


def _lax_apply(cfg: ConvConfig, x, kernel, bias):
  d = cfg.d
  window = [(k - 1) * r + 1 for k, r in zip(cfg.kernel_size, cfg.kernel_dilation)]
  pad = cfg.padding
  if pad in ("CIRCULAR", "REFLECT"):
    pads = [((w - 1) // 2, w // 2) for w in window]
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
    lax_pad: Any = "VALID"
  elif pad == "CAUSAL":
    lax_pad = [(window[0] - 1, 0)]
  elif isinstance(pad, str):
    lax_pad = pad
  elif isinstance(pad, int):
    lax_pad = [(pad, pad)] * d
  else:
    lax_pad = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
  sp = SPATIAL_AXES[3 - d :]
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=cfg.strides,
    padding=lax_pad,
    lhs_dilation=cfg.input_dilation,
    rhs_dilation=cfg.kernel_dilation,
    dimension_numbers=dn,
    feature_group_count=cfg.feature_group_count,
    precision=jax.lax.Precision.HIGHEST,
  )
  return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _emulate(cfg: ConvConfig, x, kernel, bias, *, implementation="dense", alpha=None):
  module, variables = conv_to_attention(
    kernel, bias, alpha=alpha, implementation=implementation, **cfg.geometry()
  )
  return module.apply(variables, x)


def emulate(cfg: ConvConfig, x, kernel, bias, *, implementation="dense", alpha=None):
  """The attention layer built from ``kernel`` inside the traced function, applied to ``x``."""
  fn = lambda *a: _emulate(cfg, *a, implementation=implementation, alpha=alpha)  # noqa: E731
  return jax.jit(fn)(x, kernel, bias)


def gamma(n: int, u: float) -> float:
  """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an n-term float sum."""
  assert n * u < 1, (n, u)
  return n * u / (1 - n * u)


def abs_sum(cfg: ConvConfig, x, kernel, bias) -> np.ndarray:
  """``S = sum_i |w_i x_i| + |b|`` per output element (float64 after a float32 convolution)."""
  s = np.asarray(
    flax_reference(
      cfg,
      jnp.abs(jnp.asarray(x, jnp.float32)),
      jnp.abs(jnp.asarray(kernel, jnp.float32)),
      None if bias is None else jnp.abs(jnp.asarray(bias, jnp.float32)),
    ),
    np.float64,
  )
  return s * (1 + 1e-5) + np.finfo(np.float32).tiny


def reduction_length(cfg: ConvConfig) -> int:
  """Longest sum either side evaluates: ``H * C_in`` products and the bias."""
  return cfg.num_heads * cfg.in_features + 1


def summation_tolerance(cfg: ConvConfig, x, kernel, bias, u: float = F32_U) -> np.ndarray:
  return 2 * gamma(reduction_length(cfg), u) * abs_sum(cfg, x, kernel, bias)


def assert_within(actual, expected, tol, what: str) -> None:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  chex.assert_tree_all_finite(actual)
  err = np.abs(actual - expected)
  worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.size else ()
  assert np.all(err <= tol), (
    f"{what}: error {err[worst]:.3g} > tolerance {np.broadcast_to(tol, err.shape)[worst]:.3g} "
    f"at {worst}"
  )


def _bounds_module():
  from attnconv import bounds

  return bounds


# ----------------------------------------------------------------------------------------------
# Theorem 1: the emulation equals the convolution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(cfg=conv_configs())
def test_matches_flax_conv_and_lax(cfg: ConvConfig, implementation: str) -> None:
  """Float data: attention == flax.linen.Conv == lax.conv_general_dilated up to summation order."""
  x, kernel, bias = _data(cfg)
  ref_flax = flax_reference(cfg, x, kernel, bias)
  ref_lax = lax_reference(cfg, x, kernel, bias)
  y = emulate(cfg, x, kernel, bias, implementation=implementation)
  chex.assert_shape(y, _flax_output_shape(cfg))
  chex.assert_equal_shape([y, ref_flax, ref_lax])
  tol = summation_tolerance(cfg, x, kernel, bias)
  assert_within(y, ref_flax, tol, "attention vs flax.linen.Conv")
  assert_within(y, ref_lax, tol, "attention vs lax.conv_general_dilated")
  assert_within(ref_flax, ref_lax, tol, "flax.linen.Conv vs lax.conv_general_dilated")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(cfg=conv_configs())
def test_integer_data_is_bitwise_exact(cfg: ConvConfig, implementation: str) -> None:
  """Integer-valued float32 data: every partial sum is exact, so the outputs are bitwise equal.

  |x|, |w|, |b| <= 3 and at most 125 * 3 products: partial sums stay far below 2**24.
  """
  x, kernel, bias = _data(cfg, integer=True)
  y = emulate(cfg, x, kernel, bias, implementation=implementation)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(flax_reference(cfg, x, kernel, bias)))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(lax_reference(cfg, x, kernel, bias)))


def test_hard_attention_is_exactly_one_hot() -> None:
  """In the hard limit each head puts probability exactly 1.0 on one key and 0.0 elsewhere."""
  kernel = jnp.ones((3, 2, 1, 1))
  module, variables = conv_to_attention(kernel, padding=((1, 1), (0, 1)), strides=(2, 1))
  probs = np.asarray(module.apply(variables, (5, 4), method=module.position_probabilities))
  assert set(np.unique(probs).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(probs.sum(-1), 1.0)
  chex.assert_shape(probs, (6, 3 * 4, 7 * 5))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(cfg=conv_configs(dims=(1, 2), max_channels=2))
def test_gradients_match_convolution(cfg: ConvConfig, implementation: str) -> None:
  """d/dx, d/dkernel and d/dbias of a scalar loss equal the convolution's.

  ``conv_to_attention`` is traced with the kernel as an argument. Bounds: the cotangent ``g`` is
  linear, so ``|grad| <= |conv|^T`` evaluated on ``|g|, |w|`` (resp. ``|x|``); the sums have at
  most ``B * N_out * H * C_out`` (input gradient) or ``B * N_out`` (kernel gradient) terms.
  """
  cfg = dataclasses.replace(cfg, use_bias=True)
  x, kernel, bias = _data(cfg)
  out_shape = _flax_output_shape(cfg)
  g = np.random.default_rng(cfg.seed + 1).standard_normal(out_shape).astype(np.float32)

  abs_g = np.abs(g)
  attn = lambda x_, k_, b_: _emulate(cfg, x_, k_, b_, implementation=implementation)  # noqa: E731
  conv = lambda x_, k_, b_: _flax_apply(cfg, x_, k_, b_)  # noqa: E731
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a) * g), argnums=(0, 1, 2)))(x, kernel, bias)

  @jax.jit
  def reference(x_, k_, b_):
    ref = jax.grad(lambda *a: jnp.sum(conv(*a) * g), argnums=(0, 1, 2))(x_, k_, b_)
    # |.|-bounds of the same linear maps
    sx = jax.grad(lambda v: jnp.sum(conv(v, jnp.abs(k_), jnp.zeros_like(b_)) * abs_g))(jnp.abs(x_))
    sk = jax.grad(lambda v: jnp.sum(conv(jnp.abs(x_), v, jnp.zeros_like(b_)) * abs_g))(jnp.abs(k_))
    return ref, sx, sk

  ref, sx, sk = reference(x, kernel, bias)
  chex.assert_trees_all_equal_shapes(grads, ref)
  chex.assert_tree_all_finite(grads)
  n_out = math.prod(out_shape[:-1])
  gx = gamma(n_out * cfg.num_heads * cfg.features + cfg.num_heads * cfg.in_features, F32_U)
  gk = gamma(n_out + cfg.num_heads * cfg.in_features, F32_U)
  slack = 1 + 1e-5
  assert_within(grads[0], ref[0], 2 * gx * slack * np.asarray(sx, np.float64) + 1e-30, "d/dx")
  assert_within(grads[1], ref[1], 2 * gk * slack * np.asarray(sk, np.float64) + 1e-30, "d/dk")
  tol_b = 2 * gamma(n_out, F32_U) * abs_g.reshape(-1, cfg.features).sum(0) * slack
  assert_within(grads[2], ref[2], tol_b, "d/dbias")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(cfg=conv_configs(dims=(1, 2), max_channels=3))
def test_bfloat16(cfg: ConvConfig, implementation: str) -> None:
  """bfloat16 inputs and kernel vs. the float32 convolution of the unrounded data.

  Rounding x, w and b to bfloat16 costs a relative ``u`` each (``u = 2**-8``), every product one
  more, the sum ``gamma_n`` and the bfloat16 output one more ``u``: with ``S`` as above the error
  is at most ``gamma_{n+3} S`` (``(1+u)^3 (1+gamma_n) (1+u) - 1 <= gamma_{n+4}``).
  """
  x, kernel, bias = _data(cfg)
  to_bf16 = lambda a: None if a is None else jnp.asarray(a, jnp.bfloat16)  # noqa: E731
  y = emulate(cfg, to_bf16(x), to_bf16(kernel), to_bf16(bias), implementation=implementation)
  assert y.dtype == jnp.bfloat16
  ref = flax_reference(cfg, x, kernel, bias)
  tol = gamma(reduction_length(cfg) + 4, BF16_U) * abs_sum(cfg, x, kernel, bias)
  assert_within(y, ref, tol, "bfloat16 attention vs float32 flax.linen.Conv")


# ----------------------------------------------------------------------------------------------
# finite alpha: the softmax emulation and its bound
# ----------------------------------------------------------------------------------------------


def _finite_alpha_tolerance(cfg: ConvConfig, num_keys: int, input_bound: float, kernel, bias):
  """Float rounding of the finite-alpha layer (beyond the exact-arithmetic bound).

  The softmax probabilities carry a relative error of at most about ``(Nk + 4) u`` (exp, the
  Nk-term normaliser, one division), the aggregation sums ``Nk`` terms of total weight ~1 and the
  projection ``H * C_in`` more: per output channel ``o`` the rounding is at most
  ``(2 Nk + H C_in + 8) u B sum_{h,c} |w[h, c, o]| + u |b|`` to first order; doubled for slack.
  """
  w_abs = np.abs(np.asarray(kernel, np.float64)).reshape(-1, cfg.features).sum(0)
  n = 2 * num_keys + cfg.num_heads * cfg.in_features + 8
  b_abs = 0.0 if bias is None else np.abs(np.asarray(bias, np.float64))
  return 2 * (n * F32_U * input_bound * w_abs + F32_U * b_abs) + 1e-30


def _num_keys(module, variables, x) -> int:
  """Number of keys on the padded key grid, as the bound expects."""
  keys = jax.eval_shape(lambda v, x_: module.apply(v, x_, method=module.key_values), variables, x)
  return int(keys.shape[1])


@given(cfg=conv_configs(dims=(1, 2), max_channels=2))
def test_finite_alpha_error_within_bound(cfg: ConvConfig) -> None:
  """max |MHSA_alpha(x) - Conv(x)| <= softmax_emulation_error_bound + float rounding."""
  bounds = _bounds_module()
  x, kernel, bias = _data(cfg)
  ref = np.asarray(flax_reference(cfg, x, kernel, bias), np.float64)
  input_bound = float(np.max(np.abs(x)))
  module, variables = conv_to_attention(kernel, bias, alpha=1.0, **cfg.geometry())
  num_keys = _num_keys(module, variables, x)
  apply = jax.jit(module.apply)  # alpha is a parameter: one compilation for every alpha
  for alpha in (0.5, 2.0, 8.0, 46.0):
    params = dict(variables["params"], alpha=jnp.full_like(variables["params"]["alpha"], alpha))
    bound = bounds.softmax_emulation_error_bound(
      kernel,
      alpha,
      input_bound=input_bound,
      num_keys=num_keys,
      feature_group_count=cfg.feature_group_count,
    )
    assert bound >= 0.0 and math.isfinite(bound)
    y = np.asarray(apply({"params": params}, x), np.float64)
    tol = bound + _finite_alpha_tolerance(cfg, num_keys, input_bound, kernel, bias)
    err = np.abs(y - ref)
    assert np.all(err <= tol), (
      f"alpha={alpha}: max error {err.max():.4g} > bound {bound:.4g} (+ rounding)"
    )


def test_bound_decreases_to_zero() -> None:
  """The bound is non-increasing in alpha and tends to 0."""
  bounds = _bounds_module()
  kernel = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
  alphas = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 46, 64, 128, 256, 1024]
  values = [
    bounds.softmax_emulation_error_bound(kernel, a, input_bound=1.0, num_keys=100) for a in alphas
  ]
  assert all(math.isfinite(v) and v >= 0 for v in values)
  assert all(b <= a for a, b in zip(values, values[1:])), values
  assert values[-1] < 1e-30 * max(values[0], 1.0), values
  grouped = bounds.softmax_emulation_error_bound(
    kernel[:, :, :1, :], 4.0, input_bound=1.0, num_keys=100, feature_group_count=5
  )
  assert math.isfinite(grouped) and grouped >= 0


@given(cfg=conv_configs(dims=(1, 2), max_channels=2), tolerance=st.sampled_from([1e-1, 1e-3, 1e-6]))
def test_alpha_for_tolerance(cfg: ConvConfig, tolerance: float) -> None:
  """With ``alpha_for_tolerance(eps)``: bound <= eps and measured error <= eps (+ rounding)."""
  bounds = _bounds_module()
  x, kernel, bias = _data(cfg)
  module, variables = conv_to_attention(kernel, bias, **cfg.geometry())
  num_keys = _num_keys(module, variables, x)
  input_bound = float(np.max(np.abs(x)))
  kwargs = dict(
    input_bound=input_bound, num_keys=num_keys, feature_group_count=cfg.feature_group_count
  )
  alpha = bounds.alpha_for_tolerance(kernel, tolerance, **kwargs)
  assert alpha > 0 and math.isfinite(alpha)
  assert bounds.softmax_emulation_error_bound(kernel, alpha, **kwargs) <= tolerance
  y = emulate(cfg, x, kernel, bias, alpha=alpha)
  err = np.abs(np.asarray(y, np.float64) - np.asarray(flax_reference(cfg, x, kernel, bias)))
  tol = tolerance + _finite_alpha_tolerance(cfg, num_keys, input_bound, kernel, bias)
  assert np.all(err <= tol), f"max error {err.max():.4g} > {tolerance:g} (+ rounding)"


def _is_one_hot(probs: np.ndarray) -> bool:
  return bool(np.all((probs == 0.0) | (probs == 1.0)))


def float32_one_hot_alpha(kernel_size=(3, 3), spatial=(8, 8)) -> float:
  """Smallest float32 alpha at which the float32 softmax attention is exactly one-hot.

  Bisection over the ordered bit patterns of positive float32 numbers; one-hotness is monotone in
  alpha (the off-target probabilities ``exp(-alpha k) / Z`` decrease).
  """
  kernel = jnp.ones((*kernel_size, 1, 1), jnp.float32)
  module, variables = conv_to_attention(kernel, alpha=1.0, padding="SAME")

  @jax.jit
  def probs(alpha):
    params = dict(variables["params"])
    params["alpha"] = jnp.full_like(params["alpha"], alpha)
    return module.apply({"params": params}, spatial, method=module.position_probabilities)

  as_float = lambda bits: float(np.array(bits, np.int32).view(np.float32))  # noqa: E731
  lo = int(np.float32(1.0).view(np.int32))  # not one-hot
  hi = int(np.float32(1000.0).view(np.int32))  # one-hot
  assert not _is_one_hot(np.asarray(probs(as_float(lo))))
  assert _is_one_hot(np.asarray(probs(as_float(hi))))
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if _is_one_hot(np.asarray(probs(np.float32(as_float(mid))))):
      hi = mid
    else:
      lo = mid
  return as_float(hi)


def test_float32_one_hot_alpha() -> None:
  """Empirical smallest alpha with exactly one-hot float32 attention, vs. the paper's alpha = 46.

  The paper remarks that alpha = 46 makes float32 attention one-hot; the threshold found here is
  recorded (and checked against ``attnconv.bounds.float32_one_hot_alpha`` when it exists).
  """
  alpha = float32_one_hot_alpha()
  print(f"empirical float32 one-hot alpha: {alpha!r}")
  assert 1.0 < alpha < 1000.0
  # monotone: one-hot at every alpha above, not below
  kernel = jnp.ones((3, 3, 1, 1))
  for a, expected in [(np.nextafter(np.float32(alpha), np.float32(0)), False), (alpha, True)]:
    module, variables = conv_to_attention(kernel, alpha=float(a), padding="SAME")
    probs = np.asarray(module.apply(variables, (8, 8), method=module.position_probabilities))
    assert _is_one_hot(probs) is expected
  bounds = _bounds_module()
  predicted = bounds.float32_one_hot_alpha()  # XLA CPU flushes subnormals: 126 ln 2
  assert predicted.alpha_float == alpha, (predicted, alpha)
  assert predicted.paper_alpha == 46 and alpha > 46


# ----------------------------------------------------------------------------------------------
# the inverse map
# ----------------------------------------------------------------------------------------------


@given(cfg=conv_configs(unit_dilation=True), alpha=st.sampled_from([None, 200.0]))
def test_round_trip_returns_the_kernel(cfg: ConvConfig, alpha: float | None) -> None:
  """conv -> attention -> conv returns the kernel exactly (block-diagonal dense kernel for groups)."""
  _, kernel, bias = _data(cfg)
  module, variables = conv_to_attention(kernel, bias, alpha=alpha, **cfg.geometry())
  kernel2, bias2 = attention_to_conv(module, variables)
  g = cfg.feature_group_count
  if g == 1:
    expected = kernel
  else:  # dense kernel with the groups' blocks on the diagonal
    cin_g, cout_g = cfg.in_features // g, cfg.features // g
    expected = np.zeros((*cfg.kernel_size, cfg.in_features, cfg.features), np.float32)
    for i in range(g):
      blk = kernel[..., i * cout_g : (i + 1) * cout_g]
      expected[..., i * cin_g : (i + 1) * cin_g, i * cout_g : (i + 1) * cout_g] = blk
  np.testing.assert_array_equal(np.asarray(kernel2), expected)
  if bias is None:
    assert bias2 is None
  else:
    np.testing.assert_array_equal(np.asarray(bias2), bias)


def test_round_trip_of_dilated_kernel_spreads_taps() -> None:
  """With kernel dilation the recovered kernel is the dilated one (zeros between the taps)."""
  kernel = np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1, 1)
  module, variables = conv_to_attention(kernel, kernel_dilation=2, padding="VALID")
  kernel2, _ = attention_to_conv(module, variables)
  expected = np.zeros((3, 3, 1, 1), np.float32)
  expected[::2, ::2] = kernel
  np.testing.assert_array_equal(np.asarray(kernel2), expected)


def test_attention_to_conv_rejects_diffuse_head() -> None:
  """A finite-alpha layer whose heads are not concentrated raises a ValueError naming the head."""
  kernel = jnp.ones((3, 3, 2, 2))
  module, variables = conv_to_attention(kernel, alpha=0.5)
  with pytest.raises(ValueError, match=r"head 0 is not concentrated"):
    attention_to_conv(module, variables)
  params = dict(variables["params"])
  params["alpha"] = params["alpha"].at[4].set(0.3).at[:4].set(500.0).at[5:].set(500.0)
  with pytest.raises(ValueError, match=r"head 4 "):
    attention_to_conv(module, {"params": params})


# ----------------------------------------------------------------------------------------------
# whole networks
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)  # noqa: E731
    y = nn.Conv(self.features, (3, 3), self.strides, padding="SAME", use_bias=False)(x)
    y = nn.relu(bn()(y))
    y = bn()(nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = bn()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class TinyResNet(nn.Module):
  """A small ResNet: stem, a basic block, a stride-2 block with a 1x1 projection, linear head."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
    x = _Block(8)(x)
    x = _Block(12, strides=2)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _init(model: nn.Module, x: jax.Array) -> dict:
  return jax.jit(lambda k, x_: model.init(k, x_))(jax.random.key(0), x)


def _apply(model: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
  """A freshly traced (and compiled) apply: JAX's trace cache cannot see the context."""
  return jax.jit(lambda v, x_: model.apply(v, x_))(variables, x)


@pytest.fixture(scope="module")
def resnet():
  model = TinyResNet()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = _init(model, x)
  # non-trivial batch statistics
  stats = jax.tree.map(
    lambda s: s + 0.1 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"]
  )
  eval_vars = {"params": variables["params"], "batch_stats": stats}
  return model, eval_vars, x, variables, _apply(model, eval_vars, x)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_resnet_logits_under_context(resnet, implementation: str) -> None:
  """Every Conv of a ResNet runs as attention: same logits, no convolution in the jaxpr.

  Each trace uses a fresh function: JAX caches traces per function object, and the context is
  Python state outside the cache key (see test_context_retraces_cached_functions).
  """
  model, variables, x, _, ref = resnet
  outside = str(jax.make_jaxpr(lambda v, x_: model.apply(v, x_))(variables, x))
  assert "conv_general_dilated" in outside
  with convolutions_as_attention(implementation=implementation):
    jaxpr = str(jax.make_jaxpr(lambda v, x_: model.apply(v, x_))(variables, x))
    logits = _apply(model, variables, x)
  assert "conv_general_dilated" not in jaxpr
  after = str(jax.make_jaxpr(lambda v, x_: model.apply(v, x_))(variables, x))
  assert "conv_general_dilated" in after  # the context is left
  chex.assert_shape(logits, (2, 10))
  # float32 summation-order differences through 5 convolutions of width <= 12 * 9
  chex.assert_trees_all_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_context_retraces_cached_functions() -> None:
  model = nn.Conv(4, (3, 3))
  x = jnp.ones((1, 5, 5, 2))
  variables = model.init(jax.random.key(0), x)
  apply = lambda v, x_: model.apply(v, x_)  # noqa: E731
  assert "conv_general_dilated" in str(jax.make_jaxpr(apply)(variables, x))
  with convolutions_as_attention():
    assert "conv_general_dilated" not in str(jax.make_jaxpr(apply)(variables, x))


def test_resnet_finite_alpha_and_init_under_context(resnet) -> None:
  """model.init works inside the context (same parameters); large finite alpha ~ the ResNet."""
  model, variables, x, outside, ref = resnet
  with convolutions_as_attention():
    inside = _init(model, x)
  chex.assert_trees_all_equal(inside, outside)
  with convolutions_as_attention(alpha=100.0):
    logits = _apply(model, variables, x)
  chex.assert_trees_all_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_context_leaves_other_modules_alone() -> None:
  """Only flax.linen.Conv is intercepted: ConvTranspose and Dense are untouched."""
  model = nn.ConvTranspose(3, (3, 3), strides=(2, 2))
  x = jnp.ones((1, 4, 4, 2))
  variables = model.init(jax.random.key(0), x)
  ref = model.apply(variables, x)
  with convolutions_as_attention():
    y = model.apply(variables, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

_K = np.ones((3, 3, 4, 6), np.float32)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    (
      dict(feature_group_count=4),
      ValueError,
      r"feature_group_count: expected a divisor of .*got 4",
    ),
    (dict(feature_group_count=0), ValueError, r"feature_group_count: .*got 0"),
    (dict(strides=0), ValueError, r"strides: expected .*>= 1, got 0"),
    (dict(strides=(1, -2)), ValueError, r"strides: expected .*got \(1, -2\)"),
    (dict(strides=(1, 1, 1)), TypeError, r"strides: expected .*2 ints, got \(1, 1, 1\)"),
    (dict(input_dilation=0, padding=1), ValueError, r"input_dilation: expected .*got 0"),
    (dict(kernel_dilation=(2, -1)), ValueError, r"kernel_dilation: expected .*got \(2, -1\)"),
    (dict(padding="FULL"), ValueError, r"padding: expected one of .*got 'FULL'"),
    (dict(padding="CAUSAL"), ValueError, r"padding: 'CAUSAL' is only defined for 1-D"),
    (dict(padding=((1, 1),)), ValueError, r"padding: expected 2 entries"),
    (dict(padding="SAME", input_dilation=2), ValueError, r"padding: input_dilation"),
    (dict(alpha=0.0), ValueError, r"alpha: expected .*got 0.0"),
    (dict(alpha=-3.0), ValueError, r"alpha: expected .*got -3.0"),
    (dict(alpha=float("inf")), ValueError, r"alpha: expected .*got inf"),
    (dict(implementation="gather", alpha=4.0), ValueError, r"implementation: .*alpha=4.0"),
    (dict(implementation="fft"), ValueError, r"implementation: expected .*got 'fft'"),
  ],
)
def test_conv_to_attention_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
  with pytest.raises(error, match=match):
    conv_to_attention(_K, **kwargs)


def test_conv_to_attention_rejects_bad_kernel_and_bias() -> None:
  with pytest.raises(ValueError, match=r"kernel: expected rank 3, 4 or 5.*got shape \(3, 4\)"):
    conv_to_attention(np.ones((3, 4), np.float32))
  with pytest.raises(TypeError, match=r"kernel: expected a floating-point dtype, got int32"):
    conv_to_attention(np.ones((3, 3, 1, 1), np.int32))
  with pytest.raises(ValueError, match=r"bias: expected shape \(6,\), got \(5,\)"):
    conv_to_attention(_K, np.zeros(5, np.float32))


def test_apply_rejects_mismatched_input() -> None:
  """Input rank or channels not matching the kernel: an error naming ``x`` and both values."""
  module, variables = conv_to_attention(_K)
  with pytest.raises(ValueError, match=r"x: expected 4 input features .*got shape \(1, 5, 5, 3\)"):
    module.apply(variables, jnp.ones((1, 5, 5, 3)))
  with pytest.raises(ValueError, match=r"x: expected rank"):
    module.apply(variables, jnp.ones((5, 4)))


@pytest.mark.parametrize("x_shape", [(1, 5, 4), (1, 5, 5, 5, 4)])
def test_apply_rejects_input_rank_not_matching_kernel(x_shape) -> None:
  module, variables = conv_to_attention(_K)
  with pytest.raises(ValueError, match=r"x: expected rank 4"):
    module.apply(variables, jnp.ones(x_shape))


def test_context_rejects_bad_arguments() -> None:
  for kwargs, match in [
    (dict(alpha=0.0), r"alpha: expected .*got 0.0"),
    (dict(alpha=-1.0), r"alpha: expected .*got -1.0"),
    (dict(implementation="gather", alpha=2.0), r"implementation: .*alpha=2.0"),
    (dict(implementation="fft"), r"implementation: expected .*got 'fft'"),
  ]:
    with pytest.raises(ValueError, match=match):
      with convolutions_as_attention(**kwargs):
        pass


def test_head_offsets_are_the_papers_shifts() -> None:
  """For odd K and 'SAME' the centres are the paper's shifts {-K//2..K//2}^2, row-major."""
  offsets = construction.conv_head_offsets((3, 3))
  expected = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
  np.testing.assert_array_equal(offsets, np.array(expected))
  np.testing.assert_array_equal(construction.conv_head_offsets((2,), 3), [[-1], [2]])


# ----------------------------------------------------------------------------------------------
# heavy sweep
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(cfg=conv_configs(max_channels=6))
def test_sweep_integer_exactness(cfg: ConvConfig, implementation: str) -> None:
  """As test_integer_data_is_bitwise_exact with wider channels (run with ATTNCONV_SLOW=1)."""
  test_integer_data_is_bitwise_exact.hypothesis.inner_test(cfg, implementation)
