"""Fixtures shared by the CPU tests. Shared helper functions and classes live in ``tests/helpers.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


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
