"""Latency modes (sequential, fused, parallel) and measurements shared within a scope, with a fake clock."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import torch
from torch import nn

import lightning_ensembles.latency as latency
from lightning_ensembles.latency import measure_ensemble_latency
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.parallel import ParallelEnsemble

TICK_S = 2.0**-10
TICK_MS = TICK_S * 1e3
INPUT_SHAPE = (2, 3)
NUM_CLASSES = 4


class LockedClock:
    """A fake clock that stands still until a member runs; members may run on several threads at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self) -> None:
        with self._lock:
            self.now += TICK_S


def tiny_member() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))


def instrumented(num_members: int = 3) -> tuple[EnsembleLightningModule, LockedClock, list[int]]:
    module = EnsembleLightningModule(
        member=tiny_member, num_members=num_members, num_classes=NUM_CLASSES, seed=0
    )
    clock = LockedClock()
    calls = [0] * num_members
    lock = threading.Lock()
    for i, member in enumerate(module.members):

        def hook(m: nn.Module, args: Any, out: Any, i: int = i) -> None:
            with lock:
                calls[i] += 1
            clock.advance()

        member.register_forward_hook(hook)
    return module, clock, calls


def test_parallel_runs_each_member_once_per_run_on_one_pool_per_size(monkeypatch: pytest.MonkeyPatch):
    created: list[ParallelEnsemble] = []

    class Counting(ParallelEnsemble):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(latency, "ParallelEnsemble", Counting)
    module, clock, calls = instrumented(3)
    stats = measure_ensemble_latency(
        module, INPUT_SHAPE, mode="parallel", workers=2, warmup=2, repeats=3, clock=clock
    )
    assert list(stats) == [1, 2, 3]
    assert [p.workers for p in created] == [
        1,
        2,
        2,
    ]  # min(workers, k), one pool per size, reused by every run
    assert all(p._closed for p in created)
    assert calls == [(2 + 3) * (3 - i) for i in range(3)]
    assert clock.reads == 2 * 3 * 3
    assert all(s.repeats == 3 and s.p50_ms == k * TICK_MS for k, s in stats.items())


def test_every_mode_aggregates_the_same_logits():
    module = EnsembleLightningModule(member=tiny_member, num_members=3, num_classes=NUM_CLASSES, seed=0)
    outputs: dict[str, torch.Tensor] = {}
    original = latency.aggregate

    def spy(logits: torch.Tensor, aggregation: str) -> torch.Tensor:
        outputs[mode] = logits.clone()
        return original(logits, aggregation)

    for mode in latency.MODES:
        latency.aggregate = spy  # type: ignore[assignment]
        try:
            measure_ensemble_latency(module, INPUT_SHAPE, sizes=[3], mode=mode, warmup=0, repeats=1)
        finally:
            latency.aggregate = original  # type: ignore[assignment]
    assert set(outputs) == {"sequential", "fused", "parallel"}
    torch.testing.assert_close(outputs["fused"], outputs["sequential"])
    torch.testing.assert_close(outputs["parallel"], outputs["sequential"])
    assert module.training  # restored


def test_fused_refuses_mixed_members_naming_the_mode():
    module = EnsembleLightningModule(member=tiny_member, num_members=3, num_classes=NUM_CLASSES, seed=0)
    module.members[2] = nn.Sequential(nn.Flatten(), nn.Linear(6, NUM_CLASSES))
    with pytest.raises(ValueError) as err:
        measure_ensemble_latency(module, INPUT_SHAPE, mode="fused")
    message = str(err.value)
    assert message.startswith("Expected `mode` to ask for 'fused' only with identical members")
    assert "allowed for these members: 'sequential' or 'parallel'" in message and "'loop'" not in message
    # The first two members are identical: their sizes can be fused.
    assert list(measure_ensemble_latency(module, INPUT_SHAPE, mode="fused", sizes=[1, 2], repeats=1)) == [
        1,
        2,
    ]


def test_a_scope_shares_a_measurement_until_more_runs_are_asked_for():
    module, clock, _ = instrumented(2)

    class Scope:
        pass

    scope = Scope()
    first = measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=4, clock=clock, scope=scope)
    reads = clock.reads
    again = measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=3, clock=clock, scope=scope)
    assert clock.reads == reads and again == first and again[2] is first[2]  # reused, not measured
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=5, clock=clock, scope=scope)
    assert clock.reads == reads + 2 * 5 * 2  # more repeats than stored: measured again
    reads = clock.reads
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=2, repeats=5, clock=clock, scope=scope)
    assert clock.reads == reads + 2 * 5 * 2  # more warm-up than stored: measured again
    reads = clock.reads
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=4, clock=clock, scope=Scope())
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=4, clock=clock)
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=4, clock=clock, batch_size=2, scope=scope)
    measure_ensemble_latency(
        module, INPUT_SHAPE, warmup=1, repeats=4, clock=clock, mode="parallel", scope=scope
    )
    assert clock.reads == reads + 4 * 2 * 4 * 2  # another scope, no scope, batch size, mode: each measured
    reads = clock.reads
    stats = measure_ensemble_latency(
        module, INPUT_SHAPE, sizes=[2, 1], repeats=4, warmup=1, clock=clock, scope=scope
    )
    assert clock.reads == reads and list(stats) == [2, 1]
    del scope
    gc.collect()
    assert not any(type(s).__name__ == "Scope" for s in latency._SHARED.keys())


def test_parallel_with_traced_members_measures_the_same_logits_apart_from_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[ParallelEnsemble] = []

    class Recording(ParallelEnsemble):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    outputs: list[torch.Tensor] = []
    original = latency.aggregate

    def spy(logits: torch.Tensor, aggregation: str) -> torch.Tensor:
        outputs.append(logits.clone())
        return original(logits, aggregation)

    monkeypatch.setattr(latency, "ParallelEnsemble", Recording)
    monkeypatch.setattr(latency, "aggregate", spy)
    module = EnsembleLightningModule(member=tiny_member, num_members=2, num_classes=NUM_CLASSES, seed=0)
    scope = Recording  # any weakly referenceable object
    kwargs: dict[str, Any] = dict(sizes=[2], mode="parallel", workers=2, warmup=0, repeats=1, scope=scope)
    traced = measure_ensemble_latency(module, INPUT_SHAPE, trace=True, **kwargs)
    assert [p.trace for p in created] == [True] and created[0]._workers[0].graphs  # traced, then timed
    eager = measure_ensemble_latency(module, INPUT_SHAPE, **kwargs)  # not the traced measurement
    assert [p.trace for p in created] == [True, False] and traced[2] is not eager[2]
    assert measure_ensemble_latency(module, INPUT_SHAPE, trace=True, **kwargs)[2] is traced[2]  # shared
    x = torch.randn(1, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module.member_logits(x)
    assert len(outputs) == 2  # the traced run, then the eager one (the tracing call is not aggregated)
    for logits in outputs:
        torch.testing.assert_close(logits, expected)


def test_trace_only_with_the_parallel_mode() -> None:
    module = EnsembleLightningModule(member=tiny_member, num_members=2, num_classes=NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match=r"`trace=True` only with mode='parallel'.*got mode='sequential'"):
        measure_ensemble_latency(module, INPUT_SHAPE, trace=True)
    with pytest.raises(ValueError, match="`trace`"):
        measure_ensemble_latency(module, INPUT_SHAPE, mode="parallel", trace="yes")  # type: ignore[arg-type]
