"""Which slice of the training set a process reads: the contract between strategies and datamodules.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models* (arXiv
2005.00570), note that members "can be easily distributed across multiple workers". A member-parallel
strategy (:class:`~lightning_ensembles.distributed.MemberParallelStrategy`) then shards the training set
within a member group instead of over every process. Lightning's samplers learn this from the strategy's
``distributed_sampler_kwargs``; a datamodule that shards its batches itself (the device-resident
:class:`~lightning_ensembles.data.GPUCIFAR10DataModule`) asks :func:`training_shard` instead.

The question is duck-typed, so that data modules know nothing of any strategy: a strategy with a
``training_shard()`` method returning a :class:`TrainingShard` is asked; any other strategy is taken to
shard by global rank over the whole world, as Lightning's DDP does. Both sides import this module, which
imports nothing of the package.

The other contract here is between a member-parallel strategy and the module it trains
(:class:`PlacedMembers`): the strategy asks the module how many members it has and tells it which ones this
process trains, so that neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["PlacedMembers", "TrainingShard", "training_shard"]


@runtime_checkable
class PlacedMembers(Protocol):
    """A module whose members a member-parallel strategy places on processes.

    :class:`~lightning_ensembles.EnsembleLightningModule` is one; the strategy
    (:class:`~lightning_ensembles.distributed.MemberParallelStrategy`) checks ``isinstance(module,
    PlacedMembers)`` and uses nothing else of the module's class.
    """

    members: Any
    """The members, indexable by member index (an ``nn.ModuleList``)."""

    @property
    def num_members(self) -> int:
        """``M``."""
        ...

    @property
    def local_members(self) -> list[int]:
        """The trainable members this process trains."""
        ...

    def assign_members(self, indices: Sequence[int] | None) -> None:
        """Train only ``indices`` in this process (``None``: every trainable member)."""
        ...


@dataclass(frozen=True)
class TrainingShard:
    """The slice of the training set one process iterates.

    Args:
        rank: This process's index among the processes that share the training set.
        num_replicas: How many processes share it (each reads ``1 / num_replicas`` of every epoch).
        seed_offset: Added to the shuffle seed, so that groups of processes can read different orders.

    Example:
        >>> TrainingShard(rank=1, num_replicas=2)
        TrainingShard(rank=1, num_replicas=2, seed_offset=0)
    """

    rank: int
    num_replicas: int
    seed_offset: int = 0


def training_shard(trainer: Any) -> TrainingShard:
    """The shard of the training data this process should read, for loaders that shard themselves.

    Args:
        trainer: The attached trainer, or ``None`` (one process). Its strategy is asked through a
            ``training_shard()`` method when it has one (e.g. ``MemberParallelStrategy``: the rank within the
            member group); otherwise the shard is the trainer's ``global_rank`` of its ``world_size``.

    Returns:
        The shard.

    Example:
        >>> from types import SimpleNamespace
        >>> training_shard(None)
        TrainingShard(rank=0, num_replicas=1, seed_offset=0)
        >>> training_shard(SimpleNamespace(strategy=object(), global_rank=3, world_size=4))
        TrainingShard(rank=3, num_replicas=4, seed_offset=0)
    """
    if trainer is None:
        return TrainingShard(0, 1, 0)
    ask = getattr(getattr(trainer, "strategy", None), "training_shard", None)
    if callable(ask):
        shard = ask()
        if not isinstance(shard, TrainingShard):
            raise TypeError(
                f"Expected `{type(trainer.strategy).__name__}.training_shard()` to return a "
                f"lightning_ensembles.sharding.TrainingShard, but got {type(shard).__name__}."
            )
        return shard
    return TrainingShard(int(trainer.global_rank), int(trainer.world_size), 0)
