"""The EfficientNet schedule: timm's formula, and the learning rate a Trainer actually uses."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from timm.scheduler import StepLRScheduler

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.schedules import StepDecayWithWarmup
from tests.helpers import NUM_CLASSES, TinyNet, make_loader, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
LR, WARMUP_LR, DECAY, RATE, WARMUP = 0.064, 1e-6, 2.4, 0.97, 3


def published(epoch: int) -> float:
    """Tan & Le 2019 with timm's linear warm-up (B2 recipe): written out, not imported."""
    if epoch < WARMUP:
        return WARMUP_LR + epoch * (LR - WARMUP_LR) / WARMUP
    return LR * RATE ** (epoch // DECAY)


def test_matches_timms_step_scheduler() -> None:
    ours = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    theirs = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = StepDecayWithWarmup(ours, DECAY, RATE, WARMUP, WARMUP_LR)
    timm_schedule = StepLRScheduler(
        theirs, decay_t=DECAY, decay_rate=RATE, warmup_t=WARMUP, warmup_lr_init=WARMUP_LR, warmup_prefix=False
    )
    for epoch in range(30):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
        assert ours.param_groups[0]["lr"] == pytest.approx(published(epoch), rel=1e-12)
        ours.step()
        schedule.step()
        timm_schedule.step(epoch + 1)
    # a staircase, not a smooth decay: epochs 3 and 4 share a rate, 5 drops (floor(5 / 2.4) = 2)
    assert published(3) == published(4) > published(5)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[float]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        groups = trainer.optimizers[0].param_groups
        self.seen.append((trainer.current_epoch, trainer.global_step, [g["lr"] for g in groups]))


def test_the_trainer_trains_each_epoch_at_the_published_rate(tmp_path: Path) -> None:
    module = EnsembleLightningModule(
        member=TinyNet,
        num_members=2,
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        lr_scheduler=functools.partial(
            StepDecayWithWarmup,
            decay_epochs=DECAY,
            decay_rate=RATE,
            warmup_epochs=WARMUP,
            warmup_lr=WARMUP_LR,
        ),
    )
    record = RecordLR()
    trainer = pl.Trainer(max_epochs=8, **trainer_kwargs(callbacks=[record]))
    trainer.fit(module, make_loader(n=32, batch_size=16))
    assert len(record.seen) == 16  # two steps per epoch
    for epoch, step, rates in record.seen:
        assert step // 2 == epoch
        assert rates == pytest.approx([published(epoch)] * 2, rel=1e-12)  # both members' groups


def test_the_imagenet_recipe_uses_it() -> None:
    cli = EnsembleCLI(
        args=[
            "--config",
            str(CONFIGS / "imagenet_efficientnet.yaml"),
            "--config",
            str(CONFIGS / "imagenet/b0.yaml"),
        ]
    )
    config = cli.model.configure_optimizers()
    schedule = config["lr_scheduler"]["scheduler"]
    assert isinstance(schedule, StepDecayWithWarmup) and config["lr_scheduler"]["interval"] == "epoch"
    assert (schedule.decay_epochs, schedule.decay_rate, schedule.warmup_epochs, schedule.warmup_lr) == (
        DECAY,
        RATE,
        WARMUP,
        WARMUP_LR,
    )
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(WARMUP_LR)  # epoch 0 warms up


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay_epochs": 0}, r"`--model.lr_scheduler.init_args.decay_epochs` to be a number > 0, but got 0"),
        ({"decay_rate": 1.5}, r"decay_rate` to be in \(0, 1\], but got 1.5"),
        ({"warmup_epochs": -1}, r"warmup_epochs` to be an int >= 0, but got -1"),
        ({"warmup_lr": -1e-6}, r"warmup_lr` to be a number >= 0"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs: dict[str, Any], match: str) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    with pytest.raises(ValueError, match=match):
        StepDecayWithWarmup(optimizer, **kwargs)
