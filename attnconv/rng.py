"""Bernoulli masks bit-for-bit equal to ``jax.random.bernoulli``, drawn in one fused pass.

JAX lowers its Threefry-2x32 hash for the CPU as a rolled loop of five passes over the whole
counter array (memory-bound), then converts the bits to floats in further passes: a dropout mask
of the paper model's hidden size (25 x 16 x 16 x 400 entries) takes ~25 ms on the 2-core EPYC,
~6 % of a training step. :func:`bernoulli` computes the same hash unrolled (20 rounds), which XLA
fuses with the comparison into one loop over registers, several times faster
(``tests/test_rng.py`` checks the bits are identical).

The hash and its counters follow JAX's "partitionable" Threefry scheme (the default,
``jax_threefry_partitionable=True``): entry ``i`` of the flattened shape hashes the 64-bit counter
``i`` (as two 32-bit words) under the key, and its 32 random bits are the xor of the two output
words. Anything else -- another key implementation, the non-partitionable scheme, a batch of
keys, a non-float32 probability, 2^32 entries or more -- falls back to ``jax.random.bernoulli``.
Threefry: Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(v: Array, r: int) -> Array:
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(key: tuple[Array, Array], x: tuple[Array, Array]) -> tuple[Array, Array]:
  """Threefry-2x32 with 20 rounds: the pair of words ``x`` hashed under ``key`` (uint32 scalars
  or arrays, broadcast), unrolled so that XLA fuses it into its consumers."""
  ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
  x0, x1 = x[0] + ks[0], x[1] + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _threefry_words(key: Array) -> Array | None:
  """The two uint32 key words of a single Threefry key, or None when the fast path does not
  reproduce ``jax.random`` for it."""
  if not jax.config.jax_threefry_partitionable:
    return None
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    return jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    return None
  if jax.config.jax_default_prng_impl != "threefry2x32":
    return None
  return key


def uniform_bits(key: Array, shape: Sequence[int]) -> Array | None:
  """``jax.random.bits(key, shape, uint32)`` computed in one fused pass (None where the fast
  path does not apply; see the module docstring)."""
  words = _threefry_words(key)
  shape = tuple(int(s) for s in shape)
  n = int(np.prod(shape))
  if words is None or n >= 2**32:
    return None
  counter = lax.iota(np.uint32, n).reshape(shape)  # low word; the high word is 0 below 2^32
  return _hash_counter(words, counter)


def _hash_counter(words: Array, counter: Array) -> Array:
  b0, b1 = threefry2x32((words[0], words[1]), (jnp.zeros_like(counter), counter))
  return b0 ^ b1


def _below(bits: Array, p) -> Array:
  one = np.array(1.0, np.float32).view(np.uint32)
  floats = lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - np.float32(1.0)
  return floats < lax.convert_element_type(p, jnp.float32)


def bernoulli(key: Array, p: float, shape: Sequence[int], *, materialize: bool = False) -> Array:
  """``jax.random.bernoulli(key, p, shape)``, bit for bit, as one fused pass on the CPU.

  Args:
    key: a single PRNG key (typed or raw ``uint32[2]``).
    p: probability of ``True`` (a float32 scalar or a Python float, as for flax's ``Dropout``).
    shape: output shape.
    materialize: compute the mask in a loop over the leading axis of ``shape``, so that XLA
      stores it (one byte per entry) instead of fusing the hash into its consumers. Use it when a
      consumer broadcasts another operand (e.g. attention probabilities without a batch axis, or
      a Kronecker product of per-axis factors): in such a fusion LLVM does not vectorise the
      hash, and the paper model's shared (9, 256, 256) attention mask fused with the outer
      product of its per-axis probabilities took 3.9 ms against 1.3 ms for the same select on a
      stored mask plus 0.6 ms to store it. The mask is also computed once when both the forward
      and the backward pass use it.

  Returns:
    bool array of ``shape``. As in ``jax.random.uniform``, the top 23 bits of each word give the
    mantissa of a float in ``[1, 2)``; the entry is ``float - 1 < p``.
  """
  if jnp.dtype(jax.dtypes.canonicalize_dtype(lax.dtype(p))) != jnp.dtype(jnp.float32):
    return jax.random.bernoulli(key, p, shape)
  shape = tuple(int(s) for s in shape)
  words = _threefry_words(key)
  if words is None or int(np.prod(shape)) >= 2**32:
    return jax.random.bernoulli(key, p, shape)
  if not materialize or len(shape) < 2 or shape[0] < 2:
    return _below(uniform_bits(key, shape), p)
  rows, row = shape[0], int(np.prod(shape[1:]))

  def body(i, out):  # row i hashes the counters [i * row, (i + 1) * row) of the flat shape
    counter = lax.iota(np.uint32, row) + i.astype(np.uint32) * np.uint32(row)
    keep = _below(_hash_counter(words, counter), p).reshape(shape[1:])
    return lax.dynamic_update_index_in_dim(out, keep, i, 0)

  return lax.fori_loop(0, rows, body, jnp.zeros(shape, jnp.bool_))
