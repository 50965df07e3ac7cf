"""Fixtures of the CUDA-only tests: exact float32. Their device and marks live in ``tests/gpu/helpers.py``.

Every test here is marked ``gpu`` and skips where CUDA is missing, so the default CPU run collects and skips
them. ``benchmarks/gpu_suite.py`` runs every ``gpu``-marked test with ``pytest -m gpu tests``. To check the
tests' own logic on a machine without a GPU, ``LE_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/gpu`` runs those
that do not need CUDA itself (CUDA events and fp16 mixed precision still skip) on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def exact_float32() -> Iterator[None]:
    """Turn TF32 off for the test, so float32 convolutions and matmuls round as float32 does."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
