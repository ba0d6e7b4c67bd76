"""Where keys and queries sit: padding resolution, the key grid and the strided query grid.

A grid is described per axis by the 1-D integer coordinates of its points; the grid is their
Cartesian product, flattened in row-major order. Input pixel ``i`` (per axis) sits at coordinate
``i * input_dilation``; the key grid is the (dilated) input padded by ``(low, high)`` per axis, so
key index ``j`` sits at coordinate ``j - low``; the query of output ``o`` sits at the centre of
the window of keys it reads, ``o * stride - low + (window - 1) // 2``. The relative shift of key
``k`` seen from query ``q`` is ``delta = k - q`` (Cordonnier et al., 2020, Sec. 2.3), the same
for every input size, so a convolution's kernel offset ``kappa`` is the fixed shift
``kappa * kernel_dilation - (window - 1) // 2`` (Theorem 1's construction).

Shared by :class:`attnconv.layers.MultiHeadRelativeAttention` and :mod:`attnconv.construction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Positions = tuple[np.ndarray, ...]
Padding = tuple[tuple[int, int], ...]

PADDING_MODES = ("zeros", "circular", "reflect")
# The string paddings of flax.linen.Conv (conv_padding maps them to pairs and a mode).
CONV_PADDINGS = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


def as_tuple(name: str, value: Any, d: int, *, minimum: int = 1) -> tuple[int, ...]:
  """``value`` (an int, or ``d`` ints) as a ``d``-tuple of ints ``>= minimum``.

  Raises:
    TypeError: naming ``name`` if ``value`` is not an int or a sequence of ``d`` ints.
    ValueError: naming ``name`` if an entry is below ``minimum``.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}: expected an int or a sequence of {d} ints, got {value!r}")
  if isinstance(value, (int, np.integer)):
    out = (int(value),) * d
  else:
    try:
      out = tuple(value)
    except TypeError:
      raise TypeError(f"{name}: expected an int or a sequence of {d} ints, got {value!r}") from None
    if len(out) != d or any(
      isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in out
    ):
      raise TypeError(f"{name}: expected an int or a sequence of {d} ints, got {value!r}")
    out = tuple(int(v) for v in out)
  if any(v < minimum for v in out):
    raise ValueError(f"{name}: expected integers >= {minimum}, got {value!r}")
  return out


def grid_positions(
  shape: Sequence[int], *, start: Sequence[int] | int = 0, step: Sequence[int] | int = 1
) -> Positions:
  """Per-axis coordinates ``start_a + step_a * arange(shape_a)`` of a regular grid.

  Args:
    shape: number of points per axis, ``d`` in {1, 2, 3} axes.
    start: coordinate of the first point (an int or one per axis).
    step: spacing (an int or one per axis).

  Returns:
    ``d`` static int32 numpy arrays, the a-th of shape ``(shape[a],)``.
  """
  shape = tuple(int(s) for s in shape)
  d = len(shape)
  if d not in (1, 2, 3) or any(s < 1 for s in shape):
    raise ValueError(f"shape: expected 1 to 3 positive sizes, got {shape}")
  start = as_tuple("start", start, d, minimum=-(2**31))
  step = as_tuple("step", step, d, minimum=-(2**31))
  return tuple((s0 + st * np.arange(n)).astype(np.int32) for n, s0, st in zip(shape, start, step))


def resolve_padding(
  padding: str | Sequence[tuple[int, int]] | None,
  spatial_shape: Sequence[int],
  *,
  strides: Sequence[int],
  input_dilation: Sequence[int],
  window: Sequence[int],
) -> Padding:
  """``(low, high)`` per axis for ``padding`` None (no padding), ``'VALID'``, ``'SAME'``,
  ``'SAME_LOWER'`` (as ``jax.lax.padtype_to_pads`` for the dilated input and a ``window``-wide
  kernel: ``ceil(n / stride)`` outputs, the odd pixel high or low) or explicit pairs."""
  d = len(spatial_shape)
  if padding is None or padding == "VALID":
    return ((0, 0),) * d
  if isinstance(padding, str):
    if padding not in ("SAME", "SAME_LOWER"):
      raise ValueError(
        f"padding: expected 'SAME', 'SAME_LOWER', 'VALID' or (low, high) pairs, got {padding!r}"
      )
    pads = []
    for n, dil, s, w in zip(spatial_shape, input_dilation, strides, window):
      length = (n - 1) * dil + 1
      total = max((-(-length // s) - 1) * s + w - length, 0)
      low = total // 2 if padding == "SAME" else total - total // 2
      pads.append((low, total - low))
    return tuple(pads)
  pairs = tuple(padding)
  if len(pairs) != d or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
    raise ValueError(f"padding: expected {d} (low, high) pairs, got {padding!r}")
  return tuple((int(lo), int(hi)) for lo, hi in pairs)


def conv_padding(
  padding: str | int | Sequence[int | tuple[int, int]],
  window: Sequence[int],
  input_dilation: Sequence[int],
) -> tuple[str | Padding, str]:
  """``flax.linen.Conv``'s ``padding`` as the attention layer's ``(padding, padding_mode)``.

  'SAME', 'SAME_LOWER' and 'VALID' stay strings (resolved per input size by
  :func:`resolve_padding`); 'CAUSAL' (1-D) pads ``window - 1`` low; 'CIRCULAR' and 'REFLECT' pad
  ``((window - 1) // 2, window // 2)`` with wrapped or mirrored keys; an int or per-axis ints /
  pairs are explicit zero padding. ``window`` is the dilated kernel extent per axis.
  """
  d = len(window)
  if isinstance(padding, str):
    if padding not in CONV_PADDINGS:
      raise ValueError(
        f"padding: expected one of {CONV_PADDINGS} or explicit pairs, got {padding!r}"
      )
    if any(v != 1 for v in input_dilation):
      # flax.linen.Conv passes a string padding to lax, which rejects it with input dilation.
      raise ValueError(
        f"padding: input_dilation {tuple(input_dilation)} needs explicit (low, high) padding (as "
        f"in jax.lax.conv_general_dilated), got {padding!r}"
      )
    if padding in ("SAME", "SAME_LOWER", "VALID"):
      return padding, "zeros"
    if padding == "CAUSAL":
      if d != 1:
        raise ValueError(f"padding: 'CAUSAL' is only defined for 1-D convolutions, got {d}-D")
      return ((window[0] - 1, 0),), "zeros"
    pads = tuple(((w - 1) // 2, w // 2) for w in window)
    return pads, {"CIRCULAR": "circular", "REFLECT": "reflect"}[padding]
  if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
    return ((int(padding), int(padding)),) * d, "zeros"
  try:
    items = list(padding)
  except TypeError:
    raise TypeError(
      f"padding: expected a string, an int or {d} (low, high) pairs, got {padding!r}"
    ) from None
  if len(items) != d:
    raise ValueError(f"padding: expected {d} entries (one per spatial axis), got {padding!r}")
  pads = []
  for p in items:
    if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
      pads.append((int(p), int(p)))
    elif (
      isinstance(p, (tuple, list))
      and len(p) == 2
      and all(isinstance(v, (int, np.integer)) for v in p)
    ):
      pads.append((int(p[0]), int(p[1])))
    else:
      raise TypeError(f"padding: expected ints or (low, high) pairs of ints, got {padding!r}")
  return tuple(pads), "zeros"


def key_positions(
  spatial_shape: Sequence[int], padding: Padding, *, input_dilation: Sequence[int]
) -> Positions:
  """Per-axis coordinates of the key grid of an input grid (static; see the module docstring)."""
  out = []
  for a, (n, (lo, hi), dil) in enumerate(zip(spatial_shape, padding, input_dilation)):
    size = (n - 1) * dil + 1 + lo + hi
    if size < 1:
      raise ValueError(f"padding: the key grid would be empty on axis {a}, got {padding}")
    out.append((np.arange(size) - lo).astype(np.int32))
  return tuple(out)


def key_grid(
  x: Array,
  padding: Padding,
  *,
  mode: str = "zeros",
  input_dilation: Sequence[int] | int = 1,
) -> tuple[Array, Positions]:
  """The key/value grid built from the input, with its per-axis coordinates.

  Args:
    x: ``(B, *spatial, C)`` channels-last input, 1 to 3 spatial axes.
    padding: ``(low, high)`` per spatial axis (negative values crop).
    mode: ``'zeros'`` (zero-padded keys), ``'circular'`` (keys on a torus) or ``'reflect'``
      (mirrored keys; the border pixel is not repeated). Circular and reflect need
      ``input_dilation == 1`` and non-negative padding.
    input_dilation: zeros interleaved between input pixels (transposed-convolution style).

  Returns:
    ``(keys (B, *key_shape, C), key_positions)``.
  """
  d = x.ndim - 2
  if d not in (1, 2, 3):
    raise ValueError(f"x: expected rank 3 to 5 (batch, 1-3 spatial axes, channels), got {x.shape}")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(padding) != d:
    raise ValueError(f"padding: expected {d} (low, high) pairs, got {padding}")
  dil = as_tuple("input_dilation", input_dilation, d)
  if mode not in PADDING_MODES:
    raise ValueError(f"mode: expected one of {PADDING_MODES}, got {mode!r}")
  positions = key_positions(x.shape[1:-1], padding, input_dilation=dil)
  if mode == "zeros":
    config = [(0, 0, 0), *((lo, hi, v - 1) for (lo, hi), v in zip(padding, dil)), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config), positions
  if any(v != 1 for v in dil):
    raise ValueError(f"input_dilation: expected 1 with {mode!r} padding, got {dil}")
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise ValueError(f"padding: expected non-negative pairs with {mode!r} padding, got {padding}")
  np_mode = {"circular": "wrap", "reflect": "reflect"}[mode]
  return jnp.pad(x, [(0, 0), *padding, (0, 0)], mode=np_mode), positions


def query_grid(
  key_shape: Sequence[int], padding: Padding, *, strides: Sequence[int], window: Sequence[int]
) -> Positions:
  """Per-axis query coordinates: one query per output position of a convolution.

  Output ``o`` reads keys ``o * stride ... o * stride + window - 1``; its query sits at the
  centre of that window, coordinate ``o * stride - low + (window - 1) // 2``, and there are
  ``(Nk_a - window_a) // stride_a + 1`` queries per axis. With ``window = stride = 1`` and no
  padding the queries are the input positions.
  """
  out = []
  for a, (nk, (lo, _), s, w) in enumerate(zip(key_shape, padding, strides, window)):
    n = (nk - w) // s + 1
    if n < 1:
      raise ValueError(
        f"window: expected at most {nk} keys on axis {a} (key grid {tuple(key_shape)}), got {w}"
      )
    out.append((np.arange(n) * s - lo + (w - 1) // 2).astype(np.int32))
  return tuple(out)
