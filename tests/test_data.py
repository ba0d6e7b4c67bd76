"""Tests of experiments.input_pipeline: loading (a mock CIFAR-10 tarball, tiny IDX
Fashion-MNIST), splits, deterministic batching, augmentation and normalisation. Nothing here
touches the network. The readers themselves are tested in tests/test_datasets.py."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import datasets, input_pipeline
from tests.test_datasets import (
  NUM_TRAIN,
  fake_fashion_mnist,
  no_network,  # noqa: F401 (fixture)
  no_system_fashion_mnist,  # noqa: F401 (fixture)
  write_cifar10_tarball,
)

# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
  """The fake IDX files and the full dataset loaded from them."""
  manual_dir = tmp_path_factory.mktemp("fashion") / "idx"
  arrays = fake_fashion_mnist(manual_dir)
  full = input_pipeline.load_dataset("fashion_mnist", manual_dir=manual_dir, val_size=0)
  return arrays, manual_dir, full


def _load_fashion(fashion, **kwargs) -> input_pipeline.Dataset:
  return input_pipeline.load_dataset("fashion_mnist", manual_dir=fashion[1], **kwargs)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch, no_network):  # noqa: F811
  """A data_dir holding a mock CIFAR-10 tarball (60 train, 20 test images), md5 accepted."""
  data_dir = tmp_path / "data"
  _, md5 = write_cifar10_tarball(data_dir / datasets.CIFAR10_FILENAME)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  return data_dir


def _synthetic(num_train: int, shape=(4, 4, 1)) -> input_pipeline.Dataset:
  """A Dataset whose train image i has every pixel equal to i (mod 256)."""
  images = np.broadcast_to(
    (np.arange(num_train) % 256).astype(np.uint8)[:, None, None, None], (num_train, *shape)
  ).copy()
  labels = (np.arange(num_train) % 10).astype(np.int32)
  empty = np.zeros((0, *shape), np.uint8)
  return input_pipeline.Dataset(
    "synthetic", images, labels, empty, labels[:0], empty, labels[:0], 10, (0.5,), (0.5,), 0, False
  )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (mock tarball).


def test_cifar10_mock_shapes_and_paper_constants(cifar_dir):
  ds = input_pipeline.load_dataset("cifar10", data_dir=cifar_dir, val_size=12)
  assert ds.name == "cifar10"
  assert ds.train_images.shape == (48, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.val_images.shape == (12, 32, 32, 3) and ds.val_images.dtype == np.uint8
  assert ds.test_images.shape == (20, 32, 32, 3)
  assert ds.image_shape == (32, 32, 3) and ds.num_train == 48
  for labels, n in ((ds.train_labels, 48), (ds.val_labels, 12), (ds.test_labels, 20)):
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10
  assert ds.num_classes == 10
  assert ds.mean == (0.4914, 0.4822, 0.4465)
  assert ds.std == (0.2023, 0.1994, 0.2010)
  assert ds.crop_padding == 4 and ds.flip is True
  assert not ds.train_images.flags.writeable


def test_cifar10_mock_splits_disjoint_deterministic_nested(cifar_dir):
  def _load_cifar_mock(**kwargs):
    return input_pipeline.load_dataset("cifar10", data_dir=cifar_dir, **kwargs)

  full = _load_cifar_mock(val_size=0)
  assert full.val_images.shape[0] == 0 and full.num_train == 60
  official = {im.tobytes(): i for i, im in enumerate(full.train_images)}
  assert len(official) == 60  # random mock images are distinct

  def indices(images):
    return [official[im.tobytes()] for im in images]

  a = _load_cifar_mock(val_size=15, seed=3)
  b = _load_cifar_mock(val_size=15, seed=3)
  c = _load_cifar_mock(val_size=15, seed=4)
  val, train = indices(a.val_images), indices(a.train_images)
  assert not set(val) & set(train) and sorted(val + train) == list(range(60))
  np.testing.assert_array_equal(a.val_images, b.val_images)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  np.testing.assert_array_equal(a.val_labels, full.train_labels[val])
  assert set(indices(c.val_images)) != set(val)

  small = _load_cifar_mock(val_size=15, seed=3, train_size=10)
  large = _load_cifar_mock(val_size=15, seed=3, train_size=25)
  np.testing.assert_array_equal(small.train_images, large.train_images[:10])
  np.testing.assert_array_equal(small.val_images, a.val_images)
  assert set(indices(large.train_images)) <= set(train)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (tiny IDX files).


def test_fashion_mnist_roundtrip_exact(fashion):
  arrays, _, full = fashion
  np.testing.assert_array_equal(full.train_images, arrays["train_images"][..., None])
  np.testing.assert_array_equal(full.train_labels, arrays["train_labels"])
  np.testing.assert_array_equal(full.test_images, arrays["test_images"][..., None])
  np.testing.assert_array_equal(full.test_labels, arrays["test_labels"])
  assert full.train_images.dtype == np.uint8 and full.train_labels.dtype == np.int32
  assert full.image_shape == (28, 28, 1) and full.num_classes == 10
  assert full.mean == input_pipeline.FASHION_MNIST_MEAN == (0.2860,)
  assert full.std == input_pipeline.FASHION_MNIST_STD == (0.3530,)
  assert full.crop_padding == 2 and full.flip is True
  assert full.num_train == NUM_TRAIN
  assert input_pipeline.read_idx is datasets.read_idx
  assert input_pipeline.FASHION_MNIST_FILES is datasets.FASHION_MNIST_FILES


def test_fashion_mnist_splits_stratified_and_nested(fashion):
  ds = _load_fashion(fashion, val_size=10, seed=7)
  val_ids, train_ids = ds.val_images[:, 0, 0, 0], ds.train_images[:, 0, 0, 0]
  assert sorted(np.concatenate([val_ids, train_ids]).tolist()) == list(range(NUM_TRAIN))
  np.testing.assert_array_equal(ds.val_labels, val_ids % 10)
  np.testing.assert_array_equal(np.bincount(ds.val_labels, minlength=10), np.ones(10))
  sub = _load_fashion(fashion, val_size=10, seed=7, train_size=10)
  np.testing.assert_array_equal(np.bincount(sub.train_labels, minlength=10), np.ones(10))
  prefix = _load_fashion(fashion, val_size=10, seed=7, train_size=4)
  np.testing.assert_array_equal(prefix.train_images, sub.train_images[:4])
  assert set(sub.train_images[:, 0, 0, 0]) <= set(train_ids)


def test_fashion_mnist_overrides_and_data_dir_unused(fashion, tmp_path):
  _, manual_dir, full = fashion
  ds = input_pipeline.load_dataset(
    "fashion_mnist",
    data_dir=tmp_path / "unused",
    manual_dir=manual_dir,
    val_size=0,
    crop_padding=0,
    flip=False,
  )
  np.testing.assert_array_equal(ds.train_images, full.train_images)
  assert ds.crop_padding == 0 and ds.flip is False
  assert not (tmp_path / "unused").exists()  # Fashion-MNIST is read in place, never copied


def test_fashion_mnist_env_var(fashion, monkeypatch):
  arrays, manual_dir, _ = fashion
  monkeypatch.setenv(input_pipeline.FASHION_MNIST_ENV_VAR, os.fspath(manual_dir))
  assert input_pipeline.find_fashion_mnist_dir() == manual_dir
  ds = input_pipeline.load_dataset("fashion_mnist", val_size=5)
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])


def test_fashion_mnist_missing_source_message(tmp_path, no_system_fashion_mnist):  # noqa: F811
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
    input_pipeline.load_dataset("fashion_mnist")
  assert input_pipeline.FASHION_MNIST_ENV_VAR in str(info.value) and "manual_dir" in str(info.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="manual_dir=.*dataset-fashion-mnist"):
    input_pipeline.load_dataset("fashion_mnist", manual_dir=tmp_path / "empty")


def test_cifar10_missing_offline_message(tmp_path, no_network):  # noqa: F811
  with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*downloading it failed"):
    input_pipeline.load_dataset("cifar10", data_dir=tmp_path / "empty")
  assert len(no_network) == 1


@pytest.mark.skipif(
  not datasets._has_fashion_mnist_files(pathlib.Path(datasets.FASHION_MNIST_DEFAULT_DIR)),
  reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(monkeypatch):
  monkeypatch.delenv(input_pipeline.FASHION_MNIST_ENV_VAR, raising=False)
  ds = input_pipeline.load_dataset("fashion_mnist", val_size=6000, seed=0)
  assert ds.num_train == 54000 and ds.val_images.shape == (6000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.val_labels), np.full(10, 600))
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
  pixels = np.concatenate([ds.train_images.ravel(), ds.val_images.ravel()]) / 255.0
  assert abs(pixels.mean() - ds.mean[0]) < 5e-5 and abs(pixels.std() - ds.std[0]) < 5e-5


# ---------------------------------------------------------------------------------------------
# Argument errors.


def test_bad_name():
  with pytest.raises(ValueError, match=r"name: expected one of \('cifar10', 'fashion_mnist'\)"):
    input_pipeline.load_dataset("mnist")


def test_bad_sizes(fashion):
  with pytest.raises(ValueError, match=r"train_size: expected an integer in \[1, 20\].*got 21"):
    _load_fashion(fashion, val_size=10, train_size=21)
  with pytest.raises(ValueError, match="train_size"):
    _load_fashion(fashion, val_size=10, train_size=0)
  with pytest.raises(ValueError, match="val_size: expected fewer than the 30"):
    _load_fashion(fashion, val_size=30)
  with pytest.raises(ValueError, match="val_size"):
    input_pipeline.load_dataset("cifar10", val_size=-1)
  with pytest.raises(ValueError, match="seed"):
    input_pipeline.load_dataset("cifar10", seed=-1)
  with pytest.raises(ValueError, match="crop_padding"):
    input_pipeline.load_dataset("cifar10", crop_padding=-2)


# ---------------------------------------------------------------------------------------------
# Batching.


def test_epoch_permutation_deterministic():
  p = input_pipeline.epoch_permutation(100, seed=1, epoch=2)
  assert sorted(p.tolist()) == list(range(100))
  np.testing.assert_array_equal(p, input_pipeline.epoch_permutation(100, seed=1, epoch=2))
  assert not np.array_equal(p, input_pipeline.epoch_permutation(100, seed=1, epoch=3))
  assert not np.array_equal(p, input_pipeline.epoch_permutation(100, seed=2, epoch=2))
  with pytest.raises(ValueError, match="epoch"):
    input_pipeline.epoch_permutation(100, seed=1, epoch=-1)


@pytest.mark.parametrize("num_train,batch_size", [(40, 8), (43, 8)])
def test_batch_at_step_covers_each_epoch_once(num_train, batch_size):
  ds = _synthetic(num_train)
  per_epoch = input_pipeline.steps_per_epoch(ds, batch_size)
  assert per_epoch == num_train // batch_size
  epochs = []
  for epoch in range(2):
    seen = []
    for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      images, labels = input_pipeline.batch_at_step(ds, step, batch_size, seed=5)
      assert images.shape == (batch_size, 4, 4, 1) and images.dtype == np.uint8
      np.testing.assert_array_equal(labels, images[:, 0, 0, 0] % 10)
      seen.extend(images[:, 0, 0, 0].tolist())
    assert len(set(seen)) == len(seen) == per_epoch * batch_size  # each example at most once
    epochs.append(seen)
  assert epochs[0] != epochs[1]


def test_batch_at_step_pure_function_of_seed_and_step():
  ds = _synthetic(50)
  a = input_pipeline.batch_at_step(ds, 17, 6, seed=3)
  input_pipeline.batch_at_step(
    ds, 2, 6, seed=9
  )  # interleaved calls (e.g. a resumed run) change nothing
  b = input_pipeline.batch_at_step(ds, 17, 6, seed=3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], input_pipeline.batch_at_step(ds, 17, 6, seed=4)[0])
  with pytest.raises(ValueError, match="batch_size"):
    input_pipeline.steps_per_epoch(ds, 51)
  with pytest.raises(TypeError, match="batch_size"):
    input_pipeline.steps_per_epoch(ds, 2.0)
  with pytest.raises(ValueError, match="step"):
    input_pipeline.batch_at_step(ds, -1, 6, seed=3)


def test_eval_batches_pads_and_masks():
  images = np.arange(10, dtype=np.uint8)[:, None, None, None] + np.ones((10, 2, 2, 1), np.uint8)
  labels = np.arange(10, dtype=np.int32)
  batches = list(input_pipeline.eval_batches(images, labels, 4))
  assert len(batches) == 3
  for batch_images, batch_labels, mask in batches:
    assert batch_images.shape == (4, 2, 2, 1) and batch_labels.shape == mask.shape == (4,)
  np.testing.assert_array_equal(batches[-1][2], [True, True, False, False])
  np.testing.assert_array_equal(batches[-1][0][2:], 0)
  real = np.concatenate([b[0][b[2]] for b in batches])
  np.testing.assert_array_equal(real, images)
  np.testing.assert_array_equal(np.concatenate([b[1][b[2]] for b in batches]), labels)
  assert list(input_pipeline.eval_batches(images[:0], labels[:0], 4)) == []
  with pytest.raises(ValueError, match="batch_size"):
    list(input_pipeline.eval_batches(images, labels, 0))
  with pytest.raises(ValueError, match="labels"):
    list(input_pipeline.eval_batches(images, labels[:3], 4))


# ---------------------------------------------------------------------------------------------
# Augmentation and normalisation.


def _reference_crop_flip(images, offsets, flips, p):
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = images.shape[1:3]
  out = np.stack([padded[b, dy : dy + h, dx : dx + w] for b, (dy, dx) in enumerate(offsets)])
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


@given(
  p=st.integers(0, 3),
  batch=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_apply_crop_flip_matches_numpy_reference(p, batch, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, 5, 6, 2), dtype=np.uint8)
  offsets = rng.integers(0, 2 * p + 1, (batch, 2))
  flips = rng.random(batch) < 0.5
  out = input_pipeline.apply_crop_flip(
    jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), crop_padding=p
  )
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out), _reference_crop_flip(images, offsets, flips, p))


def test_apply_crop_flip_identity_and_shift():
  images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1) + 1
  centred = input_pipeline.apply_crop_flip(
    images, jnp.full((2, 2), 2), jnp.zeros(2, bool), crop_padding=2
  )
  np.testing.assert_array_equal(centred, images)
  shifted = input_pipeline.apply_crop_flip(
    images, jnp.zeros((2, 2), int), jnp.zeros(2, bool), crop_padding=1
  )
  np.testing.assert_array_equal(shifted[:, 1:, 1:], images[:, :-1, :-1])
  np.testing.assert_array_equal(shifted[:, 0], 0)
  np.testing.assert_array_equal(shifted[:, :, 0], 0)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_augment_flip_only_is_exact(dtype):
  images = jax.random.randint(jax.random.key(1), (64, 6, 5, 3), 0, 256).astype(dtype)
  out = input_pipeline.augment(jax.random.key(2), images, crop_padding=0, flip=True)
  assert out.shape == images.shape and out.dtype == images.dtype
  same = jnp.all(out == images, axis=(1, 2, 3))
  flipped = jnp.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert bool(jnp.all(same | flipped))
  assert 0 < int(flipped.sum()) < 64  # independent per image
  assert bool(
    jnp.all(input_pipeline.augment(jax.random.key(2), images, crop_padding=0, flip=False) == images)
  )


def test_augment_crop_is_a_shift_and_deterministic():
  p = 2
  images = np.asarray(jax.random.randint(jax.random.key(3), (16, 8, 8, 1), 1, 256), np.uint8)
  out = np.asarray(
    input_pipeline.augment(jax.random.key(4), jnp.asarray(images), crop_padding=p, flip=False)
  )
  assert out.dtype == np.uint8 and out.shape == images.shape
  offsets_used = set()
  for b in range(16):
    matches = [
      (dy, dx)
      for dy in range(2 * p + 1)
      for dx in range(2 * p + 1)
      if np.array_equal(
        out[b], _reference_crop_flip(images[b : b + 1], [(dy, dx)], np.zeros(1, bool), p)[0]
      )
    ]
    assert len(matches) == 1
    offsets_used.update(matches)
  assert len(offsets_used) > 1
  again = input_pipeline.augment(jax.random.key(4), jnp.asarray(images), crop_padding=p, flip=False)
  np.testing.assert_array_equal(out, again)
  other = input_pipeline.augment(jax.random.key(5), jnp.asarray(images), crop_padding=p, flip=False)
  assert not np.array_equal(out, other)
  with pytest.raises(ValueError, match="images"):
    input_pipeline.augment(jax.random.key(0), jnp.zeros((8, 8, 1)), crop_padding=1, flip=True)


def test_normalize_values():
  images = jnp.array([0, 255, 51], jnp.uint8).reshape(1, 1, 1, 3)
  mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
  out = input_pipeline.normalize(images, mean, std)
  assert out.dtype == jnp.float32 and out.shape == (1, 1, 1, 3)
  np.testing.assert_allclose(np.asarray(out).ravel(), [-1.0, 3.0, 0.0], atol=1e-6)
  grey = input_pipeline.normalize(
    jnp.full((2, 3, 3, 1), 255, jnp.uint8),
    input_pipeline.FASHION_MNIST_MEAN,
    input_pipeline.FASHION_MNIST_STD,
  )
  np.testing.assert_allclose(grey, (1 - 0.2860) / 0.3530, rtol=1e-6)
  with pytest.raises(ValueError, match="mean"):
    input_pipeline.normalize(images, (0.5, 0.5), std)
