"""Fashion-MNIST as a LightningDataModule: real data on which model size matters, offline from idx files.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models* (arXiv
2005.00570), find that the gain of an ensemble of small networks over one large network at equal multiply-adds
grows with the model size and is largest when the models approach what the data set can foster. Testing that
needs a data set on which a larger network is better. Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv
1708.07747: 60,000 training and 10,000 test images of 28x28 grey-scale clothing, 10 balanced classes) is such a
set, small enough for a CPU, and available offline.

Where the files come from (``--data.root``), in the order they are looked for:

- torchvision's layout, ``<root>/FashionMNIST/raw/``, which :class:`torchvision.datasets.FashionMNIST` fills
  when ``download`` is true and the network allows (torchvision checks the md5 of what it downloads);
- a flat folder holding the four files, such as Debian's package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist/``).

Each of ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` may be plain or gzipped (``.gz``). The md5 sums are not compared: the sums torchvision
lists are of the ``.gz`` archives, and Debian's archives were recompressed, so their sums differ while the
decompressed contents are the same idx files. Instead every file is checked for what can be checked: its idx
header (magic number, unsigned-byte type, dimensions), its length against the header, one label per image and
labels in ``[0, 10)``; with ``strict=True`` (the default) also the published counts, 60,000 and 10,000, and
the balanced classes, 6,000 and 1,000 images each. A missing or damaged file is an error naming the file and
how to get it. torchvision's own idx reader asserts on these failures without naming the file, so the reader
here is our own (the format is four lines of ``struct``).

``train_size`` draws a seeded, class-balanced subset of the training images (after the validation split is
held out), so the size of the training set is an axis of a sweep. The published augmentation (the Random
Erasing repository's Fashion-MNIST recipe: 4-pixel zero padding, a random 28x28 crop and a horizontal flip) is
``augment=True``. Out-of-distribution sets: held-out classes (``ood_classes``), or scikit-learn's handwritten
digits scaled to MNIST's layout (``ood="digits"``: each 8x8 digit resized to 20x20 and centred in a 28x28
frame, as MNIST centres its digits), a real MNIST-like set that needs no download.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms
from typing_extensions import override

from lightning_ensembles._validation import check_bool, check_held_out_classes, check_int, expected
from lightning_ensembles.data.sampling import SplitDataModule

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNISTCorruptedError",
    "FashionMNISTDataModule",
    "FashionMNISTNotFoundError",
    "find_idx_file",
    "read_idx",
]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
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
"""The class names, in label order (Xiao et al. 2017)."""

FASHION_MNIST_MEAN = 0.2860
"""Mean pixel of the 60,000 training images in [0, 1] units (0.28604 computed on the files)."""

FASHION_MNIST_STD = 0.3530
"""Population standard deviation of the training pixels in [0, 1] units (0.35302 computed on the files)."""

_NUM_CLASSES = 10
_SIDE = 28
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_PUBLISHED_COUNTS = {"train": 60_000, "test": 10_000}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # 0x00000803: ubyte, 3 dims; 0x00000801: ubyte, 1 dim
_STAGES = ("fit", "validate", "test", "predict")
OOD_SETS = ("digits",)
"""The named out-of-distribution test sets :class:`FashionMNISTDataModule` offers (``--data.ood``)."""


class FashionMNISTNotFoundError(FileNotFoundError):
    """A Fashion-MNIST file is missing and could not (or may not) be downloaded."""


_REFETCH = (
    "To get intact files: `apt-get install --reinstall dataset-fashion-mnist` (Debian; they land in "
    "/usr/share/datasets/fashion-mnist/), or delete the file and pass `--data.download true` where the internet "
    "is reachable."
)


class FashionMNISTCorruptedError(RuntimeError):
    """A Fashion-MNIST file is not a readable idx file of the expected shape, count or labels.

    The message names the file and the problem, then says how to get intact files.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} {_REFETCH}")


def _how_to_get(root: str | os.PathLike[str]) -> str:
    return (
        f"Get the four files with `apt-get install dataset-fashion-mnist` (Debian; they land in "
        f"/usr/share/datasets/fashion-mnist/, pass that folder as `--data.root`), or pass `--data.download true` "
        f"where the internet is reachable so torchvision fetches them into {os.fspath(root)!r}/FashionMNIST/raw/"
    )


def _folders(root: str | os.PathLike[str]) -> list[Path]:
    base = Path(os.path.expanduser(os.fspath(root)))
    return [base / "FashionMNIST" / "raw", base]


def find_idx_file(root: str | os.PathLike[str], name: str) -> Path:
    """Find one idx file under ``root``: torchvision's ``FashionMNIST/raw/`` first, then ``root`` itself.

    In each folder the plain file is preferred to its ``.gz``.

    Args:
        root: the dataset root (``--data.root``).
        name: the file's name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.

    Returns:
        The path of the file found.

    Raises:
        FashionMNISTNotFoundError: naming the file, the folders looked in and how to get it.
    """
    for folder in _folders(root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    looked = " and ".join(repr(str(f)) for f in _folders(root))
    raise FashionMNISTNotFoundError(
        f"Fashion-MNIST's {name} (or {name}.gz) was not found in {looked}. {_how_to_get(root)}."
    )


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (plain or gzipped), checking its header against its length.

    The idx format (LeCun et al., MNIST): two zero bytes, the type code ``0x08`` (unsigned byte), the number
    of dimensions, then one big-endian uint32 per dimension, then the data.

    Args:
        path: the file.
        ndim: the number of dimensions expected (3 for images, 1 for labels).

    Returns:
        The uint8 array of the shape the header gives.

    Raises:
        FashionMNISTCorruptedError: naming the file, for a file that cannot be decompressed, a wrong magic
            number, type or dimension count, or a length that does not match the header (a truncated file).
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: damaged deflate data inside the .gz
        truncated = " (the file is truncated)" if isinstance(err, EOFError) else ""
        raise FashionMNISTCorruptedError(
            f"{path} could not be read ({type(err).__name__}: {err}){truncated}; delete it and fetch it again."
        ) from err
    header = 4 + 4 * ndim
    magic = 0x800 + ndim
    if len(raw) < header:
        raise FashionMNISTCorruptedError(
            f"{path} holds {len(raw)} bytes, fewer than the {header}-byte idx header: the file is truncated."
        )
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise FashionMNISTCorruptedError(
            f"{path} starts with the idx magic number {found} (0x{found:08x}), but an unsigned-byte idx file of "
            f"{ndim} dimension(s) starts with {magic} (0x{magic:08x}): it is not the expected idx file."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise FashionMNISTCorruptedError(
            f"{path}: its idx header gives the shape {tuple(shape)}, i.e. {size} data bytes, but the file holds "
            f"{len(raw) - header}: the file is "
            f"{'truncated' if len(raw) - header < size else 'longer than its header says'}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_split(root: str | os.PathLike[str], split: str, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split's images ``(N, 28, 28)`` and labels ``(N,)`` (see the module docstring).

    Raises:
        FashionMNISTNotFoundError: for a missing file.
        FashionMNISTCorruptedError: naming the file, for a malformed file or counts that do not hold.
    """
    image_path = find_idx_file(root, _FILES[f"{split}_images"])
    label_path = find_idx_file(root, _FILES[f"{split}_labels"])
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise FashionMNISTCorruptedError(
            f"{image_path} holds images of {images.shape[1]}x{images.shape[2]} pixels, but Fashion-MNIST's are "
            f"{_SIDE}x{_SIDE}."
        )
    if len(labels) != len(images):
        raise FashionMNISTCorruptedError(
            f"{label_path} holds {len(labels)} labels but {image_path} holds {len(images)} images: the files "
            "do not belong together."
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise FashionMNISTCorruptedError(
            f"{label_path} holds the label {int(labels.max())}, but Fashion-MNIST's labels are 0..9."
        )
    if strict:
        published = _PUBLISHED_COUNTS[split]
        if len(labels) != published:
            raise FashionMNISTCorruptedError(
                f"{image_path} holds {len(images)} images, but Fashion-MNIST's {split} split has {published}. "
                "Only files you generated yourself (e.g. with "
                "`lightning_ensembles.testing.write_fake_fashion_mnist`) should be loaded with "
                "`--data.strict false`."
            )
        counts = np.bincount(labels, minlength=_NUM_CLASSES)
        if not (counts == published // _NUM_CLASSES).all():
            raise FashionMNISTCorruptedError(
                f"{label_path} holds the class counts {counts.tolist()}, but Fashion-MNIST's {split} split has "
                f"{published // _NUM_CLASSES} images of every class."
            )
    return images, labels.astype(np.int64)


def _balanced_pick(labels: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """Pick ``count`` indices, class-balanced: ``count // K`` of each of the K classes present, the remainder
    from randomly chosen classes, all drawn with ``generator``.

    Returns:
        The picked indices, sorted.
    """
    classes = np.unique(labels)
    per_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    quota = {c: count // len(classes) for c in per_class}
    extra = torch.randperm(len(classes), generator=generator).tolist()
    for i in extra[: count % len(classes)]:
        quota[int(classes[i])] += 1
    picked = []
    for c, indices in per_class.items():
        order = torch.randperm(len(indices), generator=generator).numpy()
        picked.append(indices[order[: min(quota[c], len(indices))]])
    chosen = np.concatenate(picked) if picked else np.empty(0, dtype=np.int64)
    if len(chosen) < count:  # a class has fewer images than its quota (only in small generated data)
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        order = torch.randperm(len(rest), generator=generator).numpy()
        chosen = np.concatenate([chosen, rest[order[: count - len(chosen)]]])
    return np.sort(chosen)


def digits_as_mnist() -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits in MNIST's layout: ``(N, 1, 28, 28)`` floats in [0, 1].

    Each 8x8 digit (pixels 0..16) is divided by 16, resized to 20x20 (bilinear, antialiased) and centred in
    a 28x28 frame of zeros, as MNIST fits its digits into a 20x20 box centred in 28x28.

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "`--data.ood digits` needs scikit-learn: `pip install scikit-learn` "
            "(or install lightning-ensembles with its `dev` extra)."
        ) from err
    digits = torch.from_numpy(np.asarray(load_digits().data, dtype=np.float32)).reshape(-1, 1, 8, 8) / 16.0
    resized = torch.nn.functional.interpolate(
        digits, size=(20, 20), mode="bilinear", align_corners=False, antialias=True
    )
    return torch.nn.functional.pad(resized.clamp(0.0, 1.0), (4, 4, 4, 4))


class _AugmentedImages(Dataset[tuple[torch.Tensor, int]]):
    """Images ``(N, 1, 28, 28)`` in [0, 1] with a per-sample transform (torchvision, on tensors)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], Any]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST (28x28 grey-scale, 10 classes) with a seeded validation split and training subset.

    Images are float32 tensors ``(1, 28, 28)``: pixels divided by 255, then normalised with
    :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`; labels are int64 in ``[0, 10)``. ``val_size``
    training images, class-balanced and drawn by ``seed``, are held out for validation (with ``val_size == 0``
    :meth:`val_dataloader` returns the test split, as in :class:`~lightning_ensembles.data.CIFAR10DataModule`).
    Of the rest, ``train_size`` (all if ``None``) are drawn by ``seed``, class-balanced, for training: the
    validation split is the same for every ``train_size`` of a seed, and a smaller subset is not nested in a
    larger one. The training loader shuffles by ``(seed, epoch)``. The test split is always the 10,000 test
    images.

    Out-of-distribution evaluation (:mod:`lightning_ensembles.ood`): with ``ood_classes`` (e.g. ``[8, 9]``,
    bags and ankle boots) those classes are removed from every split, the others are relabelled ``0..K-1``
    (:attr:`classes` names them) and the held-out classes' test images form the OOD set; with ``ood="digits"``
    the OOD set is :func:`digits_as_mnist`. Either way :meth:`test_dataloader` returns
    ``[test loader, OOD loader]``, Lightning's multiple test loaders, which
    :class:`~lightning_ensembles.module.EnsembleLightningModule` logs as ``test/ood/...``.

    Args:
        root: the folder holding the four idx files, plain or ``.gz``: torchvision's ``FashionMNIST/raw/``
            below it, or the files directly in it (e.g. ``/usr/share/datasets/fashion-mnist``).
        batch_size: images per batch, for every loader.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_size: training images held out for validation (class-balanced); 0 validates on the test split.
        train_size: training images drawn (class-balanced) from those not held out; ``None``: all of them.
        download: where files are missing, let :class:`torchvision.datasets.FashionMNIST` download them into
            ``<root>/FashionMNIST/raw/`` in :meth:`prepare_data` (needs the internet).
        strict: also check the published counts (60,000 and 10,000 images) and balanced classes; turn off
            only for generated data such as :func:`lightning_ensembles.testing.write_fake_fashion_mnist`.
        augment: pad by 4, randomly crop 28x28 and flip horizontally (the published recipe); else none.
        seed: seed of the validation split, the training subset and the training order.
        ood: ``"digits"`` adds scikit-learn's digits in MNIST's layout as the OOD test set; ``None``: none.
        ood_classes: classes held out as the OOD test set, distinct ints in ``[0, 9]`` leaving at least 2;
            ``None`` or ``[]``: none. Not together with ``ood``.

    Raises:
        ValueError: if an argument is out of range; the message names its ``--data.*`` flag.

    Example:
        >>> dm = FashionMNISTDataModule(root="/usr/share/datasets/fashion-mnist", train_size=6000)
        >>> dm.num_classes, dm.input_shape
        (10, (1, 28, 28))
        >>> FashionMNISTDataModule(ood_classes=[8, 9]).classes
        ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker']
    """

    num_classes: int = _NUM_CLASSES
    """The number of classes (fewer with ``ood_classes``)."""

    input_shape: tuple[int, int, int] = (1, _SIDE, _SIDE)
    """The shape ``(C, H, W)`` of one image tensor."""

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        train_size: int | None = None,
        download: bool = False,
        strict: bool = True,
        augment: bool = False,
        seed: int = 0,
        ood: Literal["digits"] | None = None,
        ood_classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise expected("--data.root", "a non-empty directory path", root)
        self.root = os.fspath(root)
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.num_workers = check_int(num_workers, "--data.num_workers", 0)
        self.val_size = check_int(val_size, "--data.val_size", 0)
        self.train_size = None if train_size is None else check_int(train_size, "--data.train_size", 1)
        self.download = check_bool(download, "--data.download")
        self.strict = check_bool(strict, "--data.strict")
        self.augment = check_bool(augment, "--data.augment")
        self.seed = check_int(seed, "--data.seed", 0)
        if ood is not None and ood not in OOD_SETS:
            raise expected("--data.ood", f"one of {list(OOD_SETS)} or null", ood)
        self.ood = ood
        self.ood_classes: tuple[int, ...] = check_held_out_classes(
            ood_classes, "--data.ood_classes", _NUM_CLASSES
        )
        """The held-out classes, sorted (empty: none)."""
        if self.ood is not None and self.ood_classes:
            raise ValueError(
                f"Expected at most one of `--data.ood` and `--data.ood_classes` (one OOD test set), but got "
                f"ood={ood!r} and ood_classes={list(self.ood_classes)}."
            )
        self.classes: list[str] = [
            name for c, name in enumerate(FASHION_MNIST_CLASSES) if c not in self.ood_classes
        ]
        """The class name of each label, in label order."""
        self.num_classes = len(self.classes)
        self.save_hyperparameters()

        normalize = transforms.Normalize(mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
        self.train_transform: Callable[[Any], Any] = transforms.Compose(
            [transforms.RandomCrop(_SIDE, padding=4), transforms.RandomHorizontalFlip(), normalize]
        )
        """With ``augment``: the per-image training transform on ``(1, 28, 28)`` tensors in [0, 1]."""
        self.split_indices: dict[str, np.ndarray] = {}
        """Sorted indices of each split into its file, set by :meth:`setup`: ``"train"`` and ``"val"``
        (into the training file) and ``"test"`` (into the test file), in-distribution classes only."""
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None
        self.ood_set: Dataset[Any] | None = None
        """The OOD test set, set by ``setup("test")`` when ``ood`` or ``ood_classes`` is given."""

    @override
    def prepare_data(self) -> None:
        """With ``download``, let torchvision fetch the files that are missing (md5 checked by torchvision).

        Raises:
            FashionMNISTNotFoundError: if the download failed.
        """
        if not self.download:
            return
        try:
            for name in _FILES.values():
                find_idx_file(self.root, name)
            return
        except FashionMNISTNotFoundError:
            pass
        from torchvision.datasets import FashionMNIST

        log.info("Downloading Fashion-MNIST into %s", os.path.join(self.root, "FashionMNIST", "raw"))
        try:
            for train in (True, False):
                FashionMNIST(os.path.expanduser(self.root), train=train, download=True)
        except Exception as err:  # network, disk or archive errors; re-raised with the fix in the message
            raise FashionMNISTNotFoundError(
                f"Downloading Fashion-MNIST into {self.root!r} failed ({type(err).__name__}: {err}). "
                f"{_how_to_get(self.root)}."
            ) from err

    def _tensors(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> tuple[torch.Tensor, ...]:
        relabel = np.full(_NUM_CLASSES, -1, dtype=np.int64)
        kept = [c for c in range(_NUM_CLASSES) if c not in self.ood_classes]
        relabel[kept] = np.arange(len(kept))
        x = torch.from_numpy(images[indices].astype(np.float32) / 255.0).unsqueeze(1)
        return x, torch.from_numpy(relabel[labels[indices]])

    def _evaluation_set(self, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
        return TensorDataset((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, y)

    def _setup_train_val(self) -> None:
        if self.train_set is not None:
            return
        images, labels = _load_split(self.root, "train", self.strict)
        kept = np.flatnonzero(~np.isin(labels, self.ood_classes))
        generator = torch.Generator().manual_seed(self.seed)
        if self.val_size >= len(kept):
            raise ValueError(
                f"Expected `--data.val_size` to be smaller than the {len(kept)} training images found in "
                f"{self.root!r}, but got {self.val_size}."
            )
        val_idx = kept[_balanced_pick(labels[kept], self.val_size, generator)] if self.val_size else kept[:0]
        rest = np.setdiff1d(kept, val_idx)
        if self.train_size is not None:
            if self.train_size > len(rest):
                raise ValueError(
                    f"Expected `--data.train_size` to be at most the {len(rest)} training images left after "
                    f"`--data.val_size` {self.val_size}, or null, but got {self.train_size}."
                )
            rest = rest[_balanced_pick(labels[rest], self.train_size, generator)]
        self.split_indices["train"] = rest
        x, y = self._tensors(images, labels, rest)
        self.train_set = (
            _AugmentedImages(x, y, self.train_transform) if self.augment else self._evaluation_set(x, y)
        )
        if self.val_size:
            self.split_indices["val"] = val_idx
            self.val_set = self._evaluation_set(*self._tensors(images, labels, val_idx))

    def _setup_test(self) -> None:
        if self.test_set is None:
            images, labels = _load_split(self.root, "test", self.strict)
            held_out = np.isin(labels, self.ood_classes)
            self.split_indices["test"] = np.flatnonzero(~held_out)
            self.test_set = self._evaluation_set(*self._tensors(images, labels, self.split_indices["test"]))
            if self.ood_classes:
                self.split_indices["ood"] = np.flatnonzero(held_out)
                ood = torch.from_numpy(images[held_out].astype(np.float32) / 255.0).unsqueeze(1)
                self.ood_set = self._evaluation_set(ood, torch.from_numpy(labels[held_out]))
            elif self.ood == "digits":
                ood = digits_as_mnist()
                self.ood_set = self._evaluation_set(ood, torch.zeros(len(ood), dtype=torch.int64))
        if self.val_size == 0:
            self.val_set = self.test_set

    @override
    def setup(self, stage: str) -> None:
        """Read, check and split the files a stage needs; calling it again reuses what is loaded.

        Args:
            stage: one of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``.

        Raises:
            ValueError: for an unknown stage, or ``val_size`` / ``train_size`` larger than the files allow.
            FashionMNISTNotFoundError: for a missing file.
            FashionMNISTCorruptedError: naming the file, for a malformed file or counts that do not hold.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` to be one of {', '.join(_STAGES)}, but got {stage!r}.")
        if stage in ("fit", "validate"):
            self._setup_train_val()
            if self.val_size == 0:
                self._setup_test()
        if stage in ("test", "predict"):
            self._setup_test()

    @override
    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """Return the test loader, or ``[test loader, OOD loader]`` with ``ood`` or ``ood_classes``.

        Raises:
            RuntimeError: if ``setup("test")`` has not run.
        """
        if self.ood is not None or self.ood_classes:
            return [self._loader(self.test_set, "test", "test"), self._loader(self.ood_set, "OOD", "test")]
        return self._loader(self.test_set, "test", "test")

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """Return the test split for prediction.

        Raises:
            RuntimeError: if ``setup("predict")`` has not run.
        """
        return self._loader(self.test_set, "test", "predict")
