"""ReliabilityDiagram: its ECE equals torchmetrics', its bins count every test sample once, and it writes a
PNG, a JSON and a TensorBoard image (nothing under fast_dev_run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassCalibrationError

from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.callbacks import ReliabilityDiagram
from lightning_ensembles.callbacks.reliability import CalibrationBins, calibration_error
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.metrics import ECE_BINS
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import NUM_CLASSES, TinyDataModule, TinyNet, make_data, sgd, trainer_kwargs

ROOT = Path(__file__).resolve().parents[2]
M = 3
TEST_SAMPLES = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TinyData(TinyDataModule):
    """64 training, 40 validation and ``TEST_SAMPLES`` test samples (seeds 0, 1, 2) in batches of 16."""

    def __init__(self) -> None:
        super().__init__(n_train=64, n_val=40, n_test=TEST_SAMPLES, batch_size=16)


def _module(**kwargs: Any) -> EnsembleLightningModule:
    torch.manual_seed(0)
    return EnsembleLightningModule(
        member=TinyNet, num_members=M, num_classes=NUM_CLASSES, optimizer=sgd(), **kwargs
    )


def _reference_ece(module: EnsembleLightningModule, member: int | None = None) -> torch.Tensor:
    """torchmetrics' 15-bin L1 ECE on the aggregated (or one member's) probabilities of the test set."""
    module.eval()
    x, y = make_data(TEST_SAMPLES, seed=2).tensors
    with torch.no_grad():
        logits = module(x)
    if member is None:
        probs = cumulative_log_probs(logits, module.aggregation)[-1].exp().clamp(0.0, 1.0)
    else:
        probs = logits[member].softmax(dim=-1)
    return MulticlassCalibrationError(num_classes=NUM_CLASSES, n_bins=ECE_BINS, norm="l1")(probs, y)


@pytest.mark.parametrize("aggregation", ["mean_probs", "vote"])  # votes: confidences 1/3, 2/3 on bin edges
def test_ece_bins_and_files(tmp_path: Path, aggregation: str) -> None:
    module = _module(aggregation=aggregation)
    callback = ReliabilityDiagram(members=(0, 2))
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=tmp_path, callbacks=[callback]))
    (metrics,) = trainer.test(module, datamodule=TinyData(), verbose=False)

    png = tmp_path / "reliability_test.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "reliability_test.json").read_text())
    assert saved == json.loads(json.dumps(callback.results["test"]))
    assert (saved["stage"], saved["n_bins"], saved["aggregation"]) == ("test", ECE_BINS, aggregation)
    assert sorted(saved["curves"]) == ["ensemble", "member_0", "member_2"]
    references = {"ensemble": None, "member_0": 0, "member_2": 2}
    for name, curve in saved["curves"].items():
        assert len(curve["bins"]) == len(curve["count"]) == ECE_BINS + 1  # + [1, 1], as torchmetrics
        assert sum(curve["count"]) == curve["samples"] == TEST_SAMPLES
        expected = _reference_ece(module, references[name])
        torch.testing.assert_close(
            torch.tensor(curve["ece"], dtype=torch.float64), expected.double(), atol=1e-6, rtol=0
        )
        for n, accuracy in zip(curve["count"], curve["accuracy"]):
            assert (accuracy is None) == (n == 0)
    # the ensemble's ECE is the module's own `test/ece`
    assert saved["curves"]["ensemble"]["ece"] == pytest.approx(metrics["test/ece"], abs=1e-6)


def test_bins_match_torchmetrics_on_edges_and_saturated_confidences() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(200, 4, generator=generator).mul(3).softmax(dim=-1)
    probs[:20] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1
    probs[20:40] = torch.tensor([0.6, 0.2, 0.2, 0.0])  # on a bin edge for 5 bins
    target = torch.randint(0, 4, (200,), generator=generator)
    for n_bins in (1, 5, 15):
        bins = CalibrationBins(n_bins)
        bins.update(probs[:77], target[:77])
        bins.update(probs[77:], target[77:])
        sums = bins.compute()
        assert float(sums["count"].sum()) == 200
        expected = MulticlassCalibrationError(num_classes=4, n_bins=n_bins, norm="l1")(probs, target)
        assert calibration_error(sums) == pytest.approx(float(expected), abs=1e-6)


def test_tensorboard_image_and_no_sanity_check(tmp_path: Path) -> None:
    module = _module()
    callback = ReliabilityDiagram(stages=("val", "test"))
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        max_epochs=1,
        **trainer_kwargs(logger=logger, callbacks=[callback], num_sanity_val_steps=2),
    )
    trainer.fit(module, datamodule=TinyData())
    assert sum(callback.results["val"]["curves"]["ensemble"]["count"]) == 40  # not the sanity batches too
    trainer.test(module, datamodule=TinyData(), verbose=False)
    run_dir = tmp_path / "run" / "version_0"
    assert (run_dir / "reliability_val.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "reliability_test.png").read_bytes()[:8] == PNG_MAGIC
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"reliability/val", "reliability/test"} <= set(events.Tags()["images"])
    (image,) = events.Images("reliability/test")
    assert image.encoded_image_string[:8] == PNG_MAGIC
    state = callback.state_dict()
    restored = ReliabilityDiagram(stages=("val", "test"))
    restored.load_state_dict(state)
    assert restored.results == callback.results


def test_figures_false_writes_only_the_json(tmp_path: Path) -> None:
    callback = ReliabilityDiagram(members=(), figures=False)
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=tmp_path, callbacks=[callback]))
    trainer.test(_module(), datamodule=TinyData(), verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reliability_test.json"]
    assert list(callback.results["test"]["curves"]) == ["ensemble"]


def test_fast_dev_run_writes_nothing(tmp_path: Path) -> None:
    callback = ReliabilityDiagram()
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=tmp_path, callbacks=[callback], fast_dev_run=True))
    trainer.test(_module(), datamodule=TinyData(), verbose=False)
    assert list(tmp_path.iterdir()) == []
    assert sum(callback.results["test"]["curves"]["ensemble"]["count"]) == 16  # one batch, still measured


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"stages": ("train",)},
            r"`ReliabilityDiagram\(stages=\.\.\.\)` .* subset of \['val', 'test'\].*'train'",
        ),
        ({"stages": ()}, r"`ReliabilityDiagram\(stages=\.\.\.\)`"),
        ({"n_bins": 0}, r"Expected `ReliabilityDiagram\(n_bins=\.\.\.\)` to be an int >= 1, but got 0"),
        ({"members": (-1,)}, r"`ReliabilityDiagram\(members=\.\.\.\)` .*ints >= 0.*-1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReliabilityDiagram(**kwargs)


def test_member_index_out_of_range(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        **trainer_kwargs(default_root_dir=tmp_path, callbacks=[ReliabilityDiagram(members=(0, 3))])
    )
    with pytest.raises(
        ValueError, match=r"`ReliabilityDiagram\(members=\.\.\.\)` .* in \[0, 3\).*\[0, 3\].*\[3\]"
    ):
        trainer.test(_module(), datamodule=TinyData(), verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_preset_adds_the_callback_to_a_recipe() -> None:
    args = ["--config", str(ROOT / "reproductions/configs/cifar_wrn.yaml")]
    args += ["--config", str(ROOT / "callbacks/reliability.yaml"), "--trainer.logger=false"]
    args += ["--trainer.callbacks+=lightning_ensembles.callbacks.ReliabilityDiagram"]
    args += ["--trainer.callbacks.init_args.members=[]", "--trainer.callbacks.init_args.n_bins=10"]
    cli = EnsembleCLI(args=args, run=False)
    preset, configured = [c for c in cli.trainer.callbacks if isinstance(c, ReliabilityDiagram)]
    assert (preset.stages, preset.n_bins, preset.members, preset.figures) == (("test",), ECE_BINS, (0,), True)
    assert (configured.n_bins, configured.members) == (10, ())


@pytest.mark.timeout(120)
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    # gloo on CPU, 25 test samples per rank; the bins are sum-reduced across the ranks.
    module = _module()
    kwargs = trainer_kwargs(
        default_root_dir=str(tmp_path / "ddp"), callbacks=[ReliabilityDiagram(figures=False)]
    )
    kwargs.update(devices=2, strategy="ddp_spawn")
    pl.Trainer(**kwargs).test(module, datamodule=TinyData(), verbose=False)
    gathered = json.loads((tmp_path / "ddp" / "reliability_test.json").read_text())

    single = ReliabilityDiagram(figures=False)
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=str(tmp_path / "one"), callbacks=[single]))
    trainer.test(module, datamodule=TinyData(), verbose=False)
    for name, curve in single.results["test"]["curves"].items():
        assert gathered["curves"][name]["count"] == curve["count"]
        assert gathered["curves"][name]["ece"] == pytest.approx(curve["ece"], abs=1e-6)
