"""MemberEMA: per-member EMA (timm's ModelEmaV3), evaluated as the member, checkpointed and resumed."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.testing import assert_close

from lightning_ensembles.callbacks.ema import MemberEMA
from lightning_ensembles.members import build_member
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import IN_FEATURES, NUM_CLASSES, make_loader, trainer_kwargs


def Mlp() -> nn.Module:  # noqa: N802 - a factory, named like the class it stands for
    return nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))


def _module(num_members: int = 2) -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=Mlp,
        num_members=num_members,
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )


def test_ema_follows_the_recurrence_for_each_member() -> None:
    decay = 0.5
    module = _module()
    ema = MemberEMA(decay=decay)
    loader = make_loader(n=48, batch_size=16)
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(callbacks=[ema]))
    for i in range(2):
        assert_close(build_member(Mlp, i).state_dict(), module.members[i].state_dict())

    models = [build_member(Mlp, i) for i in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    expected: list[dict[str, torch.Tensor]] = [{}, {}]
    for step, (x, y) in enumerate(loader, start=1):
        for model, optimizer, avg in zip(models, optimizers, expected):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            for name, param in model.named_parameters():
                # timm's ModelEmaV3: the first update copies the weights, later ones average with `decay`.
                d = 0.0 if step == 1 else decay
                avg[name] = d * avg.get(name, param.detach()) + (1 - d) * param.detach()

    trainer.fit(module, loader)
    for i in range(2):
        got = dict(ema.ema_member(i).named_parameters())
        for name, value in expected[i].items():
            assert_close(got[name], value)
        assert not torch.allclose(got["2.weight"], module.members[i][2].weight)  # EMA differs from raw


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation() -> None:
    """With accumulate_grad_batches=3, the global step stays put for 3 batches: one update per optimizer step."""
    decay, accumulate = 0.5, 3
    module = _module()
    ema = MemberEMA(decay=decay)
    loader = make_loader(n=96, batch_size=8)  # 12 batches: 4 optimizer steps
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(callbacks=[ema], accumulate_grad_batches=accumulate))

    models = [build_member(Mlp, i) for i in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    expected: list[dict[str, torch.Tensor]] = [{}, {}]
    batches = list(loader)
    for step in range(len(batches) // accumulate):
        for model, optimizer, avg in zip(models, optimizers, expected):
            optimizer.zero_grad()
            for x, y in batches[step * accumulate : (step + 1) * accumulate]:
                (torch.nn.functional.cross_entropy(model(x), y) / accumulate).backward()
            optimizer.step()
            for name, param in model.named_parameters():
                d = 0.0 if step == 0 else decay
                avg[name] = d * avg.get(name, param.detach()) + (1 - d) * param.detach()

    trainer.fit(module, loader)
    assert trainer.global_step == 4
    for i in range(2):
        got = dict(ema.ema_member(i).named_parameters())
        for name, value in expected[i].items():
            assert_close(got[name], value)


def test_validation_sees_ema_weights_and_training_keeps_raw_ones(tmp_path: Path) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Spy(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                seen.append(
                    (pl_module.members[0][0].weight.detach().clone(), ema.ema_member(0)[0].weight.clone())
                )

    ema = MemberEMA(decay=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _module()
    loader = make_loader(n=32, batch_size=16)
    trainer = pl.Trainer(
        max_epochs=2, **trainer_kwargs(callbacks=[ema, Spy(), checkpoint], enable_checkpointing=True)
    )
    trainer.fit(module, loader, loader)
    assert len(seen) == 4 and all(torch.equal(member, avg) for member, avg in seen)
    raw = module.members[0][0].weight
    assert not torch.allclose(raw, ema.ema_member(0)[0].weight)  # raw weights are back after validation

    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(saved["state_dict"]["members.0.0.weight"], raw)  # checkpoints keep the trained weights
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("MemberEMA")]
    assert torch.equal(state["members"][0]["0.weight"], ema.ema_member(0)[0].weight)


def test_resumed_run_continues_the_ema(tmp_path: Path) -> None:
    loader = make_loader(n=32, batch_size=16)

    def run(epochs: int, root: Path, ckpt_path: str | None = None) -> MemberEMA:
        ema = MemberEMA(decay=0.8)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = pl.Trainer(
            max_epochs=epochs, **trainer_kwargs(callbacks=[ema, checkpoint], enable_checkpointing=True)
        )
        trainer.fit(_module(), loader, ckpt_path=ckpt_path)
        return ema

    straight = run(3, tmp_path / "a")
    run(1, tmp_path / "b")
    resumed = run(3, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for i in range(2):
        assert_close(resumed.ema_member(i).state_dict(), straight.ema_member(i).state_dict())


def test_frozen_members_get_no_ema() -> None:
    module = _module()
    module.grow(1)
    ema = MemberEMA()
    pl.Trainer(max_steps=2, **trainer_kwargs(callbacks=[ema])).fit(module, make_loader())
    assert sorted(ema.emas) == [2]
    with pytest.raises(KeyError, match="Member 0 has no EMA"):
        ema.ema_member(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decay=1.0), r"`MemberEMA\(decay=\.\.\.\)` to be a float in \[0, 1\), but got 1.0"),
        (dict(decay=-0.1), r"`MemberEMA\(decay=\.\.\.\)`"),
        (dict(every_n_steps=0), r"`MemberEMA\(every_n_steps=\.\.\.\)` to be an int >= 1, but got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemberEMA(**kwargs)
