"""Checkpoints: round trip, exact resume, combining, extracting and growing ensembles."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

from lightning_ensembles.members import build_member
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import NUM_CLASSES, TinyConvNet, TinyNet, make_loader, trainer_kwargs

Dropout = functools.partial(TinyNet, dropout=0.3)


def _module(num_members: int = 2, member=Dropout, **kwargs) -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=member,
        num_members=num_members,
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        **kwargs,
    )


def _fit(module, epochs: int, root: Path, ckpt_path: str | None = None, **kwargs) -> pl.Trainer:
    loader = make_loader(n=48, batch_size=16)
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=epochs, **trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint], **kwargs)
    )
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer


def test_resumed_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    # Dropout makes the result depend on the RNG stream, so this also checks that resuming restores it.
    torch.manual_seed(0)
    straight = _module()
    _fit(straight, 4, tmp_path / "straight")

    torch.manual_seed(0)
    _fit(_module(), 2, tmp_path / "first")
    torch.manual_seed(999)  # whatever happened in between must not matter
    resumed = _module()
    _fit(resumed, 4, tmp_path / "second", ckpt_path=str(tmp_path / "first" / "last.ckpt"))

    assert_close(resumed.state_dict(), straight.state_dict())


def test_checkpoint_round_trip_is_weights_only_safe(tmp_path: Path) -> None:
    module = _module(num_members=3)
    trainer = _fit(module, 1, tmp_path)
    path = tmp_path / "last.ckpt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["num_members"] == 3
    loaded = EnsembleLightningModule.load_from_checkpoint(path, member=Dropout, weights_only=True)
    x = torch.randn(6, 12)
    module.eval()
    loaded.eval()
    assert_close(loaded(x), module(x))
    (results,) = trainer.test(loaded, make_loader(n=32), verbose=False)
    assert 0.0 <= results["test/top1"] <= 1.0


def test_loading_into_a_different_member_count_is_reported(tmp_path: Path) -> None:
    _fit(_module(num_members=3), 1, tmp_path)
    with pytest.raises(ValueError, match="holds 3 members but this module has 2"):
        EnsembleLightningModule.load_from_checkpoint(tmp_path / "last.ckpt", member=Dropout, num_members=2)


def test_combine_checkpoints_of_ensembles_and_plain_members(tmp_path: Path) -> None:
    pair = _module(num_members=2, member=TinyNet, seed=0)
    _fit(pair, 1, tmp_path / "pair")
    single = _module(num_members=1, member=TinyNet, seed=50)
    _fit(single, 1, tmp_path / "single")
    plain = build_member(TinyNet, seed=99)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")

    combined = EnsembleLightningModule.from_checkpoints(
        [tmp_path / "pair" / "last.ckpt", tmp_path / "single" / "last.ckpt", tmp_path / "plain.pt"],
        member=TinyNet,
        num_classes=NUM_CLASSES,
    )
    assert combined.num_members == 4
    sources = [pair.members[0], pair.members[1], single.members[0], plain]
    for got, expected in zip(combined.members, sources):
        assert_close(got.state_dict(), expected.state_dict())


def test_combine_mixed_architectures(tmp_path: Path) -> None:
    torch.save(build_member(TinyNet, 1).state_dict(), tmp_path / "mlp.pt")
    conv = build_member(TinyConvNet, 2)
    torch.save(conv.state_dict(), tmp_path / "conv.pt")
    combined = EnsembleLightningModule.from_checkpoints(
        [tmp_path / "mlp.pt", tmp_path / "conv.pt"], members=[TinyNet, TinyConvNet], num_classes=NUM_CLASSES
    )
    assert_close(combined.members[1].state_dict(), conv.state_dict())


def test_checkpoint_from_another_architecture_is_reported(tmp_path: Path) -> None:
    torch.save(build_member(TinyConvNet, 0).state_dict(), tmp_path / "conv.pt")
    with pytest.raises(ValueError, match=r"member 0 of checkpoint .*conv.pt.*another architecture"):
        EnsembleLightningModule.from_checkpoints(
            [tmp_path / "conv.pt"], member=TinyNet, num_classes=NUM_CLASSES
        )
    wide = functools.partial(TinyNet, hidden=32)
    with pytest.raises(ValueError, match="another architecture"):
        EnsembleLightningModule.from_checkpoints([tmp_path / "conv.pt"], member=wide, num_classes=NUM_CLASSES)


def test_combine_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one checkpoint"):
        EnsembleLightningModule.from_checkpoints([], member=TinyNet, num_classes=NUM_CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        EnsembleLightningModule.from_checkpoints(
            [tmp_path / "missing.ckpt"], member=TinyNet, num_classes=NUM_CLASSES
        )
    torch.save(build_member(TinyNet, 0).state_dict(), tmp_path / "one.pt")
    with pytest.raises(ValueError, match=r"one entry of `members` per member.*\(1\), but got 2"):
        EnsembleLightningModule.from_checkpoints(
            [tmp_path / "one.pt"], members=[TinyNet, TinyNet], num_classes=NUM_CLASSES
        )
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt.*weights_only=True"):
        EnsembleLightningModule.from_checkpoints(
            [tmp_path / "junk.ckpt"], member=TinyNet, num_classes=NUM_CLASSES
        )


def test_extract_member_is_an_independent_plain_module() -> None:
    module = _module(num_members=3, member=TinyNet)
    extracted = module.extract_member(2)
    assert type(extracted) is TinyNet
    assert_close(extracted.state_dict(), module.members[2].state_dict())
    with torch.no_grad():
        extracted.head.weight.add_(1.0)
    assert not torch.equal(extracted.head.weight, module.members[2].head.weight)
    with pytest.raises(IndexError, match=r"\[0, 3\), but got 3"):
        module.extract_member(3)


def test_grow_trains_only_new_members(tmp_path: Path) -> None:
    module = _module(num_members=2, member=TinyNet)
    _fit(module, 1, tmp_path / "first")
    before = {k: v.clone() for k, v in module.state_dict().items()}

    module.grow(2)
    assert module.num_members == 4 and module.frozen_members == (0, 1)
    fresh = build_member(TinyNet, seed=0 + 3)  # member 3 is built under seed + 3, as in a 4-member ensemble
    assert_close(module.members[3].state_dict(), fresh.state_dict())
    assert [g["name"] for g in module.configure_optimizers()["optimizer"].param_groups] == [
        "member_2",
        "member_3",
    ]

    trainer = _fit(module, 3, tmp_path / "second")
    after = module.state_dict()
    for key, value in before.items():  # weights and BatchNorm running statistics of old members
        if key.startswith("members."):
            assert torch.equal(after[key], value), key
    assert torch.equal(after["temperature.member"], torch.ones(4))  # one per member, the identity
    assert not torch.equal(after["members.2.head.weight"], fresh.head.weight)
    (results,) = trainer.test(module, make_loader(n=32), verbose=False)
    assert "test/member_3/top1" in results and "test/size_4/nll" in results

    reloaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "second" / "last.ckpt", member=TinyNet)
    assert reloaded.num_members == 4 and reloaded.frozen_members == (0, 1)


def test_grow_bad_input() -> None:
    module = EnsembleLightningModule(members=[TinyNet, TinyConvNet], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="pass `member=`"):
        module.grow(1)
    with pytest.raises(ValueError, match="`num_new_members` to be an int >= 1, but got 0"):
        module.grow(0, member=TinyNet)


class _Unpickled:
    """Leaves a marker file if it is ever unpickled: a checkpoint must never run such code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_unreadable_checkpoints_name_the_file(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))
    import cifar_wrn

    _fit(_module(num_members=2), 1, tmp_path)
    good = tmp_path / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted copy
    marker = tmp_path / "unpickled"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": _Unpickled(str(marker))}, hostile)

    for path in (truncated, hostile):
        with pytest.raises(ValueError, match=rf"`checkpoint_path` to be a readable checkpoint, but '{path}'"):
            EnsembleLightningModule.load_from_checkpoint(path, member=Dropout)
        with pytest.raises(ValueError, match=rf"`--ckpt_path` to be a readable checkpoint, but '{path}'"):
            cifar_wrn.main(
                [
                    "--config", str(Path(cifar_wrn.__file__).parent / "configs/digits/quickstart.yaml"),
                    "--config", str(Path(cifar_wrn.__file__).parent / "configs/cifar/wrn-10-1.yaml"),
                    "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
                    f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", f"--ckpt_path={path}",
                ]
            )  # fmt: skip
        # A plain Trainer.fit raises Lightning's own error (a bare OSError for the truncated file), with a note
        # naming the file; pytest matches notes.
        with pytest.raises(Exception, match=rf"`ckpt_path` to be a readable checkpoint, but '{path}'"):
            _fit(_module(num_members=2), 2, tmp_path / "resumed", ckpt_path=str(path))
    assert not marker.exists()  # never unpickled
    with pytest.raises(
        FileNotFoundError, match=r"`checkpoint_path` to be a checkpoint file, but .*missing.ckpt"
    ):
        EnsembleLightningModule.load_from_checkpoint(tmp_path / "missing.ckpt", member=Dropout)
    assert EnsembleLightningModule.load_from_checkpoint(good, member=Dropout).num_members == 2


def test_the_declared_torch_never_unpickles_checkpoints_by_default() -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (minimum,) = re.findall(r'^\s*"torch>=\s*([\d.]+)"', text, flags=re.MULTILINE)
    assert tuple(int(p) for p in minimum.split(".")[:2]) >= (2, 6)  # 2.6 made torch.load weights_only


def test_the_checkpoint_note_callback_is_added_once(caplog: pytest.LogCaptureFixture) -> None:
    module = _module(num_members=2)
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs())
    with caplog.at_level("INFO"):
        trainer.fit(module, make_loader(n=32))
        trainer.test(module, make_loader(n=32), verbose=False)
        trainer.validate(module, make_loader(n=32), verbose=False)
    assert "override existing callbacks" not in caplog.text
    assert sum(type(c).__name__ == "NameUnreadableCheckpoint" for c in trainer.callbacks) == 1


def test_resumed_mixup_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    """timm's Mixup/CutMix draw from numpy's global RNG: a resumed run must restore it to mix the same batches."""
    import numpy as np

    from lightning_ensembles.data import ImageNetDataModule
    from lightning_ensembles.models import WideResNet
    from lightning_ensembles.testing_imagenet import write_fake_imagefolder

    root = write_fake_imagefolder(tmp_path / "imagenet", classes=("a", "b", "c"), size=24)
    member = functools.partial(WideResNet, depth=10, width=1)

    def run(epochs: int, folder: str, ckpt_path: str | None = None) -> EnsembleLightningModule:
        data = ImageNetDataModule(
            root=str(root), input_size=16, batch_size=4, num_workers=0, mixup_alpha=0.4, cutmix_alpha=1.0
        )
        module = EnsembleLightningModule(member=member, num_members=2, num_classes=3)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = pl.Trainer(
            max_epochs=epochs,
            **trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint], limit_val_batches=1),
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    pl.seed_everything(0)
    straight = run(3, "straight")
    pl.seed_everything(0)
    run(1, "first")
    pl.seed_everything(999)  # every stream, numpy's included, is elsewhere when the run resumes
    np.random.seed(999)
    resumed = run(3, "second", str(tmp_path / "first" / "last.ckpt"))
    assert_close(resumed.state_dict(), straight.state_dict())
    saved = torch.load(tmp_path / "first" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["lightning_ensembles_rng"]["numpy"]["keys"].shape == (624,)
