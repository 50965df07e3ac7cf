"""The device-resident CIFAR-10 loader on CUDA: batches stay on the GPU and follow the CPU pipeline."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_ensembles.data import GPUCIFAR10DataModule
from lightning_ensembles.data.gpu_cifar import DeviceBatches
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.testing import write_fake_cifar10
from tests.gpu.helpers import DEVICE, ON_DEVICE

pytestmark = ON_DEVICE


def _images(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_are_on_the_device_in_the_requested_dtype_and_layout(
    dtype: torch.dtype, channels_last: bool
) -> None:
    images, labels = _images()
    batches = DeviceBatches(
        images.to(DEVICE), labels.to(DEVICE), batch_size=16, shuffle=True, augment=True,
        dtype=dtype, channels_last=channels_last,
    )  # fmt: skip
    seen = []
    for x, y in batches:
        assert x.device.type == y.device.type == DEVICE.type
        assert x.dtype == dtype and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last or x.shape[0] == 1
        seen.append(y)
    assert len(seen) == math.ceil(50 / 16)
    assert sorted(torch.cat(seen).cpu().tolist()) == sorted(labels.tolist())


def test_unaugmented_batches_equal_the_cpu_ones() -> None:
    images, labels = _images()
    on_device = DeviceBatches(
        images.to(DEVICE), labels.to(DEVICE), batch_size=16, shuffle=True, augment=False
    )
    on_cpu = DeviceBatches(images, labels, batch_size=16, shuffle=True, augment=False)
    for epoch in (0, 1):
        on_device.set_epoch(epoch)
        on_cpu.set_epoch(epoch)
        for (xd, yd), (xc, yc) in zip(on_device, on_cpu, strict=True):
            torch.testing.assert_close(
                xd.cpu(), xc
            )  # the order is the sampler's; the arithmetic is elementwise
            assert torch.equal(yd.cpu(), yc)


def test_augmentation_is_reproducible_on_the_device() -> None:
    images, labels = _images()
    batches = DeviceBatches(images.to(DEVICE), labels.to(DEVICE), batch_size=16, shuffle=True, augment=True)
    first = [x.clone() for x, _ in batches]
    again = [x for x, _ in batches]
    batches.set_epoch(1)
    other = [x for x, _ in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_lightning_trains_an_ensemble_from_the_device_resident_datamodule(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, num_train=64, num_test=32)
    data = GPUCIFAR10DataModule(
        root=str(tmp_path), batch_size=16, download=False, verify_checksums=False, channels_last=True
    )
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, 10, 1), num_members=2, num_classes=10, channels_last=True,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator=DEVICE.type, devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert data.device is not None and data.device.type == DEVICE.type  # followed the trainer
    assert trainer.global_step == 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
