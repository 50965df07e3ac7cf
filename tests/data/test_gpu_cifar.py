"""Tests for GPUCIFAR10DataModule: the torchvision pipeline's numbers, on the device, without a DataLoader."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision.transforms.functional as TF
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.testing import assert_close
from torch.utils.data import DistributedSampler

from lightning_ensembles.data import CIFAR10DataModule, EpochSeededRandomSampler
from lightning_ensembles.data.gpu_cifar import (
    GPUCIFAR10DataModule,
    augment_batch,
    normalize_batch,
)
from lightning_ensembles.models.wide_resnet import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.testing import write_fake_cifar10
from tests.helpers import trainer_kwargs

NUM_TRAIN, NUM_TEST = 100, 50


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 (100 train, 50 test) that the tests only read."""
    path = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(path, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
    return path


def _gpu(root: Path, **kwargs: Any) -> GPUCIFAR10DataModule:
    options: dict[str, Any] = {
        "batch_size": 16,
        "download": False,
        "verify_checksums": False,
        "device": "cpu",
    }
    options.update(kwargs)
    return GPUCIFAR10DataModule(root=str(root), **options)


def _reference(root: Path, **kwargs: Any) -> CIFAR10DataModule:
    options: dict[str, Any] = {
        "batch_size": 16,
        "num_workers": 0,
        "download": False,
        "verify_checksums": False,
    }
    options.update(kwargs)
    return CIFAR10DataModule(root=str(root), **options)


def _torchvision_augmented(pil_image: Any, dy: int, dx: int, flip: bool, eval_transform: Any) -> Tensor:
    """torchvision's crop of the 4-pixel reflect-padded PIL image at (dy, dx), flip, ToTensor, Normalize."""
    image = TF.crop(TF.pad(pil_image, 4, padding_mode="reflect"), dy, dx, 32, 32)
    return eval_transform(TF.hflip(image) if flip else image)


# ------------------------------------------------------------------------------------ split and evaluation


@pytest.mark.parametrize(("val_size", "seed"), [(0, 0), (20, 3), (20, 4)])
def test_same_split_as_cifar10_datamodule(root: Path, val_size: int, seed: int) -> None:
    dm, ref = _gpu(root, val_size=val_size, seed=seed), _reference(root, val_size=val_size, seed=seed)
    dm.setup("fit")
    ref.setup("fit")
    assert ref.train_set is not None
    assert dm.train_indices == ref.train_set.indices
    assert len(dm.train_indices) == NUM_TRAIN - val_size
    if val_size:
        assert ref.val_set is not None
        assert dm.val_indices == ref.val_set.indices
        assert set(dm.val_indices).isdisjoint(dm.train_indices)
    else:
        assert dm.val_indices == []


@pytest.mark.parametrize("val_size", [0, 20])
def test_eval_batches_equal_the_torchvision_pipeline(root: Path, val_size: int) -> None:
    dm, ref = _gpu(root, val_size=val_size, batch_size=16), _reference(root, val_size=val_size, batch_size=16)
    for stage in ("validate", "test"):
        dm.setup(stage)
        ref.setup(stage)
    for ours, theirs in (
        (dm.val_dataloader(), ref.val_dataloader()),
        (dm.test_dataloader(), ref.test_dataloader()),
    ):
        assert len(ours) == len(theirs)
        for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert_close(x, x_ref, rtol=0, atol=0)
            assert_close(y, y_ref)


def test_unaugmented_training_batches_equal_the_torchvision_loader_every_epoch(root: Path) -> None:
    dm, ref = (
        _gpu(root, augment=False, val_size=10, seed=5),
        _reference(root, augment=False, val_size=10, seed=5),
    )
    dm.setup("fit")
    ref.setup("fit")
    ours, theirs = dm.train_dataloader(), ref.train_dataloader()
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        assert isinstance(theirs.sampler, EpochSeededRandomSampler)
        theirs.sampler.set_epoch(epoch)
        for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
            assert_close(x, x_ref, rtol=0, atol=0)
            assert_close(y, y_ref)


# -------------------------------------------------------------------------------------------- augmentation


def test_augment_batch_is_torchvisions_crop_and_flip_for_the_drawn_parameters(root: Path) -> None:
    ref = _reference(root)
    ref.setup("fit")
    assert ref.train_set is not None
    pil_images = [ref.train_set.dataset[i][0] for i in range(40)]
    uint8 = torch.stack([TF.pil_to_tensor(image) for image in pil_images])
    out, offsets, flips = augment_batch(uint8, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and offsets.dtype == torch.int64 and flips.dtype == torch.bool
    normalised = normalize_batch(out)
    padded = torch.nn.functional.pad(uint8.float(), (4, 4, 4, 4), mode="reflect")
    for b, image in enumerate(pil_images):
        dy, dx, flip = int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b])
        expected = _torchvision_augmented(image, dy, dx, flip, ref.eval_transform)
        assert_close(normalised[b], expected, rtol=0, atol=0)
        crop = padded[b, :, dy : dy + 32, dx : dx + 32]
        assert_close(out[b].float(), crop.flip(-1) if flip else crop, rtol=0, atol=0)
    assert 0 < int(flips.sum()) < len(flips)


def test_augmentation_draws_every_offset_and_flip_roughly_uniformly() -> None:
    images = torch.zeros(9000, 1, 8, 8, dtype=torch.uint8)
    _, offsets, flips = augment_batch(images, torch.Generator().manual_seed(0))
    for axis in (0, 1):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert len(counts) == 9
        assert bool(((counts > 800) & (counts < 1200)).all()), counts  # expected 1000 each
    assert len(torch.unique(offsets[:, 0] * 9 + offsets[:, 1])) == 81  # offsets drawn independently per axis
    assert 0.46 < flips.float().mean().item() < 0.54


def test_augmented_training_batches_are_torchvisions_for_the_generator_of_each_batch(root: Path) -> None:
    dm, ref = _gpu(root, batch_size=32, seed=2), _reference(root, seed=2)
    dm.setup("fit")
    ref.setup("fit")
    assert ref.train_set is not None
    batches = dm.train_dataloader()
    batches.set_epoch(3)
    indices = batches.epoch_indices()
    for batch_index, (x, y) in enumerate(batches):
        index = indices[batch_index * 32 : (batch_index + 1) * 32]
        _, offsets, flips = augment_batch(batches.images[index], batches.batch_generator(batch_index))
        for b, position in enumerate(index.tolist()):
            image, label = ref.train_set.dataset[ref.train_set.indices[position]]
            dy, dx, flip = int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b])
            assert_close(
                x[b], _torchvision_augmented(image, dy, dx, flip, ref.eval_transform), rtol=0, atol=0
            )
            assert int(y[b]) == label


def test_augmentation_is_reproducible_and_differs_across_batches_and_epochs(root: Path) -> None:
    dm = _gpu(root, batch_size=25)
    dm.setup("fit")

    def draws(epoch: int) -> list[Tensor]:
        batches = dm.train_dataloader()
        batches.set_epoch(epoch)
        return [
            augment_batch(batches.images[:25], batches.batch_generator(i))[1] for i in range(len(batches))
        ]

    first = draws(0)
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0), strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], draws(1)[0])


# ------------------------------------------------------------------------------------------- order and len


def test_order_is_a_function_of_seed_and_epoch_and_covers_every_sample_once(root: Path) -> None:
    dm = _gpu(root, seed=7)
    dm.setup("fit")
    a, b = dm.train_dataloader(), dm.train_dataloader()
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert torch.equal(a.epoch_indices(), b.epoch_indices())
        expected = EpochSeededRandomSampler(range(NUM_TRAIN), seed=7)
        expected.set_epoch(epoch)
        assert a.epoch_indices().tolist() == list(expected)
        labels = torch.cat([y for _, y in a])
        assert_close(labels, dm._splits["train"][1][a.epoch_indices()])
        assert sorted(a.epoch_indices().tolist()) == list(range(NUM_TRAIN))
        orders.append(a.epoch_indices().tolist())
    assert orders[0] != orders[1] != orders[2]
    other = _gpu(root, seed=8)
    other.setup("fit")
    assert other.train_dataloader().epoch_indices().tolist() != orders[0]


@pytest.mark.parametrize(("drop_last", "expected_len", "last_size"), [(False, 4, 4), (True, 3, 32)])
def test_len_with_and_without_drop_last(
    root: Path, drop_last: bool, expected_len: int, last_size: int
) -> None:
    dm = _gpu(root, batch_size=32, drop_last=drop_last)
    dm.setup("fit")
    batches = dm.train_dataloader()
    sizes = [len(y) for _, y in batches]
    assert len(batches) == len(sizes) == expected_len and sizes[-1] == last_size
    assert len(dm.val_dataloader()) == 2  # evaluation never drops: 50 test images in batches of 32


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_take_distributed_sampler_shards_of_the_epoch_order(root: Path, world_size: int) -> None:
    dm = _gpu(root, batch_size=8)
    dm.setup("fit")
    order = dm.train_dataloader().epoch_indices()
    shards = []
    for rank in range(world_size):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # type: ignore[assignment]
        batches = dm.train_dataloader()
        sampler = DistributedSampler(range(NUM_TRAIN), num_replicas=world_size, rank=rank, shuffle=False)
        assert batches.epoch_indices().tolist() == order[list(sampler)].tolist()
        assert len(batches) == -(-len(sampler) // 8)
        assert torch.equal(torch.cat([y for _, y in batches]), batches.labels[batches.epoch_indices()])
        shards.append(batches.epoch_indices())
    dm.trainer = None
    assert len({len(shard) for shard in shards}) == 1
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(NUM_TRAIN))
    assert len(together) - NUM_TRAIN < world_size  # only DistributedSampler's padding repeats


# ---------------------------------------------------------------------------------------- dtype and layout


def test_dtype_and_channels_last(root: Path) -> None:
    dm = _gpu(root, dtype="bfloat16", channels_last=True)
    dm.setup("test")
    reference = _gpu(root)
    reference.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    x_ref, _ = next(iter(reference.test_dataloader()))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert_close(x, x_ref.to(torch.bfloat16))


def test_device_follows_the_trainer_when_not_given(root: Path) -> None:
    dm = _gpu(root, device=None)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))  # type: ignore[assignment]
    dm.setup("test")
    assert dm.device == torch.device("cpu")
    dm.trainer = None
    assert _gpu(root, device=None).requested_device is None


# ------------------------------------------------------------------------------------------------ Lightning


class _RecordBatches(pl.Callback):
    """Record, per epoch, each training batch's labels and the sum of its images."""

    def __init__(self) -> None:
        self.labels: dict[int, list[list[int]]] = {}
        self.sums: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.labels.setdefault(trainer.current_epoch, []).append(batch[1].tolist())
        self.sums.setdefault(trainer.current_epoch, []).append(float(batch[0].double().sum()))


def _module() -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=functools.partial(WideResNet, depth=10, width=1), num_members=2, num_classes=10
    )


def _fit(
    root: Path, max_epochs: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None
) -> _RecordBatches:
    """Fit 3 batches of 8 per epoch (constant shapes keep CPU kernels warm), checkpointing every epoch if asked."""
    recorder = _RecordBatches()
    callbacks: list[pl.Callback] = [recorder]
    if ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    kwargs = trainer_kwargs(
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
        limit_train_batches=3,
        limit_val_batches=1,
    )
    pl.Trainer(**kwargs).fit(_module(), datamodule=_gpu(root, batch_size=8, device=None), ckpt_path=ckpt_path)
    return recorder


@pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`"
)  # no checkpoints in the resumed run
def test_lightning_fit_and_resume_see_the_uninterrupted_order(root: Path, tmp_path: Path) -> None:
    full = _fit(root, max_epochs=2, ckpt_dir=tmp_path)
    assert len(full.labels[0]) == len(full.labels[1]) == 3
    assert full.labels[0] != full.labels[1]  # Lightning called `set_epoch` through `DeviceBatches.sampler`
    dm = _gpu(root)
    dm.setup("fit")
    for epoch in (0, 1):
        expected = EpochSeededRandomSampler(range(NUM_TRAIN), seed=0)
        expected.set_epoch(epoch)
        assert sum(full.labels[epoch], []) == dm._splits["train"][1][list(expected)[:24]].tolist()

    resumed = _fit(root, max_epochs=2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert list(resumed.labels) == [1]
    assert resumed.labels[1] == full.labels[1]
    assert resumed.sums[1] == full.sums[1]  # the same augmentation too


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_names_the_flag(root: Path, device: str) -> None:
    with pytest.raises(ValueError, match=r"`--data.device`.*CUDA is not available"):
        _gpu(root, device=device)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"batch_size": 0}, "--data.batch_size"),
        ({"batch_size": 2.5}, "--data.batch_size"),
        ({"seed": -1}, "--data.seed"),
        ({"augment": "yes"}, "--data.augment"),
        ({"channels_last": 1}, "--data.channels_last"),
        ({"drop_last": None}, "--data.drop_last"),
        ({"dtype": "float64"}, "--data.dtype"),
        ({"device": "gpu0"}, "--data.device"),
        ({"device": 0}, "--data.device"),
        ({"val_size": -1}, "--data.val_size"),
    ],
)
def test_bad_arguments_name_the_flag_and_value(root: Path, kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=f"`{flag}`") as info:
        _gpu(root, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_empty_root_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"`--data.root`.*''"):
        GPUCIFAR10DataModule(root="")


def test_loaders_before_setup_and_bad_stage(root: Path) -> None:
    dm = _gpu(root)
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="`stage`"):
        dm.setup("train")
    dm.setup("test")
    with pytest.raises(ValueError, match="`epoch`"):
        dm.test_dataloader().set_epoch(-1)


def test_val_size_too_large_for_the_data_found(root: Path) -> None:
    with pytest.raises(ValueError, match=r"`--data.val_size`.*100 training images"):
        _gpu(root, val_size=100).setup("fit")


# ------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_land_on_the_gpu_and_match_the_cpu(root: Path) -> None:
    gpu, cpu = _gpu(root, device="cuda", batch_size=32), _gpu(root, batch_size=32)
    for dm in (gpu, cpu):
        dm.setup("fit")
    x, y = next(iter(gpu.train_dataloader()))
    assert x.is_cuda and y.is_cuda and gpu._splits["train"][0].is_cuda
    x_eval, _ = next(iter(gpu.val_dataloader()))
    assert_close(x_eval.cpu(), next(iter(cpu.val_dataloader()))[0])
    batches = gpu.train_dataloader()
    index = batches.epoch_indices()[:32]
    assert_close(batches.epoch_indices().cpu(), cpu.train_dataloader().epoch_indices())
    out, offsets, flips = augment_batch(batches.images[index], batches.batch_generator(0))
    assert offsets.is_cuda and flips.is_cuda
    padded = torch.nn.functional.pad(batches.images[index].float(), (4, 4, 4, 4), mode="reflect")
    for b in range(32):
        crop = padded[b, :, int(offsets[b, 0]) :, int(offsets[b, 1]) :][:, :32, :32]
        assert_close(out[b].float(), crop.flip(-1) if bool(flips[b]) else crop, rtol=0, atol=0)
    assert_close(x, normalize_batch(out))


@pytest.mark.parametrize("data_order", ["shared", "per_group"])
def test_member_parallel_shards_training_data_within_a_member_group(root: Path, data_order: str) -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_ensembles.distributed import MemberParallelStrategy, plan_members

    class Rank(LightningEnvironment):  # LightningEnvironment.set_global_rank would also set rank_zero_only
        def __init__(self, rank: int) -> None:
            super().__init__()
            self.rank = rank

        def global_rank(self) -> int:
            return self.rank

        def world_size(self) -> int:
            return 4

    dm = _gpu(root, batch_size=8)
    dm.setup("fit")
    shards = []
    for rank in range(4):  # W = 4 processes, M = 2 members: ranks {0, 1} train member 0, {2, 3} member 1
        strategy = MemberParallelStrategy(data_order=data_order, cluster_environment=Rank(rank))  # type: ignore[arg-type]
        strategy.layout = plan_members(4, 2)
        dm.trainer = SimpleNamespace(strategy=strategy, global_rank=rank, world_size=4)  # type: ignore[assignment]
        shards.append(dm.train_dataloader().epoch_indices())
        assert len(dm.val_dataloader()) == 2  # evaluation: 50 test images over 4 processes, 13 each
    dm.trainer = None
    for group in (shards[:2], shards[2:]):  # each member group covers the whole training set
        assert set(torch.cat(group).tolist()) == set(range(NUM_TRAIN))
    same_order = all(torch.equal(a, b) for a, b in zip(shards[:2], shards[2:]))
    assert same_order == (data_order == "shared")
