"""A shuffling sampler whose order depends only on ``(seed, epoch)``.

The ensembles of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large
Models* (arXiv 2005.00570), are compared against separate single-model runs, so the data order has to be
reproducible: an ensemble of M trained in one process must see exactly the batches that M separate runs
with the same seed see, and a run resumed from a checkpoint must see the same order as an uninterrupted one.

:class:`EpochSeededRandomSampler` draws epoch ``e``'s permutation from a fresh
``torch.Generator().manual_seed(seed + e)``, so the order owes nothing to the global RNG, to how many
random numbers the model or the augmentations consumed before, or to whether the process was restarted.
Lightning's fit loop calls ``set_epoch`` at the start of every epoch on any sampler that has it. Under a
distributed strategy Lightning wraps a custom sampler like this one in its ``DistributedSamplerWrapper``,
which forwards ``set_epoch`` and shards the permutation across ranks, so the order stays a function of
``(seed, epoch)`` there too.

:func:`make_loader` is the DataLoader every datamodule here builds over a split; :class:`SplitDataModule` gives
the datamodules whose ``setup`` builds ``train_set`` and ``val_set`` their training and validation loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from lightning_ensembles._validation import check_int

__all__ = [
    "EpochSeededRandomSampler",
    "SplitDataModule",
    "evaluation_sampler",
    "make_loader",
    "padded_samples",
    "padding_warning",
    "split_loader",
]


class EpochSeededRandomSampler(Sampler[int]):
    """Sample a random permutation of ``range(len(data_source))`` that depends only on ``(seed, epoch)``.

    Each call to ``__iter__`` draws ``torch.randperm(len(data_source))`` from a generator seeded with
    ``seed + epoch``; iterating twice in the same epoch gives the same order. Lightning calls
    :meth:`set_epoch` at the start of every training epoch.

    Args:
        data_source: The dataset (only its length is used).
        seed: The base seed; epoch ``e`` uses ``seed + e``.

    Raises:
        TypeError: If ``data_source`` has no length.
        ValueError: If ``seed`` is not an int >= 0.

    Example:
        >>> sampler = EpochSeededRandomSampler(range(6), seed=3)
        >>> first = list(sampler)
        >>> sorted(first)
        [0, 1, 2, 3, 4, 5]
        >>> first == list(EpochSeededRandomSampler(range(6), seed=3))
        True
        >>> sampler.set_epoch(1)
        >>> list(sampler) == list(EpochSeededRandomSampler(range(6), seed=4))
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        if not isinstance(data_source, Sized):
            raise TypeError(
                f"Expected `data_source` to be a sized dataset (with `__len__`), "
                f"but got {type(data_source).__name__}."
            )
        self.data_source = data_source
        self.seed = check_int(seed, "seed", 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation used by the next iteration.

        Args:
            epoch: The epoch number (Lightning passes the number of epochs already completed).

        Raises:
            ValueError: If ``epoch`` is not an int >= 0.
        """
        self.epoch = check_int(epoch, "epoch", 0)

    def __iter__(self) -> Iterator[int]:
        """Yield the indices of the permutation for the current epoch.

        Returns:
            An iterator over ``len(data_source)`` distinct indices.
        """
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        """Return the number of indices one epoch yields.

        Returns:
            ``len(data_source)``.
        """
        return len(self.data_source)


def evaluation_sampler(dataset: Sized) -> Sampler[int] | None:
    """The evaluation sampler of a distributed run: every sample on exactly one process, none repeated.

    Lightning gives evaluation loaders a ``DistributedSampler``, which pads the split by repeating its first
    samples until its length divides by the number of processes: with 201 test images on 2 processes, 202
    are evaluated and one counts twice. Lightning's ``UnrepeatedDistributedSampler`` (which Lightning keeps,
    being a ``DistributedSampler``) gives the processes shards of ``ceil`` or ``floor(N / world_size)``
    samples instead; torchmetrics gathers uneven shards. Evaluation has no per-step collective here (the
    metrics synchronise once, at the end), so processes may run different numbers of batches.

    Args:
        dataset: the evaluation split.

    Returns:
        The sampler when a process group of more than one process is initialised, else ``None`` (the loader's
        own sequential order).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(  # type: ignore[no-any-return]
        dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False
    )


def padded_samples(loader: Any) -> int:
    """How many samples a loader's ``DistributedSampler`` repeats to even out the shards (0 if none).

    Example:
        >>> from torch.utils.data import DistributedSampler
        >>> padded_samples(DataLoader(range(201), sampler=DistributedSampler(range(201), 2, 0, shuffle=False)))
        1
    """
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or isinstance(sampler, UnrepeatedDistributedSampler):
        return 0
    dataset = getattr(sampler, "dataset", None)
    if not isinstance(dataset, Sized):
        return 0
    return int(sampler.total_size) - len(dataset)


def padding_warning(stage: str, loaders: Any, world_size: int) -> str | None:
    """What to tell the user when ``loaders``' ``DistributedSampler`` repeats samples, so that ``stage``'s
    metrics count them twice; ``None`` when no sample repeats.

    Args:
        stage: ``"val"`` or ``"test"``.
        loaders: one loader or a list of them (``None`` entries are skipped).
        world_size: the number of processes, for the message.
    """
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    repeated = sum(padded_samples(loader) for loader in loaders if loader is not None)
    if not repeated:
        return None
    return (
        f"The {stage} loader's DistributedSampler repeats {repeated} sample(s) to even out the {world_size} "
        f"processes' shards, so {stage}/ metrics count them twice. Give the datamodule's evaluation loaders "
        "`sampler=lightning_ensembles.data.sampling.evaluation_sampler(dataset)` (or use `make_loader`, as the "
        "library's datamodules do) to evaluate every sample exactly once."
    )


def make_loader(
    dataset: Dataset[Any], batch_size: int, num_workers: int, seed: int, train: bool
) -> DataLoader[Any]:
    """The DataLoader every datamodule here uses: shuffled by ``(seed, epoch)`` for training, in order else.

    Evaluation loaders built inside a distributed run shard the split without repeating a sample
    (:func:`evaluation_sampler`), so val and test metrics count every sample exactly once.

    Args:
        dataset: the split.
        batch_size: samples per batch.
        num_workers: loader worker processes (0 loads in the main process).
        seed: the shuffle seed (training only).
        train: shuffle with :class:`EpochSeededRandomSampler` if true.

    Returns:
        The loader; pinned memory only when CUDA is available, persistent workers when there are any.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSeededRandomSampler(dataset, seed=seed) if train else evaluation_sampler(dataset),  # type: ignore[arg-type]
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def split_loader(
    dataset: Dataset[Any] | None,
    name: str,
    stage: str,
    datamodule: Any,
    train: bool = False,
) -> DataLoader[Any]:
    """:func:`make_loader` over one split of a datamodule, or a clear error if ``setup`` has not built it.

    Args:
        dataset: the split, or ``None`` if ``setup`` has not built it.
        name: the split's name, for the error message (``"training"``, ``"test"``, ...).
        stage: the stage whose ``setup`` builds the split.
        datamodule: where ``batch_size``, ``num_workers`` and ``seed`` are read.
        train: shuffle with :class:`EpochSeededRandomSampler`.

    Returns:
        The loader.

    Raises:
        RuntimeError: if the split has not been built.
    """
    if dataset is None:
        raise RuntimeError(f"The {name} set is not built yet: call `setup({stage!r})` first.")
    return make_loader(dataset, datamodule.batch_size, datamodule.num_workers, datamodule.seed, train)


class SplitDataModule(LightningDataModule):
    """A datamodule whose ``setup`` builds its splits as datasets: the loaders of its training and validation
    splits, by :func:`split_loader` over ``train_set`` and ``val_set`` with its ``batch_size``, ``num_workers``
    and ``seed``.

    Subclasses set the four attributes (the splits to ``None`` until ``setup`` builds them) and return their
    test and prediction loaders with :meth:`_loader`.
    """

    train_set: Dataset[Any] | None
    val_set: Dataset[Any] | None
    batch_size: int
    num_workers: int
    seed: int

    def _loader(
        self, dataset: Dataset[Any] | None, name: str, stage: str, train: bool = False
    ) -> DataLoader[Any]:
        return split_loader(dataset, name, stage, self, train)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Return the training loader, shuffled by ``(seed, epoch)``.

        Returns:
            Batches ``(inputs (B, *input_shape), labels (B,))``.

        Raises:
            RuntimeError: If ``setup("fit")`` has not run.
        """
        return self._loader(self.train_set, "training", "fit", train=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Return the validation loader, in a fixed order (which split it is, the datamodule says).

        Returns:
            Batches ``(inputs (B, *input_shape), labels (B,))``.

        Raises:
            RuntimeError: If ``setup("fit")`` or ``setup("validate")`` has not run.
        """
        return self._loader(self.val_set, "validation", "validate")
