"""CIFAR-10 held on the training device: augmentation, shuffling and batching without a DataLoader.

The CIFAR-10 experiments of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570), train many small Wide ResNets, where a DataLoader that decodes PIL images in
worker processes becomes the bottleneck. airbench (Keller Jordan, arXiv 2404.00498) avoids it: the whole
dataset is 150 MB of uint8, so it is copied to the GPU once and every epoch's shuffle and every batch's random crops and flips happen there, in a few vectorised kernels.
:class:`GPUCIFAR10DataModule` does the same behind the LightningDataModule interface.

The result is numerically the pipeline of :class:`~lightning_ensembles.data.CIFAR10DataModule` (tested in
``tests/data/test_gpu_cifar.py``): the files are read and checked by that class's code, the train/validation
split is the same for the same seed, the training order is
:class:`~lightning_ensembles.data.EpochSeededRandomSampler`'s for ``(seed, epoch)``, and every image gets torchvision's
``RandomCrop(32, padding=4, padding_mode="reflect")``, ``RandomHorizontalFlip()``, ``ToTensor()`` and
``Normalize(CIFAR10_MEAN, CIFAR10_STD)`` — an independent crop offset in ``[0, 8] x [0, 8]`` of the 4-pixel
reflect-padded image and an independent flip with probability 0.5, then the same float32 operations, so
evaluation batches are bitwise equal. Only the random numbers differ: they come from a generator on the
device seeded from ``(seed, epoch, rank, batch index)`` (:func:`augment_batch` returns what it drew), so a
run is reproducible on the same kind of device, and a resumed run sees the batches an uninterrupted one sees.

Lightning calls ``set_epoch`` only on a loader's ``sampler`` (``lightning.fabric.utilities.data.
_set_sampler_epoch``, from the fit loop at the start of every epoch, with the number of epochs already
completed, restored from the checkpoint on resume); a custom iterable is left alone otherwise. So
:class:`DeviceBatches` carries its order in a ``sampler`` attribute, an :class:`EpochSeededRandomSampler`,
and a ``batch_sampler`` set to ``None`` so that Lightning's shuffle check on evaluation loaders reads it as
unshuffled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torchvision.datasets import CIFAR10
from typing_extensions import override

from lightning_ensembles._validation import check_bool, check_int
from lightning_ensembles.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, CIFAR10Shapes
from lightning_ensembles.data.sampling import EpochSeededRandomSampler
from lightning_ensembles.sharding import training_shard

__all__ = ["DeviceBatches", "GPUCIFAR10DataModule", "augment_batch", "normalize_batch"]

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_PADDING = 4
_STAGES = ("fit", "validate", "test", "predict")


def augment_batch(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly crop each image from its 4-pixel reflect padding and flip it horizontally with p = 0.5.

    The same operation as torchvision's ``RandomCrop(H, padding=4, padding_mode="reflect")`` followed by
    ``RandomHorizontalFlip()``, for a whole batch at once: the batch is padded once, and one advanced-indexing
    gather takes every image's crop, with the column indices of the flipped images reversed (``torch.where``).

    Args:
        images: Images ``(B, C, H, W)`` of any dtype (uint8 for CIFAR-10), on the generator's device.
        generator: Source of the offsets and flips; it must live on ``images.device``.

    Returns:
        ``(augmented (B, C, H, W), offsets (B, 2), flips (B,))``: the augmented images (dtype of ``images``),
        each image's crop offset ``(dy, dx)`` into the padded image, int64 in ``[0, 8]``, and whether it was
        flipped (bool). Image ``b`` is ``padded[b, :, dy:dy + H, dx:dx + W]``, then reversed along ``W`` if
        ``flips[b]``.

    Raises:
        ValueError: If ``images`` is not 4-dimensional or is smaller than the padding.

    Example:
        >>> images = torch.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32).to(torch.uint8)
        >>> out, offsets, flips = augment_batch(images, torch.Generator().manual_seed(0))
        >>> out.shape, out.dtype, offsets.shape, flips.dtype
        (torch.Size([2, 3, 32, 32]), torch.uint8, torch.Size([2, 2]), torch.bool)
        >>> bool(((offsets >= 0) & (offsets <= 8)).all())
        True
    """
    if images.ndim != 4 or images.shape[-1] <= _PADDING or images.shape[-2] <= _PADDING:
        raise ValueError(
            f"Expected `images` of shape (B, C, H, W) with H, W > {_PADDING}, but got {tuple(images.shape)}."
        )
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (_PADDING, _PADDING, _PADDING, _PADDING), mode="reflect")
    offsets = torch.randint(0, 2 * _PADDING + 1, (batch, 2), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    rows = offsets[:, :1] + torch.arange(height, device=device)  # (B, H)
    columns = torch.arange(width, device=device)
    columns = offsets[:, 1:] + torch.where(flips[:, None], columns.flip(0), columns)  # (B, W)
    out = padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]
    return out, offsets, flips


def normalize_batch(
    images: Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> Tensor:
    """Convert uint8 images to normalised floats exactly as ``ToTensor()`` + ``Normalize(mean, std)`` do.

    The arithmetic is torchvision's, in float32 (``x.float().div(255)``, then ``.sub(mean).div(std)``); the
    result is cast to ``dtype`` afterwards.

    Args:
        images: uint8 images ``(B, 3, H, W)``.
        dtype: The floating dtype of the result.
        channels_last: Return the result in ``torch.channels_last`` memory format.

    Returns:
        The normalised images ``(B, 3, H, W)`` with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.

    Example:
        >>> out = normalize_batch(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
        >>> [round(v, 4) for v in out[0, :, 0, 0].tolist()]
        [2.0587, 2.1256, 2.1154]
    """
    mean = torch.as_tensor(CIFAR10_MEAN, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(CIFAR10_STD, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    out = images.to(torch.float32).div(255).sub(mean).div(std).to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _augmentation_seed(seed: int, epoch: int, rank: int, batch_index: int) -> int:
    """Mix ``(seed, epoch, rank, batch index)`` into one 63-bit generator seed.

    Args:
        seed: The datamodule's seed.
        epoch: The epoch.
        rank: The process's global rank.
        batch_index: The batch's position in the epoch.

    Returns:
        A seed in ``[0, 2**63)``, well spread even for neighbouring inputs (numpy's ``SeedSequence``).
    """
    words = np.random.SeedSequence([seed, epoch, rank, batch_index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class DeviceBatches:
    """An iterable of ready batches drawn from images already on their device; Lightning takes it as a loader.

    One pass yields ``len(self)`` batches ``(images (B, 3, 32, 32) floating, labels (B,) int64)`` on the
    images' device. With ``shuffle`` the order is :attr:`sampler`'s permutation for its epoch (Lightning's
    fit loop calls ``sampler.set_epoch`` before every epoch; :meth:`set_epoch` does the same by hand);
    otherwise it is ``0 .. N-1``. With ``augment`` each batch is cropped and flipped by :func:`augment_batch`
    with the generator :meth:`batch_generator` returns.

    With ``world_size > 1`` rank ``r`` takes ``order[r::world_size]``. For training (``pad``) the epoch's order
    is first padded, as ``torch.utils.data.DistributedSampler`` (with ``drop_last=False``) does, by repeating
    its first elements until the length divides by ``world_size``: the shards are disjoint up to that padding
    (at most ``world_size - 1`` repeated samples) and all of length ``ceil(N / world_size)``, so every rank
    runs the same number of steps. ``drop_last`` then drops a rank's last incomplete batch. For evaluation
    (``pad=False``) nothing is repeated: every sample is on exactly one rank, and shards differ by at most one.

    Args:
        images: uint8 images ``(N, 3, H, W)``, already on the device the batches should be on.
        labels: int64 labels ``(N,)`` on the same device.
        batch_size: Images per batch.
        shuffle: Permute by ``(seed, epoch)`` (training) rather than keep the order (evaluation).
        augment: Apply :func:`augment_batch` to each batch.
        seed: The base seed of the order and of the augmentation.
        drop_last: Drop the last batch if it is smaller than ``batch_size``.
        rank: This process's global rank.
        world_size: The number of processes sharing the data.
        pad: Repeat samples so every rank gets ``ceil(N / world_size)`` (training); ``False`` for evaluation.
        dtype: The floating dtype of the yielded images.
        channels_last: Yield images in ``torch.channels_last`` memory format.

    Raises:
        ValueError: If an argument is out of range or the tensors do not match.

    Example:
        >>> images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
        >>> batches = DeviceBatches(images, torch.arange(10), batch_size=4, shuffle=True, augment=True)
        >>> len(batches), [tuple(x.shape) for x, _ in batches][-1]
        (3, (2, 3, 32, 32))
        >>> batches.set_epoch(1)
        >>> sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
        True
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        pad: bool = True,
    ) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"Expected `images` to be a uint8 tensor (N, C, H, W), but got {images.dtype} {tuple(images.shape)}."
            )
        if labels.shape != images.shape[:1] or labels.device != images.device:
            raise ValueError(
                f"Expected `labels` of shape ({len(images)},) on {images.device}, but got "
                f"{tuple(labels.shape)} on {labels.device}."
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.augment = check_bool(augment, "augment")
        self.seed = check_int(seed, "--data.seed", 0)
        self.drop_last = check_bool(drop_last, "--data.drop_last")
        self.world_size = check_int(world_size, "world_size", 1)
        self.rank = check_int(rank, "rank", 0, self.world_size)
        self.pad = check_bool(pad, "pad")
        self.dtype = dtype
        self.channels_last = check_bool(channels_last, "--data.channels_last")
        self.sampler: EpochSeededRandomSampler | None = (
            EpochSeededRandomSampler(range(len(images)), seed=self.seed)
            if check_bool(shuffle, "shuffle")
            else None
        )
        """The training order (``None`` for evaluation); Lightning calls its ``set_epoch`` every epoch."""
        self.batch_sampler: None = None
        """Always ``None``: tells Lightning's shuffle check to look at :attr:`sampler` (no batch sampler)."""
        self._generator: torch.Generator | None = None

    @property
    def device(self) -> torch.device:
        """The device the batches are on."""
        return self.images.device

    @property
    def epoch(self) -> int:
        """The epoch whose order and augmentation the next pass uses (0 without shuffling)."""
        return self.sampler.epoch if self.sampler is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentation of the next pass.

        Args:
            epoch: The epoch (Lightning passes the number of epochs already completed).

        Raises:
            ValueError: If ``epoch`` is not an int >= 0.
        """
        check_int(epoch, "epoch", 0)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _per_rank(self) -> int:
        """Return the number of samples this rank gets per epoch.

        Returns:
            ``ceil(N / world_size)`` with ``pad``, else the size of this rank's share of ``range(N)``.
        """
        if not self.pad:
            return len(range(self.rank, len(self.images), self.world_size))
        return math.ceil(len(self.images) / self.world_size)

    def epoch_indices(self) -> Tensor:
        """Return the indices into :attr:`images` this rank visits in the current epoch, in order.

        Returns:
            int64 indices (:meth:`_per_rank` of them) on the device, before ``drop_last``.
        """
        num = len(self.images)
        order = torch.tensor(list(self.sampler)) if self.sampler is not None else torch.arange(num)
        if self.world_size > 1:
            if self.pad:
                total = self._per_rank() * self.world_size
                order = order.repeat(math.ceil(total / max(num, 1)))[:total]
            order = order[self.rank :: self.world_size]
        return order.to(torch.int64).to(self.device)

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """Return the generator :func:`augment_batch` draws from for one batch of the current epoch.

        The generator lives on the device and is seeded from ``(seed, epoch, rank, batch_index)``; the same
        object is re-seeded on every call.

        Args:
            batch_index: The batch's position in the epoch.

        Returns:
            The seeded generator.
        """
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(_augmentation_seed(self.seed, self.epoch, self.rank, batch_index))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the batches of the current epoch.

        Returns:
            An iterator over ``(images (B, 3, H, W), labels (B,))`` on the device.
        """
        indices = self.epoch_indices()
        for batch_index in range(len(self)):
            index = indices[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            images = self.images[index]
            if self.augment:
                images = augment_batch(images, self.batch_generator(batch_index))[0]
            yield normalize_batch(images, self.dtype, self.channels_last), self.labels[index]

    def __len__(self) -> int:
        """Return the number of batches one pass yields on this rank.

        Returns:
            ``floor`` (with ``drop_last``) or ``ceil`` of ``ceil(N / world_size) / batch_size``.
        """
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)


class GPUCIFAR10DataModule(CIFAR10Shapes, LightningDataModule):
    """CIFAR-10 kept as uint8 on the training device, cropped, flipped and shuffled there (airbench-style).

    The files are read and verified by :class:`~lightning_ensembles.data.CIFAR10DataModule` (same ``root``,
    ``download``, ``verify_checksums``, ``val_size`` and ``seed``, hence the same split); :meth:`setup` then
    copies each split's uint8 images once to the device. The loaders are :class:`DeviceBatches`: no worker
    processes, no PIL, no host-to-device copies per step. Batches equal those of ``CIFAR10DataModule`` up to
    the random draws of the augmentation (see the module docstring).

    The device is ``device`` if given, else the trainer's root device (``trainer.strategy.root_device``) when
    a trainer is attached at :meth:`setup`, else the CPU; leave it unset under multi-GPU strategies, where
    each rank's root device differs. Under a distributed strategy each rank takes a
    shard of every epoch's order (:class:`DeviceBatches`), read from the trainer's global rank and world size.
    With ``val_size == 0`` :meth:`val_dataloader` returns the **test** split, as ``CIFAR10DataModule`` does.

    Args:
        root: Directory holding (or to receive) ``cifar-10-batches-py/``.
        batch_size: Images per batch, for every loader.
        val_size: Training images to hold out for validation; 0 validates on the test split.
        download: Download the official archive in :meth:`prepare_data` if files are missing.
        verify_checksums: Compare each file's md5 with torchvision's list when loading.
        augment: Randomly crop and flip training images on the device.
        seed: Seed of the split, the training order and the augmentation.
        device: The device to hold the data on, e.g. ``"cuda:0"``; ``None`` follows the trainer.
        channels_last: Yield images in ``torch.channels_last`` memory format.
        dtype: The floating dtype of the yielded images (normalisation is computed in float32 first).
        drop_last: Drop each rank's last incomplete training batch (evaluation never drops).

    Raises:
        ValueError: If an argument is out of range or names an unavailable device; the message names its
            ``--data.*`` flag.

    Example:
        >>> dm = GPUCIFAR10DataModule(root="data", batch_size=512, device="cpu", dtype="bfloat16")
        >>> dm.num_classes, dm.input_shape, dm.device
        (10, (3, 32, 32), None)
    """

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        val_size: int = 0,
        download: bool = True,
        verify_checksums: bool = True,
        augment: bool = True,
        seed: int = 0,
        device: str | None = None,
        channels_last: bool = False,
        dtype: DType = "float32",
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.augment = check_bool(augment, "--data.augment")
        self.seed = check_int(seed, "--data.seed", 0)
        self.channels_last = check_bool(channels_last, "--data.channels_last")
        self.drop_last = check_bool(drop_last, "--data.drop_last")
        if dtype not in _DTYPES:
            raise ValueError(
                f"Expected `--data.dtype` to be one of {', '.join(get_args(DType))}, but got {dtype!r}."
            )
        self.dtype_name = dtype
        self.requested_device = None if device is None else _check_device(device)
        self.source = CIFAR10DataModule(
            root=root,
            batch_size=batch_size,
            num_workers=0,
            val_size=val_size,
            download=download,
            verify_checksums=verify_checksums,
            augment=False,
            seed=seed,
        )
        """The datamodule that reads, verifies and splits the files."""
        self.save_hyperparameters()

        self.device: torch.device | None = None
        """The device the data is on; set by :meth:`setup`."""
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the yielded images."""
        return _DTYPES[self.dtype_name]

    @property
    def train_indices(self) -> list[int]:
        """Indices into the official training split of the training images (after :meth:`setup`)."""
        return [] if self.source.train_set is None else list(self.source.train_set.indices)

    @property
    def val_indices(self) -> list[int]:
        """Indices into the official training split of the held-out images (empty when ``val_size == 0``)."""
        if self.source.val_size == 0 or self.source.val_set is None:
            return []
        return list(self.source.val_set.indices)

    @override
    def prepare_data(self) -> None:
        """Download CIFAR-10 if files are missing and ``download`` is true (``CIFAR10DataModule``'s code).

        Raises:
            CIFAR10NotFoundError: If files are missing and cannot be downloaded.
        """
        self.source.prepare_data()

    def _resolve_device(self) -> torch.device:
        """Return the device to hold the data on: the argument, the trainer's root device, or the CPU.

        Returns:
            The device.

        Raises:
            ValueError: If the device cannot hold ``dtype`` images.
        """
        if self.requested_device is not None:
            device = self.requested_device
        elif self.trainer is not None:
            device = self.trainer.strategy.root_device
        else:
            device = torch.device("cpu")
        try:
            normalize_batch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8, device=device), self.dtype)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"Expected `--data.dtype` to be a dtype that {device} supports, but got {self.dtype_name!r} "
                f"({type(err).__name__}: {err}). Use `--data.dtype float32` on this device."
            ) from err
        return device

    def _to_device(self, name: str, dataset: CIFAR10, indices: list[int], device: torch.device) -> None:
        """Copy one split's uint8 images ``(N, 3, 32, 32)`` and int64 labels to ``device`` (once).

        Args:
            name: The split's key, ``"train"``, ``"val"`` or ``"test"``.
            dataset: The loaded torchvision dataset holding ``data`` (N, 32, 32, 3) and ``targets``.
            indices: The split's indices into ``dataset``.
            device: The target device.
        """
        cached = self._splits.get(name)
        if cached is not None and cached[0].device == device:
            return
        data = np.asarray(dataset.data)
        targets = np.asarray(dataset.targets, dtype=np.int64)
        index = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(data[index].transpose(0, 3, 1, 2)))
        labels = torch.from_numpy(targets[index])
        self._splits[name] = (images.to(device), labels.to(device))

    @override
    def setup(self, stage: str) -> None:
        """Load the splits a stage needs through ``CIFAR10DataModule`` and copy them to the device.

        Args:
            stage: One of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``.

        Raises:
            ValueError: If ``stage`` is unknown, ``val_size`` is too large, or the device cannot hold ``dtype``.
            CIFAR10NotFoundError: If a file is missing.
            CIFAR10CorruptedError: If a file fails its md5 check, cannot be unpickled or is malformed.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` to be one of {', '.join(_STAGES)}, but got {stage!r}.")
        self.device = self._resolve_device()
        self.source.setup(stage)
        source = self.source
        if source.train_set is not None:
            self._to_device("train", source.train_set.dataset, source.train_set.indices, self.device)
        if source.test_set is not None:
            self._to_device("test", source.test_set.dataset, source.test_set.indices, self.device)
        if source.val_size > 0 and source.val_set is not None:
            self._to_device("val", source.val_set.dataset, source.val_set.indices, self.device)

    def _batches(self, name: str, stage: str, train: bool = False) -> DeviceBatches:
        """Build the loader over one split.

        Args:
            name: The split's key.
            stage: The stage whose :meth:`setup` loads it, for the error message.
            train: Shuffle, augment (if ``augment``) and honour ``drop_last``.

        Returns:
            The loader, sharded by the trainer's global rank and world size if one is attached (training
            data: as the strategy says, by :func:`~lightning_ensembles.sharding.training_shard`).

        Raises:
            RuntimeError: If the split has not been loaded.
        """
        split = self._splits.get(name)
        if split is None:
            raise RuntimeError(f"The {name} split is not loaded yet: call `setup({stage!r})` first.")
        if train:  # a member-parallel strategy shards training data within a member group only
            shard = training_shard(self.trainer)
            rank, world_size, seed = shard.rank, shard.num_replicas, self.seed + shard.seed_offset
        else:
            rank, world_size = (
                (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
            )
            seed = self.seed
        return DeviceBatches(
            split[0],
            split[1],
            self.batch_size,
            shuffle=train,
            augment=train and self.augment,
            seed=seed,
            drop_last=train and self.drop_last,
            rank=rank,
            world_size=world_size,
            dtype=self.dtype,
            channels_last=self.channels_last,
            pad=train,  # evaluation counts every sample exactly once
        )

    @override
    def train_dataloader(self) -> DeviceBatches:
        """Return the training batches, shuffled by ``(seed, epoch)`` and augmented on the device.

        Returns:
            Batches ``(images (B, 3, 32, 32), labels (B,))`` on the device.

        Raises:
            RuntimeError: If ``setup("fit")`` has not run.
        """
        return self._batches("train", "fit", train=True)

    @override
    def val_dataloader(self) -> DeviceBatches:
        """Return the validation batches: the held-out split, or the test split when ``val_size == 0``.

        Returns:
            Batches ``(images (B, 3, 32, 32), labels (B,))`` on the device, in a fixed order.

        Raises:
            RuntimeError: If ``setup("fit")`` or ``setup("validate")`` has not run.
        """
        return self._batches("val" if self.source.val_size > 0 else "test", "validate")

    @override
    def test_dataloader(self) -> DeviceBatches:
        """Return the test batches.

        Returns:
            Batches ``(images (B, 3, 32, 32), labels (B,))`` on the device, in a fixed order.

        Raises:
            RuntimeError: If ``setup("test")`` has not run.
        """
        return self._batches("test", "test")

    @override
    def predict_dataloader(self) -> DeviceBatches:
        """Return the test split for prediction.

        Returns:
            The batches of :meth:`test_dataloader`.

        Raises:
            RuntimeError: If ``setup("predict")`` has not run.
        """
        return self._batches("test", "predict")


def _check_device(device: object) -> torch.device:
    """Parse ``--data.device`` and check that the device exists here.

    Args:
        device: The value given, e.g. ``"cuda:0"``.

    Returns:
        The parsed device.

    Raises:
        ValueError: If ``device`` is not a device string, or names a CUDA/MPS device that is not available.
    """
    message = (
        "Expected `--data.device` to be a torch device string such as 'cpu', 'cuda' or 'cuda:1' (or null to "
        f"follow the trainer), but got {device!r}."
    )
    if not isinstance(device, str):
        raise ValueError(message)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(message) from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(
                f"Expected `--data.device` to name an available device, but got {device!r}: "
                f"{'CUDA is not available' if count == 0 else f'only {count} CUDA device(s) are visible'} here. "
                "Pass `--data.device cpu`, or leave it unset to use the trainer's device."
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"Expected `--data.device` to name an available device, but got {device!r}: MPS is not available "
            "here. Pass `--data.device cpu`, or leave it unset to use the trainer's device."
        )
    return parsed
