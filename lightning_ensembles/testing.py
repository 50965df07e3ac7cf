"""Helpers for tests and smoke runs: a tiny CIFAR-10 written in the real on-disk format.

The CIFAR-10 reproduction of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570), trains Wide ResNets on CIFAR-10 (Krizhevsky, 2009). Tests and CPU smoke
runs cannot download the 170 MB archive, yet they should exercise the real loading code
(:class:`torchvision.datasets.CIFAR10` behind :class:`~lightning_ensembles.data.CIFAR10DataModule`), not a
stand-in. :func:`write_fake_cifar10` therefore writes a few hundred images in exactly the layout of the
official "python version": ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``, each a pickled dict. Like the originals (pickled by Python 2), the dict
keys and byte strings are written as Python 2 ``str`` objects, so they load with ``encoding="latin1"``
(what torchvision uses) as ``str`` keys and with ``encoding="bytes"`` as ``bytes`` keys.

The images are learnable: every class has its own mean colour and a brighter square in a class-dependent
corner, plus Gaussian noise, so a tiny model beats chance within a few steps. Their md5 sums cannot match
the official ones, so load them with ``verify_checksums=False``.

:func:`write_fake_svhn` does the same for the SVHN test split that serves as CIFAR-10's out-of-distribution
set (``CIFAR10DataModule(ood="svhn")``): a ``test_32x32.mat`` MATLAB file as :class:`torchvision.datasets.SVHN`
reads it.

:func:`write_fake_fashion_mnist` writes a tiny Fashion-MNIST for
:class:`~lightning_ensembles.data.FashionMNISTDataModule`: the four idx files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) in the real idx format,
plain or gzipped, in a flat folder (as Debian's ``dataset-fashion-mnist``) or in torchvision's
``FashionMNIST/raw/``. Every class has a bright block at its own position, plus noise. Its counts are not the
published ones, so load it with ``strict=False``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ensembles._validation import check_bool, check_int, expected

__all__ = ["CIFAR10_CLASSES", "write_fake_cifar10", "write_fake_fashion_mnist", "write_fake_svhn"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""The class names of CIFAR-10, in label order, as stored in ``batches.meta``."""

_BASE_FOLDER = "cifar-10-batches-py"
_NUM_TRAIN_BATCHES = 5

# One mean colour (R, G, B) per class, far enough apart to be separable under the noise below.
_CLASS_COLOURS = np.array(
    [
        [200, 60, 60],
        [60, 200, 60],
        [60, 60, 200],
        [200, 200, 60],
        [200, 60, 200],
        [60, 200, 200],
        [130, 130, 130],
        [230, 150, 80],
        [80, 150, 230],
        [40, 40, 40],
    ],
    dtype=np.float64,
)


# The pure-Python pickler, whose per-type `dispatch` table can be extended (the C one cannot).
_PurePythonPickler: Any = pickle._Pickler  # type: ignore[attr-defined]


class _Python2StrPickler(_PurePythonPickler):
    """A pickler that writes ``bytes`` as Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING``) opcodes.

    The official CIFAR-10 files were pickled by Python 2; torchvision reads them with ``encoding="latin1"``,
    which decodes those strings to ``str``. Python 3 ``bytes`` would stay ``bytes`` under that encoding and
    the keys would not match, so the fake files use the same opcodes as the real ones. numpy's array state
    (the raw pixel buffer) goes through this path too, exactly as in the originals.
    """

    dispatch = _PurePythonPickler.dispatch.copy()

    def _save_bytes_as_python2_str(self, obj: bytes) -> None:
        """Write ``obj`` as a Python 2 byte string and memoize it.

        Args:
            obj: The bytes to write.
        """
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_as_python2_str


def _dump_python2_style(obj: Any, path: Path) -> None:
    """Pickle ``obj`` to ``path`` with protocol 2 and Python 2 byte strings.

    Args:
        obj: The object to pickle.
        path: Where to write it.
    """
    with open(path, "wb") as file:
        _Python2StrPickler(file, protocol=2).dump(obj)


def _fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one class-dependent 32x32 RGB image per label.

    Args:
        labels: Integer labels in ``[0, 10)``, shape ``(N,)``.
        rng: The random generator to draw the noise from.

    Returns:
        A uint8 array of shape ``(N, 3072)``: each row holds the red, then green, then blue 32x32 plane,
        row-major, as in the official files.
    """
    num = len(labels)
    images = np.empty((num, 3, 32, 32), dtype=np.float64)
    images[:] = _CLASS_COLOURS[labels][:, :, None, None]
    # A brighter 12x12 square whose corner depends on the class (four corners, shifted for classes >= 4).
    for index, label in enumerate(labels):
        row = 2 + 16 * (label % 2) + (label // 4)
        col = 2 + 16 * ((label // 2) % 2) + (label // 4)
        images[index, :, row : row + 12, col : col + 12] += 50.0
    images += rng.normal(0.0, 25.0, size=images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(num, 3 * 32 * 32)


def _balanced_labels(num: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``num`` labels cycling through the 10 classes, shuffled.

    Args:
        num: How many labels.
        rng: The random generator used to shuffle.

    Returns:
        An int64 array of shape ``(num,)`` with values in ``[0, 10)``.
    """
    return rng.permutation(np.arange(num) % len(CIFAR10_CLASSES)).astype(np.int64)


def _batch_dict(batch_label: str, labels: np.ndarray, data: np.ndarray, first_index: int) -> dict[bytes, Any]:
    """Build one batch dict in the layout of the official files.

    Args:
        batch_label: The batch description, e.g. ``"training batch 1 of 5"``.
        labels: The labels of the batch.
        data: The images of the batch, shape ``(N, 3072)``.
        first_index: The running index of the first image, used for the file names.

    Returns:
        The dict with keys ``b"batch_label"``, ``b"labels"``, ``b"data"`` and ``b"filenames"``.
    """
    return {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": data,
        b"filenames": [
            f"fake_{CIFAR10_CLASSES[int(label)]}_{first_index + offset:06d}.png".encode()
            for offset, label in enumerate(labels)
        ],
    }


def write_fake_cifar10(
    root: str | os.PathLike[str], num_train: int = 100, num_test: int = 50, seed: int = 0
) -> Path:
    """Write a tiny CIFAR-10 in the official on-disk format under ``root``.

    Creates ``<root>/cifar-10-batches-py/`` holding ``data_batch_1`` .. ``data_batch_5`` (``num_train``
    images split as evenly as possible over the five), ``test_batch`` (``num_test`` images) and
    ``batches.meta``. Labels are balanced over the 10 classes and shuffled; existing files are overwritten.
    The result is deterministic in ``seed``.

    Args:
        root: The dataset root, i.e. what ``--data.root`` would be.
        num_train: The number of training images.
        num_test: The number of test images.
        seed: Seed for the labels' order and the pixel noise.

    Returns:
        The path of the ``cifar-10-batches-py`` directory.

    Raises:
        ValueError: If ``num_train`` or ``num_test`` is not an int >= 1, or ``seed`` is not an int >= 0.

    Example:
        >>> import pickle, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     batches = write_fake_cifar10(root, num_train=20, num_test=10)
        ...     names = sorted(path.name for path in batches.iterdir())
        ...     with open(batches / "data_batch_1", "rb") as file:
        ...         entry = pickle.load(file, encoding="latin1")
        >>> names[:3], names[-2:]
        (['batches.meta', 'data_batch_1', 'data_batch_2'], ['data_batch_5', 'test_batch'])
        >>> sorted(entry)
        ['batch_label', 'data', 'filenames', 'labels']
        >>> entry["data"].shape, entry["data"].dtype
        ((4, 3072), dtype('uint8'))
    """
    check_int(num_train, "num_train", 1)
    check_int(num_test, "num_test", 1)
    check_int(seed, "seed", 0)

    batches_dir = Path(root).expanduser() / _BASE_FOLDER
    batches_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    train_labels = _balanced_labels(num_train, rng)
    train_data = _fake_images(train_labels, rng)
    first_index = 0
    index_chunks = np.array_split(np.arange(num_train), _NUM_TRAIN_BATCHES)
    for number, indices in enumerate(index_chunks, start=1):
        batch = _batch_dict(
            f"training batch {number} of {_NUM_TRAIN_BATCHES}",
            train_labels[indices],
            train_data[indices],
            first_index,
        )
        _dump_python2_style(batch, batches_dir / f"data_batch_{number}")
        first_index += len(indices)

    test_labels = _balanced_labels(num_test, rng)
    test_batch = _batch_dict("testing batch 1 of 1", test_labels, _fake_images(test_labels, rng), first_index)
    _dump_python2_style(test_batch, batches_dir / "test_batch")

    meta = {
        b"num_cases_per_batch": max(len(indices) for indices in index_chunks),
        b"label_names": [name.encode() for name in CIFAR10_CLASSES],
        b"num_vis": 3 * 32 * 32,
    }
    _dump_python2_style(meta, batches_dir / "batches.meta")
    return batches_dir


def write_fake_svhn(root: str | os.PathLike[str], num_test: int = 50, seed: int = 0) -> Path:
    """Write a tiny SVHN test split in the official format: ``<root>/test_32x32.mat``.

    The file holds what the official one holds (MATLAB 5 format, written with :func:`scipy.io.savemat`):
    ``X``, uint8 images of shape ``(32, 32, 3, N)``, and ``y``, labels of shape ``(N, 1)`` in ``1..10``
    (SVHN writes the digit 0 as 10). Each image is a grey-ish background with a bright vertical bar, plus
    noise: unlike every class of :func:`write_fake_cifar10`. Its md5 cannot match, so load it with
    ``verify_checksums=False``. Deterministic in ``seed``; an existing file is overwritten.

    Args:
        root: The folder to write into (``--data.ood_root``), created if missing.
        num_test: The number of images.
        seed: Seed of the labels and the noise.

    Returns:
        The path of ``test_32x32.mat``.

    Raises:
        ValueError: If ``num_test`` is not an int >= 1 or ``seed`` not an int >= 0.

    Example:
        >>> import tempfile
        >>> from scipy.io import loadmat
        >>> with tempfile.TemporaryDirectory() as root:
        ...     mat = loadmat(write_fake_svhn(root, num_test=7))
        >>> mat["X"].shape, mat["X"].dtype, mat["y"].shape
        ((32, 32, 3, 7), dtype('uint8'), (7, 1))
    """
    check_int(num_test, "num_test", 1)
    check_int(seed, "seed", 0)
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 11, size=num_test)
    images = np.empty((num_test, 32, 32, 3), dtype=np.float64)
    images[:] = rng.uniform(90, 160, size=(num_test, 1, 1, 1))
    for index, label in enumerate(labels):
        left = 4 + 2 * int(label)
        images[index, 6:26, left : left + 4, :] += 80.0
    images += rng.normal(0.0, 15.0, size=images.shape)
    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    file = path / "test_32x32.mat"
    savemat(
        file,
        {
            "X": np.ascontiguousarray(pixels.transpose(1, 2, 3, 0)),
            "y": labels.reshape(-1, 1).astype(np.uint8),
        },
    )
    return file


_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_LAYOUTS = ("flat", "torchvision")


def _fake_fashion_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one class-dependent 28x28 grey-scale image per label.

    Args:
        labels: Integer labels in ``[0, 10)``, shape ``(N,)``.
        rng: The random generator to draw the noise from.

    Returns:
        A uint8 array of shape ``(N, 28, 28)``: a dark noisy background with a bright 8x6 block whose position
        depends on the class (a 3x4 grid of positions, the first ten used).
    """
    images = rng.normal(40.0, 20.0, size=(len(labels), 28, 28))
    for index, label in enumerate(labels):
        row, col = 1 + 9 * (int(label) // 4), 1 + 7 * (int(label) % 4)
        images[index, row : row + 8, col : col + 6] += 170.0
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _write_idx(path: Path, magic: int, data: np.ndarray, compress: bool) -> None:
    """Write ``data`` (uint8) as an idx file: the big-endian magic number and dimensions, then the bytes.

    Args:
        path: The file, without ``.gz``; with ``compress`` ``.gz`` is appended. The other variant (plain or
            ``.gz``) is removed, so that only what was written can be read.
        magic: ``2051`` for images ``(N, 28, 28)``, ``2049`` for labels ``(N,)``.
        data: The uint8 array.
        compress: Gzip the file (with a fixed time stamp, so the bytes depend on the data only).
    """
    raw = struct.pack(f">{1 + data.ndim}I", magic, *data.shape) + np.ascontiguousarray(data).tobytes()
    plain, gzipped = path, path.with_name(path.name + ".gz")
    target, other = (gzipped, plain) if compress else (plain, gzipped)
    other.unlink(missing_ok=True)
    target.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)


def write_fake_fashion_mnist(
    root: str | os.PathLike[str],
    num_train: int = 200,
    num_test: int = 50,
    layout: str = "flat",
    compress: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny Fashion-MNIST as the four idx files of the official format.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each with ``.gz`` when ``compress``): a big-endian header (magic number 2051 and
    the dimensions ``N, 28, 28`` for images, 2049 and ``N`` for labels), then the uint8 data. Labels are
    balanced (``num // 10`` of every class, the remainder one each to the first classes) and shuffled; each
    class's images have a bright block at a class-dependent position over noise, so a tiny model beats chance
    within a few steps. Existing files are overwritten (and the other variant, plain or ``.gz``, removed). The
    result is deterministic in ``seed``. The counts are not the published ones: load it with ``strict=False``.

    Args:
        root: The dataset root, i.e. what ``--data.root`` would be.
        num_train: The number of training images.
        num_test: The number of test images.
        layout: ``"flat"`` writes into ``root`` itself (as Debian's ``/usr/share/datasets/fashion-mnist``),
            ``"torchvision"`` into ``root/FashionMNIST/raw`` (where torchvision downloads them).
        compress: Gzip the files (named ``*.gz``); else write them plain.
        seed: Seed of the labels' order and the pixel noise.

    Returns:
        The folder the four files were written to.

    Raises:
        ValueError: If ``num_train`` or ``num_test`` is not an int >= 1, ``seed`` not an int >= 0, ``layout``
            not ``"flat"`` or ``"torchvision"``, or ``compress`` not a bool.

    Example:
        >>> import tempfile
        >>> from lightning_ensembles.data.fashion_mnist import read_idx
        >>> with tempfile.TemporaryDirectory() as root:
        ...     folder = write_fake_fashion_mnist(root, num_train=30, num_test=10, layout="torchvision")
        ...     names = sorted(path.name for path in folder.iterdir())
        ...     images = read_idx(folder / "train-images-idx3-ubyte.gz", 3)
        ...     labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", 1)
        >>> folder.relative_to(root).as_posix(), names[0]
        ('FashionMNIST/raw', 't10k-images-idx3-ubyte.gz')
        >>> images.shape, images.dtype, sorted(labels.tolist())
        ((30, 28, 28), dtype('uint8'), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    check_int(num_train, "num_train", 1)
    check_int(num_test, "num_test", 1)
    if not isinstance(layout, str) or layout not in _FASHION_MNIST_LAYOUTS:
        raise expected("layout", f"one of {list(_FASHION_MNIST_LAYOUTS)}", layout)
    check_bool(compress, "compress")
    check_int(seed, "seed", 0)

    folder = Path(root).expanduser()
    if layout == "torchvision":
        folder = folder / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, num in (("train", num_train), ("test", num_test)):
        image_name, label_name = _FASHION_MNIST_FILES[split]
        labels = _balanced_labels(num, rng).astype(np.uint8)
        _write_idx(folder / image_name, 2051, _fake_fashion_images(labels, rng), compress)
        _write_idx(folder / label_name, 2049, labels, compress)
    return folder
