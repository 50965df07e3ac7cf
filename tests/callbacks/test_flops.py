import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import lightning_ensembles.callbacks.flops as flops_module
from lightning_ensembles.callbacks.flops import FlopsMonitor
from lightning_ensembles.cost import count_macs, count_params, count_training_macs
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import TinyDataModule, trainer_kwargs

SHAPE = (1, 8, 8)
NUM_CLASSES = 10


class RandomImages(TinyDataModule):
    """16 random (1, 8, 8) images per split with 10 classes, in batches of 8."""

    def __init__(self) -> None:
        super().__init__(
            n_train=16, n_val=16, n_test=16, batch_size=8, input_shape=SHAPE, num_classes=NUM_CLASSES
        )


class NoShapeImages(RandomImages):
    input_shape = None  # type: ignore[assignment]


def wrn(depth: int, in_channels: int = 1) -> functools.partial:
    return functools.partial(
        WideResNet, depth=depth, width=1, num_classes=NUM_CLASSES, in_channels=in_channels
    )


def make_module(*depths: int) -> EnsembleLightningModule:
    return EnsembleLightningModule(members=[wrn(d) for d in depths or (10, 16)], num_classes=NUM_CLASSES)


def make_trainer(monitor: FlopsMonitor, **kwargs) -> Trainer:
    return Trainer(
        **trainer_kwargs(**{"callbacks": [monitor], "max_steps": 2, "limit_val_batches": 1, **kwargs})
    )


def spy_on_counts(monkeypatch: pytest.MonkeyPatch, trainer_box: list[Trainer] | None = None) -> list[str]:
    """The counts FlopsMonitor asks the run's cost source for, named after the count they stand for."""
    calls: list[str] = []
    original = flops_module.member_macs

    def spy(*args, **kwargs):
        name = "count_training_macs" if kwargs.get("training") else "count_macs"
        if trainer_box and trainer_box[0].sanity_checking:
            calls.append(f"{name} during the sanity check")
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(flops_module, "member_macs", spy)
    return calls


def test_logs_per_member_and_ensemble_costs_to_tensorboard(tmp_path: Path):
    module = make_module(10, 16)
    monitor = FlopsMonitor()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(monitor, logger=logger)
    trainer.fit(module, datamodule=RandomImages())

    accumulator = EventAccumulator(str(logger.log_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])

    def value(tag: str) -> float:
        (event,) = accumulator.Scalars(tag)  # logged exactly once
        assert event.step == 0
        return event.value

    kinds = ("gmacs", "gflops", "mparams", "train_gmacs")
    expected_tags = {f"flops/{who}_{kind}" for who in ("member_0", "member_1", "ensemble") for kind in kinds}
    assert expected_tags <= tags

    members = [WideResNet(10, 1, in_channels=1), WideResNet(16, 1, in_channels=1)]
    macs = [count_macs(m, SHAPE) for m in members]
    train = [count_training_macs(m, SHAPE, batch_size=2) for m in members]
    params = [count_params(m) for m in members]
    assert macs[0] != macs[1]  # mixed architectures are costed separately
    for i in range(2):
        assert value(f"flops/member_{i}_gmacs") == pytest.approx(macs[i] / 1e9, rel=1e-6)
        assert value(f"flops/member_{i}_gflops") == pytest.approx(
            2 * value(f"flops/member_{i}_gmacs"), rel=1e-6
        )
        assert value(f"flops/member_{i}_mparams") == pytest.approx(params[i] / 1e6, rel=1e-6)
        assert value(f"flops/member_{i}_train_gmacs") == pytest.approx(train[i] / 1e9, rel=1e-6)
    for kind in kinds:
        total = value(f"flops/member_0_{kind}") + value(f"flops/member_1_{kind}")
        assert value(f"flops/ensemble_{kind}") == pytest.approx(total, rel=1e-6)
    assert value("flops/ensemble_gflops") == pytest.approx(2 * value("flops/ensemble_gmacs"), rel=1e-6)

    assert monitor.results == {
        "input_shape": list(SHAPE),
        "members": [
            {"name": "WRN-10-1", "macs": macs[0], "params": params[0], "train_macs": train[0]},
            {"name": "WRN-16-1", "macs": macs[1], "params": params[1], "train_macs": train[1]},
        ],
        "ensemble": {"macs": sum(macs), "params": sum(params), "train_macs": sum(train)},
    }


def test_counts_once_per_run_and_never_in_the_sanity_check(monkeypatch: pytest.MonkeyPatch):
    box: list[Trainer] = []
    calls = spy_on_counts(monkeypatch, box)
    monitor = FlopsMonitor()
    trainer = make_trainer(monitor, num_sanity_val_steps=1, val_check_interval=1)
    box.append(trainer)
    module = make_module()
    datamodule = RandomImages()
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    assert calls == ["count_macs", "count_training_macs"] * 2


@pytest.mark.parametrize("stage", ["test", "validate"])
def test_counts_in_an_evaluation_only_run(stage: str):
    # Evaluation hooks run under torch.inference_mode(): the training count must still work there.
    monitor = FlopsMonitor()
    trainer = make_trainer(monitor)
    getattr(trainer, stage)(make_module(), datamodule=RandomImages(), verbose=False)
    train_macs = monitor.results["members"][0]["train_macs"]
    assert train_macs == count_training_macs(WideResNet(10, 1, in_channels=1), SHAPE, batch_size=2)


def test_count_training_false_logs_no_training_keys(tmp_path: Path):
    monitor = FlopsMonitor(input_shape=[1, 8, 8], count_training=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    make_trainer(monitor, logger=logger).fit(make_module(10), datamodule=NoShapeImages())
    accumulator = EventAccumulator(str(logger.log_dir))
    accumulator.Reload()
    tags = {t for t in accumulator.Tags()["scalars"] if t.startswith("flops/")}
    assert tags == {
        f"flops/{w}_{k}" for w in ("member_0", "ensemble") for k in ("gmacs", "gflops", "mparams")
    }
    assert "train_macs" not in monitor.results["ensemble"]


def test_state_dict_round_trip_skips_the_recount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monitor = FlopsMonitor()
    trainer = make_trainer(monitor)
    module = make_module()
    trainer.fit(module, datamodule=RandomImages())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][monitor.state_key]
    assert state == monitor.results
    assert monitor.state_dict() is not monitor.results  # a copy

    calls = spy_on_counts(monkeypatch)
    resumed = FlopsMonitor()
    trainer = make_trainer(resumed, max_steps=3)
    trainer.fit(module, datamodule=RandomImages(), ckpt_path=path)
    assert calls == []
    assert resumed.results == monitor.results

    restored = FlopsMonitor()
    restored.load_state_dict(state)
    assert restored.results == monitor.results
    make_trainer(restored).test(make_module(10, 16, 10), datamodule=RandomImages(), verbose=False)
    assert calls == ["count_macs", "count_training_macs"] * 3  # three members now: counted again
    assert len(restored.results["members"]) == 3


def test_missing_input_shape_raises():
    with pytest.raises(ValueError, match=r"`input_shape`.*FlopsMonitor\(input_shape=\.\.\.\)"):
        make_trainer(FlopsMonitor()).fit(make_module(), datamodule=NoShapeImages())
    dicts = DataLoader([{"image": torch.zeros(*SHAPE)}] * 4, batch_size=2)  # no tensor batch to read
    with pytest.raises(ValueError, match="no datamodule was given.*`input_shape` attribute"):
        make_trainer(FlopsMonitor()).fit(make_module(), train_dataloaders=dicts)


def test_plain_dataloaders_give_the_shape_from_their_first_batch():
    data = RandomImages()
    guessed, explicit = FlopsMonitor(), FlopsMonitor(input_shape=list(SHAPE))
    make_trainer(guessed).fit(make_module(), train_dataloaders=data.train_dataloader())
    make_trainer(explicit).fit(make_module(), datamodule=data)
    assert guessed.results["input_shape"] == list(SHAPE)
    assert guessed.results["ensemble"]["macs"] == explicit.results["ensemble"]["macs"] > 0
    tested = FlopsMonitor()  # test only: the test loader's batch
    make_trainer(tested).test(make_module(), dataloaders=data.test_dataloader(), verbose=False)
    assert tested.results["input_shape"] == list(SHAPE)


def test_input_shape_that_does_not_fit_a_member_names_it():
    module = EnsembleLightningModule(members=[wrn(10), wrn(10, in_channels=3)], num_classes=NUM_CLASSES)
    monitor = FlopsMonitor(input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"`input_shape` \[1, 8, 8\].*member 1 \(WRN-10-1\)") as excinfo:
        make_trainer(monitor).fit(module, datamodule=NoShapeImages())
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert str(excinfo.value.__cause__) in str(excinfo.value)
    with pytest.raises(ValueError, match=r"`input_shape` \[2, 8, 8\].*member 0 \(WRN-10-1\)"):
        make_trainer(FlopsMonitor(input_shape=(2, 8, 8))).fit(make_module(), datamodule=NoShapeImages())


class WithoutSetup(EnsembleLightningModule):
    """Skips the module's own `setup`, so the callback is the first to read the datamodule's shape."""

    def setup(self, stage: str) -> None:
        pass


def test_bad_datamodule_input_shape_raises():
    class BadShape(RandomImages):
        input_shape = (1, 0, 8)  # type: ignore[assignment]

    module = WithoutSetup(members=[wrn(10)], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"datamodule's `input_shape`.*\(1, 0, 8\)"):
        make_trainer(FlopsMonitor()).fit(module, datamodule=BadShape())


def test_module_without_members_raises():
    class Plain(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, NUM_CLASSES)

        def test_step(self, batch, batch_idx):
            pass

    with pytest.raises(TypeError, match="FlopsMonitor needs an EnsembleLightningModule, but got Plain"):
        make_trainer(FlopsMonitor(input_shape=SHAPE)).test(Plain(), datamodule=RandomImages(), verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (3, 0, 32)}, r"`FlopsMonitor\(input_shape=\.\.\.\)`.*\(3, 0, 32\)"),
        ({"input_shape": ()}, r"`FlopsMonitor\(input_shape=\.\.\.\)`.*\(\)"),
        ({"input_shape": "3x32x32"}, r"`FlopsMonitor\(input_shape=\.\.\.\)`.*'3x32x32'"),
        ({"count_training": "yes"}, r"`FlopsMonitor\(count_training=\.\.\.\)`.*'yes'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        FlopsMonitor(**kwargs)


def test_cross_check_logs_ptflops_next_to_our_count_and_warns_on_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ptflops")
    from lightning_ensembles.cost import ptflops_macs

    monitor = FlopsMonitor(cross_check=True, count_training=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    module = make_module(10, 16)
    trained_before = {k: v.clone() for k, v in module.state_dict().items()}
    make_trainer(monitor, logger=logger, max_steps=1).fit(module, datamodule=RandomImages())
    rows = monitor.results["members"]
    for depth, row in zip((10, 16), rows):
        ours = count_macs(wrn(depth)(), SHAPE)
        assert row["macs"] == ours and row["ptflops_macs"] == ours + NUM_CLASSES  # + the classifier's bias
    assert monitor.results["ensemble"]["ptflops_macs"] == sum(r["ptflops_macs"] for r in rows)
    accumulator = EventAccumulator(str(logger.log_dir))
    accumulator.Reload()
    assert accumulator.Scalars("flops/ensemble_ptflops_gmacs")[-1].value == pytest.approx(
        monitor.results["ensemble"]["ptflops_macs"] / 1e9
    )
    assert monitor.state_key == FlopsMonitor(count_training=False).state_key  # old checkpoints restore
    assert set(trained_before) == set(module.state_dict())

    # A member whose two counts disagree by more than 1% is named in a warning.
    monkeypatch.setattr(flops_module, "ptflops_macs", lambda member, shape: 2 * count_macs(member, shape))
    with pytest.warns(UserWarning, match=r"ptflops counts \d+ multiply-adds for member 0 \(WRN-10-1\)"):
        make_trainer(FlopsMonitor(cross_check=True), max_steps=1).fit(
            make_module(10), datamodule=RandomImages()
        )

    # ptflops_macs leaves the model alone: mode, BatchNorm statistics.
    member = wrn(10)().train()
    before = {k: v.clone() for k, v in member.state_dict().items()}
    assert ptflops_macs(member, SHAPE) == count_macs(member, SHAPE) + NUM_CLASSES
    assert member.training and all(torch.equal(v, member.state_dict()[k]) for k, v in before.items())


def test_cross_check_without_ptflops_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lightning_ensembles.cost import ptflops_macs

    monkeypatch.setitem(sys.modules, "ptflops", None)
    with pytest.raises(ImportError, match=r"lightning-ensembles\[flops\]"):
        ptflops_macs(wrn(10)(), SHAPE)
