"""Tests of experiments/corruptions.py: shapes and dtypes, identity at severity 0, exact pixel
moves, mean-preserving blur, the noise's standard deviation, determinism and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import corruptions as C


@st.composite
def image_batches(draw, dtype=None):
  """A small batch (B, H, W, C) of uint8 or float32 images from a drawn seed."""
  dtype = dtype or draw(st.sampled_from([np.uint8, np.float32]))
  shape = (
    draw(st.integers(1, 3)),
    draw(st.integers(1, 9)),
    draw(st.integers(1, 9)),
    draw(st.sampled_from([1, 3])),
  )
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  if dtype == np.uint8:
    return rng.integers(0, 256, shape).astype(np.uint8)
  return rng.normal(size=shape).astype(np.float32)


@st.composite
def shifts(draw):
  return draw(st.integers(-10, 10)), draw(st.integers(-10, 10))


@given(image_batches())
def test_shapes_dtypes_and_identity_at_severity_0(images):
  for name, severity in (("gaussian_noise", 0.1), ("gaussian_blur", 1.0), ("translate", 2)):
    out = C.corrupt(images, name, severity, seed=3)
    assert out.shape == images.shape and out.dtype == images.dtype
    zero = C.corrupt(images, name, 0, seed=3)
    np.testing.assert_array_equal(zero, images)
    assert zero is not images  # a copy


@given(image_batches(), shifts())
def test_translation_moves_pixels_exactly(images, shift):
  dy, dx = shift
  out = C.translate(images, dy, dx, fill=7)
  _, h, w, _ = images.shape
  for i in range(h):
    for j in range(w):
      si, sj = i - dy, j - dx
      want = images[:, si, sj] if 0 <= si < h and 0 <= sj < w else np.full_like(images[:, 0, 0], 7)
      np.testing.assert_array_equal(out[:, i, j], want)


def test_translation_suite_directions():
  images = np.zeros((1, 8, 8, 1), np.uint8)
  images[0, 4, 4, 0] = 255
  for (dy, dx), where in zip(C.TRANSLATION_DIRECTIONS, [(4, 7), (4, 1), (7, 4), (1, 4)]):
    out = C.corrupt(images, "translate", 3, direction=(dy, dx))
    assert out[0, where[0], where[1], 0] == 255 and out.sum() == 255
  assert C.corrupt(images, "translate", 9).sum() == 0  # shifted out entirely


@given(
  st.floats(0.0, 1.0, width=32),
  st.floats(0.1, 3.0),
  st.sampled_from([np.uint8, np.float32, np.float64]),
)
def test_blur_preserves_a_constant_image(value, sigma, dtype):
  level = np.asarray(255 * value if dtype == np.uint8 else value).round(
    0 if dtype == np.uint8 else 6
  )
  images = np.full((2, 9, 7, 3), level, dtype)
  out = C.gaussian_blur(images, sigma)
  assert out.dtype == images.dtype
  tol = 0 if dtype == np.uint8 else 100 * np.finfo(dtype).eps * max(abs(float(level)), 1.0)
  np.testing.assert_allclose(out, images, rtol=0, atol=tol)
  assert abs(out.mean(dtype=np.float64) - images.mean(dtype=np.float64)) <= tol


def test_blur_spreads_a_point_symmetrically():
  images = np.zeros((1, 9, 9, 1), np.float64)
  images[0, 4, 4, 0] = 1.0
  out = C.gaussian_blur(images, 1.0)[0, :, :, 0]
  assert out.sum() == pytest.approx(1.0, abs=1e-12)  # the point is away from the border
  np.testing.assert_allclose(out, out.T, atol=1e-15)
  np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-15)
  assert out[4, 4] == out.max() and out[4, 5] == pytest.approx(out[4, 4] * np.exp(-0.5), rel=1e-12)


@pytest.mark.parametrize("std", [0.05, 0.2])
def test_noise_standard_deviation(std):
  # Float images: the added noise has the requested std (n = 60,000 draws: 1% relative).
  images = np.zeros((6, 100, 100, 1), np.float32)
  noise = C.gaussian_noise(images, std, seed=1).astype(np.float64)
  assert noise.std() == pytest.approx(std, rel=0.01) and abs(noise.mean()) < 0.01 * std + 1e-3
  # uint8: std in units of the [0, 1] range, i.e. 255 std pixel values (mid-grey: no clipping).
  grey = np.full((6, 100, 100, 1), 128, np.uint8)
  noisy = C.gaussian_noise(grey, std, seed=1).astype(np.float64)
  assert noisy.std() == pytest.approx(255 * std, rel=0.02)
  # Seeded: the same seed, the same noise; another seed, other noise.
  np.testing.assert_array_equal(C.gaussian_noise(grey, std, seed=1), noisy.astype(np.uint8))
  assert not np.array_equal(C.gaussian_noise(grey, std, seed=2), noisy.astype(np.uint8))


def test_uint8_noise_is_clipped():
  white = np.full((1, 50, 50, 1), 255, np.uint8)
  out = C.gaussian_noise(white, 0.5, seed=0)
  assert out.max() == 255 and out.min() >= 0 and (out < 255).mean() == pytest.approx(0.5, abs=0.05)


def test_suite_keys():
  suite = C.corruption_suite(
    {"gaussian_noise": (0.1,), "gaussian_blur": (0.5, 1.0), "translate": (2,)}
  )
  assert [s[0] for s in suite] == [
    "gaussian_noise:0.1",
    "gaussian_blur:0.5",
    "gaussian_blur:1",
    *["translate:2"] * 4,
  ]
  assert [s[3] for s in suite[3:]] == list(C.TRANSLATION_DIRECTIONS)


def test_errors():
  images = np.zeros((1, 4, 4, 1), np.uint8)
  cases = [
    (lambda: C.gaussian_noise(images[0], 0.1), ValueError, "images"),
    (lambda: C.gaussian_noise([[1]], 0.1), TypeError, "images"),
    (lambda: C.gaussian_noise(images.astype(np.int32), 0.1), TypeError, "images"),
    (lambda: C.gaussian_noise(images, -0.1), ValueError, "std"),
    (lambda: C.gaussian_blur(images, float("nan")), ValueError, "sigma"),
    (lambda: C.gaussian_blur(images, "1"), TypeError, "sigma"),
    (lambda: C.translate(images, 1.5, 0), TypeError, "dy"),
    (lambda: C.corrupt(images, "translate", 1.5), ValueError, "severity"),
    (lambda: C.corrupt(images, "translate", 1, direction=(1, 1)), ValueError, "direction"),
    (lambda: C.corrupt(images, "fog", 1.0), ValueError, "name"),
    (lambda: C.corruption_suite({"fog": (1.0,)}), ValueError, "severities"),
  ]
  for fn, error, name in cases:
    with pytest.raises(error, match=f"^{name}: expected"):
      fn()
