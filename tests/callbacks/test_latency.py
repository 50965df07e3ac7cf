"""Latency primitives and ``LatencyMonitor``, timed with a fake clock: no assertion on real timings."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_ensembles.callbacks.latency import LatencyMonitor
from lightning_ensembles.latency import MODES, LatencyStats, measure_ensemble_latency
from lightning_ensembles.module import EnsembleLightningModule
from tests import helpers

# One tick of the fake clock, in seconds: about a millisecond, and a power of two so that every clock
# reading, difference, millisecond conversion and mean below is exact in floating point.
TICK_S = 2.0**-10
TICK_MS = TICK_S * 1e3
INPUT_SHAPE = (2, 3)
NUM_CLASSES = 4


class FakeClock:
    """A clock that stands still until a member runs; every member call advances it by ``ticks`` ticks."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, ticks: float = 1) -> None:
        self.now += ticks * TICK_S


class MemberCalls:
    """Forward hooks on every member: count calls, record the context they run in, advance the clock."""

    def __init__(self, module: EnsembleLightningModule, clock: FakeClock, ticks: Callable[[int], float]):
        self.count = [0] * len(module.members)
        self.total = 0
        self.inference_mode: list[bool] = []
        self.grad_enabled: list[bool] = []
        self.member_training: list[bool] = []
        self.inputs: list[tuple[torch.dtype, tuple[int, ...], torch.device]] = []
        for i, member in enumerate(module.members):
            member.register_forward_hook(self._hook(i, clock, ticks))

    def _hook(self, i: int, clock: FakeClock, ticks: Callable[[int], float]) -> Any:
        def hook(member: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.count[i] += 1
            self.total += 1
            self.inference_mode.append(torch.is_inference_mode_enabled())
            self.grad_enabled.append(torch.is_grad_enabled())
            self.member_training.append(member.training)
            self.inputs.append((args[0].dtype, tuple(args[0].shape), args[0].device))
            clock.advance(ticks(self.total))

        return hook


def tiny_member() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(INPUT_SHAPE), 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES)
    )


def make_module(num_members: int = 3, **kwargs: Any) -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=tiny_member, num_members=num_members, num_classes=NUM_CLASSES, seed=0, **kwargs
    )


def instrumented(num_members: int = 4, ticks: Callable[[int], float] = lambda n: 1, **kwargs: Any):
    module = make_module(num_members, **kwargs)
    clock = FakeClock()
    return module, clock, MemberCalls(module, clock, ticks)


# ---------------------------------------------------------------------------------------------- primitives


def test_a_run_of_size_k_takes_k_member_calls_and_is_timed_exactly():
    module, clock, calls = instrumented(num_members=4)
    stats = measure_ensemble_latency(module, INPUT_SHAPE, batch_size=2, warmup=3, repeats=7, clock=clock)
    assert list(stats) == [1, 2, 3, 4]
    for k, s in stats.items():
        expected_ms = k * TICK_MS
        assert (s.p50_ms, s.p10_ms, s.p90_ms, s.mean_ms) == (expected_ms,) * 4
        assert s.throughput == 2 / (k * TICK_S)
        assert (s.repeats, s.batch_size) == (7, 2)
    # Warm-up runs are run but not timed: two clock reads per timed run, none for warm-up runs.
    assert clock.reads == 2 * 7 * 4
    assert calls.total == sum((3 + 7) * k for k in range(1, 5))
    # Member i belongs to the ensembles of size i + 1 .. M: the first k members, never the others.
    assert calls.count == [(3 + 7) * (4 - i) for i in range(4)]


def test_warmup_runs_are_excluded_from_the_statistics():
    # The first three runs (six member calls at size 2) are 1000 times slower, as a cold start would be.
    module, clock, calls = instrumented(num_members=2, ticks=lambda n: 1000 if n <= 6 else 1)
    stats = measure_ensemble_latency(module, INPUT_SHAPE, sizes=[2], warmup=3, repeats=5, clock=clock)
    assert stats[2].p90_ms == stats[2].mean_ms == 2 * TICK_MS
    assert calls.total == (3 + 5) * 2

    module, clock, calls = instrumented(num_members=2, ticks=lambda n: 1000 if n <= 6 else 1)
    stats = measure_ensemble_latency(module, INPUT_SHAPE, sizes=[2], warmup=0, repeats=5, clock=clock)
    assert stats[2].p90_ms > 1000 * TICK_MS  # without warm-up, the slow runs are timed


def test_percentiles_interpolate_between_runs_like_torch_quantile():
    durations = [3, 1, 4, 10, 5, 9, 2, 6, 8, 7]  # ticks; the clock returns start/end pairs
    readings = iter(x * TICK_S for d in durations for x in (0, d))
    module = make_module(2)
    stats = measure_ensemble_latency(
        module, INPUT_SHAPE, sizes=[1], warmup=0, repeats=len(durations), clock=lambda: next(readings)
    )[1]
    times = torch.tensor(durations, dtype=torch.float64) * TICK_MS
    q = torch.quantile(times, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    assert [stats.p10_ms, stats.p50_ms, stats.p90_ms] == pytest.approx(q, rel=1e-12)
    assert stats.mean_ms == pytest.approx(times.mean().item(), rel=1e-12)
    assert stats.throughput == pytest.approx(1 / (q[1] / 1e3), rel=1e-12)


def test_runs_in_eval_and_inference_mode_and_restores_every_training_flag():
    module, clock, calls = instrumented(num_members=3, frozen_members=[0])
    module.train()
    before = {name: m.training for name, m in module.named_modules()}
    assert before["members.0"] is False and before["members.1"] is True
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=2, clock=clock)
    assert {name: m.training for name, m in module.named_modules()} == before
    assert calls.total > 0
    assert all(calls.inference_mode) and not any(calls.grad_enabled)
    assert not any(calls.member_training)

    module.eval()
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=0, repeats=1, clock=clock)
    assert not any(m.training for m in module.modules())


def test_input_has_the_modules_dtype_and_device_and_the_requested_shape():
    module, clock, calls = instrumented(num_members=2)
    module.double()
    measure_ensemble_latency(module, INPUT_SHAPE, batch_size=5, warmup=0, repeats=1, clock=clock)
    assert set(calls.inputs) == {(torch.float64, (5, *INPUT_SHAPE), torch.device("cpu"))}


def test_leaves_the_global_random_state_alone():
    module, clock, _ = instrumented(num_members=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    measure_ensemble_latency(module, INPUT_SHAPE, warmup=1, repeats=2, clock=clock)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_sizes_keep_their_order_and_only_the_first_k_members_run():
    module, clock, calls = instrumented(num_members=4)
    stats = measure_ensemble_latency(module, INPUT_SHAPE, sizes=[2, 1, 2], warmup=0, repeats=1, clock=clock)
    assert list(stats) == [2, 1]
    assert calls.count == [2, 1, 0, 0]


def test_uses_time_perf_counter_by_default(monkeypatch: pytest.MonkeyPatch):
    module, clock, _ = instrumented(num_members=2)
    monkeypatch.setattr("lightning_ensembles.latency.time.perf_counter", clock)
    stats = measure_ensemble_latency(module, INPUT_SHAPE, warmup=0, repeats=3)
    assert stats[2].p50_ms == 2 * TICK_MS
    assert clock.reads == 2 * 3 * 2


def test_stats_are_json_serialisable():
    stats = LatencyStats.from_seconds([0.002, 0.001, 0.003], batch_size=4)
    assert json.loads(json.dumps(stats.as_dict())) == stats.as_dict()
    assert stats.as_dict()["p50_ms"] == 2.0 and stats.throughput == 2000.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.p50_ms = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="non-negative duration"):
        LatencyStats.from_seconds([0.001, -0.5], batch_size=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": [0]}, "Expected every entry of `sizes` to be in [1, M=4], but got 0."),
        ({"sizes": [1, 5]}, "Expected every entry of `sizes` to be in [1, M=4], but got 5."),
        ({"sizes": [1.5]}, "Expected every entry of `sizes` to be an int, but got 1.5."),
        ({"sizes": []}, "Expected `sizes` to hold at least one ensemble size, but got none."),
        (
            {"mode": "vmap"},
            "Expected `mode` to be one of ['sequential', 'fused', 'parallel'], but got 'vmap'.",
        ),
        (
            {"mode": "parallel", "workers": 5},
            "Expected `workers` to be None or an int in [1, M=4] (at most one worker per member), but got 5.",
        ),
        ({"mode": "parallel", "threads_per_worker": 0}, "Expected `threads_per_worker` to be an int >= 1"),
        (
            {"mode": "parallel", "devices": ["cuda:99"]},
            "Expected every entry of `devices` to be 'cpu' or a CUDA device that exists",
        ),
        (
            {"mode": "parallel", "devices": ["cpu"] * 5},
            "Expected `devices` to hold at most M=4 entries (at most one worker per member), but got 5",
        ),
        (
            {"mode": "parallel", "devices": ["cpu"] * 2, "workers": 3},
            "Expected `workers` to be None or len(devices)=2 (one worker per entry of `devices`), but got 3.",
        ),
        ({"scope": "a string"}, "Expected `scope` to be None or an object that can be weakly referenced"),
        ({"repeats": 0}, "Expected `repeats` to be an int >= 1, but got 0."),
        ({"warmup": -1}, "Expected `warmup` to be an int >= 0, but got -1."),
        ({"batch_size": 0}, "Expected `batch_size` to be an int >= 1, but got 0."),
        ({"input_shape": ()}, "Expected `input_shape` to be one sample's shape without the batch axis"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict[str, Any], message: str):
    module = make_module(4)
    kwargs = {"input_shape": INPUT_SHAPE, **kwargs}
    with pytest.raises(ValueError) as err:
        measure_ensemble_latency(module, **kwargs)
    assert str(err.value).startswith(message)


def test_modes():
    assert MODES == ("sequential", "fused", "parallel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_the_runs_on_the_gpu():
    module = make_module(3).cuda().train()
    stats = measure_ensemble_latency(module, INPUT_SHAPE, batch_size=4, warmup=2, repeats=5)
    assert list(stats) == [1, 2, 3]
    assert all(0 < s.p10_ms <= s.p50_ms <= s.p90_ms and s.throughput > 0 for s in stats.values())
    assert module.training and next(module.parameters()).is_cuda


# ---------------------------------------------------------------------------------------------- callback


class TinyDataModule(helpers.TinyDataModule):
    """16 samples of ``INPUT_SHAPE`` per split (seeds 0, 1, 2) in batches of 4."""

    def __init__(self) -> None:
        super().__init__(
            n_train=16, n_val=16, n_test=16, batch_size=4, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES
        )


class NoShapeDataModule(TinyDataModule):
    input_shape = None  # type: ignore[assignment]


def make_trainer(tmp_path: Any, callbacks: list[Any], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return Trainer(**options)


def monitored(**kwargs: Any) -> tuple[EnsembleLightningModule, LatencyMonitor, FakeClock, MemberCalls]:
    module, clock, calls = instrumented(num_members=3)
    monitor = LatencyMonitor(warmup=2, repeats=3, **kwargs)
    monitor._clock = clock
    return module, monitor, clock, calls


def scalars(trainer: Trainer) -> dict[str, list[tuple[int, float]]]:
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    accumulator = EventAccumulator(trainer.logger.log_dir)
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith("latency/")
    }


class Spy:
    """Wraps ``measure_ensemble_latency``, which the callbacks call, and records the Trainer's state per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trainer: Trainer | None = None
        self.calls: list[dict[str, Any]] = []
        monkeypatch.setattr("lightning_ensembles.latency.measure_ensemble_latency", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        assert self.trainer is not None
        self.calls.append(
            {
                "sanity_checking": self.trainer.sanity_checking,
                "fn": self.trainer.state.fn.value if self.trainer.state.fn else None,
                "global_step": self.trainer.global_step,
                "batch_size": kwargs["batch_size"],
            }
        )
        return measure_ensemble_latency(*args, **kwargs)


def test_logs_every_size_and_batch_size_to_tensorboard_at_fit_end(tmp_path: Any):
    module, monitor, clock, _ = monitored(batch_sizes=(1, 4))
    trainer = make_trainer(tmp_path, [monitor])
    trainer.fit(module, datamodule=TinyDataModule())
    logged = scalars(trainer)
    assert len(logged) == 4 * 3 * 2  # statistics x sizes x batch sizes, one mode
    for k in (1, 2, 3):
        for b in (1, 4):
            prefix = f"latency/sequential/size_{k}/batch{b}"
            for stat in ("ms_p50", "ms_p10", "ms_p90"):
                assert logged[f"{prefix}_{stat}"] == [(2, pytest.approx(k * TICK_MS, rel=1e-6))]
            assert logged[f"{prefix}_samples_per_s"] == [(2, pytest.approx(b / (k * TICK_S), rel=1e-6))]
    assert clock.reads == 2 * 3 * 3 * 2  # start/end x repeats x sizes x batch sizes
    results = monitor.results
    assert results["device"] == "cpu" and results["torch_version"] == torch.__version__
    assert results["global_step"] == 2 and results["num_members"] == 3
    assert results["metrics"]["latency/sequential/size_3/batch1_ms_p50"] == 3 * TICK_MS
    assert len(results["measurements"]) == 3 * 2
    assert json.loads(json.dumps(results)) == results
    assert next(module.parameters()).device.type == "cpu"


def test_is_not_run_during_the_sanity_check_or_the_training_loop(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
):
    spy = Spy(monkeypatch)
    events: list[str] = []

    class Recorder(Callback):
        def on_sanity_check_start(self, trainer: Trainer, pl_module: Any) -> None:
            events.append("sanity_check_start")

        def on_sanity_check_end(self, trainer: Trainer, pl_module: Any) -> None:
            events.append(f"sanity_check_end after {len(spy.calls)} measurements")

        def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
            events.append(f"train_end after {len(spy.calls)} measurements")

    module, monitor, _, _ = monitored(batch_sizes=(1, 2))
    trainer = make_trainer(tmp_path, [Recorder(), monitor], num_sanity_val_steps=1, val_check_interval=1)
    spy.trainer = trainer
    trainer.fit(module, datamodule=TinyDataModule())
    assert events == [
        "sanity_check_start",
        "sanity_check_end after 0 measurements",
        "train_end after 0 measurements",
    ]
    assert [c["batch_size"] for c in spy.calls] == [1, 2]
    assert all(not c["sanity_checking"] and c["global_step"] == 2 and c["fn"] == "fit" for c in spy.calls)


def test_only_global_rank_zero_measures(tmp_path: Any, monkeypatch: pytest.MonkeyPatch):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(Trainer, "is_global_zero", property(lambda self: False))
    module, monitor, _, _ = monitored()
    trainer = make_trainer(tmp_path, [monitor])
    spy.trainer = trainer
    trainer.fit(module, datamodule=TinyDataModule())
    assert spy.calls == [] and monitor.results == {}
    assert scalars(trainer) == {}


def test_test_start_measures_at_every_test_call_and_not_at_fit_end(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
):
    spy = Spy(monkeypatch)
    module, monitor, _, _ = monitored(when="test_start", batch_sizes=(1,), sizes=(1, 3))
    trainer = make_trainer(tmp_path, [monitor])
    spy.trainer = trainer
    dm = TinyDataModule()
    trainer.fit(module, datamodule=dm)
    assert spy.calls == [] and monitor.results == {}
    trainer.test(module, datamodule=dm, verbose=False)
    trainer.test(module, datamodule=dm, verbose=False)
    assert [c["fn"] for c in spy.calls] == ["test", "test"]
    logged = scalars(trainer)
    assert set(logged) == {
        f"latency/sequential/size_{k}/batch1_{stat}"
        for k in (1, 3)
        for stat in ("ms_p50", "ms_p10", "ms_p90", "samples_per_s")
    }
    assert (
        logged["latency/sequential/size_3/batch1_ms_p50"] == [(2, pytest.approx(3 * TICK_MS, rel=1e-6))] * 2
    )
    assert monitor.results["when"] == "test_start"


def test_input_shape_argument_works_without_a_datamodule(tmp_path: Any):
    module, monitor, _, _ = monitored(input_shape=list(INPUT_SHAPE), batch_sizes=(3,))
    trainer = make_trainer(tmp_path, [monitor])
    trainer.fit(module, train_dataloaders=TinyDataModule().train_dataloader())
    assert monitor.results["input_shape"] == list(INPUT_SHAPE)
    assert monitor.results["metrics"]["latency/sequential/size_2/batch3_ms_p50"] == 2 * TICK_MS


def test_state_dict_round_trip_and_checkpoint(tmp_path: Any):
    module, monitor, _, _ = monitored(batch_sizes=(1,))
    trainer = make_trainer(tmp_path, [monitor])
    trainer.fit(module, datamodule=TinyDataModule())
    assert monitor.results
    restored = LatencyMonitor(batch_sizes=(1,))
    restored.load_state_dict(monitor.state_dict())
    assert restored.results == monitor.results
    assert restored.state_key == monitor.state_key
    assert LatencyMonitor(batch_sizes=(1, 2)).state_key != monitor.state_key

    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["callbacks"][monitor.state_key]["results"] == monitor.results

    # The state is a copy: changing the monitor afterwards does not change a saved state.
    state = monitor.state_dict()
    monitor.results["metrics"].clear()
    assert state["results"]["metrics"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"when": "fit_start"},
            "Expected `LatencyMonitor(when=...)` to be one of ['fit_end', 'test_start'], but got 'fit_start'.",
        ),
        (
            {"sizes": (1, 0)},
            "Expected every entry of `LatencyMonitor(sizes=...)` to be an int >= 1, but got 0.",
        ),
        (
            {"sizes": ()},
            "Expected `LatencyMonitor(sizes=...)` to be a non-empty sequence of ints >= 1, but got ().",
        ),
        (
            {"modes": ("sequential", "vmap")},
            "Expected `LatencyMonitor(modes=...)` to be one of ['sequential', 'fused', 'parallel', 'cascade'], but got 'vmap'.",
        ),
        (
            {"modes": ("cascade",)},
            "Expected `LatencyMonitor(cascade_thresholds=...)` to be given with mode 'cascade' in `LatencyMonitor(modes=...)`, but got None.",
        ),
        (
            {"modes": ("cascade",), "cascade_thresholds": 1.5},
            "Expected `LatencyMonitor(cascade_thresholds=...)` to be None, a float in [0, 1] or NEVER_EXIT",
        ),
        (
            {"cascade_batches": 0},
            "Expected `LatencyMonitor(cascade_batches=...)` to be an int >= 1, but got 0.",
        ),
        ({"workers": 0}, "Expected `LatencyMonitor(workers=...)` to be an int >= 1, but got 0."),
        (
            {"devices": ["gpu:0"]},
            "Expected every entry of `LatencyMonitor(devices=...)` to be 'cpu' or a CUDA device",
        ),
        (
            {"modes": "sequential"},
            "Expected `LatencyMonitor(modes=...)` to be a non-empty sequence of mode names",
        ),
        ({"repeats": 0}, "Expected `LatencyMonitor(repeats=...)` to be an int >= 1, but got 0."),
        ({"warmup": -1}, "Expected `LatencyMonitor(warmup=...)` to be an int >= 0, but got -1."),
        (
            {"batch_sizes": (1, 0)},
            "Expected every entry of `LatencyMonitor(batch_sizes=...)` to be an int >= 1, but got 0.",
        ),
        (
            {"batch_sizes": 1},
            "Expected `LatencyMonitor(batch_sizes=...)` to be a non-empty sequence of ints >= 1, but got 1.",
        ),
        (
            {"input_shape": (3, 0)},
            "Expected `LatencyMonitor(input_shape=...)` to be None or one sample's shape without the batch axis",
        ),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError) as err:
        LatencyMonitor(**kwargs)
    assert str(err.value).startswith(message)


def test_sizes_above_m_fail_before_training(tmp_path: Any, monkeypatch: pytest.MonkeyPatch):
    spy = Spy(monkeypatch)
    module, monitor, _, calls = monitored(sizes=(1, 4))
    trainer = make_trainer(tmp_path, [monitor])
    spy.trainer = trainer
    with pytest.raises(ValueError, match=r"Expected every entry of `sizes` to be in \[1, M=3\], but got 4\."):
        trainer.fit(module, datamodule=TinyDataModule())
    assert trainer.global_step == 0 and calls.total == 0 and spy.calls == []


def test_missing_input_shape_fails_before_training(tmp_path: Any):
    module, monitor, _, calls = monitored()
    trainer = make_trainer(tmp_path, [monitor])
    with pytest.raises(ValueError, match="Expected `input_shape` to be given to LatencyMonitor"):
        trainer.fit(module, datamodule=NoShapeDataModule())
    assert calls.total == 0


def test_rejects_a_model_that_is_not_an_ensemble(tmp_path: Any):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = make_trainer(tmp_path, [LatencyMonitor(input_shape=(32,))])
    with pytest.raises(TypeError, match="LatencyMonitor needs an EnsembleLightningModule, but got"):
        trainer.fit(BoringModel())


# ---------------------------------------------------------------------------------------------- shared, cascade


def test_latency_monitor_and_ablation_share_one_measurement(tmp_path: Any):
    from lightning_ensembles.callbacks.ablation import EnsembleSizeAblation

    # Every member call takes one more tick than the one before: a second measurement could not agree.
    module, clock, calls = instrumented(num_members=3, ticks=lambda n: n)
    monitor = LatencyMonitor(batch_sizes=(1,), modes=("sequential", "fused"))
    ablation = EnsembleSizeAblation(
        metrics=("top1",),
        stages=("val",),
        latency_modes=("sequential", "fused"),
        figures=False,
        verbose=False,
    )
    monitor._clock = ablation._clock = clock
    trainer = make_trainer(tmp_path, [ablation, monitor], max_steps=4)
    trainer.fit(module, datamodule=TinyDataModule())
    assert clock.reads == 2 * 20 * 3 * 2  # start/end x default repeats x sizes x modes: measured once
    logged = scalars(trainer)
    for mode in ("sequential", "fused"):
        for k in (1, 2, 3):
            key = f"latency/{mode}/size_{k}/batch1_ms_p50"
            assert monitor.results["metrics"][key] == ablation.latency_ms_by_mode[mode][k]
            assert [value for _, value in logged[key]] == [
                pytest.approx(ablation.latency_ms_by_mode[mode][k])
            ] * 2
    assert ablation.latency_ms == ablation.latency_ms_by_mode["sequential"]
    row = ablation.history[-1]
    assert row["latency_ms"] == row["latency_ms/sequential"] and "latency_ms/fused" in row


def cascaded(**kwargs: Any) -> tuple[EnsembleLightningModule, LatencyMonitor, FakeClock, MemberCalls]:
    module, clock, calls = instrumented(num_members=3)
    monitor = LatencyMonitor(modes=("cascade",), warmup=1, **kwargs)
    monitor._clock = clock
    return module, monitor, clock, calls


def test_cascade_mode_times_the_cascade_and_the_full_ensemble_on_evaluation_batches(tmp_path: Any):
    module, monitor, clock, calls = cascaded(cascade_thresholds=0.0, cascade_batches=3)

    def real_calls() -> list[tuple[int, ...]]:
        # Counting the members' multiply-adds runs meta copies of them, with their hooks: not counted here.
        return [shape for _, shape, device in calls.inputs if device.type == "cpu"]

    before: list[int] = []

    class BeforeMonitor(Callback):
        def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
            before.extend([len(real_calls()), clock.reads])

    trainer = make_trainer(tmp_path, [BeforeMonitor(), monitor])
    trainer.fit(module, datamodule=TinyDataModule())
    metrics = monitor.results["metrics"]
    # Threshold 0: every sample leaves after the first member; the full ensemble runs all three.
    assert metrics["latency/cascade/batch4_ms_p50"] == TICK_MS
    assert metrics["latency/full_on_batches/batch4_ms_p50"] == 3 * TICK_MS
    assert metrics["latency/cascade/ms_per_sample"] == pytest.approx(TICK_MS / 4)
    assert metrics["latency/full_on_batches/ms_per_sample"] == pytest.approx(3 * TICK_MS / 4)
    assert metrics["latency/cascade/time_ratio"] == pytest.approx(1 / 3)
    assert metrics["latency/cascade/mean_exit_stage"] == 1.0
    assert metrics["latency/cascade/expected_cost_ratio"] == pytest.approx(1 / 3)
    assert monitor.results["cascade"]["batches"] == 3 and monitor.results["cascade"]["samples"] == 12
    # Warm-up: one cascade and one full run; then per batch a timed cascade, a timed full run, an exit pass.
    real = real_calls()[before[0] :]
    assert len(real) == (2 + 3 * 3) + (1 + 3) + (1 + 3)
    assert all(shape == (4, *INPUT_SHAPE) for shape in real)  # real batches of the val loader
    assert clock.reads - before[1] == 2 * 2 * 3
    logged = scalars(trainer)
    assert logged["latency/cascade/mean_exit_stage"] == [(2, 1.0)]


def test_cascade_mode_never_exiting_runs_every_member_at_test_start(tmp_path: Any):
    from lightning_ensembles.cascade import NEVER_EXIT

    module, monitor, _, calls = cascaded(when="test_start", cascade_thresholds=[NEVER_EXIT, NEVER_EXIT])
    trainer = make_trainer(tmp_path, [monitor])
    dm = TinyDataModule()
    trainer.fit(module, datamodule=dm)
    assert monitor.results == {}  # not at fit end
    trainer.test(module, datamodule=dm, verbose=False)
    metrics = monitor.results["metrics"]
    assert metrics["latency/cascade/mean_exit_stage"] == 3.0
    assert metrics["latency/cascade/expected_cost_ratio"] == 1.0
    assert metrics["latency/cascade/batch4_ms_p50"] == metrics["latency/full_on_batches/batch4_ms_p50"]
    assert monitor.results["cascade"]["samples"] == 16  # the whole test loader: 4 batches of 4


def test_cascade_thresholds_of_the_wrong_number_fail_before_training(tmp_path: Any):
    module, monitor, _, calls = cascaded(cascade_thresholds=[0.5])
    trainer = make_trainer(tmp_path, [monitor])
    with pytest.raises(
        ValueError, match=r"Expected `LatencyMonitor\(cascade_thresholds=\.\.\.\)` to be .* M - 1 = 2"
    ):
        trainer.fit(module, datamodule=TinyDataModule())
    assert trainer.global_step == 0 and monitor.results == {}


def test_modes_that_do_not_fit_the_model_fail_before_training(tmp_path: Any):
    module, _, _, calls = monitored()
    module.members[2] = nn.Sequential(nn.Flatten(), nn.Linear(6, NUM_CLASSES))
    trainer = make_trainer(tmp_path, [LatencyMonitor(modes=("fused",))])
    with pytest.raises(
        ValueError,
        match=r"Expected `LatencyMonitor\(modes=\.\.\.\)` to ask for 'fused' only with identical members",
    ):
        trainer.fit(module, datamodule=TinyDataModule())
    trainer = make_trainer(tmp_path, [LatencyMonitor(modes=("parallel",), workers=4)])
    with pytest.raises(
        ValueError, match=r"Expected `LatencyMonitor\(workers=\.\.\.\)` to be None or an int in \[1, M=3\]"
    ):
        trainer.fit(module, datamodule=TinyDataModule())
    assert calls.total == 0


def test_parallel_mode_is_logged_with_its_workers(tmp_path: Any):
    module = make_module(3)
    monitor = LatencyMonitor(
        batch_sizes=(2,), modes=("parallel",), workers=2, threads_per_worker=1, repeats=2
    )
    trainer = make_trainer(tmp_path, [monitor])
    trainer.fit(module, datamodule=TinyDataModule())
    assert {m["size"] for m in monitor.results["measurements"] if m["mode"] == "parallel"} == {1, 2, 3}
    assert "latency/parallel/size_3/batch2_ms_p50" in scalars(trainer)
