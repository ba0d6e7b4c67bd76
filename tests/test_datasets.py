"""Tests of experiments.datasets: the TensorFlow-free readers of Fashion-MNIST (tiny IDX files)
and CIFAR-10 (a mock of the official python tarball). Nothing here touches the network: the
downloader is replaced wherever a download would happen."""

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error

import numpy as np
import pytest

from experiments import datasets

NUM_TRAIN, NUM_TEST = 30, 10


# ---------------------------------------------------------------------------------------------
# Mock data (shared with tests/test_data.py).


def write_idx(path: pathlib.Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
  """Writes an unsigned-byte IDX file, gzipped if ``path`` ends in ``.gz``."""
  magic = struct.pack(">HBB", 0, 0x08, array.ndim) if magic is None else magic
  data = magic + struct.pack(f">{array.ndim}I", *array.shape)
  data += np.ascontiguousarray(array, np.uint8).tobytes()
  if path.suffix == ".gz":
    data = gzip.compress(data)
  path.write_bytes(data)


def fake_fashion_mnist(directory: pathlib.Path, *, gz: bool = True) -> dict[str, np.ndarray]:
  """Writes 30 train / 10 test random 28x28 images whose pixel (0, 0) is their index."""
  rng = np.random.default_rng(1234)
  arrays = {
    "train_images": rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
    "train_labels": (np.arange(NUM_TRAIN) % 10).astype(np.uint8),
    "test_images": rng.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
    "test_labels": rng.integers(0, 10, NUM_TEST, dtype=np.uint8),
  }
  arrays["train_images"][:, 0, 0] = np.arange(NUM_TRAIN)
  arrays["test_images"][:, 0, 0] = np.arange(NUM_TEST)
  directory.mkdir(parents=True, exist_ok=True)
  for key, filename in datasets.FASHION_MNIST_FILES.items():
    path = directory / filename
    write_idx(path if gz else path.with_suffix(""), arrays[key])
  return arrays


def _numpy1_pickle(obj, protocol: int) -> bytes:
  """Pickles ``obj`` as numpy 1 (and so the official Python 2 files) names its array globals."""
  data = pickle.dumps(obj, protocol=protocol)
  if protocol <= 3:  # GLOBAL opcodes hold the module name as newline-terminated text
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
  return data


def write_cifar10_tarball(
  path: pathlib.Path,
  *,
  per_batch: int = 12,
  num_test: int = 20,
  seed: int = 0,
  protocol: int = 2,
  replace: dict[str, bytes] | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
  """Writes a mock of ``cifar-10-python.tar.gz``: the official members, pickled batch dicts.

  Every batch is ``{b"batch_label", b"labels" (list of int), b"data" ((n, 3072) uint8, rows of
  channel-major 3x32x32 images), b"filenames"}``, as in the official file. Members are stored in
  a shuffled order (readers must go by name). ``replace`` maps a member name to raw bytes.

  Returns:
    ``({"train": (images, labels), "test": (images, labels)}, md5)``: the expected HWC images,
    int labels, and the tarball's md5.
  """
  rng = np.random.default_rng(seed)
  members, expected = {}, {"train": ([], []), "test": ([], [])}
  names = [*datasets.CIFAR10_TRAIN_BATCHES, datasets.CIFAR10_TEST_BATCH]
  for name in names:
    n = num_test if name == datasets.CIFAR10_TEST_BATCH else per_batch
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {
      b"batch_label": name.encode(),
      b"labels": labels,
      b"data": data,
      b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    members[name] = _numpy1_pickle(batch, protocol)
    split = "test" if name == datasets.CIFAR10_TEST_BATCH else "train"
    expected[split][0].append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    expected[split][1].append(np.asarray(labels))
  members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]})
  members["cifar-10-batches-py/readme.html"] = b"<html></html>"
  members.update(replace or {})
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for name in rng.permutation(sorted(members)).tolist():
      info = tarfile.TarInfo(name)
      info.size = len(members[name])
      tar.addfile(info, io.BytesIO(members[name]))
  splits = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in expected.items()}
  return splits, hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def no_system_fashion_mnist(monkeypatch, tmp_path):
  """Hides $ATTNCONV_FASHION_MNIST_DIR and the Debian package's directory."""
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV_VAR, raising=False)
  monkeypatch.setattr(datasets, "FASHION_MNIST_DEFAULT_DIR", str(tmp_path / "no-such-dir"))


@pytest.fixture
def no_network(monkeypatch):
  """Makes every download fail as on an offline machine; records the attempts."""
  attempts = []

  def offline(url, path):
    attempts.append((url, path))
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(datasets, "_download", offline)
  return attempts


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
  """A data_dir holding a mock CIFAR-10 tarball whose md5 is made the expected one."""
  data_dir = tmp_path / "data"
  expected, md5 = write_cifar10_tarball(data_dir / datasets.CIFAR10_FILENAME)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  return data_dir, expected


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST.


def test_read_idx_roundtrip_and_errors(tmp_path):
  array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  write_idx(tmp_path / "a.gz", array)
  np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), array)
  write_idx(tmp_path / "raw", array)
  np.testing.assert_array_equal(datasets.read_idx(tmp_path / "raw"), array)
  write_idx(tmp_path / "bad", array, magic=b"\x00\x00\x0d\x03")  # float IDX
  with pytest.raises(ValueError, match="unsigned-byte IDX.*expected magic 0x0000 0x08, got"):
    datasets.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes((tmp_path / "raw").read_bytes()[:-1])
  with pytest.raises(ValueError, match="has 45 bytes, expected 46"):
    datasets.read_idx(tmp_path / "short")
  (tmp_path / "header").write_bytes(b"\x00\x00\x08\x03\x00\x00")
  with pytest.raises(ValueError, match="expected >= 16 for the header"):
    datasets.read_idx(tmp_path / "header")
  (tmp_path / "tiny").write_bytes(b"\x00")
  with pytest.raises(ValueError, match="expected >= 4 bytes, got 1"):
    datasets.read_idx(tmp_path / "tiny")


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_exact_in_file_order(tmp_path, gz):
  arrays = fake_fashion_mnist(tmp_path, gz=gz)
  splits = datasets.load_fashion_mnist(tmp_path)
  assert sorted(splits) == ["test", "train"]
  for split in ("train", "test"):
    images, labels = splits[split]
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], arrays[f"{split}_images"])
    np.testing.assert_array_equal(labels, arrays[f"{split}_labels"])
  assert datasets.load("fashion_mnist", manual_dir=tmp_path)["test"][0].shape == (10, 28, 28, 1)


def test_fashion_mnist_mixed_compression(tmp_path):
  arrays = fake_fashion_mnist(tmp_path)
  gzipped = tmp_path / datasets.FASHION_MNIST_FILES["test_labels"]
  gzipped.with_suffix("").write_bytes(gzip.decompress(gzipped.read_bytes()))
  gzipped.unlink()
  assert datasets.find_fashion_mnist_dir(tmp_path) == tmp_path
  labels = datasets.load_fashion_mnist(tmp_path)["test"][1]
  np.testing.assert_array_equal(labels, arrays["test_labels"])


def test_fashion_mnist_env_var_and_default(tmp_path, monkeypatch, no_system_fashion_mnist):
  arrays = fake_fashion_mnist(tmp_path / "env")
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV_VAR, os.fspath(tmp_path / "env"))
  assert datasets.find_fashion_mnist_dir() == tmp_path / "env"
  np.testing.assert_array_equal(datasets.load_fashion_mnist()["train"][1], arrays["train_labels"])
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV_VAR)
  fake_fashion_mnist(tmp_path / "debian")
  monkeypatch.setattr(datasets, "FASHION_MNIST_DEFAULT_DIR", os.fspath(tmp_path / "debian"))
  assert datasets.find_fashion_mnist_dir() == tmp_path / "debian"


def test_fashion_mnist_missing_files(tmp_path, monkeypatch, no_system_fashion_mnist):
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
    datasets.load_fashion_mnist()
  assert datasets.FASHION_MNIST_ENV_VAR in str(info.value) and "manual_dir" in str(info.value)
  fake_fashion_mnist(tmp_path / "partial")
  (tmp_path / "partial" / datasets.FASHION_MNIST_FILES["test_images"]).unlink()
  with pytest.raises(
    FileNotFoundError, match=r"manual_dir=.*partial.*missing \['t10k-images-idx3-ubyte.gz'\]"
  ):
    datasets.load_fashion_mnist(tmp_path / "partial")
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV_VAR, os.fspath(tmp_path / "partial"))
  with pytest.raises(FileNotFoundError, match=r"\$ATTNCONV_FASHION_MNIST_DIR="):
    datasets.find_fashion_mnist_dir()


def test_fashion_mnist_malformed_files(tmp_path):
  fake_fashion_mnist(tmp_path)
  images_path = tmp_path / datasets.FASHION_MNIST_FILES["train_images"]
  labels_path = tmp_path / datasets.FASHION_MNIST_FILES["train_labels"]
  write_idx(images_path, np.zeros((NUM_TRAIN, 28, 27), np.uint8))
  with pytest.raises(
    ValueError, match=r"manual_dir: .*expected images of shape \(N, 28, 28\), got"
  ):
    datasets.load_fashion_mnist(tmp_path)
  write_idx(images_path, np.zeros((NUM_TRAIN, 28, 28), np.uint8))
  write_idx(labels_path, np.zeros(NUM_TRAIN - 1, np.uint8))
  with pytest.raises(
    ValueError, match=r"manual_dir: .*expected labels of shape \(30,\).*got \(29,\)"
  ):
    datasets.load_fashion_mnist(tmp_path)
  write_idx(labels_path, np.full(NUM_TRAIN, 10, np.uint8))
  with pytest.raises(ValueError, match=r"expected labels in \[0, 10\), got a label 10"):
    datasets.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
  not datasets._has_fashion_mnist_files(pathlib.Path(datasets.FASHION_MNIST_DEFAULT_DIR)),
  reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(monkeypatch):
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV_VAR, raising=False)
  splits = datasets.load_fashion_mnist()
  (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
  assert train_images.shape == (60000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(test_labels), np.full(10, 1000))


# ---------------------------------------------------------------------------------------------
# CIFAR-10.


def test_cifar10_constants_are_the_official_file():
  assert datasets.CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
  assert datasets.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"
  assert datasets.CIFAR10_TRAIN_BATCHES == tuple(
    f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)
  )


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_load_cifar10_mock_tarball(tmp_path, monkeypatch, no_network, protocol):
  data_dir = tmp_path / "data"
  expected, md5 = write_cifar10_tarball(data_dir / datasets.CIFAR10_FILENAME, protocol=protocol)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  splits = datasets.load_cifar10(data_dir)
  assert not no_network  # present: nothing downloaded
  for split, n in (("train", 60), ("test", 20)):
    images, labels = splits[split]
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert images.flags.c_contiguous
    assert labels.shape == (n,) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, expected[split][0])
    np.testing.assert_array_equal(labels, expected[split][1])


def test_cifar10_layout_is_channel_major_rows_and_batch_order(cifar_dir):
  data_dir, _ = cifar_dir
  path = data_dir / datasets.CIFAR10_FILENAME
  with tarfile.open(path) as tar:
    raw = [
      pickle.load(tar.extractfile(m), encoding="bytes")
      for m in (*datasets.CIFAR10_TRAIN_BATCHES, datasets.CIFAR10_TEST_BATCH)
    ]
  images, labels = datasets.load_cifar10(data_dir)["train"]
  # Pixel (y, x) of channel c of row n is byte c * 1024 + y * 32 + x, as torchvision reads it.
  n, y, x, c = 13, 5, 30, 2
  assert images[n, y, x, c] == raw[1][b"data"][n - 12, c * 1024 + y * 32 + x]
  assert labels.tolist() == sum((r[b"labels"] for r in raw[:5]), [])
  test_images, _ = datasets.load("cifar10", data_dir=data_dir)["test"]
  np.testing.assert_array_equal(test_images[7, :, :, 0].ravel(), raw[5][b"data"][7, :1024])


def test_cifar10_default_data_dir(tmp_path, monkeypatch, no_network):
  monkeypatch.setenv(datasets.DATA_DIR_ENV_VAR, os.fspath(tmp_path / "env"))
  assert datasets.default_data_dir() == tmp_path / "env"
  _, md5 = write_cifar10_tarball(tmp_path / "env" / datasets.CIFAR10_FILENAME)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  assert datasets.load_cifar10()["train"][0].shape == (60, 32, 32, 3)
  monkeypatch.delenv(datasets.DATA_DIR_ENV_VAR)
  monkeypatch.setenv("HOME", os.fspath(tmp_path / "home"))
  assert datasets.default_data_dir() == tmp_path / "home" / ".cache" / "attnconv"


def test_cifar10_missing_offline_raises_clearly(tmp_path, no_network):
  data_dir = tmp_path / "empty"
  with pytest.raises(FileNotFoundError) as info:
    datasets.load_cifar10(data_dir)
  message = str(info.value)
  assert f"data_dir={os.fspath(data_dir)!r}" in message
  assert "expected the CIFAR-10 tarball cifar-10-python.tar.gz, not found" in message
  assert "downloading it failed" in message and "name resolution" in message
  assert datasets.CIFAR10_URL in message and datasets.DATA_DIR_ENV_VAR in message
  assert isinstance(info.value.__cause__, urllib.error.URLError)
  assert no_network == [(datasets.CIFAR10_URL, no_network[0][1])]
  assert list(data_dir.iterdir()) == []  # no partial file left behind
  with pytest.raises(FileNotFoundError, match=r"not found \(download=False\)"):
    datasets.load_cifar10(tmp_path / "other", download=False)
  assert len(no_network) == 1


def test_cifar10_downloads_once(tmp_path, monkeypatch):
  source = tmp_path / "server" / "cifar.tar.gz"
  expected, md5 = write_cifar10_tarball(source)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  calls = []

  def fake_download(url, path):
    calls.append(url)
    pathlib.Path(path).write_bytes(source.read_bytes())

  monkeypatch.setattr(datasets, "_download", fake_download)
  data_dir = tmp_path / "new" / "dir"
  images, _ = datasets.load_cifar10(data_dir)["train"]
  np.testing.assert_array_equal(images, expected["train"][0])
  assert calls == [datasets.CIFAR10_URL]
  assert sorted(p.name for p in data_dir.iterdir()) == [datasets.CIFAR10_FILENAME]
  datasets.load_cifar10(data_dir)
  assert calls == [datasets.CIFAR10_URL]


def test_cifar10_real_downloader_from_a_file_url(tmp_path, monkeypatch):
  """The real downloader (urllib) on a local file:// URL: no network involved."""
  source = tmp_path / "server" / "cifar.tar.gz"
  expected, md5 = write_cifar10_tarball(source)
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  monkeypatch.setattr(datasets, "CIFAR10_URL", source.as_uri())
  labels = datasets.load_cifar10(tmp_path / "data")["test"][1]
  np.testing.assert_array_equal(labels, expected["test"][1])
  assert (tmp_path / "data" / datasets.CIFAR10_FILENAME).read_bytes() == source.read_bytes()
  monkeypatch.setattr(datasets, "CIFAR10_URL", (tmp_path / "missing.tar.gz").as_uri())
  with pytest.raises(FileNotFoundError, match="downloading it failed"):
    datasets.load_cifar10(tmp_path / "other")


def test_cifar10_md5_mismatch(tmp_path, monkeypatch):
  data_dir = tmp_path / "data"
  _, md5 = write_cifar10_tarball(data_dir / datasets.CIFAR10_FILENAME)
  official = datasets.CIFAR10_MD5
  with pytest.raises(ValueError, match=f"data_dir: .* has md5 {md5}, expected {official}"):
    datasets.load_cifar10(data_dir)

  def corrupt_download(url, path):
    pathlib.Path(path).write_bytes(b"<html>captive portal</html>")

  monkeypatch.setattr(datasets, "_download", corrupt_download)
  with pytest.raises(ValueError, match=f"the download of .* expected {official}.*try again"):
    datasets.load_cifar10(tmp_path / "fresh")
  assert list((tmp_path / "fresh").iterdir()) == []


class _Exploit:
  def __reduce__(self):
    return (os.system, ("true",))


@pytest.mark.parametrize(
  "member,payload,error,match",
  [
    ("data_batch_2", pickle.dumps({b"data": _Exploit()}), pickle.UnpicklingError, "system"),
    ("data_batch_3", pickle.dumps([1, 2]), ValueError, "expected a dict with keys"),
    (
      "data_batch_4",
      pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}),
      ValueError,
      r"expected b'data' of shape \(N, 3072\) uint8, got \(2, 3071\) uint8",
    ),
    (
      "test_batch",
      pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
      ValueError,
      r"expected 2 integer labels, got shape \(1,\)",
    ),
    (
      "data_batch_1",
      pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
      ValueError,
      r"expected labels in \[0, 10\), got \[0, 10\]",
    ),
  ],
)
def test_cifar10_malformed_batches(tmp_path, monkeypatch, member, payload, error, match):
  path = tmp_path / datasets.CIFAR10_FILENAME
  _, md5 = write_cifar10_tarball(path, replace={f"cifar-10-batches-py/{member}": payload})
  monkeypatch.setattr(datasets, "CIFAR10_MD5", md5)
  with pytest.raises(error, match=match):
    datasets.load_cifar10(tmp_path)


def test_cifar10_missing_member(tmp_path, monkeypatch):
  path = tmp_path / datasets.CIFAR10_FILENAME
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    tar.addfile(info, io.BytesIO(b""))
  monkeypatch.setattr(datasets, "CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
  with pytest.raises(ValueError, match="expected a file cifar-10-batches-py/data_batch_1"):
    datasets.load_cifar10(tmp_path)


def test_load_bad_name():
  with pytest.raises(
    ValueError, match=r"name: expected one of \('cifar10', 'fashion_mnist'\), got"
  ):
    datasets.load("mnist")
