"""Shared marks and helpers of the CUDA-only tests: the device they run on, their marks, and a tolerance.

Every test in ``tests/gpu`` is marked ``gpu`` and skips where CUDA is missing, so the default CPU run collects
and skips them. To check the tests' own logic on a machine without a GPU, ``LE_GPU_TESTS_ON_CPU=1 pytest -m
gpu tests/gpu`` runs those that do not need CUDA itself (CUDA events and fp16 mixed precision still skip) on
the CPU. Fixtures live in ``tests/gpu/conftest.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

__all__ = ["DEVICE", "NEEDS_CUDA", "ON_DEVICE", "relative_error"]

DEVICE = torch.device("cpu" if os.environ.get("LE_GPU_TESTS_ON_CPU") == "1" else "cuda")
"""The device under test: CUDA, or the CPU for a dry run of the tests' logic."""

ON_DEVICE = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
"""Marks of a test that runs on :data:`DEVICE`: ``pytestmark = ON_DEVICE``."""

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
"""Mark of a test that only means something on CUDA itself (CUDA events, fp16 autocast)."""


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float32: a tolerance for low-precision results that does not
    hinge on a single element."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
