"""CIFAR-10 as a LightningDataModule, with the standard Wide ResNet augmentation.

The CIFAR-10 experiments of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570), train Wide ResNets (Zagoruyko & Komodakis, *Wide Residual Networks*,
BMVC 2016) on CIFAR-10 (Krizhevsky, 2009). This module follows the Wide ResNet recipe for the data: random
32x32 crops of the image reflect-padded by 4 pixels, random horizontal flips, and per-channel normalisation
with the dataset's mean and standard deviation (the values in the Wide ResNet code, in 0..255 units).

Loading goes through :class:`torchvision.datasets.CIFAR10`, patched only where it is silent: torchvision's
integrity check returns ``False`` without saying which file is missing or corrupted, and cannot be told to
skip the md5 comparison. :class:`_CIFAR10` makes both failures name the file, and with
``verify_checksums=False`` sets the md5 sums to ``None`` (torchvision's own "existence only" setting) so
generated test data (:func:`lightning_ensembles.testing.write_fake_cifar10`) loads through the same code.

For out-of-distribution evaluation (:mod:`lightning_ensembles.ood`), ``ood="svhn"`` adds the test split of
SVHN (Netzer et al., *Reading Digits in Natural Images with Unsupervised Feature Learning*, 2011), the usual
far-OOD set for CIFAR-10 (Hendrycks & Gimpel 2017; Lakshminarayanan et al. 2017), as a second test loader,
read by :class:`torchvision.datasets.SVHN` with the same ``verify_checksums`` switch.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, SVHN
from torchvision.datasets import utils as tv_utils
from typing_extensions import override

from lightning_ensembles._validation import check_bool, check_int
from lightning_ensembles.data.sampling import SplitDataModule

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10CorruptedError",
    "CIFAR10DataModule",
    "CIFAR10NotFoundError",
    "CIFAR10Shapes",
]

log = logging.getLogger(__name__)

CIFAR10_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
"""Per-channel (R, G, B) mean of the CIFAR-10 training images, in [0, 1] units (Wide ResNet code)."""

CIFAR10_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)
"""Per-channel (R, G, B) standard deviation of the CIFAR-10 training images, in [0, 1] units."""

_NUM_TRAIN_IMAGES = 50_000
_STAGES = ("fit", "validate", "test", "predict")


class CIFAR10NotFoundError(FileNotFoundError):
    """CIFAR-10 files are missing and could not (or may not) be downloaded."""


class CIFAR10CorruptedError(RuntimeError):
    """A CIFAR-10 file failed its md5 check, could not be unpickled, or has the wrong structure."""


def _expected_files() -> list[tuple[str, str]]:
    """Return torchvision's ``(file name, md5)`` list for CIFAR-10, metadata last.

    Returns:
        ``CIFAR10.train_list + CIFAR10.test_list + [(meta file, meta md5)]``.
    """
    files = [(str(name), str(md5)) for name, md5 in CIFAR10.train_list + CIFAR10.test_list]
    return [*files, (str(CIFAR10.meta["filename"]), str(CIFAR10.meta["md5"]))]


def _batches_dir(root: str | os.PathLike[str]) -> str:
    """Return the absolute path of the directory torchvision reads CIFAR-10 from.

    Args:
        root: The dataset root (``--data.root``).

    Returns:
        ``<root>/cifar-10-batches-py`` as an absolute path, with ``~`` expanded as torchvision does.
    """
    return os.path.abspath(os.path.join(os.path.expanduser(os.fspath(root)), CIFAR10.base_folder))


def _not_found_message(
    root: str | os.PathLike[str], missing: Sequence[str], cause: str, suggest_download: bool
) -> str:
    """Compose the error message for missing CIFAR-10 files.

    Args:
        root: The dataset root (``--data.root``).
        missing: The names of the missing files.
        cause: Why they were not fetched, e.g. ``"and downloading it failed: ..."``; may be empty.
        suggest_download: Whether to suggest ``--data.download true`` (not after a failed download).

    Returns:
        A message naming the directory, the expected files, and where to get them.
    """
    expected = ", ".join(name for name, _ in _expected_files())
    alternative = (
        "; or, where the internet is reachable, pass `--data.download true` so that `prepare_data` fetches it"
        if suggest_download
        else ""
    )
    return (
        f"CIFAR-10 was not found in {_batches_dir(root)!r} (missing: {', '.join(missing)}){cause}. "
        f"That directory must hold {expected}. Download {CIFAR10.url} "
        f"(md5 {CIFAR10.tgz_md5}) on a machine with internet access and extract it under `--data.root` "
        f"(here {os.fspath(root)!r}), e.g. `tar -xzf {CIFAR10.filename} -C {os.fspath(root)}`, which creates "
        f"{CIFAR10.base_folder}/{alternative}."
    )


def _corrupted_message(path: str, problem: str) -> str:
    """Compose the error message for one unusable CIFAR-10 file.

    Args:
        path: The file's path.
        problem: What is wrong with it, e.g. ``"failed its md5 check (expected ..., got ...)"``.

    Returns:
        A message naming the file, the problem, and how to fix it.
    """
    return (
        f"{path} {problem}. The file is damaged or is not from the official CIFAR-10 python release: delete "
        f"{os.path.dirname(path)!r} and run again with `--data.download true`, or extract "
        f"{CIFAR10.filename} ({CIFAR10.url}) under `--data.root` again. Only files you generated yourself "
        "(e.g. with `lightning_ensembles.testing.write_fake_cifar10`) should be loaded with "
        "`--data.verify_checksums false`."
    )


def _describe_problem(path: str, is_meta: bool) -> str | None:
    """Check that one CIFAR-10 file unpickles to the structure torchvision expects.

    Args:
        path: The file's path.
        is_meta: Whether it is ``batches.meta`` (rather than a data batch).

    Returns:
        A description of the problem, or ``None`` if the file looks fine.
    """
    try:
        with open(path, "rb") as file:
            entry = pickle.load(file, encoding="latin1")
    except Exception as err:  # any failure to unpickle is what we are diagnosing; it goes into the message
        return f"could not be unpickled ({type(err).__name__}: {err})"
    if not isinstance(entry, dict):
        return f"holds a {type(entry).__name__}, but a dict was expected"
    keys = sorted(map(repr, entry))
    if is_meta:
        names = entry.get(str(CIFAR10.meta["key"]))
        if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
            return f"has no list of 10 class names under {CIFAR10.meta['key']!r} (keys: {', '.join(keys)})"
        return None
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        return f"has no uint8 array of shape (N, 3072) under 'data' (got {got}; keys: {', '.join(keys)})"
    labels = entry.get("labels")
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
        return f"does not have one label per image under 'labels' ({len(data)} images, got {got})"
    if not all(isinstance(label, int) and 0 <= label < 10 for label in labels):
        return "has labels outside the ints 0..9 under 'labels'"
    return None


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR10 whose failures name the file, with an optional md5 check.

    Only three things differ from :class:`torchvision.datasets.CIFAR10`:

    * ``_check_integrity`` checks the files this split reads plus ``batches.meta`` (torchvision checks all
      six data files for either split and the metadata separately) and raises naming the first file that
      is missing or fails its md5 check, instead of returning ``False``.
    * With ``verify_checksums=False`` the instance's ``train_list``, ``test_list`` and ``meta`` carry
      ``None`` for the md5, which torchvision's ``check_integrity`` treats as "exists" — so only the md5
      comparison is skipped and the pickles are still read by torchvision's own loop and ``_load_meta``.
    * If torchvision's loading fails, or yields inconsistent arrays, each file is re-read to name the
      culprit.

    Args:
        root: The dataset root.
        train: Whether to load the training batches (else the test batch).
        verify_checksums: Whether to compare each file's md5 with torchvision's list.
        transform: Transform applied to each PIL image.

    Raises:
        CIFAR10NotFoundError: If a file is missing.
        CIFAR10CorruptedError: If a file fails its md5 check, cannot be unpickled or is malformed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: bool,
        verify_checksums: bool,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self._root_arg = root
        if not verify_checksums:
            self.train_list = [[name, None] for name, _ in CIFAR10.train_list]
            self.test_list = [[name, None] for name, _ in CIFAR10.test_list]
            self.meta = {**CIFAR10.meta, "md5": None}
        try:
            super().__init__(root, train=train, transform=transform, download=False)
        except (CIFAR10NotFoundError, CIFAR10CorruptedError):
            raise
        except Exception as err:  # re-raised below as an error naming the file
            raise self._diagnose(train, f"{type(err).__name__}: {err}") from err
        self._check_loaded(train)

    def _split_files(self, train: bool) -> list[tuple[str, str | None]]:
        """Return the ``(file name, md5 or None)`` pairs one split reads, metadata last.

        Args:
            train: Whether the split is the training split.

        Returns:
            The pairs for the split's batches followed by ``batches.meta``.
        """
        batches = self.train_list if train else self.test_list
        return [(name, md5) for name, md5 in batches] + [(self.meta["filename"], self.meta["md5"])]

    @override
    def _check_integrity(self) -> bool:
        missing = [
            name
            for name, _ in self._split_files(self.train)
            if not os.path.isfile(os.path.join(self.root, self.base_folder, name))
        ]
        if missing:
            raise CIFAR10NotFoundError(_not_found_message(self._root_arg, missing, "", suggest_download=True))
        for name, md5 in self._split_files(self.train):
            path = os.path.join(_batches_dir(self.root), name)
            if md5 is not None:
                actual = tv_utils.calculate_md5(path)
                if actual != md5:
                    problem = f"failed its md5 check (expected {md5}, got {actual})"
                    raise CIFAR10CorruptedError(_corrupted_message(path, problem))
        return True

    def _diagnose(self, train: bool, error: str) -> CIFAR10CorruptedError:
        """Build the error for a failed load, naming the first malformed file if there is one.

        Args:
            train: Whether the training split was being loaded.
            error: The text of the underlying failure.

        Returns:
            The error to raise.
        """
        meta_name = self.meta["filename"]
        for name, _ in self._split_files(train):
            path = os.path.join(_batches_dir(self.root), name)
            problem = _describe_problem(path, is_meta=name == meta_name)
            if problem is not None:
                return CIFAR10CorruptedError(_corrupted_message(path, problem))
        return CIFAR10CorruptedError(
            f"Loading CIFAR-10 from {_batches_dir(self.root)!r} failed ({error}), although each file "
            "unpickles to the expected structure on its own."
        )

    def _check_loaded(self, train: bool) -> None:
        """Check the arrays torchvision assembled, naming a file if they are inconsistent.

        Args:
            train: Whether the training split was loaded.

        Raises:
            CIFAR10CorruptedError: If the images are not uint8, the label count differs from the image count,
                a label is outside ``[0, 10)`` or there are not 10 class names.
        """
        targets = np.asarray(self.targets)
        if (
            self.data.dtype != np.uint8
            or len(targets) != len(self.data)
            or (
                len(targets) > 0
                and (targets.dtype.kind not in "iu" or targets.min() < 0 or targets.max() > 9)
            )
            or len(self.classes) != 10
        ):
            raise self._diagnose(train, "the loaded images, labels or class names are inconsistent")


_SVHN_URL, _SVHN_FILE, _SVHN_MD5 = (str(v) for v in SVHN.split_list["test"])
OOD_SETS = ("svhn",)
"""The out-of-distribution test sets :class:`CIFAR10DataModule` offers (``--data.ood``)."""


class _SVHN(SVHN):
    """torchvision's SVHN test split whose failures name the file, with an optional md5 check.

    As for :class:`_CIFAR10`: with ``verify_checksums=False`` the instance's ``split_list`` carries ``None``
    for the md5 (torchvision's "exists only"), and a missing, corrupted or malformed ``test_32x32.mat`` is an
    error naming the file instead of torchvision's "Dataset not found or corrupted".

    Args:
        root: The folder holding ``test_32x32.mat`` (``--data.ood_root``).
        verify_checksums: Whether to compare the file's md5 with torchvision's.
        transform: Transform applied to each PIL image.

    Raises:
        FileNotFoundError: If the file is missing.
        RuntimeError: If it fails its md5 check, cannot be read, or does not hold 32x32 RGB uint8 images.
    """

    def __init__(
        self, root: str | os.PathLike[str], verify_checksums: bool, transform: Callable[[Any], Any] | None
    ) -> None:
        if not verify_checksums:
            self.split_list = {split: [url, name, None] for split, (url, name, _) in SVHN.split_list.items()}
        self._path = os.path.abspath(os.path.join(os.path.expanduser(os.fspath(root)), _SVHN_FILE))
        try:
            super().__init__(root, split="test", transform=transform, download=False)
        except (FileNotFoundError, RuntimeError):
            raise
        except Exception as err:  # scipy cannot read it, or it lacks 'X'/'y': re-raised naming the file
            raise RuntimeError(self._corrupted(f"could not be read ({type(err).__name__}: {err})")) from err
        if (
            self.data.dtype != np.uint8
            or self.data.ndim != 4
            or self.data.shape[1:] != (3, 32, 32)
            or len(self.labels) != len(self.data)
        ):
            raise RuntimeError(
                self._corrupted(
                    f"holds 'X' of shape {tuple(self.data.shape)[::-1]} ({self.data.dtype}) and "
                    f"{len(self.labels)} labels, but (32, 32, 3, N) uint8 images and N labels were expected"
                )
            )

    def _corrupted(self, problem: str) -> str:
        return (
            f"SVHN {self._path} {problem}. Download {_SVHN_URL} (md5 {_SVHN_MD5}) again into `--data.ood_root`; "
            "only files you generated yourself (e.g. with `lightning_ensembles.testing.write_fake_svhn`) should "
            "be loaded with `--data.verify_checksums false`."
        )

    @override
    def _check_integrity(self) -> bool:
        if not os.path.isfile(self._path):
            raise FileNotFoundError(
                f"SVHN (the OOD test set of `--data.ood svhn`) was not found: {self._path!r} does not exist. "
                f"Download {_SVHN_URL} (md5 {_SVHN_MD5}) into `--data.ood_root`, or pass `--data.download true` "
                "where the internet is reachable."
            )
        md5 = self.split_list[self.split][2]
        if md5 is not None:
            actual = tv_utils.calculate_md5(self._path)
            if actual != md5:
                raise RuntimeError(self._corrupted(f"failed its md5 check (expected {md5}, got {actual})"))
        return True


class _TransformedSubset(Dataset[tuple[Any, int]]):
    """A subset of a CIFAR-10 split with its own transform.

    The train and validation parts of the training split share one loaded dataset (whose own transform is
    ``None``) but get different transforms.

    Args:
        dataset: The dataset returning ``(PIL image, label)``.
        indices: The indices of the subset, into ``dataset``.
        transform: The transform applied to each image.
    """

    def __init__(self, dataset: CIFAR10, indices: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return the transformed image and label at ``index`` of the subset.

        Args:
            index: The position in the subset.

        Returns:
            ``(transform(image), label)``.
        """
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label

    def __len__(self) -> int:
        """Return the size of the subset.

        Returns:
            The number of indices.
        """
        return len(self.indices)


class CIFAR10Shapes:
    """What every CIFAR-10 datamodule tells the model and the cost callbacks: 10 classes of ``(3, 32, 32)``
    images."""

    num_classes: int = 10
    """The number of classes."""

    input_shape: tuple[int, int, int] = (3, 32, 32)
    """The shape ``(C, H, W)`` of one image tensor."""


class CIFAR10DataModule(CIFAR10Shapes, SplitDataModule):
    """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images, 10 classes) with Wide ResNet augmentation.

    Training images are reflect-padded by 4 pixels, randomly cropped back to 32x32, randomly flipped
    horizontally, converted to tensors in [0, 1] and normalised with :data:`CIFAR10_MEAN` /
    :data:`CIFAR10_STD`; evaluation images are only converted and normalised. The training loader shuffles
    with :class:`~lightning_ensembles.data.EpochSeededRandomSampler`, so the order depends only on
    ``(seed, epoch)``.

    With ``val_size == 0`` there is no validation split: :meth:`val_dataloader` returns the **test** split
    (the usual CIFAR practice, and what the Wide ResNet paper reports). With ``val_size > 0`` that many
    training images, chosen by ``seed``, are held out as a validation split with the evaluation transforms,
    and training uses the rest. :meth:`test_dataloader` and :meth:`predict_dataloader` always return the
    test split.

    Out-of-distribution evaluation: with ``ood="svhn"`` :meth:`setup` for ``"test"`` also loads SVHN's test
    split (26,032 32x32 RGB images) from ``ood_root`` with the evaluation transforms (CIFAR-10's
    normalisation), and :meth:`test_dataloader` returns ``[cifar10_test_loader, svhn_loader]``: Lightning's
    multiple test loaders, ``dataloader_idx`` 1 being the OOD set, which
    :class:`~lightning_ensembles.module.EnsembleLightningModule` logs as ``test/ood/...``. SVHN's labels are
    ignored. ``download`` and ``verify_checksums`` apply to SVHN too.

    Args:
        root: Directory holding (or to receive) ``cifar-10-batches-py/``.
        batch_size: Images per batch, for every loader.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_size: Training images to hold out for validation; 0 validates on the test split.
        download: Download and extract the official archive in :meth:`prepare_data` if files are missing.
        verify_checksums: Compare each file's md5 with torchvision's list when loading. Turn off only for
            generated data such as :func:`lightning_ensembles.testing.write_fake_cifar10`.
        augment: Apply random crop and flip to training images; if false they get the evaluation transforms.
        seed: Seed of the train/validation split and of the training order.
        ood: ``"svhn"`` adds SVHN's test split as an OOD test loader; ``None``: no OOD set.
        ood_root: The folder holding SVHN's ``test_32x32.mat`` (as for :class:`torchvision.datasets.SVHN`);
            ``None``: ``<root>/svhn``.

    Raises:
        ValueError: If an argument is out of range; the message names its ``--data.*`` flag.

    Example:
        >>> CIFAR10DataModule(root="data", ood="svhn").ood_root
        'data/svhn'
        >>> dm = CIFAR10DataModule(root="data", batch_size=64)
        >>> dm.num_classes, dm.input_shape
        (10, (3, 32, 32))
    """

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 0,
        download: bool = True,
        verify_checksums: bool = True,
        augment: bool = True,
        seed: int = 0,
        ood: Literal["svhn"] | None = None,
        ood_root: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ValueError(f"Expected `--data.root` to be a non-empty directory path, but got {root!r}.")
        self.root = root
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.num_workers = check_int(num_workers, "--data.num_workers", 0)
        self.val_size = check_int(val_size, "--data.val_size", 0, _NUM_TRAIN_IMAGES)
        self.download = check_bool(download, "--data.download")
        self.verify_checksums = check_bool(verify_checksums, "--data.verify_checksums")
        self.augment = check_bool(augment, "--data.augment")
        self.seed = check_int(seed, "--data.seed", 0)
        if ood is not None and ood not in OOD_SETS:
            raise ValueError(f"Expected `--data.ood` to be one of {list(OOD_SETS)} or null, but got {ood!r}.")
        self.ood = ood
        if ood_root is not None and (not isinstance(ood_root, (str, os.PathLike)) or not os.fspath(ood_root)):
            raise ValueError(
                f"Expected `--data.ood_root` to be a non-empty directory path or null, but got {ood_root!r}."
            )
        self.ood_root: str = (
            os.fspath(ood_root) if ood_root is not None else os.path.join(os.fspath(root), "svhn")
        )
        """The folder SVHN's ``test_32x32.mat`` is read from (``--data.ood_root``, default ``<root>/svhn``)."""
        self.save_hyperparameters()

        normalize = [transforms.ToTensor(), transforms.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD)]
        self.eval_transform: Callable[[Any], torch.Tensor] = transforms.Compose(normalize)
        """Transform of validation and test images: ``ToTensor`` then ``Normalize``."""
        augmentation = [
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]
        self.train_transform: Callable[[Any], torch.Tensor] = transforms.Compose(
            (augmentation if augment else []) + normalize
        )
        """Transform of training images: crop and flip (if ``augment``), ``ToTensor``, ``Normalize``."""

        self._train_full: _CIFAR10 | None = None
        self.train_set: _TransformedSubset | None = None
        self.val_set: _TransformedSubset | None = None
        self.test_set: _TransformedSubset | None = None
        self.ood_set: Dataset[tuple[Any, int]] | None = None
        """The OOD test set (SVHN's test split), set by ``setup("test")`` when ``ood`` is given."""

    @property
    def batches_dir(self) -> str:
        """The absolute path of the ``cifar-10-batches-py`` directory the data is read from."""
        return _batches_dir(self.root)

    def _missing_files(self) -> list[str]:
        """Return the expected CIFAR-10 files that do not exist.

        Returns:
            The missing file names, in torchvision's order.
        """
        return [
            name for name, _ in _expected_files() if not os.path.isfile(os.path.join(self.batches_dir, name))
        ]

    @override
    def prepare_data(self) -> None:
        """Download and extract CIFAR-10 if any file is missing and ``download`` is true.

        The archive's md5 is checked by torchvision. Files that exist are not checked here; :meth:`setup`
        verifies them.

        Raises:
            CIFAR10NotFoundError: If files are missing and ``download`` is false, or the download failed.
        """
        if self.ood == "svhn" and self.download:
            self._download_svhn()
        missing = self._missing_files()
        if not missing:
            return
        if not self.download:
            raise CIFAR10NotFoundError(
                _not_found_message(
                    self.root, missing, " and `--data.download` is false", suggest_download=True
                )
            )
        log.info("Downloading CIFAR-10 from %s to %s", CIFAR10.url, self.root)
        try:
            tv_utils.download_and_extract_archive(
                CIFAR10.url,
                os.path.expanduser(os.fspath(self.root)),
                filename=CIFAR10.filename,
                md5=CIFAR10.tgz_md5,
            )
        except Exception as err:  # network, disk or archive errors; re-raised with the fix in the message
            raise CIFAR10NotFoundError(
                _not_found_message(
                    self.root,
                    missing,
                    f" and downloading it failed: {type(err).__name__}: {err}",
                    suggest_download=False,
                )
            ) from err
        still_missing = self._missing_files()
        if still_missing:
            raise CIFAR10NotFoundError(
                _not_found_message(
                    self.root, still_missing, f" after extracting {CIFAR10.filename}", suggest_download=False
                )
            )

    def _download_svhn(self) -> None:
        """Download SVHN's ``test_32x32.mat`` into ``ood_root`` if it is missing (md5 checked by torchvision).

        Raises:
            FileNotFoundError: If the download failed.
        """
        if os.path.isfile(os.path.join(os.path.expanduser(self.ood_root), _SVHN_FILE)):
            return
        log.info("Downloading SVHN's test split from %s to %s", _SVHN_URL, self.ood_root)
        try:
            tv_utils.download_url(_SVHN_URL, os.path.expanduser(self.ood_root), _SVHN_FILE, _SVHN_MD5)
        except Exception as err:  # network or disk errors; re-raised with the fix in the message
            raise FileNotFoundError(
                f"Downloading SVHN ({_SVHN_URL}) into `--data.ood_root` {self.ood_root!r} failed: "
                f"{type(err).__name__}: {err}. Download it on a machine with internet access and copy "
                f"{_SVHN_FILE} there."
            ) from err

    def _load(self, train: bool) -> _CIFAR10:
        """Load one split without a transform.

        Args:
            train: Whether to load the training split.

        Returns:
            The loaded split.
        """
        return _CIFAR10(self.root, train=train, verify_checksums=self.verify_checksums)

    def _setup_train_val(self) -> None:
        """Load the training split and divide it into the train and validation sets.

        Raises:
            ValueError: If ``val_size`` is not smaller than the number of training images found.
        """
        if self._train_full is not None:
            return
        full = self._load(train=True)
        if self.val_size >= len(full):
            raise ValueError(
                f"Expected `--data.val_size` to be smaller than the {len(full)} training images found in "
                f"{self.batches_dir!r}, but got {self.val_size}."
            )
        generator = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(len(full), generator=generator)
        val_indices = sorted(permutation[: self.val_size].tolist())
        train_indices = sorted(permutation[self.val_size :].tolist())
        self._train_full = full
        self.train_set = _TransformedSubset(full, train_indices, self.train_transform)
        if self.val_size > 0:
            self.val_set = _TransformedSubset(full, val_indices, self.eval_transform)

    def _setup_test(self) -> None:
        """Load the test split (also the validation set when ``val_size == 0``)."""
        if self.test_set is None:
            test = self._load(train=False)
            self.test_set = _TransformedSubset(test, range(len(test)), self.eval_transform)
        if self.val_size == 0:
            self.val_set = self.test_set

    @override
    def setup(self, stage: str) -> None:
        """Load the splits a stage needs; calling it again reuses what is already loaded.

        Args:
            stage: One of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``.

        Raises:
            ValueError: If ``stage`` is unknown, or ``val_size`` is not smaller than the training split found.
            CIFAR10NotFoundError: If a file is missing.
            CIFAR10CorruptedError: If a file fails its md5 check, cannot be unpickled or is malformed.
            FileNotFoundError: If ``ood="svhn"`` and SVHN's ``test_32x32.mat`` is missing (stage ``"test"``).
            RuntimeError: If that file fails its md5 check or is malformed.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` to be one of {', '.join(_STAGES)}, but got {stage!r}.")
        if stage == "fit":
            self._setup_train_val()
        if stage in ("fit", "validate"):
            if self.val_size > 0:
                self._setup_train_val()
            else:
                self._setup_test()
        if stage in ("test", "predict"):
            self._setup_test()
        if stage == "test" and self.ood == "svhn" and self.ood_set is None:
            self.ood_set = _SVHN(self.ood_root, self.verify_checksums, self.eval_transform)

    @override
    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """Return the test loader, or ``[test loader, OOD loader]`` when ``ood`` is given.

        Returns:
            Batches ``(images (B, 3, 32, 32), labels (B,))`` in a fixed order (SVHN's labels are its digits).

        Raises:
            RuntimeError: If ``setup("test")`` has not run.
        """
        if self.ood is not None:
            return [self._loader(self.test_set, "test", "test"), self._loader(self.ood_set, "OOD", "test")]
        return self._loader(self.test_set, "test", "test")

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """Return the test split for prediction.

        Returns:
            Batches ``(images (B, 3, 32, 32), labels (B,))`` in a fixed order.

        Raises:
            RuntimeError: If ``setup("predict")`` has not run.
        """
        return self._loader(self.test_set, "test", "predict")
