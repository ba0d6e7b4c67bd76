"""Gradient accumulation: the gradient of a batch computed as slices run in sequence.

Only jax is imported, so the benchmark child processes (which must run where ml_collections and
orbax are absent) share this function with :mod:`experiments.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def accumulated_value_and_grad(
  loss_fn: Callable,
  params: Any,
  carry: Any,
  batch: tuple,
  key: jax.Array,
  microbatches: int,
  unroll: bool = False,
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
  """``value_and_grad`` of a mean loss over ``microbatches`` equal slices of ``batch``, in sequence.

  ``loss_fn(params, carry, *batch_slice, key) -> (loss, (logits, carry))``. The slices run one
  after another under ``lax.scan`` (activation memory of one slice), each with its own key
  (``jax.random.split(key, microbatches)``); ``carry`` (e.g. BatchNorm statistics) is threaded
  through them. Returns the mean loss, the concatenated logits, the last carry and the mean
  gradient -- the full-batch gradient for a per-example mean loss, up to float rounding and the
  per-slice random draws (dropout masks shared by a slice, not by the whole batch).

  ``unroll=True`` unrolls the loop (straight-line slices). Use it for convolutional models on
  the CPU: XLA:CPU runs convolutions inside a loop body on a slow fallback kernel (ResNet18,
  float32, batch 32 as 4 slices: 1.6 img/s under ``lax.scan``, 42 unrolled, 37 as one batch).
  The price is memory: unrolled, XLA may keep every slice's activations alive (the paper's
  quadratic attention model, batch 100 as 4 x 25: 4.8 GiB of step buffers unrolled, 1.5 under
  ``lax.scan``), so attention models keep the loop.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, carry, *batch, key)
  n = batch[0].shape[0]
  if n % microbatches:
    raise ValueError(f"microbatches: expected a divisor of the batch size {n}, got {microbatches}")
  sliced = tuple(x.reshape(microbatches, n // microbatches, *x.shape[1:]) for x in batch)

  def body(acc, xs):
    grads, carry, loss = acc
    *parts, k = xs
    (part_loss, (logits, carry)), g = grad_fn(params, carry, *parts, k)
    return (jax.tree.map(jnp.add, grads, g), carry, loss + part_loss), logits

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = (zeros, carry, jnp.zeros((), jnp.float32))
  (grads, carry, loss), logits = jax.lax.scan(
    body, init, (*sliced, jax.random.split(key, microbatches)), unroll=bool(unroll)
  )
  grads = jax.tree.map(lambda g: g / microbatches, grads)
  logits = logits.reshape(n, *logits.shape[2:])
  return (loss / microbatches, (logits, carry)), grads
