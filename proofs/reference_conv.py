"""A direct definition of ``flax.linen.Conv`` / ``lax.conv_general_dilated`` semantics.

Written from the definitions (not from :mod:`attnconv`), on numpy *object* arrays so that the same
code runs on Python integers (exact) and SymPy symbols (symbolic):

* input dilation ``l``: input pixel ``i`` sits at dilated index ``i * l``, zeros in between;
* padding ``(lo, hi)`` per axis: padded index ``p`` holds dilated index ``p - lo``; outside the
  dilated input the value is 0 (zero padding), ``x[(p - lo) mod n]`` (circular) or the mirror
  image without repeating the border pixel (reflect, period ``2(n - 1)``);
* output ``o`` (stride ``s``, kernel dilation ``r``):
  ``y[o, f] = b[f] + sum_kappa sum_{c in group(f)} xpad[o s + kappa r, c] W[kappa, c - g C_g, f]``
  with ``g = f // (C_out / G)`` and ``C_g = C_in / G``; ``floor((L - window) / s) + 1`` outputs
  per axis, ``L`` the padded length and ``window = (K - 1) r + 1``.

String paddings as flax resolves them: ``'SAME'`` (``lax``: ``out = ceil(n / s)``,
``total = max((out - 1) s + window - n, 0)``, ``lo = total // 2``), ``'SAME_LOWER'``
(``lo = total - total // 2``), ``'VALID'`` (none), ``'CIRCULAR'`` / ``'REFLECT'``
(``((window - 1) // 2, window // 2)``, wrapped / mirrored) and ``'CAUSAL'`` (1-D,
``(window - 1, 0)``). An int ``p`` means ``(p, p)`` on every axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np


def _tup(v: Any, d: int) -> tuple[int, ...]:
  return (int(v),) * d if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)


def resolve_padding(
  padding: Any, spatial: Sequence[int], kernel_size: Sequence[int], strides, kernel_dilation
) -> tuple[tuple[tuple[int, int], ...], str]:
  """Per-axis ``(lo, hi)`` and the mode ``'zeros' | 'circular' | 'reflect'``."""
  d = len(spatial)
  s, r = _tup(strides, d), _tup(kernel_dilation, d)
  window = [(k - 1) * ri + 1 for k, ri in zip(kernel_size, r)]
  if isinstance(padding, str):
    if padding in ("SAME", "SAME_LOWER"):
      pads = []
      for n, si, w in zip(spatial, s, window):
        out = -(-n // si)
        total = max((out - 1) * si + w - n, 0)
        lo = total // 2 if padding == "SAME" else total - total // 2
        pads.append((lo, total - lo))
      return tuple(pads), "zeros"
    if padding == "VALID":
      return ((0, 0),) * d, "zeros"
    if padding in ("CIRCULAR", "REFLECT"):
      return tuple(((w - 1) // 2, w // 2) for w in window), padding.lower()
    if padding == "CAUSAL":
      assert d == 1
      return ((window[0] - 1, 0),), "zeros"
    raise ValueError(padding)
  if isinstance(padding, (int, np.integer)):
    return ((int(padding), int(padding)),) * d, "zeros"
  pads = tuple((int(p), int(p)) if isinstance(p, (int, np.integer)) else tuple(p) for p in padding)
  return pads, "zeros"


def _source(p: int, lo: int, n: int, dil: int, mode: str) -> int | None:
  """Index of the input pixel at padded index ``p`` (None for a zero)."""
  j = p - lo
  if mode == "zeros":
    if j % dil or not 0 <= j // dil < n:
      return None
    return j // dil
  if mode == "circular":
    return j % n
  if n == 1:
    return 0
  m = j % (2 * (n - 1))
  return m if m < n else 2 * (n - 1) - m


def reference_conv(
  x: np.ndarray,
  kernel: np.ndarray,
  bias: np.ndarray | None = None,
  *,
  strides: Any = 1,
  padding: Any = "SAME",
  input_dilation: Any = 1,
  kernel_dilation: Any = 1,
  feature_group_count: int = 1,
) -> np.ndarray:
  """Convolution of one example ``x`` ``(*spatial, C_in)``; returns ``(*out_spatial, C_out)``."""
  d = x.ndim - 1
  spatial = x.shape[:d]
  kernel_size = kernel.shape[:d]
  cin_g, cout = kernel.shape[-2:]
  groups = feature_group_count
  assert cin_g * groups == x.shape[-1] and cout % groups == 0
  s, ld, r = _tup(strides, d), _tup(input_dilation, d), _tup(kernel_dilation, d)
  pads, mode = resolve_padding(padding, spatial, kernel_size, s, r)
  window = [(k - 1) * ri + 1 for k, ri in zip(kernel_size, r)]
  lengths = [(n - 1) * li + 1 + lo + hi for n, li, (lo, hi) in zip(spatial, ld, pads)]
  out_shape = [(length - w) // si + 1 for length, w, si in zip(lengths, window, s)]
  assert all(o >= 1 for o in out_shape), out_shape
  y = np.empty((*out_shape, cout), dtype=object)
  per_group = cout // groups
  for o in itertools.product(*[range(n) for n in out_shape]):
    for f in range(cout):
      g = f // per_group
      terms = [] if bias is None else [bias[f]]
      for kappa in itertools.product(*[range(k) for k in kernel_size]):
        src = []
        for a in range(d):
          p = o[a] * s[a] + kappa[a] * r[a]
          src.append(_source(p, pads[a][0], spatial[a], ld[a], mode))
        if any(v is None for v in src):
          continue
        for c in range(cin_g):
          terms.append(x[(*src, g * cin_g + c)] * kernel[(*kappa, c, f)])
      y[(*o, f)] = sum(terms[1:], terms[0]) if terms else 0
  return y
