"""Latency on CUDA is timed with CUDA events, not the host clock, for every ensemble size."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_ensembles.latency import measure_ensemble_latency
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from tests.gpu.helpers import NEEDS_CUDA

pytestmark = [pytest.mark.gpu, NEEDS_CUDA]


def _host_clock() -> float:
    raise AssertionError("the host clock must not time CUDA runs")


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_cuda_events_time_every_size_and_the_module_is_restored(execution: str) -> None:
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, 10, 1), num_members=3, num_classes=10, execution=execution
    ).cuda()
    stats = measure_ensemble_latency(
        module, (3, 32, 32), batch_size=8, warmup=2, repeats=5, clock=_host_clock
    )
    assert list(stats) == [1, 2, 3]
    assert all(0 < s.p10_ms <= s.p50_ms <= s.p90_ms and s.repeats == 5 for s in stats.values())
    assert module.training and next(module.parameters()).is_cuda


def test_bfloat16_weights_are_timed_in_bfloat16() -> None:
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, 10, 1), num_members=2, num_classes=10
    ).to("cuda", torch.bfloat16)
    stats = measure_ensemble_latency(module, (3, 32, 32), sizes=[2], warmup=1, repeats=3, clock=_host_clock)
    assert list(stats) == [2] and stats[2].p50_ms > 0
