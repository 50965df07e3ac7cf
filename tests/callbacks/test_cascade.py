"""CascadeMonitor: curves and calibration in a real fit + test, TensorBoard output, state, sanity check."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ensembles.callbacks.cascade import CascadeMonitor
from lightning_ensembles.cascade import NEVER_EXIT
from lightning_ensembles.cost import count_macs
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyDataModule, TinyNet, sgd, trainer_kwargs

M = 3
NUM_VAL = 40
NUM_TEST = 50


class TinyData(TinyDataModule):
    """64 training, ``NUM_VAL`` validation and ``NUM_TEST`` test samples (seeds 0, 1, 2) in batches of 16."""

    def __init__(self) -> None:
        super().__init__(n_train=64, n_val=NUM_VAL, n_test=NUM_TEST, batch_size=16)


class SanityProbe(pl.Callback):
    """Records what the monitor holds when the sanity check ends."""

    def __init__(self, monitor: CascadeMonitor) -> None:
        self.monitor = monitor
        self.seen: dict[str, Any] | None = None

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = {
            "collected": self.monitor._num_collected,
            "results": dict(self.monitor.results),
            "threshold": self.monitor.threshold,
        }


def _module() -> EnsembleLightningModule:
    # Members of different widths, so the cheapest-first order is not the member order.
    hidden = [32, 8, 16]
    members = [lambda h=h: TinyNet(hidden=h) for h in hidden]
    return EnsembleLightningModule(members=members, num_classes=NUM_CLASSES, optimizer=sgd())


def _fit(tmp_path: Path, monitor: CascadeMonitor, **trainer_overrides: Any) -> tuple[Any, pl.Trainer]:
    module = _module()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    probe = SanityProbe(monitor)
    kwargs = trainer_kwargs(logger=logger, callbacks=[monitor, probe], num_sanity_val_steps=2)
    kwargs.update(trainer_overrides)
    trainer = pl.Trainer(max_epochs=1, **kwargs)
    trainer.fit(module, datamodule=TinyData())
    assert probe.seen == {"collected": 0, "results": {}, "threshold": None}  # nothing from the sanity check
    return module, trainer


def test_fit_and_test_log_curves_calibrated_point_figure_and_files(tmp_path: Path) -> None:
    monitor = CascadeMonitor(target_accuracy=0.05, num_thresholds=8)
    module, trainer = _fit(tmp_path, monitor)
    member_gmacs = [count_macs(m, (IN_FEATURES,)) / 1e9 for m in module.members]
    assert monitor.member_gmacs == pytest.approx(member_gmacs)
    assert monitor.order == [1, 2, 0]  # hidden 8, 16, 32: cheapest first
    val = monitor.results["val"]
    assert val["num_samples"] == NUM_VAL  # the sanity-check batches are not in it
    # A target every point reaches: the cheapest point, i.e. the cheapest member alone.
    assert monitor.threshold == 0.0
    assert val["calibrated"]["expected_gmacs"] == pytest.approx(min(member_gmacs))
    assert val["full"]["expected_gmacs"] == pytest.approx(sum(member_gmacs))
    assert 2 <= len(val["curve"]) <= 8 and [s["k"] for s in val["sizes"]] == [1, 2, 3]

    (results,) = trainer.test(module, datamodule=TinyData(), verbose=False)
    test = monitor.results["test"]
    assert test["num_samples"] == NUM_TEST
    # The full ensemble is the module's own ensemble metric.
    assert test["full"]["accuracy"] == pytest.approx(results["test/top1"], abs=1e-6)
    assert test["full"]["nll"] == pytest.approx(results["test/nll"], rel=1e-5)
    for k in (1, 2, 3):  # ensemble sizes in running order: not the module's size_k (member order) here
        assert test["sizes"][k - 1]["exit_fractions"] == [1.0 if j == k else 0.0 for j in (1, 2, 3)]
    for k in (1, 2, 3):
        size = test["sizes"][k - 1]
        assert size["expected_gmacs"] == pytest.approx(sum(member_gmacs[i] for i in monitor.order[:k]))
    calibrated = test["calibrated"]
    assert calibrated["threshold"] == 0.0 and calibrated["exit_fractions"] == [1.0, 0.0, 0.0]

    run_dir = tmp_path / "run" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for stage in ("val", "test"):
        assert {
            f"cascade/{stage}/calibrated/top1",
            f"cascade/{stage}/calibrated/expected_gmacs",
            f"cascade/{stage}/calibrated/threshold",
            f"cascade/{stage}/calibrated/speedup",
            f"cascade/{stage}/full/top1",
            f"cascade/{stage}/full/gmacs",
        } <= scalars
    speedup = events.Scalars("cascade/test/calibrated/speedup")[-1].value
    assert speedup == pytest.approx(sum(member_gmacs) / min(member_gmacs), rel=1e-5)
    assert events.Scalars("cascade/test/full/top1")[-1].value == pytest.approx(test["full"]["accuracy"])
    images = set(events.Tags()["images"])
    assert {"cascade/val/accuracy_vs_expected_gmacs", "cascade/test/accuracy_vs_expected_gmacs"} <= images
    png = events.Images("cascade/test/accuracy_vs_expected_gmacs")[-1].encoded_image_string
    assert png.startswith(b"\x89PNG")

    saved = json.loads((run_dir / "cascade_test.json").read_text())
    assert saved["calibrated"]["expected_gmacs"] == pytest.approx(calibrated["expected_gmacs"])
    assert saved["full"]["thresholds"] == ["inf", "inf"]  # NEVER_EXIT, in strict JSON
    assert json.loads((run_dir / "cascade_val.json").read_text())["num_samples"] == NUM_VAL


def test_calibrated_threshold_survives_a_state_dict_round_trip(tmp_path: Path) -> None:
    monitor = CascadeMonitor(cost_budget_gmacs=1.0)  # far above the tiny members: the full ensemble fits
    module, trainer = _fit(tmp_path, monitor)
    assert monitor.threshold is not None
    assert monitor.results["val"]["calibrated"]["expected_gmacs"] <= 1.0
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    restored = CascadeMonitor(cost_budget_gmacs=1.0)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.threshold == monitor.threshold
    assert restored.member_gmacs == monitor.member_gmacs and restored.order == monitor.order
    assert restored.results == monitor.results
    # The restored monitor applies that threshold at test time without having seen validation data.
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=str(tmp_path / "restored"), callbacks=[restored]))
    trainer.test(module, datamodule=TinyData(), verbose=False)
    assert restored.results["test"]["calibrated"]["thresholds"] == [monitor.threshold] * (M - 1)
    assert restored.state_key == monitor.state_key != CascadeMonitor(target_accuracy=0.5).state_key


def test_never_exit_threshold_round_trips() -> None:
    monitor = CascadeMonitor(target_accuracy=1.0)
    monitor.threshold = NEVER_EXIT
    monitor.results = {"val": {"full": {"thresholds": [math.inf]}}}
    restored = CascadeMonitor(target_accuracy=1.0)
    restored.load_state_dict(monitor.state_dict())
    assert restored.threshold == NEVER_EXIT and restored.results == monitor.results


def test_unreachable_target_warns_and_calibrates_nothing(tmp_path: Path) -> None:
    monitor = CascadeMonitor(target_accuracy=1.0)
    with pytest.warns(UserWarning, match="calibrates no threshold.*`target_accuracy` to be reachable"):
        _fit(tmp_path, monitor)
    assert monitor.threshold is None and monitor.results["val"]["calibrated"] is None
    assert "full" in monitor.results["val"]


def test_curve_only_without_target_and_truncation_warning(tmp_path: Path) -> None:
    monitor = CascadeMonitor(max_samples=20)
    with pytest.warns(UserWarning, match="at most 20 samples"):
        _fit(tmp_path, monitor)
    assert monitor.results["val"]["num_samples"] == 20
    assert monitor.results["val"]["calibrated"] is None and monitor.threshold is None


def test_setup_errors(tmp_path: Path) -> None:
    class NoShape(TinyData):
        input_shape = None  # type: ignore[assignment]

    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=str(tmp_path), callbacks=[CascadeMonitor()]))
    with pytest.raises(ValueError, match=r"needs `input_shape`.*has no `input_shape`|needs `input_shape`"):
        trainer.test(_module(), datamodule=NoShape())
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[CascadeMonitor(cost_budget_gmacs=1e-12)]))
    with pytest.raises(ValueError, match=r"`CascadeMonitor\(cost_budget_gmacs=\.\.\.\)`.*cheapest member"):
        trainer.test(_module(), datamodule=TinyData())

    class Plain(pl.LightningModule):
        def test_step(self, batch: Any, batch_idx: int) -> None:  # pragma: no cover - never reached
            return None

    trainer = pl.Trainer(**trainer_kwargs(callbacks=[CascadeMonitor()]))
    with pytest.raises(TypeError, match="CascadeMonitor needs an EnsembleLightningModule, but got Plain"):
        trainer.test(Plain(), datamodule=TinyData())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_accuracy=0.9, cost_budget_gmacs=1.0), r"at most one of .*target_accuracy.*both"),
        (dict(target_accuracy=0.0), r"`CascadeMonitor\(target_accuracy=\.\.\.\)`.*\(0, 1\].*0\.0"),
        (dict(target_accuracy=1.5), r"target_accuracy=\.\.\.\)`.*1\.5"),
        (dict(cost_budget_gmacs=0.0), r"cost_budget_gmacs=\.\.\.\)`.*> 0.*0\.0"),
        (dict(cost_budget_gmacs=math.inf), r"cost_budget_gmacs=\.\.\.\)`.*inf"),
        (dict(num_thresholds=1), r"num_thresholds=\.\.\.\)` to be an int >= 2, but got 1"),
        (dict(max_samples=0), r"max_samples=\.\.\.\)` to be an int >= 1, but got 0"),
        (dict(input_shape=[3, 0]), r"input_shape=\.\.\.\)`.*\[3, 0\]"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CascadeMonitor(**kwargs)


@pytest.mark.timeout(120)
def test_ddp_gathers_every_shard(tmp_path: Path) -> None:
    # Two CPU processes (gloo): each sees half of the test set; the curve must cover all of it.
    module = EnsembleLightningModule(
        members=[TinyNet(hidden=h) for h in (32, 8, 16)], num_classes=NUM_CLASSES
    )
    kwargs = trainer_kwargs(
        default_root_dir=str(tmp_path / "ddp"), callbacks=[CascadeMonitor(num_thresholds=8)]
    )
    kwargs.update(devices=2, strategy="ddp_spawn")
    pl.Trainer(**kwargs).test(module, datamodule=TinyData(), verbose=False)
    gathered = json.loads((tmp_path / "ddp" / "cascade_test.json").read_text())

    single = CascadeMonitor(num_thresholds=8)
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=str(tmp_path / "single"), callbacks=[single]))
    trainer.test(module, datamodule=TinyData(), verbose=False)
    reference = single.results["test"]
    assert gathered["num_samples"] == reference["num_samples"] == NUM_TEST
    for key in ("accuracy", "expected_gmacs"):
        assert [p[key] for p in gathered["curve"]] == pytest.approx([p[key] for p in reference["curve"]])
