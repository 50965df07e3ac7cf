"""Shared tiny models, data and Trainer settings for the CPU tests.

Test files import these with ``from tests.helpers import ...``; ``tests/conftest.py`` holds only fixtures.
Everything here is deterministic: data comes from seeded generators, never from the global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "IN_FEATURES",
    "NUM_CLASSES",
    "TinyConvNet",
    "TinyDataModule",
    "TinyNet",
    "fast_recipe_args",
    "make_data",
    "make_loader",
    "sgd",
    "trainer_kwargs",
]

NUM_CLASSES = 5
IN_FEATURES = 12


class TinyNet(nn.Module):
    """An MLP with BatchNorm (running statistics) and optional dropout."""

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyConvNet(nn.Module):
    """A different architecture taking the same flat input, for mixed ensembles."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * IN_FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))


def make_data(
    n: int = 64, seed: int = 0, input_shape: Sequence[int] = (IN_FEATURES,), num_classes: int = NUM_CLASSES
) -> TensorDataset:
    """``n`` Gaussian inputs of ``input_shape`` labelled by a random linear teacher plus noise.

    The default shape draws exactly what the flat version always drew, so seeds keep their data.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=g)
    w = torch.randn(math.prod(input_shape), num_classes, generator=g)
    y = (x.flatten(1) @ w + 0.5 * torch.randn(n, num_classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


class TinyDataModule(pl.LightningDataModule):
    """The tests' datamodule: :func:`make_data` splits in order, with ``input_shape`` and ``num_classes``
    declared as the library's datamodules declare them.

    The splits use seeds ``seed``, ``seed + 1`` and ``seed + 2`` (train, val, test). ``input_shape`` and
    ``num_classes`` are properties, so a test can declare another shape than the data has (a subclass
    attribute ``input_shape = None``, or an assignment) without touching the data.

    Args:
        n_train: training samples.
        n_val: validation samples.
        n_test: test samples.
        batch_size: samples per batch in every loader.
        seed: the seed of the training split.
        input_shape: the per-sample shape of the data.
        num_classes: the number of classes.
        ood_shape: if given, ``test_dataloader`` returns two loaders, the in-distribution test split and
            ``n_ood`` out-of-distribution samples ``3 * randn(*ood_shape)`` labelled 0 (seed ``seed + 3``).
        n_ood: out-of-distribution samples.
    """

    def __init__(
        self,
        n_train: int = 64,
        n_val: int = 40,
        n_test: int = 50,
        batch_size: int = 16,
        seed: int = 0,
        input_shape: Sequence[int] = (IN_FEATURES,),
        num_classes: int = NUM_CLASSES,
        ood_shape: Sequence[int] | None = None,
        n_ood: int = 24,
    ) -> None:
        super().__init__()
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.batch_size = batch_size
        self.seed = seed
        self.data_shape = tuple(input_shape)
        self.ood_shape = None if ood_shape is None else tuple(ood_shape)
        self.n_ood = n_ood
        self._input_shape: tuple[int, ...] | None = self.data_shape
        self._num_classes = num_classes

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    @input_shape.setter
    def input_shape(self, value: tuple[int, ...] | None) -> None:
        self._input_shape = value

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def split(self, stage: str) -> TensorDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` split (a test's reference computation reads it here)."""
        offset = {"train": 0, "val": 1, "test": 2}[stage]
        return make_data(self.sizes[stage], self.seed + offset, self.data_shape, self._num_classes)

    def _loader(self, data: TensorDataset) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split("val"))

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        test = self._loader(self.split("test"))
        if self.ood_shape is None:
            return test
        g = torch.Generator().manual_seed(self.seed + 3)
        x = 3 * torch.randn(self.n_ood, *self.ood_shape, generator=g)
        return [test, self._loader(TensorDataset(x, torch.zeros(self.n_ood, dtype=torch.long)))]


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


def fast_recipe_args(log_dir: Path) -> list[str]:
    """Flags that make a reproduction run one quick CPU epoch, logging under ``log_dir``."""
    return [
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
    ]


def sgd(**kwargs: Any) -> Any:
    defaults = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    defaults.update(kwargs)
    return functools.partial(torch.optim.SGD, **defaults)


def assert_identical(got: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts, lists and tuples of tensors and plain values are equal to the bit (NaN equals NaN), tensors
    of the same dtype; ``where`` names the first place that differs."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, where
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_identical(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert got == expected or (got != got and expected != expected), where  # nan == nan
