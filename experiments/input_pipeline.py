"""Image-classification data: CIFAR-10 as in the paper, Fashion-MNIST offline.

Both datasets are read by :mod:`experiments.datasets`, in plain numpy (no TensorFlow), and the
whole (small) dataset is held in memory as numpy ``uint8`` arrays (:class:`Dataset`):

* ``cifar10`` is the official "CIFAR-10 python version" tarball, the file the paper's code reads
  through torchvision's ``CIFAR10``: downloaded once into ``data_dir`` (default
  ``$ATTNCONV_DATA_DIR``, else ``~/.cache/attnconv``) when the machine is online, md5-checked, and
  read in torchvision's order (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).
* ``fashion_mnist`` is read from the four official IDX files (gzipped or not) in a local
  directory (``manual_dir``, then ``$ATTNCONV_FASHION_MNIST_DIR``, then
  ``/usr/share/datasets/fashion-mnist`` where the Debian package ``dataset-fashion-mnist``
  installs them), in the files' order, so nothing is ever downloaded.

Batching (:func:`batch_at_step`) is a pure function of ``(seed, step)``, so a resumed run sees
exactly the same batches, and augmentation (:func:`augment`) and normalisation
(:func:`normalize`) are jittable JAX functions.

The paper's pipeline (official code, ``train.py: get_dataset``): ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()``, ``Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))``
for training, normalisation only for evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import datasets
from experiments.datasets import (
  FASHION_MNIST_DEFAULT_DIR,
  FASHION_MNIST_ENV_VAR,
  FASHION_MNIST_FILES,
  find_fashion_mnist_dir,
  read_idx,
)

__all__ = [
  "CIFAR10_MEAN",
  "CIFAR10_STD",
  "DATASET_NAMES",
  "FASHION_MNIST_DEFAULT_DIR",
  "FASHION_MNIST_ENV_VAR",
  "FASHION_MNIST_FILES",
  "FASHION_MNIST_MEAN",
  "FASHION_MNIST_STD",
  "Dataset",
  "apply_crop_flip",
  "augment",
  "batch_at_step",
  "epoch_permutation",
  "eval_batches",
  "find_fashion_mnist_dir",
  "load_dataset",
  "make_global_batch",
  "normalize",
  "process_rows",
  "read_idx",
  "steps_per_epoch",
]

DATASET_NAMES = ("cifar10", "fashion_mnist")

# The paper's (official code's) CIFAR-10 normalisation, in [0, 1] pixel units. (The std values
# are the widely copied ones from kuangliu/pytorch-cifar, not the true per-channel std; kept as
# the paper used them.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# Fashion-MNIST normalisation, in [0, 1] pixel units: mean and (population) standard deviation
# of all 60000 * 28 * 28 pixels of the official train split (train-images-idx3-ubyte.gz from the
# Debian package dataset-fashion-mnist), computed once in float64 as
# ``x = images / 255; x.mean(), x.std()`` = 0.286040597, 0.353024245.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)

# Per-dataset defaults: (num_classes, mean, std, crop_padding, flip).
_DEFAULTS = {
  "cifar10": (10, CIFAR10_MEAN, CIFAR10_STD, 4, True),
  "fashion_mnist": (10, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 2, True),
}

# Distinct streams derived from the user's seed (np.random.SeedSequence entropy words).
_STREAM_VAL = 0
_STREAM_TRAIN_SUBSET = 1
_STREAM_EPOCH = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A small image-classification dataset held in memory.

  Attributes:
    name: dataset name (one of :data:`DATASET_NAMES`).
    train_images: ``(N_train, H, W, C)`` uint8, the training pool (official train split minus
      the validation examples, optionally subsampled to ``train_size``).
    train_labels: ``(N_train,)`` int32.
    val_images: ``(N_val, H, W, C)`` uint8, carved from the official train split.
    val_labels: ``(N_val,)`` int32.
    test_images: ``(N_test, H, W, C)`` uint8, the official test split.
    test_labels: ``(N_test,)`` int32.
    num_classes: number of classes; labels lie in ``[0, num_classes)``.
    mean: per-channel mean, in [0, 1] pixel units, used by :func:`normalize`.
    std: per-channel standard deviation, in [0, 1] pixel units.
    crop_padding: zero padding of the random crop augmentation (0: no crop).
    flip: whether training images are randomly flipped horizontally.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int
  flip: bool

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    """Number of training examples ``N_train``."""
    return int(self.train_images.shape[0])


# ----------------------------------------------------------------------------------------------
# Loading.


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random order of ``labels`` whose every prefix is (nearly) class-balanced.

  Each example gets the key ``(rank within its class + U(0, 1)) / class count`` under a random
  within-class ranking; sorting by it interleaves the classes in proportion to their sizes, so
  any prefix of length n holds ``n * count_c / N`` examples of class c, up to rounding.
  """
  n = labels.shape[0]
  order = rng.permutation(n)
  _, inverse, counts = np.unique(labels[order], return_inverse=True, return_counts=True)
  rank = np.zeros(n, np.int64)
  for c in range(counts.shape[0]):
    members = np.flatnonzero(inverse == c)
    rank[members] = np.arange(members.shape[0])
  key = (rank + rng.random(n)) / counts[inverse]
  return order[np.argsort(key, kind="stable")]


def _readonly(array: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(array)
  array.setflags(write=False)
  return array


def load_dataset(
  name: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  val_size: int = 5000,
  train_size: int | None = None,
  seed: int = 0,
  crop_padding: int | None = None,
  flip: bool | None = None,
) -> Dataset:
  """Reads a dataset into memory (:mod:`experiments.datasets`) and carves train / val / test.

  Args:
    name: ``"cifar10"`` or ``"fashion_mnist"``.
    data_dir: CIFAR-10 only: directory of the official tarball ``cifar-10-python.tar.gz``
      (``None``: ``$ATTNCONV_DATA_DIR``, else ``~/.cache/attnconv``); downloaded there the first
      time when it is missing.
    manual_dir: Fashion-MNIST only: directory holding the four IDX files, gzipped or not
      (``None``: ``$ATTNCONV_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist``).
    val_size: number of validation examples, a deterministic (given ``seed``), class-stratified
      random subset of the official train split; the rest is the train pool. 0 allowed.
    train_size: if given, keep only this many examples of the train pool: the first
      ``train_size`` of a seeded, class-stratified order, so smaller subsets are prefixes of (and
      contained in) larger ones for the same seed.
    seed: non-negative integer seed of the validation split and the train subset.
    crop_padding: random-crop zero padding (``None``: dataset default, 4 for CIFAR-10 as in the
      paper, 2 for Fashion-MNIST; 0 disables cropping).
    flip: random horizontal flips (``None``: dataset default, True for both).

  Returns:
    The :class:`Dataset`; images ``(N, H, W, C)`` uint8 (32x32x3 or 28x28x1), labels int32.

  Raises:
    ValueError: on an unknown ``name`` or out-of-range ``val_size``, ``train_size``, ``seed`` or
      ``crop_padding``, or a malformed data file (wrong md5, IDX header or shape).
    FileNotFoundError: if the Fashion-MNIST IDX files are not found, or the CIFAR-10 tarball is
      missing and cannot be downloaded.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"name: expected one of {DATASET_NAMES}, got {name!r}")
  if not isinstance(seed, int | np.integer) or seed < 0:
    raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
  if not isinstance(val_size, int | np.integer) or val_size < 0:
    raise ValueError(f"val_size: expected a non-negative integer, got {val_size!r}")
  num_classes, mean, std, default_padding, default_flip = _DEFAULTS[name]
  crop_padding = default_padding if crop_padding is None else crop_padding
  flip = default_flip if flip is None else flip
  if not isinstance(crop_padding, int | np.integer) or crop_padding < 0:
    raise ValueError(f"crop_padding: expected a non-negative integer or None, got {crop_padding!r}")

  splits = datasets.load(name, data_dir=data_dir, manual_dir=manual_dir)
  train_images, train_labels = splits["train"]
  test_images, test_labels = splits["test"]
  num_official = train_images.shape[0]
  if val_size >= num_official:
    raise ValueError(
      f"val_size: expected fewer than the {num_official} examples of the official {name} train "
      f"split, got {val_size}"
    )

  order = _stratified_order(train_labels, np.random.default_rng([seed, _STREAM_VAL]))
  val_idx, pool_idx = order[:val_size], np.sort(order[val_size:])
  if train_size is not None:
    if not isinstance(train_size, int | np.integer) or not 1 <= train_size <= pool_idx.shape[0]:
      raise ValueError(
        f"train_size: expected an integer in [1, {pool_idx.shape[0]}] (the {name} train pool "
        f"after removing val_size={val_size} examples), got {train_size!r}"
      )
    sub = _stratified_order(
      train_labels[pool_idx], np.random.default_rng([seed, _STREAM_TRAIN_SUBSET])
    )
    pool_idx = pool_idx[sub[:train_size]]

  return Dataset(
    name=name,
    train_images=_readonly(train_images[pool_idx]),
    train_labels=_readonly(train_labels[pool_idx]),
    val_images=_readonly(train_images[val_idx]),
    val_labels=_readonly(train_labels[val_idx]),
    test_images=_readonly(test_images),
    test_labels=_readonly(test_labels),
    num_classes=num_classes,
    mean=tuple(mean),
    std=tuple(std),
    crop_padding=int(crop_padding),
    flip=bool(flip),
  )


# ----------------------------------------------------------------------------------------------
# Batching (numpy, a pure function of (seed, step)).


def _check_nonneg_int(value, argument: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
    raise ValueError(f"{argument}: expected a non-negative integer, got {value!r}")
  return int(value)


@functools.lru_cache(maxsize=4)
def _cached_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, _STREAM_EPOCH, epoch]).permutation(num_examples)
  perm.setflags(write=False)
  return perm


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The shuffle of epoch ``epoch``: a permutation of ``range(num_examples)``.

  Args:
    num_examples: number of training examples N.
    seed: non-negative integer seed.
    epoch: non-negative epoch index.

  Returns:
    ``(N,)`` int64 read-only permutation, a pure function of ``(num_examples, seed, epoch)``.
  """
  return _cached_permutation(
    _check_nonneg_int(num_examples, "num_examples"),
    _check_nonneg_int(seed, "seed"),
    _check_nonneg_int(epoch, "epoch"),
  )


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  """Number of full batches per epoch, ``N_train // batch_size`` (the remainder is dropped).

  Raises:
    ValueError: if ``batch_size`` is not positive or exceeds ``N_train``.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
    raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
  if not 1 <= batch_size <= dataset.num_train:
    raise ValueError(
      f"batch_size: expected an integer in [1, {dataset.num_train}] (N_train), got {batch_size}"
    )
  return dataset.num_train // int(batch_size)


def batch_at_step(
  dataset: Dataset, step: int, batch_size: int, *, seed: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of global step ``step``, or the rows ``rows`` of it.

  Epochs are drop-remainder passes over a fresh :func:`epoch_permutation`: step ``s`` is batch
  ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. The result depends only on
  ``(dataset, seed, step, batch_size)``, so a run resumed at step s sees the same batches, and
  the global batch does not depend on how many processes share it: each process reads only its
  ``rows`` (:func:`process_rows`) of the same global batch.

  Args:
    dataset: the :class:`Dataset`.
    step: non-negative global step.
    batch_size: examples per (global) batch, in ``[1, N_train]``.
    seed: non-negative integer seed of the shuffles.
    rows: optional ascending positions in ``[0, batch_size)`` of the global batch to read
      (``None``: all of them).

  Returns:
    ``(images, labels)``: ``(R, H, W, C)`` uint8 and ``(R,)`` int32, where ``R`` is
    ``batch_size`` or ``len(rows)``.

  Raises:
    ValueError: if ``step`` is negative or ``rows`` holds positions outside ``[0, batch_size)``.
  """
  per_epoch = steps_per_epoch(dataset, batch_size)
  step = _check_nonneg_int(step, "step")
  epoch, index = divmod(step, per_epoch)
  perm = epoch_permutation(dataset.num_train, seed=seed, epoch=epoch)
  idx = perm[index * batch_size : (index + 1) * batch_size]
  if rows is not None:
    idx = idx[_check_rows(rows, batch_size)]
  return dataset.train_images[idx], dataset.train_labels[idx]


def _check_rows(rows, batch_size: int) -> np.ndarray:
  rows = np.asarray(rows)
  if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(
      f"rows: expected a 1-D integer array of batch positions, got {rows.dtype} of shape "
      f"{rows.shape}"
    )
  if rows.size and (rows.min() < 0 or rows.max() >= batch_size):
    raise ValueError(
      f"rows: expected positions in [0, {batch_size}), got values in [{rows.min()}, {rows.max()}]"
    )
  return rows


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
  """The rows of a ``(batch_size, ...)`` global batch that this process's devices hold.

  With the batch axis sharded over all devices of all processes, each process feeds only these
  rows (the layout :func:`jax.make_array_from_process_local_data` expects).

  Args:
    sharding: the sharding of the batch's arrays (only their leading axis is looked at).
    batch_size: global batch size, divisible as the sharding requires.

  Returns:
    ``(R,)`` int64, ascending and without repeats.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
    raise ValueError(f"batch_size: expected an int, got {type(batch_size).__name__}")
  if batch_size < 1:
    raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
  positions = np.arange(int(batch_size))
  index_map = sharding.addressable_devices_indices_map((int(batch_size),))
  return np.unique(np.concatenate([positions[index[0]] for index in index_map.values()]))


def make_global_batch(
  sharding: jax.sharding.Sharding, local: Sequence[np.ndarray], batch_size: int
) -> tuple[jax.Array, ...]:
  """Global arrays of a batch from this process's rows (:func:`process_rows`) of it.

  Args:
    sharding: the batch's sharding over the devices of all processes.
    local: arrays ``(R, ...)`` holding this process's rows of the global batch, in order.
    batch_size: global batch size.

  Returns:
    One ``(batch_size, ...)`` :class:`jax.Array` per array of ``local``.

  Raises:
    ValueError: if an array of ``local`` does not have this process's row count.
  """
  num_rows = process_rows(sharding, batch_size).shape[0]
  arrays = []
  for i, array in enumerate(local):
    array = np.asarray(array)
    if array.ndim < 1 or array.shape[0] != num_rows:
      raise ValueError(
        f"local[{i}]: expected this process's {num_rows} rows of the global batch of "
        f"{batch_size}, got shape {array.shape}"
      )
    global_shape = (int(batch_size), *array.shape[1:])
    arrays.append(jax.make_array_from_process_local_data(sharding, array, global_shape))
  return tuple(arrays)


def eval_batches(
  images: np.ndarray, labels: np.ndarray, batch_size: int, *, rows: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Iterates over an evaluation set in fixed-size batches, in order.

  The last batch is zero-padded to ``batch_size`` so every batch has the same shape (one
  compilation); ``mask`` marks the real examples.

  Args:
    images: ``(N, H, W, C)`` array.
    labels: ``(N,)`` array.
    batch_size: positive (global) batch size.
    rows: optional ascending positions in ``[0, batch_size)`` of every batch to yield (a
      process's share, :func:`process_rows`); ``None``: the whole batches.

  Yields:
    ``(images, labels, mask)``: ``(R, H, W, C)``, ``(R,)`` and ``(R,)`` bool, where ``R`` is
    ``batch_size`` or ``len(rows)``.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
    raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
  if batch_size < 1:
    raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"labels: expected {images.shape[0]} labels (one per image), got {labels.shape[0]}"
    )
  if rows is not None:
    rows = _check_rows(rows, batch_size)
  n = images.shape[0]
  for start in range(0, n, batch_size):
    if rows is None:
      batch_images, batch_labels = (
        images[start : start + batch_size],
        labels[start : start + batch_size],
      )
      size = batch_size
    else:  # rows are ascending: the real examples come first, the padding last
      take = start + rows[start + rows < n]
      batch_images, batch_labels = images[take], labels[take]
      size = rows.shape[0]
    real = batch_images.shape[0]
    mask = np.zeros(size, bool)
    mask[:real] = True
    pad = size - real
    if pad:
      batch_images = np.concatenate(
        [batch_images, np.zeros((pad,) + images.shape[1:], images.dtype)]
      )
      batch_labels = np.concatenate([batch_labels, np.zeros((pad,), labels.dtype)])
    yield batch_images, batch_labels, mask


# ----------------------------------------------------------------------------------------------
# Augmentation and normalisation (JAX, jittable).


def apply_crop_flip(
  images: jax.Array, offsets: jax.Array, flips: jax.Array, *, crop_padding: int
) -> jax.Array:
  """Deterministic crop-and-flip with given per-image parameters.

  Each image is zero-padded by ``crop_padding`` on every side, the ``H x W`` window at
  ``offsets[b] = (dy, dx)`` (in ``[0, 2 * crop_padding]``) is cut out, and it is mirrored
  left-right where ``flips[b]``. ``offsets = crop_padding`` everywhere is the identity crop.

  Args:
    images: ``(B, H, W, C)`` array of any dtype.
    offsets: ``(B, 2)`` integer crop offsets.
    flips: ``(B,)`` bool.
    crop_padding: non-negative static padding.

  Returns:
    ``(B, H, W, C)`` array of the input dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images: expected a (B, H, W, C) array, got shape {images.shape}")
  if crop_padding < 0:
    raise ValueError(f"crop_padding: expected a non-negative integer, got {crop_padding}")
  _, h, w, c = images.shape
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    images = jax.vmap(crop)(padded, offsets.astype(jnp.int32))
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames=("crop_padding", "flip"))
def augment(rng: jax.Array, images: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop (zero padding ``crop_padding``) and random horizontal flip, per image.

  As torchvision's ``RandomCrop(H, padding=crop_padding)`` + ``RandomHorizontalFlip()``: each
  image gets an independent uniform offset in ``[0, 2 * crop_padding]^2`` into its zero-padded
  version and is flipped with probability 1/2. Pixels are only moved (or zero-filled), never
  interpolated, so the dtype is kept.

  Args:
    rng: a JAX PRNG key.
    images: ``(B, H, W, C)`` uint8 or float array.
    crop_padding: static non-negative padding; 0 disables cropping.
    flip: static; whether to flip.

  Returns:
    ``(B, H, W, C)`` array of the input dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images: expected a (B, H, W, C) array, got shape {images.shape}")
  if crop_padding < 0:
    raise ValueError(f"crop_padding: expected a non-negative integer, got {crop_padding}")
  batch = images.shape[0]
  crop_key, flip_key = jax.random.split(rng)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * crop_padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
  return apply_crop_flip(images, offsets, flips, crop_padding=crop_padding)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Maps pixel values in [0, 255] (uint8 or float) to ``(x / 255 - mean) / std`` in float32.

  Args:
    images: ``(..., C)`` array of pixel values in [0, 255].
    mean: ``C`` per-channel means (or one value), in [0, 1] units.
    std: ``C`` per-channel standard deviations (or one value), in [0, 1] units.

  Returns:
    float32 array of the input shape.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.ndim > 1 or std.ndim > 1 or mean.size not in (1, images.shape[-1]):
    raise ValueError(
      f"mean: expected 1 or {images.shape[-1]} (channels) values, got shape {mean.shape}"
    )
  if std.size not in (1, images.shape[-1]):
    raise ValueError(
      f"std: expected 1 or {images.shape[-1]} (channels) values, got shape {std.shape}"
    )
  images = jnp.asarray(images, jnp.float32)
  channels = (1,) * (images.ndim - 1) + (-1,)  # broadcast over the leading axes
  return (images / 255.0 - jnp.reshape(mean, channels)) / jnp.reshape(std, channels)
