"""TensorFlow-free readers of the image datasets, into in-memory uint8 numpy arrays.

Every reader returns ``{"train": (images, labels), "test": (images, labels)}`` with images
``(N, H, W, C)`` uint8 and labels ``(N,)`` int32, each split in its official file order.

* Fashion-MNIST (:func:`load_fashion_mnist`): the four official IDX files, gzipped
  (``*-ubyte.gz``) or not (``*-ubyte``), read from a local directory: ``manual_dir``, then
  ``$ATTNCONV_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist`` where the Debian
  package ``dataset-fashion-mnist`` installs them. Nothing is downloaded.
* CIFAR-10 (:func:`load_cifar10`): the official "CIFAR-10 python version" tarball, the file the
  paper's code reads through torchvision's ``CIFAR10``. It is downloaded once (with ``urllib``)
  into ``data_dir`` (default ``$ATTNCONV_DATA_DIR``, else ``~/.cache/attnconv``), its md5 is checked
  on every read, and the pickled batches are read straight from the tarball (``data_batch_1`` ..
  ``data_batch_5`` for train, ``test_batch`` for test), with torchvision's layout: each row of 3072
  bytes is a channel-major 3x32x32 image, transposed to 32x32x3.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np

__all__ = [
  "CIFAR10_FILENAME",
  "CIFAR10_MD5",
  "CIFAR10_TEST_BATCH",
  "CIFAR10_TRAIN_BATCHES",
  "CIFAR10_URL",
  "DATA_DIR_ENV_VAR",
  "DEFAULT_DATA_DIR",
  "FASHION_MNIST_DEFAULT_DIR",
  "FASHION_MNIST_ENV_VAR",
  "FASHION_MNIST_FILES",
  "Splits",
  "default_data_dir",
  "find_fashion_mnist_dir",
  "load",
  "load_cifar10",
  "load_fashion_mnist",
  "read_idx",
]

Splits = dict[str, tuple[np.ndarray, np.ndarray]]

DATA_DIR_ENV_VAR = "ATTNCONV_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/attnconv"

# ----------------------------------------------------------------------------------------------
# Fashion-MNIST.

FASHION_MNIST_ENV_VAR = "ATTNCONV_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_FASHION_MNIST_SHAPE = (28, 28)
_NUM_CLASSES = 10

_MISSING_FASHION_MNIST = (
  "Fashion-MNIST IDX files not found. Install them with `sudo apt-get install -y "
  "dataset-fashion-mnist` (Debian/Ubuntu; puts them in {default}), or put the four files "
  "{files} (gzipped or not) into a directory and pass it as manual_dir=... or set ${env}."
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) of unsigned bytes.

  Args:
    path: an ``idx1`` (labels) or ``idx3`` (images) file, gzipped if its name ends in ``.gz``.

  Returns:
    uint8 array of the file's shape: ``(N,)`` for labels, ``(N, H, W)`` for images.

  Raises:
    ValueError: if the file is not an unsigned-byte IDX file or is truncated.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4:
    raise ValueError(f"path: {path} is not an IDX file (expected >= 4 bytes, got {len(data)})")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(
      f"path: {path} is not an unsigned-byte IDX file (expected magic 0x0000 0x08, got "
      f"{zero:#06x} {dtype_code:#04x})"
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(
      f"path: {path} has {len(data)} bytes, expected >= {header} for the header of a "
      f"{ndim}-dimensional IDX array"
    )
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = header + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected:
    raise ValueError(
      f"path: {path} has {len(data)} bytes, expected {expected} for an IDX array of shape {shape}"
    )
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist_file(directory: pathlib.Path, key: str) -> pathlib.Path | None:
  """The file of ``key`` in ``directory``: gzipped, else uncompressed, else None."""
  gzipped = directory / FASHION_MNIST_FILES[key]
  for path in (gzipped, gzipped.with_suffix("")):
    if path.is_file():
      return path
  return None


def _has_fashion_mnist_files(directory: pathlib.Path) -> bool:
  return all(_fashion_mnist_file(directory, key) is not None for key in FASHION_MNIST_FILES)


def find_fashion_mnist_dir(manual_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Locates the four Fashion-MNIST IDX files (each gzipped or not).

  Search order: ``manual_dir``, then ``$ATTNCONV_FASHION_MNIST_DIR``, then
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``). An explicitly
  given directory (argument or environment variable) must hold the files.

  Args:
    manual_dir: optional directory holding the four files.

  Returns:
    The directory holding the files.

  Raises:
    FileNotFoundError: if no source holds the files; the message says what to install / set.
  """
  message = _MISSING_FASHION_MNIST.format(
    default=FASHION_MNIST_DEFAULT_DIR,
    files=", ".join(FASHION_MNIST_FILES.values()),
    env=FASHION_MNIST_ENV_VAR,
  )
  for source, directory in (
    ("manual_dir", manual_dir),
    (f"${FASHION_MNIST_ENV_VAR}", os.environ.get(FASHION_MNIST_ENV_VAR) or None),
  ):
    if directory is not None:
      directory = pathlib.Path(directory).expanduser()
      if not _has_fashion_mnist_files(directory):
        missing = [
          name
          for key, name in FASHION_MNIST_FILES.items()
          if not _fashion_mnist_file(directory, key)
        ]
        raise FileNotFoundError(
          f"{source}={str(directory)!r}: expected the four IDX files, missing {missing}. {message}"
        )
      return directory
  directory = pathlib.Path(FASHION_MNIST_DEFAULT_DIR)
  if _has_fashion_mnist_files(directory):
    return directory
  raise FileNotFoundError(message)


def load_fashion_mnist(manual_dir: str | os.PathLike | None = None) -> Splits:
  """Reads Fashion-MNIST from its IDX files, in the files' order.

  Args:
    manual_dir: directory holding the four IDX files (gzipped or not); ``None``: see
      :func:`find_fashion_mnist_dir`.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``: images ``(N, 28, 28, 1)`` uint8,
    labels ``(N,)`` int32 in ``[0, 10)`` (60000 train and 10000 test examples for the official
    files).

  Raises:
    FileNotFoundError: if the files are not found.
    ValueError: if a file is not an unsigned-byte IDX file of the expected shape, or the labels
      do not match the images.
  """
  directory = find_fashion_mnist_dir(manual_dir)
  splits = {}
  for split in ("train", "test"):
    images_path = _fashion_mnist_file(directory, f"{split}_images")
    labels_path = _fashion_mnist_file(directory, f"{split}_labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != _FASHION_MNIST_SHAPE:
      raise ValueError(
        f"manual_dir: {images_path}: expected images of shape (N, 28, 28), got {images.shape}"
      )
    if labels.shape != images.shape[:1]:
      raise ValueError(
        f"manual_dir: {labels_path}: expected labels of shape {images.shape[:1]} (one per image "
        f"of {images_path.name}), got {labels.shape}"
      )
    if labels.size and labels.max() >= _NUM_CLASSES:
      raise ValueError(
        f"manual_dir: {labels_path}: expected labels in [0, {_NUM_CLASSES}), got a label "
        f"{int(labels.max())}"
      )
    splits[split] = (images[..., None].copy(), labels.astype(np.int32))
  return splits


# ----------------------------------------------------------------------------------------------
# CIFAR-10.

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILENAME = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "cifar-10-batches-py/test_batch"
_CIFAR10_SHAPE = (3, 32, 32)  # channel-major rows of 3072 bytes
_DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation

# The only globals a CIFAR-10 batch pickle (a dict of lists, bytes and one uint8 ndarray, written
# by Python 2 or 3 with numpy 1 or 2) needs; anything else is refused rather than executed.
_PICKLE_GLOBALS = frozenset(
  {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
  }
)


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles a CIFAR-10 batch, allowing only the globals of :data:`_PICKLE_GLOBALS`."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
        f"a CIFAR-10 batch may only reference numpy arrays, got the global {module}.{name}"
      )
    return super().find_class(module, name)


def default_data_dir() -> pathlib.Path:
  """``$ATTNCONV_DATA_DIR`` if set and non-empty, else ``~/.cache/attnconv`` (expanded)."""
  return pathlib.Path(os.environ.get(DATA_DIR_ENV_VAR) or DEFAULT_DATA_DIR).expanduser()


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _download(url: str, path: pathlib.Path) -> None:
  """Fetches ``url`` into the file ``path`` (a stalled connection fails after a minute)."""
  with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as f:
    shutil.copyfileobj(response, f, 1 << 20)


def _cifar10_tarball(data_dir: pathlib.Path, download: bool) -> pathlib.Path:
  """The verified tarball in ``data_dir``, downloaded first if it is missing and allowed."""
  path = data_dir / CIFAR10_FILENAME
  if not path.is_file():
    by_hand = (
      f"Download {CIFAR10_URL} (md5 {CIFAR10_MD5}) by hand into that directory, or pass "
      f"data_dir=... (or set ${DATA_DIR_ENV_VAR}) to a directory that holds it."
    )
    if not download:
      raise FileNotFoundError(
        f"data_dir={str(data_dir)!r}: expected the CIFAR-10 tarball {CIFAR10_FILENAME}, not found "
        f"(download=False). {by_hand}"
      )
    print(f"Downloading CIFAR-10 (163 MB) from {CIFAR10_URL} to {path}", file=sys.stderr)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Into a temporary file of the same directory, moved into place once complete and verified,
    # so an interrupted or concurrent download never leaves a partial tarball under the name.
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=f".{path.name}.", delete=False) as f:
      tmp = pathlib.Path(f.name)
    try:
      try:
        _download(CIFAR10_URL, tmp)
      except (urllib.error.URLError, OSError) as err:
        raise FileNotFoundError(
          f"data_dir={str(data_dir)!r}: expected the CIFAR-10 tarball {CIFAR10_FILENAME}, not "
          f"found, and downloading it failed ({err}). {by_hand}"
        ) from err
      _check_md5(
        tmp, f"the download of {CIFAR10_URL}", "try again, or " + by_hand[0].lower() + by_hand[1:]
      )
      os.replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)
    return path
  _check_md5(path, str(path), "delete it to download it again")
  return path


def _check_md5(path: pathlib.Path, what: str, remedy: str) -> None:
  received = _md5(path)
  if received != CIFAR10_MD5:
    raise ValueError(
      f"data_dir: {what} has md5 {received}, expected {CIFAR10_MD5} (the official CIFAR-10 "
      f"python tarball): a partial or different file; {remedy}"
    )


def _read_cifar10_batch(tar: tarfile.TarFile, member: str, path: pathlib.Path):
  try:
    f = tar.extractfile(member)
  except KeyError:
    f = None
  if f is None:
    raise ValueError(f"data_dir: {path}: expected a file {member} in the tarball, not found")
  with f:
    batch = _BatchUnpickler(f, encoding="bytes").load()
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    received = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(
      f"data_dir: {path}: {member}: expected a dict with keys b'data' and b'labels', got {received}"
    )
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[b"labels"])
  row = int(np.prod(_CIFAR10_SHAPE))
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
    raise ValueError(
      f"data_dir: {path}: {member}: expected b'data' of shape (N, {row}) uint8, got "
      f"{data.shape} {data.dtype}"
    )
  if labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"data_dir: {path}: {member}: expected {data.shape[0]} integer labels, got shape "
      f"{labels.shape} {labels.dtype}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
    raise ValueError(
      f"data_dir: {path}: {member}: expected labels in [0, {_NUM_CLASSES}), got "
      f"[{int(labels.min())}, {int(labels.max())}]"
    )
  images = np.ascontiguousarray(data.reshape((-1, *_CIFAR10_SHAPE)).transpose(0, 2, 3, 1))
  return images, labels.astype(np.int32)


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Splits:
  """Reads CIFAR-10 from the official python tarball, downloading it once if needed.

  Args:
    data_dir: directory of ``cifar-10-python.tar.gz`` (``None``: :func:`default_data_dir`).
    download: fetch the tarball from :data:`CIFAR10_URL` into ``data_dir`` if it is missing.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``: images ``(N, 32, 32, 3)`` uint8
    (HWC), labels ``(N,)`` int32; train is ``data_batch_1`` .. ``data_batch_5`` concatenated in
    order (50000 examples), test is ``test_batch`` (10000), as torchvision's ``CIFAR10``.

  Raises:
    FileNotFoundError: if the tarball is missing and cannot (or may not) be downloaded.
    ValueError: if its md5 is not :data:`CIFAR10_MD5` or a batch is malformed.
  """
  data_dir = default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser()
  path = _cifar10_tarball(data_dir, download)
  with tarfile.open(path, "r:gz") as tar:
    train = [_read_cifar10_batch(tar, member, path) for member in CIFAR10_TRAIN_BATCHES]
    test = _read_cifar10_batch(tar, CIFAR10_TEST_BATCH, path)
  return {
    "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
    "test": test,
  }


# ----------------------------------------------------------------------------------------------
# Dispatch.

_NAMES = ("cifar10", "fashion_mnist")


def load(
  name: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
) -> Splits:
  """Reads dataset ``name`` into memory.

  Args:
    name: ``"cifar10"`` or ``"fashion_mnist"``.
    data_dir: CIFAR-10 only: directory of the downloaded tarball (see :func:`load_cifar10`).
    manual_dir: Fashion-MNIST only: directory of the IDX files (see :func:`load_fashion_mnist`).

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``, uint8 ``(N, H, W, C)`` images and
    int32 ``(N,)`` labels.

  Raises:
    ValueError: on an unknown ``name``; see the readers for the rest.
  """
  if name == "cifar10":
    return load_cifar10(data_dir)
  if name == "fashion_mnist":
    return load_fashion_mnist(manual_dir)
  raise ValueError(f"name: expected one of {_NAMES}, got {name!r}")
