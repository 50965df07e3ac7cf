"""EnsembleLightningModule on CUDA under the Trainer: mixed precision, channels_last, torch.compile."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from tests.gpu.helpers import DEVICE, NEEDS_CUDA, ON_DEVICE

pytestmark = ON_DEVICE

WRN = functools.partial(WideResNet, depth=10, width=1)
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


class SmallConvNet(nn.Module):
    """A quick-to-compile convolutional member: conv-BN-ReLU, pooling, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def _fit(module: EnsembleLightningModule, precision: str, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator=DEVICE.type, devices=1, precision=precision, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, _loader())
    return trainer


def _precisions() -> list[object]:
    return ["bf16-mixed", pytest.param("16-mixed", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize("precision", _precisions())
def test_mixed_precision_training_steps_are_finite(precision: str, execution: str) -> None:
    module = EnsembleLightningModule(
        member=WRN, num_members=2, num_classes=10, optimizer=SGD, execution=execution
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _fit(module, precision)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    params = list(module.parameters())
    assert all(
        p.device.type == DEVICE.type and p.dtype == torch.float32 for p in params
    )  # AMP keeps fp32 masters
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p.cpu(), b.cpu()) for p, b in zip(params, before, strict=True))


def test_channels_last_keeps_the_outputs_and_trains(exact_float32: None) -> None:
    plain = EnsembleLightningModule(member=WRN, num_members=2, num_classes=10).to(DEVICE)
    last = EnsembleLightningModule(member=WRN, num_members=2, num_classes=10, channels_last=True).to(DEVICE)
    weights = [p for p in last.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    plain.eval()
    last.eval()
    with torch.no_grad():
        assert_close(last(x), plain(x), atol=1e-4, rtol=1e-4)
    trainer = _fit(last.train(), "bf16-mixed")
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_compiled_members_match_eager_and_train() -> None:
    eager = EnsembleLightningModule(member=SmallConvNet, num_members=2, num_classes=10).to(DEVICE)
    compiled = EnsembleLightningModule(member=SmallConvNet, num_members=2, num_classes=10, compile=True)
    compiled = compiled.to(DEVICE)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiling in place keeps the names
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), atol=1e-3, rtol=1e-3)  # inductor may fuse and reorder float ops
    trainer = _fit(compiled.train(), "bf16-mixed", steps=2)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
