"""What the callbacks share (``callbacks/_shared.py``): the evaluation hooks of one base class, told their stage,
and the names of a latency measurement's scalars."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_ensembles.callbacks._shared import EvaluationBatchCallback, latency_scalars
from lightning_ensembles.latency import LatencyStats


class Recorder(EvaluationBatchCallback):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @override
    def on_evaluation_batch(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str, dataloader_idx: int
    ) -> None:
        self.calls.append(("batch", stage, outputs, dataloader_idx))

    @override
    def on_evaluation_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.calls.append(("end", stage))


def test_lightnings_evaluation_hooks_reach_one_method_each_told_the_stage() -> None:
    trainer: Any = SimpleNamespace(sanity_checking=False)
    recorder = Recorder()
    recorder.on_validation_batch_end(trainer, None, "v", "batch", 0)  # Lightning's call with one loader
    recorder.on_test_batch_end(trainer, None, "t", "batch", 3, 1)  # and with several
    recorder.on_validation_epoch_end(trainer, None)
    recorder.on_test_epoch_end(trainer, None)
    assert recorder.calls == [
        ("batch", "val", "v", 0),
        ("batch", "test", "t", 1),
        ("end", "val"),
        ("end", "test"),
    ]


def test_nothing_reaches_them_during_the_sanity_check() -> None:
    trainer: Any = SimpleNamespace(sanity_checking=True)
    recorder = Recorder()
    recorder.on_validation_batch_end(trainer, None, "v", "batch", 0)
    recorder.on_validation_epoch_end(trainer, None)
    assert recorder.calls == []


def test_latency_scalars_carry_mode_size_batch_and_unit_in_the_key() -> None:
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.003], batch_size=4)
    assert latency_scalars("fused", 2, stats) == {
        "latency/fused/size_2/batch4_ms_p50": stats.p50_ms,
        "latency/fused/size_2/batch4_ms_p10": stats.p10_ms,
        "latency/fused/size_2/batch4_ms_p90": stats.p90_ms,
        "latency/fused/size_2/batch4_samples_per_s": stats.throughput,
    }
