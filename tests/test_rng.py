"""``attnconv.rng``: Bernoulli masks bit for bit equal to ``jax.random``, and the Dropout layer
bit for bit equal to ``flax.linen.Dropout``."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnconv import rng
from attnconv.layers import Dropout

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
seeds = st.integers(0, 2**32 - 1)
probs = st.floats(0.0, 1.0, width=32)


def _key(seed: int, typed: bool):
  return jax.random.key(seed) if typed else jax.random.PRNGKey(seed)


@pytest.mark.parametrize(
  "key, counter, want",
  [  # Threefry-2x32 (20 rounds) known-answer vectors of the Random123 distribution
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  ],
)
def test_threefry_known_answers(key, counter, want):
  words = [jnp.uint32(v) for v in key], [jnp.asarray([v], jnp.uint32) for v in counter]
  got = rng.threefry2x32(*words)
  assert [int(w[0]) for w in got] == list(want)


@given(shapes, seeds, st.booleans())
def test_uniform_bits_equal_jax_random_bits(shape, seed, typed):
  key = _key(seed, typed)
  got = jax.jit(rng.uniform_bits, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(got, jax.random.bits(key, shape, jnp.uint32))


@given(shapes, seeds, probs, st.booleans())
def test_bernoulli_equals_jax_random_bernoulli(shape, seed, p, typed):
  key = _key(seed, typed)
  want = jax.random.bernoulli(key, p, shape)
  for got in (
    rng.bernoulli(key, p, shape),
    jax.jit(rng.bernoulli, static_argnums=2)(key, p, shape),
    rng.bernoulli(key, p, shape, materialize=True),
    jax.jit(functools.partial(rng.bernoulli, materialize=True), static_argnums=2)(key, p, shape),
  ):
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    np.testing.assert_array_equal(got, want)


def test_bernoulli_at_the_paper_shapes():
  """Hidden-dropout and shared attention-dropout masks of the paper model (batch 25)."""
  key = jax.random.fold_in(jax.random.key(42), 7)
  for shape in [(25, 16, 16, 400), (9, 256, 256), (8, 9, 256, 256)]:
    want = jax.random.bernoulli(key, 0.9, shape)
    np.testing.assert_array_equal(rng.bernoulli(key, 0.9, shape), want)
    np.testing.assert_array_equal(rng.bernoulli(key, 0.9, shape, materialize=True), want)


def test_materialized_mask_is_a_loop_the_consumer_cannot_fuse():
  """``materialize=True`` hashes inside a loop over rows (one stored mask); the default fuses."""
  key = jax.random.key(1)
  probs = jnp.ones((3, 4, 5), jnp.float32)

  def masked(materialize):
    keep = rng.bernoulli(key, 0.9, (2, 3, 4, 5), materialize=materialize)
    return jnp.where(keep, probs[None], 0.0)

  hlo = lambda m: jax.jit(masked, static_argnums=0).lower(m).compile().as_text()  # noqa: E731
  assert "while" in hlo(True) and "while" not in hlo(False)
  np.testing.assert_array_equal(masked(True), masked(False))


@pytest.mark.parametrize(
  "key",
  [jax.random.key(3, impl="rbg"), jax.random.key(3, impl="unsafe_rbg")],
  ids=["rbg", "unsafe_rbg"],
)
def test_bernoulli_falls_back_for_other_keys(key):
  assert rng.uniform_bits(key, (4, 5)) is None
  np.testing.assert_array_equal(
    rng.bernoulli(key, 0.7, (4, 5)), jax.random.bernoulli(key, 0.7, (4, 5))
  )


def test_bernoulli_rejects_a_batch_of_keys_as_jax_does():
  keys = jax.random.split(jax.random.key(3), 2)
  assert rng.uniform_bits(keys, (4, 5)) is None
  with pytest.raises(ValueError, match="accepts a single key"):
    rng.bernoulli(keys, 0.7, (4, 5))


def test_bernoulli_falls_back_without_partitionable_threefry():
  key = jax.random.key(5)
  with jax.threefry_partitionable(False):
    assert rng.uniform_bits(key, (6, 7)) is None
    np.testing.assert_array_equal(
      rng.bernoulli(key, 0.3, (6, 7)), jax.random.bernoulli(key, 0.3, (6, 7))
    )


def test_bernoulli_falls_back_for_a_float16_probability():
  key = jax.random.key(5)
  p = jnp.float16(0.3)
  np.testing.assert_array_equal(rng.bernoulli(key, p, (6, 7)), jax.random.bernoulli(key, p, (6, 7)))


def test_bernoulli_frequency():
  """A sanity check independent of JAX: the keep frequency of 10^6 draws is within 5 sigma."""
  p, n = 0.9, 10**6
  freq = float(jnp.mean(rng.bernoulli(jax.random.key(0), p, (n,))))
  assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)


class _Twice(nn.Module):
  """Two dropouts in one module: their keys come from the module path, as in a real model."""

  cls: type
  rate: float
  broadcast_dims: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.cls(self.rate, broadcast_dims=self.broadcast_dims)(x, deterministic=not train)
    return self.cls(self.rate, deterministic=not train)(x * 2.0)


@given(
  st.sampled_from([0.0, 0.1, 0.5, 0.999, 1.0]),
  st.sampled_from([(), (0,), (1, 2)]),
  st.booleans(),
  st.sampled_from([jnp.float32, jnp.bfloat16]),
  seeds,
)
def test_dropout_equals_flax_dropout(rate, broadcast_dims, train, dtype, seed):
  x = jax.random.normal(jax.random.key(1), (3, 4, 5)).astype(dtype)
  rngs = {"dropout": jax.random.key(seed)}
  outs = [
    _Twice(cls, rate, broadcast_dims).apply({}, x, train, rngs=rngs)
    for cls in (nn.Dropout, Dropout)
  ]
  chex.assert_trees_all_equal(*outs)


def test_dropout_with_an_explicit_rng_and_its_gradient():
  x = jax.random.normal(jax.random.key(1), (8, 16))
  key = jax.random.key(9)
  f = lambda cls, x: jnp.sum(jnp.sin(cls(0.3).apply({}, x, False, rng=key)))  # noqa: E731
  chex.assert_trees_all_equal(f(nn.Dropout, x), f(Dropout, x))
  chex.assert_trees_all_equal(jax.grad(f, 1)(nn.Dropout, x), jax.grad(f, 1)(Dropout, x))
