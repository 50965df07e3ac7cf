"""Fixtures shared by the CPU tests. Shared helper functions and classes live in ``tests/helpers.py``.

A test module that cannot be imported because an optional package is missing (Optuna for the NAS recipe,
jsonargparse for the command lines, ptflops for the cost cross-check, ONNX for export) is skipped, named with
the package, instead of failing collection. The GPU image lacks jsonargparse, Optuna and ptflops, and there
`pytest -m gpu tests` must still collect and run every GPU test. Where the package is installed, an import
error is the error it always was.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

OPTIONAL_PACKAGES = frozenset({"jsonargparse", "optuna", "ptflops", "onnx", "onnxscript", "onnxruntime"})
"""Packages whose absence skips the test modules that need them (see the module docstring)."""


_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """Turn "a test module cannot be imported because an optional package is not installed" into a skip."""
    report = yield
    if report.failed and isinstance(collector, pytest.Module):
        found = _MISSING_MODULE.search(str(report.longrepr))
        package = found.group(1).split(".")[0] if found else None
        if package in OPTIONAL_PACKAGES and importlib.util.find_spec(package) is None:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: needs {package}, which is not installed")
    return report


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
