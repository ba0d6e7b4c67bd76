"""Small synthetic datasets for trainer tests: classes told apart by brightness."""

from __future__ import annotations

import numpy as np

from experiments.input_pipeline import Dataset


def synthetic_dataset(
  train_size: int = 64,
  val_size: int = 16,
  test_size: int = 20,
  *,
  num_classes: int = 4,
  hw: int = 8,
  channels: int = 1,
  noise: int = 60,
  step: int = 60,
  crop_padding: int = 1,
  seed: int = 0,
) -> Dataset:
  """uint8 ``(n, hw, hw, channels)`` images: class ``c`` is ``c * step`` plus uniform noise in
  ``[0, noise)``; train, validation and test splits drawn in that order from ``seed``; random
  crops (``crop_padding``) and flips on."""
  rng = np.random.default_rng(seed)

  def make(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, noise, (n, hw, hw, channels)) + step * labels[:, None, None, None]
    return images.astype(np.uint8), labels

  (tri, trl), (vai, val), (tei, tel) = make(train_size), make(val_size), make(test_size)
  return Dataset(
    name="synthetic",
    train_images=tri,
    train_labels=trl,
    val_images=vai,
    val_labels=val,
    test_images=tei,
    test_labels=tel,
    num_classes=num_classes,
    mean=(0.5,) * channels,
    std=(0.25,) * channels,
    crop_padding=crop_padding,
    flip=True,
  )
