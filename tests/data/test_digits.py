"""Tests for DigitsDataModule on scikit-learn's 8x8 digits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_ensembles.data import DigitsDataModule, EpochSeededRandomSampler


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images (N, 1, 8, 8) scaled to [0, 1], and their labels."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return images, torch.tensor(data.target, dtype=torch.int64)


def _setup(**kwargs: Any) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_shapes_and_dtypes() -> None:
    dm = DigitsDataModule(batch_size=32)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 8, 8))
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert isinstance(dm.train_dataloader().sampler, EpochSeededRandomSampler)
    assert sum(len(batch) for batch, _ in dm.train_dataloader()) == 1197  # drop_last=False


def test_split_sizes_are_disjoint_and_cover_the_data() -> None:
    dm = _setup(val_size=200, test_size=150)
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1447, 200, 150)
    train, val, test = (set(dm.split_indices[split].tolist()) for split in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(1797))


def test_val_size_zero_validates_on_the_test_split() -> None:
    dm = _setup(val_size=0, test_size=300)
    assert dm.train_set is not None and len(dm.train_set) == 1497
    assert dm.val_set is dm.test_set and "val" not in dm.split_indices
    assert dm.val_dataloader().dataset is dm.test_set


def test_splits_are_stratified(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    dm = _setup(val_size=300, test_size=300)
    _, labels = digits
    for split in ("val", "test"):
        counts = torch.bincount(labels[dm.split_indices[split]], minlength=10)
        assert counts.min() >= 29 and counts.max() <= 31  # 300 images of 10 near-equal classes


def test_normalisation_uses_training_statistics_only(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    dm = _setup()
    assert dm.mean is not None and dm.std is not None
    images, labels = digits
    train = images[dm.split_indices["train"]]
    assert dm.mean == pytest.approx(float(train.mean()), abs=1e-6)
    assert dm.std == pytest.approx(float(train.std(correction=0)), abs=1e-6)
    assert abs(dm.mean - float(images.mean())) > 1e-4  # all 1797 images would give another mean
    assert dm.train_set is not None and dm.test_set is not None and dm.val_set is not None
    train_x, _ = dm.train_set.tensors
    torch.testing.assert_close(train_x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_x.std(correction=0), torch.tensor(1.0))
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        x, y = dataset.tensors
        index = dm.split_indices[split]
        torch.testing.assert_close(x, (images[index] - dm.mean) / dm.std)
        torch.testing.assert_close(y, labels[index])


def test_deterministic_across_instances_and_seeds() -> None:
    first, second, other = _setup(seed=3), _setup(seed=3), _setup(seed=4)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.split_indices[split], second.split_indices[split])
    assert not np.array_equal(first.split_indices["test"], other.split_indices["test"])
    first_batch, _ = next(iter(first.train_dataloader()))
    second_batch, _ = next(iter(second.train_dataloader()))
    torch.testing.assert_close(first_batch, second_batch)


def test_setup_is_idempotent_and_serves_every_stage() -> None:
    dm = _setup()
    train_set = dm.train_set
    for stage in ("fit", "validate", "test", "predict"):
        dm.setup(stage)
    assert dm.train_set is train_set
    assert dm.predict_dataloader().dataset is dm.test_set
    with pytest.raises(ValueError, match="Expected `stage` to be one of"):
        dm.setup("train")


def test_loaders_before_setup_raise() -> None:
    with pytest.raises(RuntimeError, match=r"call `setup\(stage\)` first"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "Expected `--data.batch_size` to be an int >= 1, but got 0."),
        ({"num_workers": -1}, "Expected `--data.num_workers` to be an int >= 0, but got -1."),
        ({"val_size": -1}, "Expected `--data.val_size` to be an int >= 0, but got -1."),
        ({"val_size": 5}, "Expected `--data.val_size` to be 0 or an int >= 10 (one image per class"),
        ({"test_size": 9}, "Expected `--data.test_size` to be an int >= 10, but got 9."),
        ({"test_size": 300.0}, "Expected `--data.test_size` to be an int >= 10, but got 300.0."),
        ({"seed": -1}, "Expected `--data.seed` to be an int >= 0, but got -1."),
        (
            {"val_size": 1000, "test_size": 788},
            "Expected `--data.val_size` + `--data.test_size` to leave at least 10 of the 1797 images for "
            "training (at most 1787), but got 1000 + 788 = 1788.",
        ),
    ],
)
def test_invalid_arguments_name_the_flag(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DigitsDataModule(**kwargs)
    assert str(info.value).startswith(message)


def test_smallest_training_split_allowed() -> None:
    dm = _setup(val_size=1000, test_size=787)
    assert dm.train_set is not None and len(dm.train_set) == 10


def test_ood_classes_are_held_out_relabelled_and_served_from_the_test_split(
    digits: tuple[torch.Tensor, torch.Tensor],
) -> None:
    plain = _setup(val_size=200, test_size=300)
    dm = DigitsDataModule(val_size=200, test_size=300, ood_classes=[5, 0])
    assert dm.num_classes == 8 and dm.classes == [1, 2, 3, 4, 6, 7, 8, 9] and dm.ood_classes == (0, 5)
    dm.setup("test")
    images, labels = digits
    held_out = (labels == 0) | (labels == 5)
    # The same split as without OOD classes, minus the held-out digits; OOD = their test images only.
    for split in ("train", "val", "test"):
        expected = plain.split_indices[split][~held_out[plain.split_indices[split]].numpy()]
        np.testing.assert_array_equal(dm.split_indices[split], expected)
    test = plain.split_indices["test"]
    np.testing.assert_array_equal(dm.split_indices["ood"], test[held_out[test].numpy()])
    # Labels 0..7 in digit order; standardised with the in-distribution training images only.
    assert dm.train_set is not None and dm.test_set is not None and dm.ood_set is not None
    train_idx = torch.from_numpy(dm.split_indices["train"])
    assert dm.mean == pytest.approx(float(images[train_idx].mean()), abs=1e-6)
    digit_of = torch.tensor(dm.classes)
    torch.testing.assert_close(digit_of[dm.train_set.tensors[1]], labels[train_idx])
    ood_idx = torch.from_numpy(dm.split_indices["ood"])
    torch.testing.assert_close(dm.ood_set.tensors[0], (images[ood_idx] - dm.mean) / dm.std)
    assert set(dm.ood_set.tensors[1].tolist()) == {0, 5}  # the original digits, ignored by the module
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and [loader.dataset for loader in loaders] == [dm.test_set, dm.ood_set]
    assert next(iter(loaders[1]))[0].shape[1:] == (1, 8, 8)
    assert not isinstance(plain.test_dataloader(), list) and plain.num_classes == 10
    assert DigitsDataModule(ood_classes=[]).num_classes == 10


@pytest.mark.parametrize("ood_classes", [[8, 8], [10], [-1], list(range(9)), "89", [True], [8.0]])
def test_invalid_ood_classes_name_the_flag(ood_classes: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"Expected `--data.ood_classes` to be distinct ints in \[0, 9\] that leave at least 2",
    ):
        DigitsDataModule(ood_classes=ood_classes)
