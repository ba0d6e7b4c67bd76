"""attnconv.matmul: the bfloat16 CPU product path equals its definition, and float32 is untouched."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import matmul as mm

BF16 = jnp.bfloat16
EPS_BF16 = float(jnp.finfo(BF16).eps)  # 2^-7
EPS_F32 = float(jnp.finfo(jnp.float32).eps)

shapes = st.tuples(
  st.lists(st.integers(1, 5), min_size=1, max_size=3),  # leading axes of a
  st.integers(1, 40),  # k
  st.integers(1, 40),  # n
)


def _operands(lead, k, n, seed, dtype):
  ka, kb, kg = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, (*lead, k)).astype(dtype)
  b = jax.random.normal(kb, (k, n)).astype(dtype)
  g = jax.random.normal(kg, (*lead, n)).astype(dtype)
  return a, b, g


def _vjp(f, a, b, g):
  y, pullback = jax.vjp(f, a, b)
  return (y, *pullback(g))


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_float32_is_plain_matmul_bitwise(shape, seed):
  """Float32 operands take ``jnp.matmul``: value and both gradients bitwise equal."""
  lead, k, n = shape
  a, b, g = _operands(lead, k, n, seed, jnp.float32)
  got = jax.jit(lambda a, b, g: _vjp(mm.matmul, a, b, g))(a, b, g)
  want = jax.jit(lambda a, b, g: _vjp(jnp.matmul, a, b, g))(a, b, g)
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_bfloat16_forward_and_gradients_match_their_definition(shape, seed):
  """bfloat16: ``y = round(a @ b)``, ``da = round(g @ b^T)``, ``db = round(a^T @ g)``, each
  accumulated in float32. Against those products written out with jnp.dot: the forward is the
  same program (bitwise); the gradients may use another kernel (another float32 summation order)
  before the one rounding, so they agree within one bfloat16 ulp."""
  lead, k, n = shape
  a, b, g = _operands(lead, k, n, seed, BF16)
  y, da, db = jax.jit(lambda a, b, g: _vjp(mm.matmul, a, b, g))(a, b, g)
  f32 = jnp.float32
  a2 = a.reshape(-1, k)
  g2 = g.reshape(-1, n)
  want_y = jnp.dot(a2, b, preferred_element_type=f32).astype(BF16).reshape(*lead, n)
  want_da = jnp.dot(g2, b.T, preferred_element_type=f32).astype(BF16).reshape(*lead, k)
  want_db = jnp.dot(a2.T, g2, preferred_element_type=f32).astype(BF16)
  chex.assert_trees_all_equal_dtypes((y, da, db), (want_y, want_da, want_db))
  np.testing.assert_array_equal(y, want_y)
  for got, want in ((da, want_da), (db, want_db)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ulp = EPS_BF16 * np.maximum(np.abs(got), np.abs(want))
    assert np.all(np.abs(got - want) <= ulp + 1e-30)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_bfloat16_close_to_exact_products(shape, seed):
  """Against float64 products of the same bfloat16 inputs: one rounding of the result
  (``eps_bf16 / 2 |y|``) plus float32 accumulation (``k eps_f32 sum |a| |b|``); for the
  gradients the cotangent is a bfloat16 input too, so the same bound holds."""
  lead, k, n = shape
  a, b, g = _operands(lead, k, n, seed, BF16)
  y, da, db = jax.jit(lambda a, b, g: _vjp(mm.matmul, a, b, g))(a, b, g)
  a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
  a2, g2 = a64.reshape(-1, k), g64.reshape(-1, n)
  cases = (
    (y, a2 @ b64, np.abs(a2) @ np.abs(b64), k),
    (da, g2 @ b64.T, np.abs(g2) @ np.abs(b64.T), n),
    (db, a2.T @ g2, np.abs(a2.T) @ np.abs(g2), a2.shape[0]),
  )
  for got, exact, mag, terms in cases:
    got = np.asarray(got, np.float64).reshape(exact.shape)
    bound = 0.5 * EPS_BF16 * np.abs(exact) + (terms + 1) * EPS_F32 * mag
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-6) + 1e-30)


def test_out_dtype_float32_keeps_the_accumulator():
  a, b, g = _operands([6], 33, 5, 0, BF16)
  y = mm.matmul(a, b, out_dtype=jnp.float32)
  chex.assert_type(y, jnp.float32)
  np.testing.assert_array_equal(y, jnp.dot(a, b, preferred_element_type=jnp.float32))
  da, db = jax.grad(lambda a, b: jnp.sum(mm.matmul(a, b, out_dtype=jnp.float32) * g), (0, 1))(a, b)
  chex.assert_type((da, db), BF16)


def test_physical_transpose_is_the_transpose():
  x = jnp.arange(35, dtype=BF16).reshape(5, 7)
  np.testing.assert_array_equal(jax.jit(mm.physical_transpose)(x), x.T)


def test_shape_error_names_b():
  with pytest.raises(ValueError, match="b: expected 4 rows"):
    mm.matmul(jnp.ones((3, 4), BF16), jnp.ones((5, 2), BF16))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_dense_with_dot_general(dtype):
  """``nn.Dense(dot_general=mm.dot_general)``: bitwise the default Dense in float32; in bfloat16
  one rounding of the float32-accumulated product (plus the bias add)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 24))
  plain = nn.Dense(16, dtype=dtype)
  fast = nn.Dense(16, dtype=dtype, dot_general=mm.dot_general)
  variables = plain.init(jax.random.key(1), x)
  y_plain = plain.apply(variables, x)
  y_fast = fast.apply(variables, x)
  g_plain = jax.grad(lambda v: jnp.sum(plain.apply(v, x).astype(jnp.float32) ** 2))(variables)
  g_fast = jax.grad(lambda v: jnp.sum(fast.apply(v, x).astype(jnp.float32) ** 2))(variables)
  if dtype == jnp.float32:
    chex.assert_trees_all_equal((y_fast, g_fast), (y_plain, g_plain))
  else:
    chex.assert_type(y_fast, BF16)
    kernel = variables["params"]["kernel"].astype(BF16)
    bias = variables["params"]["bias"].astype(BF16)
    want = jnp.dot(x.astype(BF16), kernel, preferred_element_type=jnp.float32).astype(BF16) + bias
    np.testing.assert_array_equal(y_fast, want)
    # gradients: both bfloat16 computations of the same float32 quantity
    chex.assert_trees_all_close(g_fast, g_plain, rtol=4 * EPS_BF16, atol=4 * EPS_BF16)


def test_non_matrix_products_fall_back_to_dot_general():
  """Batch axes or a non-matrix right operand go to ``lax.dot_general`` unchanged."""
  a = jax.random.normal(jax.random.key(0), (3, 4, 5)).astype(BF16)
  b = jax.random.normal(jax.random.key(1), (3, 5, 2)).astype(BF16)
  dims = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(mm.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
