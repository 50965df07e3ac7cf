"""Shared tiny models, data and Trainer settings for CPU tests."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, NUM_CLASSES, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, NUM_CLASSES, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


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


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_DISABLE_FORK", "1")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test. Tiny networks gain nothing from more threads, and on a busy 2-core
    machine OpenMP's spinning threads make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_optuna_one_thread(one_torch_thread: None) -> None:
    """For NAS tests: Optuna's logging at WARNING and one intra-op thread."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def in_process_group() -> Iterator[None]:
    """For a strategy run in this process (one device): leave no process group, port or environment variable
    behind, so the spawned tests that follow can bind their own."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
