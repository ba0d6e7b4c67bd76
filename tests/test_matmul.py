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
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
F32_EPS = float(jnp.finfo(jnp.float32).eps)
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


# ----------------------------------------------------------------------------------------------
# Batched products (attention's per-image products) and DenseGeneral kernels
# ----------------------------------------------------------------------------------------------

batched_shapes = st.tuples(
  st.lists(st.integers(1, 4), min_size=1, max_size=2),  # batch axes G...
  st.integers(1, 24),  # m
  st.integers(1, 24),  # k
  st.integers(1, 24),  # n
  st.booleans(),  # transpose_b
)


def _batched(lead, m, k, n, transpose_b, seed, dtype):
  ka, kb, kg = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, (*lead, m, k)).astype(dtype)
  b_shape = (*lead, n, k) if transpose_b else (*lead, k, n)
  b = jax.random.normal(kb, b_shape).astype(dtype)
  g = jax.random.normal(kg, (*lead, m, n)).astype(dtype)
  return a, b, g


@given(shape=batched_shapes, seed=st.integers(0, 2**16))
def test_bmm_float32_is_plain_matmul_bitwise(shape, seed):
  """Float32 ``bmm`` is ``jnp.matmul`` (with ``swapaxes`` for ``transpose_b``): bitwise."""
  *dims, transpose_b = shape
  a, b, g = _batched(*dims, transpose_b, seed, jnp.float32)
  f = lambda a, b: mm.bmm(a, b, transpose_b=transpose_b)  # noqa: E731
  ref = lambda a, b: jnp.matmul(a, jnp.swapaxes(b, -1, -2) if transpose_b else b)  # noqa: E731
  got, want = jax.jit(lambda a, b, g: (_vjp(f, a, b, g), _vjp(ref, a, b, g)))(a, b, g)
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@given(shape=batched_shapes, seed=st.integers(0, 2**16))
def test_bmm_bfloat16_close_to_exact_products(shape, seed):
  """bfloat16 ``bmm``: value and both gradients against float64 products of the same bfloat16
  inputs, within one rounding of the result plus float32 accumulation (as for matmul)."""
  *dims, transpose_b = shape
  lead, m, k, n = dims
  a, b, g = _batched(*dims, transpose_b, seed, BF16)
  f = lambda a, b: mm.bmm(a, b, transpose_b=transpose_b)  # noqa: E731
  y, da, db = jax.jit(lambda a, b, g: _vjp(f, a, b, g))(a, b, g)
  chex.assert_trees_all_equal_dtypes((y, da, db), (a, a, b))
  a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
  bn = np.swapaxes(b64, -1, -2) if transpose_b else b64  # (..., k, n)
  t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
  db_exact = t(a64) @ g64  # (..., k, n)
  db_mag = t(np.abs(a64)) @ np.abs(g64)
  if transpose_b:
    db_exact, db_mag = t(db_exact), t(db_mag)
  cases = (
    (y, a64 @ bn, np.abs(a64) @ np.abs(bn), k),
    (da, g64 @ t(bn), np.abs(g64) @ np.abs(t(bn)), n),
    (db, db_exact, db_mag, m),
  )
  for got, exact, mag, terms in cases:
    got = np.asarray(got, np.float64)
    bound = 0.5 * EPS_BF16 * np.abs(exact) + (terms + 1) * EPS_F32 * mag
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-6) + 1e-30)


def test_bmm_out_dtype_and_errors():
  a, b, _ = _batched([2], 3, 5, 4, False, 0, BF16)
  chex.assert_type(mm.bmm(a, b, out_dtype=jnp.float32), jnp.float32)
  np.testing.assert_array_equal(
    mm.bmm(a, b, out_dtype=jnp.float32),
    jnp.matmul(a, b, preferred_element_type=jnp.float32),
  )
  with pytest.raises(ValueError, match="b: expected the batch axes"):
    mm.bmm(a[0], b[0])
  with pytest.raises(ValueError, match="b: expected the batch axes"):
    mm.bmm(a, jnp.concatenate([b, b]))
  with pytest.raises(ValueError, match="b: expected 5 entries on axis 1"):
    mm.bmm(a, b[:, :4])
  with pytest.raises(ValueError, match="b: expected 5 entries on axis 2"):
    mm.bmm(a, b, transpose_b=True)


@pytest.mark.parametrize("k_first", [3, 12])
def test_left_transpose_product_both_schedules(k_first):
  """``a^T g`` by transposing ``a`` (K <= N) or ``g`` (K > N): equal to the float64 product."""
  a = jax.random.normal(jax.random.key(0), (2, 7, k_first)).astype(BF16)
  g = jax.random.normal(jax.random.key(1), (2, 7, 6)).astype(BF16)
  got = jax.jit(mm._left_transpose_product)(a, g)
  chex.assert_shape(got, (2, k_first, 6))
  want = np.swapaxes(np.asarray(a, np.float64), -1, -2) @ np.asarray(g, np.float64)
  mag = np.swapaxes(np.abs(np.asarray(a, np.float64)), -1, -2) @ np.abs(np.asarray(g, np.float64))
  assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 8 * EPS_F32 * mag + 1e-30)


def test_physical_swap_and_row_major():
  x = jnp.arange(2 * 5 * 7, dtype=BF16).reshape(2, 5, 7)
  np.testing.assert_array_equal(jax.jit(mm.physical_swap)(x), jnp.swapaxes(x, 1, 2))
  for dtype in (BF16, jnp.float32):
    y = jax.jit(lambda x: mm.row_major(x, (1, 0, 2)))(x.astype(dtype))
    np.testing.assert_array_equal(y, jnp.transpose(x.astype(dtype), (1, 0, 2)))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_dense_general_with_dot_general(dtype):
  """``nn.DenseGeneral((H, D_h), dot_general=mm.dot_general)``: the kernel ``(D_in, H, D_h)``
  used as a matrix; bitwise the default in float32, one rounding of the float32-accumulated
  product in bfloat16."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  plain = nn.DenseGeneral((3, 4), dtype=dtype)
  fast = nn.DenseGeneral((3, 4), dtype=dtype, dot_general=mm.dot_general)
  variables = plain.init(jax.random.key(1), x)
  y_fast = fast.apply(variables, x)
  y_plain = plain.apply(variables, x)
  chex.assert_shape(y_fast, (2, 5, 3, 4))
  if dtype == jnp.float32:
    np.testing.assert_array_equal(y_fast, y_plain)
  else:
    kernel = variables["params"]["kernel"].astype(BF16).reshape(12, 12)
    bias = variables["params"]["bias"].astype(BF16)
    want = jnp.dot(x.astype(BF16), kernel, preferred_element_type=jnp.float32).astype(BF16)
    np.testing.assert_array_equal(y_fast, want.reshape(2, 5, 3, 4) + bias)


# ----------------------------------------------------------------------------------------------
# Bias add (float32-summed bias gradient) and DenseHeads
# ----------------------------------------------------------------------------------------------


@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_add_bias_values_and_gradients(lead_rank, m, bias_rank, seed):
  """``add_bias`` is ``y + bias``; float32 gradients are autodiff's bitwise, bfloat16 bias
  gradients are the float32 sum of the cotangent rounded once: within ``eps_bf16 / 2`` of the
  exact sum plus ``M eps_f32 sum|g|`` for the float32 accumulation."""
  rng = np.random.default_rng(seed)
  lead = (m, *([2] * (lead_rank - 1)))
  bias_shape = (3, 4)[2 - bias_rank :]
  y = rng.normal(size=(*lead, *bias_shape)).astype(np.float32)
  b = rng.normal(size=bias_shape).astype(np.float32)
  g = rng.normal(size=y.shape).astype(np.float32)
  for dtype in (jnp.float32, BF16):
    yy, bb, gg = (jnp.asarray(a, dtype) for a in (y, b, g))
    out, vjp = jax.vjp(mm.add_bias, yy, bb)
    np.testing.assert_array_equal(out, yy + bb)
    dy, db = vjp(gg)
    np.testing.assert_array_equal(dy, gg)
    chex.assert_trees_all_equal_dtypes((dy, db), (yy, bb))
    axes = tuple(range(len(lead)))
    if dtype == jnp.float32:
      _, plain_vjp = jax.vjp(lambda a, c: a + c, yy, bb)
      np.testing.assert_array_equal(db, plain_vjp(gg)[1])
    else:
      g64 = np.asarray(gg.astype(jnp.float32), np.float64)
      exact = g64.sum(axis=axes)
      n = int(np.prod(lead))
      bound = BF16_EPS / 2 * np.abs(exact) + 2 * n * F32_EPS * np.abs(g64).sum(axis=axes)
      assert np.all(np.abs(np.asarray(db.astype(jnp.float32), np.float64) - exact) <= bound)


def test_add_bias_rejects_a_bias_that_is_not_trailing():
  with pytest.raises(ValueError, match=r"bias: expected the trailing shape of y \(3, 4\), got"):
    mm.add_bias(jnp.zeros((2, 3, 4)), jnp.zeros((4, 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_dense_heads_is_dense_general(dtype):
  """``DenseHeads`` initialises the same parameters as ``nn.DenseGeneral((H, D_h))`` (bitwise,
  non-zero bias init), computes the same output, and in float32 the same gradients."""
  from attnconv.layers import DenseHeads

  x = jax.random.normal(jax.random.key(0), (2, 5, 7))
  init = nn.initializers.normal(1.0)
  ref = nn.DenseGeneral((3, 4), dtype=dtype, dot_general=mm.dot_general, bias_init=init)
  heads = DenseHeads((3, 4), dtype=dtype, bias_init=init)
  variables = ref.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(heads.init(jax.random.key(1), x), variables)
  np.testing.assert_array_equal(heads.apply(variables, x), ref.apply(variables, x))
  if dtype == jnp.float32:
    grads = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (ref, heads)]
    chex.assert_trees_all_equal(*grads)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_is_flax_dense(dtype, use_bias):
  """``layers.Dense`` initialises the same parameters as ``nn.Dense`` (bitwise, non-zero bias
  init), computes the same output as ``nn.Dense(dot_general=mm.dot_general)``, and in float32
  the same gradients as plain ``nn.Dense``."""
  from attnconv.layers import Dense

  x = jax.random.normal(jax.random.key(0), (2, 5, 7))
  init = nn.initializers.normal(1.0)
  ref = nn.Dense(6, use_bias=use_bias, dtype=dtype, dot_general=mm.dot_general, bias_init=init)
  dense = Dense(6, use_bias=use_bias, dtype=dtype, bias_init=init)
  variables = nn.Dense(6, use_bias=use_bias, bias_init=init).init(jax.random.key(1), x)
  chex.assert_trees_all_equal(dense.init(jax.random.key(1), x), variables)
  np.testing.assert_array_equal(dense.apply(variables, x), ref.apply(variables, x))
  if dtype == jnp.float32:
    plain = nn.Dense(6, use_bias=use_bias, bias_init=init)
    grads = [
      jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (plain, dense)
    ]
    chex.assert_trees_all_equal(*grads)
