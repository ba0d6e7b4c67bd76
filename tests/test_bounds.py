"""Tests of attnconv.bounds: the finite-alpha bound against the library, and the float32 threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import bounds, conv_to_attention
from proofs.reference_conv import reference_conv


@pytest.mark.parametrize(
  "conv",
  [
    dict(padding="SAME"),
    dict(padding="VALID", strides=2),
    dict(padding="CIRCULAR", feature_group_count=2),
    dict(padding=((1, 0), (2, 1)), kernel_dilation=2),
  ],
)
@pytest.mark.parametrize("alpha", [2.0, 6.0, 15.0])
def test_bound_holds_for_library_layer(conv, alpha):
  rng = np.random.default_rng(0)
  groups = conv.get("feature_group_count", 1)
  kernel = rng.normal(size=(3, 3, 4 // groups, 4))
  x = rng.uniform(-1.5, 1.5, size=(5, 6, 4))
  module, variables = conv_to_attention(jnp.asarray(kernel, jnp.float32), alpha=alpha, **conv)
  with jax.default_matmul_precision("highest"):
    y = np.asarray(module.apply(variables, jnp.asarray(x[None], jnp.float32)), np.float64)[0]
  ref = reference_conv(x.astype(object), kernel.astype(object), **conv).astype(np.float64)
  num_keys = module.apply(variables, jnp.asarray(x[None], jnp.float32), method=module.key_values)
  bound = bounds.softmax_emulation_error_bound(
    kernel, alpha, input_bound=1.5, num_keys=num_keys.shape[1], feature_group_count=groups
  )
  err = np.max(np.abs(y - ref))
  assert err <= bound + 1e-4, (err, bound)


def test_per_head_alpha_and_monotone():
  kernel = np.arange(1.0, 1 + 3 * 2 * 2).reshape(3, 2, 2)
  kw = dict(input_bound=1.0, num_keys=10)
  scalar = bounds.softmax_emulation_error_bound(kernel, 5.0, **kw)
  assert scalar == pytest.approx(bounds.softmax_emulation_error_bound(kernel, [5.0] * 3, **kw))
  assert bounds.softmax_emulation_error_bound(kernel, [5.0, 9.0, 5.0], **kw) < scalar
  assert bounds.softmax_emulation_error_bound(kernel, 6.0, **kw) < scalar
  assert bounds.softmax_emulation_error_bound(kernel, 5.0, input_bound=1.0, num_keys=1) == 0.0


@given(
  tol=st.floats(1e-8, 10.0),
  b=st.floats(0.01, 10.0),
  m=st.integers(1, 10_000),
  seed=st.integers(0, 100),
)
def test_alpha_for_tolerance_is_smallest(tol, b, m, seed):
  kernel = np.random.default_rng(seed).normal(size=(3, 3, 2, 3))
  kw = dict(input_bound=b, num_keys=m)
  alpha = bounds.alpha_for_tolerance(kernel, tol, **kw)
  assert alpha >= bounds.MIN_ALPHA
  assert bounds.softmax_emulation_error_bound(kernel, alpha, **kw) <= tol
  if alpha > bounds.MIN_ALPHA:
    assert bounds.softmax_emulation_error_bound(kernel, alpha * (1 - 1e-6), **kw) > tol


@pytest.mark.parametrize(
  "call, exc",
  [
    (
      lambda: bounds.softmax_emulation_error_bound(np.ones((3, 1)), 1.0, input_bound=1, num_keys=2),
      ValueError,
    ),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 1)), 0.0, input_bound=1, num_keys=2
      ),
      ValueError,
    ),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 1)), [1.0, 2.0], input_bound=1, num_keys=2
      ),
      ValueError,
    ),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 1)), 1.0, input_bound=-1, num_keys=2
      ),
      ValueError,
    ),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 1)), 1.0, input_bound=1, num_keys=0
      ),
      ValueError,
    ),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 1)), 1.0, input_bound=1, num_keys=2.5
      ),
      TypeError,
    ),
    (lambda: bounds.softmax_emulation_error_bound("k", 1.0, input_bound=1, num_keys=2), TypeError),
    (
      lambda: bounds.softmax_emulation_error_bound(
        np.ones((3, 1, 3)), 1.0, input_bound=1, num_keys=2, feature_group_count=2
      ),
      ValueError,
    ),
    (
      lambda: bounds.alpha_for_tolerance(np.ones((3, 1, 1)), 0.0, input_bound=1, num_keys=2),
      ValueError,
    ),
    (lambda: bounds.float32_one_hot_alpha(0), ValueError),
    (lambda: bounds.float32_one_hot_alpha(1.5), TypeError),
  ],
)
def test_validation(call, exc):
  with pytest.raises(exc):
    call()


def _is_one_hot(alpha: np.float32) -> bool:
  dist2 = np.array([0, 1, 1, 2, 4, 5, 8], np.float32)
  p = np.asarray(jax.jit(jax.nn.softmax)(-jnp.float32(alpha) * jnp.asarray(dist2)))
  return bool(p[0] == 1.0 and np.all(p[1:] == 0.0))


def test_float32_threshold_against_jax_by_bisection():
  """Bisection over float32 bit patterns finds exactly the threshold decided by reasoning."""
  lo = int(np.array(np.float32(40.0)).view(np.int32))  # not one-hot
  hi = int(np.array(np.float32(120.0)).view(np.int32))  # one-hot
  assert not _is_one_hot(np.array(lo, np.int32).view(np.float32))
  assert _is_one_hot(np.array(hi, np.int32).view(np.float32))
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if _is_one_hot(np.array(mid, np.int32).view(np.float32)):
      hi = mid
    else:
      lo = mid
  found = float(np.array(hi, np.int32).view(np.float32))
  assert found == bounds.float32_one_hot_alpha().alpha_float == 87.3365478515625


def test_gradual_underflow_threshold_against_numpy_exp():
  """numpy's float32 exp keeps subnormals: its underflow point is the 150 ln 2 threshold."""
  r = bounds.float32_one_hot_alpha(flush_subnormals=False)
  a = np.float32(r.alpha_float)
  below = np.nextafter(a, np.float32(0))
  with np.errstate(under="ignore"):
    assert np.exp(-a) == 0.0
    assert np.exp(-below) > 0.0


def test_paper_alpha_46_is_not_one_hot_but_target_is_one():
  dist2 = np.array([0, 1, 1, 1, 1, 2, 2, 2, 2], np.float32)
  p = np.asarray(jax.nn.softmax(-jnp.float32(46.0) * jnp.asarray(dist2)))
  assert p[0] == 1.0 and p[1] > 0.0
  assert bounds.float32_one_hot_alpha().alpha_float > 46
