"""scikit-learn's handwritten digits as a LightningDataModule: real data that works offline.

The ensembles of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large
Models* (arXiv 2005.00570), are evaluated on CIFAR-10 and ImageNet, which need downloads. For examples,
tests and CPU smoke runs this module provides a small real dataset that ships inside scikit-learn: the
1,797 8x8 grey-scale handwritten digits of the UCI "Optical Recognition of Handwritten Digits" test set
(Alpaydin & Kaynak, 1998), via :func:`sklearn.datasets.load_digits`. Pixel values 0..16 are scaled to
[0, 1] and then standardised with the mean and standard deviation of the training split only. The
train/validation/test split is stratified by class and determined by ``seed``.

For out-of-distribution evaluation (:mod:`lightning_ensembles.ood`), ``ood_classes`` holds some digits out:
the model trains, validates and tests on the others, and the held-out digits of the test split form a second
test loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_ensembles._validation import check_held_out_classes, check_int
from lightning_ensembles.data.sampling import make_loader

__all__ = ["DigitsDataModule"]

_NUM_SAMPLES = 1797
_NUM_CLASSES = 10
_MIN_TRAIN = 10
_STAGES = ("fit", "validate", "test", "predict")


class DigitsDataModule(LightningDataModule):
    """The 1,797 8x8 handwritten digits of scikit-learn, split into train/validation/test by class.

    Images are float32 tensors of shape ``(1, 8, 8)``: pixels divided by 16, then standardised with the
    training split's mean and (population) standard deviation, kept in :attr:`mean` and :attr:`std` after
    :meth:`setup`. Labels are int64 in ``[0, 10)``. ``test_size`` images are held out first and
    ``val_size`` of the rest next, both with :func:`sklearn.model_selection.train_test_split` stratified by
    label and ``random_state=seed``. With ``val_size == 0`` there is no validation split and
    :meth:`val_dataloader` returns the test split (as in
    :class:`~lightning_ensembles.data.CIFAR10DataModule`).

    Out-of-distribution classes: with ``ood_classes`` (e.g. ``[8, 9]``) the split above is made as usual, then
    the held-out digits are removed from every split; the remaining ``K`` digits are relabelled ``0..K-1`` in
    increasing order (:attr:`classes` maps a label back to its digit), :attr:`num_classes` is ``K`` (linked
    into ``--model.num_classes`` by the CLI), and the standardisation uses the in-distribution training
    images only. The held-out digits' images **of the test split only** form :attr:`ood_set`, and
    :meth:`test_dataloader` returns ``[in_distribution_loader, ood_loader]``: Lightning's multiple test
    loaders, ``dataloader_idx`` 1 being the OOD set, which
    :class:`~lightning_ensembles.module.EnsembleLightningModule` scores as OOD and logs as ``test/ood/...``.
    The OOD set's labels are the original digits, which the module ignores.

    Args:
        batch_size: Images per batch, for every loader.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_size: Images held out for validation: 0, or at least 10 (one per class).
        test_size: Images held out for testing: at least 10 (one per class).
        seed: Seed of the split and of the training order.
        ood_classes: Digits held out as an out-of-distribution test set: distinct ints in ``[0, 9]`` leaving
            at least 2 in-distribution digits; ``None`` or ``[]``: none.

    Raises:
        ValueError: If an argument is out of range or the splits leave fewer than 10 training images; the
            message names the ``--data.*`` flag.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), labels.dtype, len(dm.train_set), len(dm.val_set)
        ((32, 1, 8, 8), torch.int64, 1197, 300)
        >>> dm = DigitsDataModule(ood_classes=[8, 9])
        >>> dm.setup("test")
        >>> in_distribution, ood = dm.test_dataloader()
        >>> dm.num_classes, dm.classes, len(in_distribution.dataset), len(ood.dataset)
        (8, [0, 1, 2, 3, 4, 5, 6, 7], 241, 59)
    """

    num_classes: int = _NUM_CLASSES
    """The number of classes."""

    input_shape: tuple[int, int, int] = (1, 8, 8)
    """The shape ``(C, H, W)`` of one image tensor."""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 300,
        test_size: int = 300,
        seed: int = 0,
        ood_classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.num_workers = check_int(num_workers, "--data.num_workers", 0)
        self.val_size = check_int(val_size, "--data.val_size", 0)
        if 0 < val_size < _NUM_CLASSES:
            raise ValueError(
                f"Expected `--data.val_size` to be 0 or an int >= {_NUM_CLASSES} (one image per class for a "
                f"stratified split), but got {val_size}."
            )
        self.test_size = check_int(test_size, "--data.test_size", _NUM_CLASSES)
        self.seed = check_int(seed, "--data.seed", 0)
        self.ood_classes: tuple[int, ...] = check_held_out_classes(
            ood_classes, "--data.ood_classes", _NUM_CLASSES
        )
        """The held-out digits, sorted (empty: no OOD set)."""
        self.classes: list[int] = [c for c in range(_NUM_CLASSES) if c not in self.ood_classes]
        """The digit of each label, in label order."""
        self.num_classes = len(self.classes)
        if _NUM_SAMPLES - val_size - test_size < _MIN_TRAIN:
            raise ValueError(
                f"Expected `--data.val_size` + `--data.test_size` to leave at least {_MIN_TRAIN} of the "
                f"{_NUM_SAMPLES} images for training (at most {_NUM_SAMPLES - _MIN_TRAIN}), but got "
                f"{val_size} + {test_size} = {val_size + test_size}."
            )
        self.save_hyperparameters()

        self.mean: float | None = None
        """Mean of the training pixels (after dividing by 16), set by :meth:`setup`."""
        self.std: float | None = None
        """Population std of the training pixels (after dividing by 16), set by :meth:`setup`."""
        self.split_indices: dict[str, np.ndarray] = {}
        """Sorted indices into :func:`~sklearn.datasets.load_digits` of each split, set by :meth:`setup`:
        ``"train"``, ``"val"`` (when ``val_size > 0``) and ``"test"`` (in-distribution digits only), and
        ``"ood"`` (the held-out digits of the test split, when ``ood_classes`` is given)."""
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self.ood_set: TensorDataset | None = None
        """The held-out digits of the test split (labels: the original digits), set by :meth:`setup`."""

    @override
    def setup(self, stage: str) -> None:
        """Load, split and standardise the digits (once; later calls reuse them).

        All splits are built for every stage, since the standardisation needs the training split.

        Args:
            stage: One of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``.

        Raises:
            ValueError: If ``stage`` is unknown.
            ImportError: If scikit-learn is not installed.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` to be one of {', '.join(_STAGES)}, but got {stage!r}.")
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as err:
            raise ImportError(
                "DigitsDataModule needs scikit-learn: `pip install scikit-learn` "
                "(or install lightning-ensembles with its `dev` extra)."
            ) from err

        digits = load_digits()
        images = np.asarray(digits.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
        labels = np.asarray(digits.target, dtype=np.int64)
        indices = np.arange(len(labels))
        rest, test_idx = train_test_split(
            indices, test_size=self.test_size, stratify=labels, random_state=self.seed
        )
        if self.val_size > 0:
            train_idx, val_idx = train_test_split(
                rest, test_size=self.val_size, stratify=labels[rest], random_state=self.seed
            )
        else:
            train_idx, val_idx = rest, None

        held_out = np.isin(labels, self.ood_classes)
        self.split_indices = {"train": np.sort(train_idx), "test": np.sort(test_idx)}
        if val_idx is not None:
            self.split_indices["val"] = np.sort(val_idx)
        if self.ood_classes:
            self.split_indices = {split: idx[~held_out[idx]] for split, idx in self.split_indices.items()}
            self.split_indices["ood"] = np.sort(test_idx[held_out[test_idx]])

        x = torch.from_numpy(images)
        relabel = np.full(_NUM_CLASSES, -1, dtype=np.int64)
        relabel[self.classes] = np.arange(len(self.classes))
        y = torch.from_numpy(np.where(held_out, labels, relabel[labels]))
        train_x = x[self.split_indices["train"]]
        mean = train_x.mean()
        std = train_x.std(correction=0)
        self.mean, self.std = float(mean), float(std)

        def subset(split: str) -> TensorDataset:
            idx = torch.from_numpy(self.split_indices[split])
            return TensorDataset((x[idx] - mean) / std, y[idx])

        self.train_set = subset("train")
        self.test_set = subset("test")
        self.val_set = subset("val") if val_idx is not None else self.test_set
        if self.ood_classes:
            self.ood_set = subset("ood")

    def _loader(self, dataset: TensorDataset | None, train: bool = False) -> DataLoader[Any]:
        """Build a DataLoader over one split.

        Args:
            dataset: The split, or ``None`` if :meth:`setup` has not run.
            train: Whether to shuffle with :class:`EpochSeededRandomSampler`.

        Returns:
            The loader.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        if dataset is None:
            raise RuntimeError("The digits are not loaded yet: call `setup(stage)` first.")
        return make_loader(dataset, self.batch_size, self.num_workers, self.seed, train)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Return the training loader, shuffled by ``(seed, epoch)``.

        Returns:
            Batches ``(images (B, 1, 8, 8), labels (B,))``.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        return self._loader(self.train_set, train=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Return the validation loader: the held-out split, or the test split when ``val_size == 0``.

        Returns:
            Batches ``(images (B, 1, 8, 8), labels (B,))`` in a fixed order.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        return self._loader(self.val_set)

    @override
    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """Return the test loader, or ``[test loader, OOD loader]`` when ``ood_classes`` is given.

        Returns:
            Batches ``(images (B, 1, 8, 8), labels (B,))`` in a fixed order; the OOD loader's labels are the
            original held-out digits.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        if self.ood_classes:
            return [self._loader(self.test_set), self._loader(self.ood_set)]
        return self._loader(self.test_set)

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """Return the test split for prediction.

        Returns:
            Batches ``(images (B, 1, 8, 8), labels (B,))`` in a fixed order.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        return self._loader(self.test_set)
