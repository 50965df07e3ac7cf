"""What a member may be given as: timm model names, factories that take ``num_classes`` from the ensemble,
and factories recorded in checkpoints so that they load with no arguments."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.members import describe_factory, resolve_member_spec
from lightning_ensembles.models import TimmModel, WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import NUM_CLASSES, TinyConvNet, TinyNet, make_loader, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
TINY = "test_efficientnet"


def test_a_string_member_is_a_timm_model_with_the_ensembles_classes() -> None:
    module = EnsembleLightningModule(member=TINY, num_members=2, num_classes=4)
    assert all(isinstance(m, TimmModel) and m.name == TINY for m in module.members)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 2, 4)
    first, second = (dict(m.named_parameters())["model.conv_stem.weight"] for m in module.members)
    assert not torch.equal(first, second)  # independently initialised
    assert module.hparams["member"] == TINY  # data: the checkpoint rebuilds it
    mixed = EnsembleLightningModule(members=[TINY, functools.partial(WideResNet, 10, 1)], num_classes=10)
    assert mixed(torch.randn(1, 3, 32, 32)).shape == (2, 1, 10)


def test_an_unknown_timm_name_names_the_argument_and_close_names() -> None:
    with pytest.raises(ValueError, match=r"`--model.member` to be a timm model name.*'resnt18'.*'resnet18'"):
        EnsembleLightningModule(member="resnt18", num_members=2, num_classes=4)
    with pytest.raises(ValueError, match=r"`--model.members\[1\]`"):
        EnsembleLightningModule(members=[TINY, "resnt18"], num_classes=4)


def test_a_timm_factory_without_num_classes_gets_the_ensembles() -> None:
    module = EnsembleLightningModule(member=functools.partial(TimmModel, TINY), num_members=1, num_classes=7)
    assert module(torch.randn(1, 3, 32, 32)).shape == (1, 1, 7)
    explicit = functools.partial(TimmModel, TINY, num_classes=3)
    assert resolve_member_spec(explicit, 7) is explicit  # a member's own setting is kept ...
    with pytest.raises(ValueError, match=r"member 0 gave \(1, 3\).*init_args.num_classes"):
        EnsembleLightningModule(member=explicit, num_classes=7)(torch.randn(1, 3, 32, 32))  # ... and checked
    wide = EnsembleLightningModule(member=functools.partial(WideResNet, 10, 1), num_members=1, num_classes=7)
    assert wide.members[0].num_classes == 7  # WideResNet's num_classes is unset by default: the ensemble's
    assert WideResNet(10, 1).num_classes == 10  # and on its own, CIFAR-10's


def test_string_member_and_data_classes_on_the_cli() -> None:
    cli = EnsembleCLI(
        args=[
            "--config", str(CONFIGS / "cifar_wrn.yaml"),
            "--model.member", TINY,
            "--model.num_members=2",
            "--data=DigitsDataModule",
        ]
    )  # fmt: skip
    assert [type(m) for m in cli.model.members] == [TimmModel, TimmModel]
    assert cli.model.members[0].model.num_classes == 10  # linked from the data, not timm's 1000


def _fit_and_save(module: EnsembleLightningModule, path: Path) -> None:
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs())
    trainer.fit(module, make_loader(n=32))
    trainer.save_checkpoint(path)


@pytest.mark.parametrize(
    "member",
    [TinyNet, functools.partial(TinyNet, hidden=8, dropout=0.1), functools.partial(TinyNet, NUM_CLASSES, 8)],
    ids=["class", "partial", "positional"],
)
def test_python_built_checkpoints_load_with_no_arguments(member: object, tmp_path: Path) -> None:
    module = EnsembleLightningModule(member=member, num_members=2, num_classes=NUM_CLASSES)
    _fit_and_save(module, tmp_path / "run.ckpt")
    raw = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)  # data only
    assert raw["hyper_parameters"]["member"]["class_path"] == "tests.helpers.TinyNet"
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "run.ckpt")
    x = torch.randn(4, 12)
    assert_close(loaded.eval()(x), module.eval()(x))
    combined = EnsembleLightningModule.from_checkpoints([tmp_path / "run.ckpt", tmp_path / "run.ckpt"])
    assert combined.num_members == 4 and combined.num_classes == NUM_CLASSES
    assert_close(combined.eval()(x)[2:], module(x))


def test_mixed_members_are_recorded_too(tmp_path: Path) -> None:
    module = EnsembleLightningModule(members=[TinyNet, TinyConvNet], num_classes=NUM_CLASSES)
    _fit_and_save(module, tmp_path / "mixed.ckpt")
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "mixed.ckpt")
    assert [type(m) for m in loaded.members] == [TinyNet, TinyConvNet]


def test_code_factories_ask_for_the_factory_in_python_words(tmp_path: Path) -> None:
    module = EnsembleLightningModule(member=lambda: TinyNet(), num_members=2, num_classes=NUM_CLASSES)
    _fit_and_save(module, tmp_path / "lambda.ckpt")
    with pytest.raises(
        ValueError, match=r"lambda.ckpt.*without `member=`.*load_from_checkpoint\(path, member="
    ):
        EnsembleLightningModule.load_from_checkpoint(tmp_path / "lambda.ckpt")
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "lambda.ckpt", member=TinyNet)
    assert loaded.num_members == 2
    with pytest.raises(ValueError, match=r"Cannot combine .*lambda.ckpt.* without `member=`"):
        EnsembleLightningModule.from_checkpoints([tmp_path / "lambda.ckpt"])
    torch.save(TinyNet().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain.pt.*plain state_dict"):
        EnsembleLightningModule.from_checkpoints([tmp_path / "plain.pt"])


def test_describe_factory_records_only_data_and_builds_only_modules() -> None:
    class Local(nn.Module):
        pass

    assert describe_factory(Local) is None  # a local class cannot be imported again
    assert describe_factory(functools.partial(TinyNet, hidden=torch.tensor(3))) is None  # an object, not data
    assert describe_factory(functools.partial(TinyNet, hidden=8)) == {
        "class_path": "tests.helpers.TinyNet",
        "init_args": {"hidden": 8},
    }
    with pytest.raises(ValueError, match=r"nn.Module class.*'subprocess.run'"):
        resolve_member_spec({"class_path": "subprocess.run", "init_args": {"args": ["true"]}}, 3)
    with pytest.raises(ValueError, match=r"importable class.*'no.such.Class'"):
        resolve_member_spec({"class_path": "no.such.Class"}, 3)
