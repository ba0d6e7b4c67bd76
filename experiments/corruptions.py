"""Deterministic image corruptions for robustness evaluation: noise, blur, translations.

Every transform takes a batch ``(B, H, W, C)`` of ``uint8`` images (pixel values 0-255, as the
datasets store them) or of floating-point images (e.g. normalised), and returns an array of the
same shape and dtype. Severity 0 is the identity (the input's values, copied).

* :func:`gaussian_noise`: additive ``N(0, std^2)`` noise, seeded. On ``uint8`` images ``std`` is
  in units of the full intensity range (the images as ``x / 255`` in [0, 1]; the result is
  clipped to [0, 1] and rounded back to 0-255); on floating images in the array's own units,
  without clipping.
* :func:`gaussian_blur`: separable Gaussian filter of standard deviation ``sigma`` pixels,
  truncated at ``ceil(3 sigma)`` and normalised to sum 1, with edge-replicating borders (a
  constant image stays constant; the mean of a constant image is preserved exactly up to
  rounding).
* :func:`translate`: integer shift by ``(dy, dx)`` pixels (positive: down / right), vacated
  pixels filled with ``fill`` (default 0: black for ``uint8`` images; for normalised images pass
  the normalised value of black, ``-mean / std``).

:func:`corrupt` applies one by name; :func:`corruption_suite` lists the named corruptions of a
config (``"<name>:<severity>"`` keys), translations in four directions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
  "CORRUPTIONS",
  "TRANSLATION_DIRECTIONS",
  "corrupt",
  "corruption_suite",
  "gaussian_blur",
  "gaussian_noise",
  "translate",
]

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "translate")
# Unit directions (dy, dx) of the translation suite: right, left, down, up.
TRANSLATION_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _check_images(images: np.ndarray) -> np.ndarray:
  if not isinstance(images, np.ndarray):
    raise TypeError(f"images: expected a numpy array (B, H, W, C), got {type(images).__name__}")
  if images.ndim != 4:
    raise ValueError(f"images: expected shape (B, H, W, C), got {images.shape}")
  if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
    raise TypeError(f"images: expected uint8 or floating dtype, got {images.dtype}")
  return images


def _check_severity(name: str, value: float) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
    raise TypeError(f"{name}: expected a finite number >= 0, got {value!r}")
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
  return float(value)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, std: float, *, seed: int = 0) -> np.ndarray:
  """``images`` plus ``N(0, std^2)`` noise drawn from ``np.random.default_rng(seed)``.

  Args:
    images: ``(B, H, W, C)`` ``uint8`` or floating.
    std: noise standard deviation ``>= 0``: for ``uint8``, of the [0, 1] intensity scale
      (``255 std`` pixel values; clipped and rounded); for floating images, in their units.
    seed: seed of the noise (the same seed gives the same noise).

  Returns:
    The noisy images, same shape and dtype.
  """
  images = _check_images(images)
  std = _check_severity("std", std)
  if std == 0.0:
    return images.copy()
  noise = np.random.default_rng(seed).standard_normal(images.shape)
  if images.dtype == np.uint8:
    return _to_uint8(images.astype(np.float64) + 255.0 * std * noise)
  return (images.astype(np.float64) + std * noise).astype(images.dtype)


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, math.ceil(3.0 * sigma))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of standard deviation ``sigma`` pixels (edge-replicated borders).

  Args:
    images: ``(B, H, W, C)`` ``uint8`` or floating.
    sigma: ``>= 0`` pixels (0: identity).

  Returns:
    The blurred images, same shape and dtype (``uint8``: rounded).
  """
  images = _check_images(images)
  sigma = _check_severity("sigma", sigma)
  if sigma == 0.0:
    return images.copy()
  k = _gaussian_kernel(sigma)
  r = k.shape[0] // 2
  x = images.astype(np.float64)
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    x = sum(k[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(k.shape[0]))
  return _to_uint8(x) if images.dtype == np.uint8 else x.astype(images.dtype)


def translate(images: np.ndarray, dy: int, dx: int, *, fill: float = 0) -> np.ndarray:
  """Shifts ``images`` by ``dy`` rows down and ``dx`` columns right, filling with ``fill``.

  ``out[:, i, j] = images[:, i - dy, j - dx]`` where that index is inside the image, else
  ``fill``.

  Args:
    images: ``(B, H, W, C)`` ``uint8`` or floating.
    dy, dx: integer shifts (any sign; ``|shift| >= size`` leaves only ``fill``).
    fill: the value of vacated pixels (0: black for ``uint8``).

  Returns:
    The shifted images, same shape and dtype.
  """
  images = _check_images(images)
  for name, v in (("dy", dy), ("dx", dx)):
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
      raise TypeError(f"{name}: expected an int, got {v!r}")
  out = np.full_like(images, fill)
  h, w = images.shape[1:3]
  dy, dx = int(dy), int(dx)
  if abs(dy) >= h or abs(dx) >= w:
    return out
  src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
  src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
  out[:, dst_y, dst_x] = images[:, src_y, src_x]
  return out


def corrupt(
  images: np.ndarray,
  name: str,
  severity: float,
  *,
  seed: int = 0,
  direction: tuple[int, int] = (0, 1),
  fill: float = 0,
) -> np.ndarray:
  """One corruption by ``name`` (:data:`CORRUPTIONS`) at ``severity``.

  ``gaussian_noise``: std (``seed``); ``gaussian_blur``: sigma; ``translate``: a shift of
  ``severity`` pixels (an integer) along the unit ``direction`` ``(dy, dx)``, vacated pixels
  ``fill``.
  """
  if name == "gaussian_noise":
    return gaussian_noise(images, severity, seed=seed)
  if name == "gaussian_blur":
    return gaussian_blur(images, severity)
  if name == "translate":
    pixels = _check_severity("severity", severity)
    if pixels != int(pixels):
      raise ValueError(f"severity: expected a whole number of pixels, got {severity!r}")
    if tuple(direction) not in TRANSLATION_DIRECTIONS:
      raise ValueError(f"direction: expected one of {TRANSLATION_DIRECTIONS}, got {direction!r}")
    dy, dx = direction
    return translate(images, int(dy * pixels), int(dx * pixels), fill=fill)
  raise ValueError(f"name: expected one of {CORRUPTIONS}, got {name!r}")


def corruption_suite(
  severities: dict[str, Sequence[float]],
) -> list[tuple[str, str, float, tuple[int, int]]]:
  """The corruptions of ``severities`` (``name -> severities``) as ``(key, name, severity,
  direction)``, key ``"<name>:<severity>"``; translations once per direction in
  :data:`TRANSLATION_DIRECTIONS` (the same key: results are averaged over directions)."""
  suite = []
  for name, values in severities.items():
    if name not in CORRUPTIONS:
      raise ValueError(f"severities: expected names from {CORRUPTIONS}, got {name!r}")
    for value in values:
      key = f"{name}:{value:g}"
      directions = TRANSLATION_DIRECTIONS if name == "translate" else ((0, 1),)
      suite.extend((key, name, float(value), d) for d in directions)
  return suite
