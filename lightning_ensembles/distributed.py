"""Member-parallel training: each ensemble member trained by its own group of processes.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models* (arXiv
2005.00570), conclude that ensemble members "can be easily distributed across multiple workers": a member
never needs another member's gradients. Data-parallel DDP (Lightning's ``ddp``) replicates the whole
ensemble on every process and all-reduces every member's gradients across all of them;
:class:`MemberParallelStrategy` instead places members on processes and keeps every gradient inside the
group of processes that trains that member.

With ``W`` processes and ``M`` members (:func:`plan_members`):

- ``W`` divides ``M``: each process trains ``M / W`` members on the whole training set; no gradient is
  communicated at all.
- ``M`` divides ``W``: each member is trained by ``W / M`` processes with DDP inside that group only.

Every process still holds every member, so evaluation, checkpoints and the cost callbacks work as in one
process: before evaluation and before a checkpoint is written, each member's parameters and buffers are
broadcast from the first process of the group that trains it, and the optimizer state of every member is
gathered, so checkpoints have exactly the single-process format. Evaluation is data-parallel over all ``W``
processes, with metrics synchronised by torchmetrics.

The strategy extends Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy`: launching, cluster
environments (torchrun, SLURM, ...), devices and precision are Lightning's. It is registered as
``member_parallel`` (script launch, like ``ddp``) and ``member_parallel_spawn``, so
``--trainer.strategy member_parallel`` works from the CLI once :mod:`lightning_ensembles` is imported.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_ensembles._compat import (
    ddp_comm_hook_settings,
    ddp_kwargs,
    ignore_in_ddp,
    layer_sync,
    set_launcher,
    set_layer_sync,
    spawn_launcher_base,
)
from lightning_ensembles.sharding import PlacedMembers, TrainingShard, training_shard

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["MemberLayout", "MemberParallelStrategy", "plan_members", "training_shard"]

DataOrder = Literal["shared", "per_group"]
_MEMBER_GROUP = re.compile(r"^member_(\d+)$")
# how gloo and NCCL report a peer process that died or hung
_PEER_LOST = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|NCCL.*(error|timeout)|timed out|Timeout", re.I
)


@dataclass(frozen=True)
class MemberLayout:
    """Which process trains which member: ``num_groups`` groups of ``group_size`` consecutive ranks.

    Group ``g`` holds ranks ``g * group_size ... (g + 1) * group_size - 1`` and trains members
    ``g * members_per_group ... (g + 1) * members_per_group - 1``.

    Args:
        world_size: ``W``, the number of processes.
        num_members: ``M``, the number of members.
        group_size: processes per group (``W / M`` when ``M`` divides ``W``, else 1).
        members_per_group: members per group (``M / W`` when ``W`` divides ``M``, else 1).

    Example:
        >>> layout = plan_members(world_size=4, num_members=2)
        >>> layout.group_size, layout.num_groups, layout.members_of_rank(3), layout.leader(1)
        (2, 2, [1], 2)
        >>> plan_members(world_size=2, num_members=4).members_of_rank(1)
        [2, 3]
    """

    world_size: int
    num_members: int
    group_size: int
    members_per_group: int

    @property
    def num_groups(self) -> int:
        """``G``, the number of member groups."""
        return self.world_size // self.group_size

    def group_of_rank(self, rank: int) -> int:
        """The group of global rank ``rank``."""
        return rank // self.group_size

    def ranks_of_group(self, group: int) -> list[int]:
        """The global ranks of group ``group``."""
        return list(range(group * self.group_size, (group + 1) * self.group_size))

    def members_of_group(self, group: int) -> list[int]:
        """The members trained by group ``group``."""
        return list(range(group * self.members_per_group, (group + 1) * self.members_per_group))

    def members_of_rank(self, rank: int) -> list[int]:
        """The members trained by global rank ``rank``."""
        return self.members_of_group(self.group_of_rank(rank))

    def leader(self, member: int) -> int:
        """The global rank whose copy of ``member`` is broadcast to the others (its group's first rank)."""
        return (member // self.members_per_group) * self.group_size


def plan_members(world_size: int, num_members: int) -> MemberLayout:
    """Place ``num_members`` members on ``world_size`` processes.

    Args:
        world_size: ``W`` (devices per node × nodes).
        num_members: ``M``.

    Returns:
        The layout: ``W / M`` processes per member if ``M`` divides ``W``, else ``M / W`` members per process.

    Raises:
        ValueError: if neither divides the other, naming both flags and the nearest valid process counts.
    """
    if world_size < 1 or num_members < 1:
        raise ValueError(
            f"Expected W >= 1 processes and M >= 1 members, but got W={world_size}, M={num_members}."
        )
    if world_size % num_members == 0:
        return MemberLayout(world_size, num_members, world_size // num_members, 1)
    if num_members % world_size == 0:
        return MemberLayout(world_size, num_members, 1, num_members // world_size)
    valid = sorted(
        {d for d in range(1, num_members + 1) if num_members % d == 0} | {2 * num_members, 4 * num_members}
    )
    raise ValueError(
        f"`--trainer.strategy member_parallel` needs the number of processes (W = `--trainer.devices` × "
        f"`--trainer.num_nodes` = {world_size}) to divide the number of members (`--model.num_members` = "
        f"{num_members}) or to be a multiple of it. Use W in {valid} (or any multiple of {num_members}), or "
        f"change the number of members."
    )


_EXIT_HANDLER_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group while the interpreter is still whole (once per process).

    Lightning registers this only for NCCL. A gloo group left to interpreter finalization can abort the
    process ("terminate called without an active exception", SIGABRT): its worker threads still hold work
    objects when the C++ destructors run (pytorch/pytorch#190489). A spawned worker exits right after the
    run, so destroying the group there is always safe: nothing collective follows. The handler collects
    garbage first, so that a DDP reducer in a reference cycle releases the group before it is destroyed.
    """
    global _EXIT_HANDLER_REGISTERED
    if _EXIT_HANDLER_REGISTERED or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        return  # Lightning's own handler does it
    atexit.register(_destroy_default_process_group)
    _EXIT_HANDLER_REGISTERED = True


def _destroy_default_process_group() -> None:
    # First free what still holds the group: a DDP wrapper and its reducer often sit in reference cycles
    # (module, hooks, trainer) that only the cyclic collector frees, and its finished gloo work objects hold
    # tensors. Left to interpreter finalisation, their destruction needs a GIL that is going away.
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _exit_finished_worker() -> None:
    """End a spawned worker whose run is done, without interpreter finalisation.

    multiprocessing ends a forked child this way (``os._exit`` after its target); a spawned one goes through
    interpreter finalisation, where a gloo process group's threads can abort the process after a run that
    succeeded ("terminate called without an active exception": see :func:`_destroy_process_group_at_exit`).
    Rank 0's results are in the launcher's queue already, the loggers were finalised at teardown, and nothing
    collective follows. Like a forked child, the worker runs no ``atexit`` handler.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    _destroy_default_process_group()
    os._exit(0)


class _ExitingSpawnLauncher(spawn_launcher_base()):  # type: ignore[misc]
    """Lightning's launcher of spawned processes, whose workers exit as soon as their work is done."""

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        _exit_finished_worker()  # only after a run that returned; an exception is reported as before


class MemberParallelStrategy(DDPStrategy):
    """Train each ensemble member on its own group of processes; no gradient crosses member groups.

    Use it like ``ddp``: ``Trainer(strategy="member_parallel", devices=8)`` or
    ``--trainer.strategy member_parallel``. The module must be an
    :class:`~lightning_ensembles.EnsembleLightningModule`. See :func:`plan_members` for the placement.

    Args:
        data_order: ``"shared"`` (default): every member group reads the training set in the same seeded order
            (the loader's own order when its sampler is a custom one such as
            :class:`~lightning_ensembles.data.EpochSeededRandomSampler`), so with one process per group the
            members see exactly the batches of a single-process run. ``"per_group"``: group ``g`` shuffles
            with seed ``PL_GLOBAL_SEED + g``, so members also differ in data order.
        **kwargs: forwarded to :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``,
            ``timeout``, ``process_group_backend``, ``ddp_comm_hook``, DDP keyword arguments, ...).

    Raises:
        ValueError: for an unknown ``data_order``, a ``process_group`` argument (the strategy makes its own),
            or a number of processes that does not fit the number of members.
        TypeError: if the module is not an ``EnsembleLightningModule``.

    Attributes:
        layout: the :class:`MemberLayout`, known after setup.
        gradient_bytes: bytes of gradients this process has all-reduced, per process group (a tuple of global
            ranks). Only member groups ever appear; it stays empty when each process trains whole members.
    """

    strategy_name = "member_parallel"
    #: each process back-propagates only its own members and no gradient crosses members, so a module may
    #: compute each member's gradients with a backward of its own (``memory_frugal``)
    supports_per_member_backward = True

    def __init__(self, data_order: DataOrder = "shared", **kwargs: Any) -> None:
        if data_order not in ("shared", "per_group"):
            raise ValueError(
                f"Expected `--trainer.strategy.data_order` to be 'shared' or 'per_group', but got {data_order!r}."
            )
        if kwargs.pop("process_group", None) is not None:  # None: LightningCLI passes every DDP default
            raise ValueError(
                "MemberParallelStrategy builds one process group per member group itself; do not pass "
                "`process_group`."
            )
        self._spawns = kwargs.get("start_method") == "spawn"
        super().__init__(**kwargs)
        self.data_order: DataOrder = data_order
        self.layout: MemberLayout | None = None
        self.gradient_bytes: dict[tuple[int, ...], int] = {}
        self._member_group: Any = None  # the process group of this rank's member group (None: one process)
        self._groups: tuple[MemberLayout, list[Any]] | None = None

    # ------------------------------------------------------------------ placement

    @property
    def member_group_ranks(self) -> list[int]:
        """Global ranks of the group this process belongs to."""
        if self.layout is None:
            return [self.global_rank]
        return self.layout.ranks_of_group(self.layout.group_of_rank(self.global_rank))

    def training_shard(self) -> TrainingShard:
        """This process's shard of the training set: its rank within its member group.

        Datamodules that shard their own batches ask for it through
        :func:`lightning_ensembles.sharding.training_shard`.

        Returns:
            The shard; ``seed_offset`` is the group index with ``data_order="per_group"``, else 0.
        """
        layout = self.layout
        if layout is None:
            return TrainingShard(self.global_rank, self.world_size, 0)
        group = layout.group_of_rank(self.global_rank)
        offset = group if self.data_order == "per_group" else 0
        return TrainingShard(self.global_rank % layout.group_size, layout.group_size, offset)

    def _ensemble(self) -> Any:
        module = self.lightning_module
        if not isinstance(module, PlacedMembers):
            raise TypeError(
                "`--trainer.strategy member_parallel` needs an EnsembleLightningModule, but got "
                f"{type(module).__name__}. It places ensemble members on processes; use `ddp` for other modules."
            )
        return module

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._spawns:
            set_launcher(self, _ExitingSpawnLauncher(self, start_method="spawn"))

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        _destroy_process_group_at_exit()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        module = self._ensemble()
        self.layout = layout = plan_members(self.world_size, module.num_members)
        group = layout.group_of_rank(self.global_rank)
        self._member_group = None
        if layout.group_size == self.world_size and self.world_size > 1:
            self._member_group = dist.group.WORLD
        elif layout.group_size > 1:
            if self._groups is None or self._groups[0] != layout:
                # every process must create every group, in the same order; once per layout (fit, then test)
                self._groups = (
                    layout,
                    [dist.new_group(layout.ranks_of_group(g)) for g in range(layout.num_groups)],
                )
            self._member_group = self._groups[1][group]
        module.assign_members(layout.members_of_group(group))
        if layer_sync(self) is not None:
            # SyncBatchNorm synchronises statistics inside a member group only (plain BatchNorm for one process)
            set_layer_sync(
                self, _GroupSyncBatchNorm(self._member_group) if self._member_group is not None else None
            )
        super().setup(trainer)

    @override
    def configure_ddp(self) -> None:
        assert self.model is not None
        if self.world_size > 1:
            # as DDP would, start every process from rank 0's weights, so that all groups agree
            self._broadcast_all_states(src=0)
        self.model = self._setup_model(self.model)
        self._register_ddp_hooks()

    @override
    def _setup_model(self, model: nn.Module) -> Any:
        if self._member_group is None:
            return model  # one process per group: nothing to reduce
        module = self._ensemble()
        local = set(module.local_members)
        if not local:
            return model
        ignored = [
            f"members.{i}.{name}"
            for i in range(module.num_members)
            if i not in local
            for name, _ in [*module.members[i].named_parameters(), *module.members[i].named_buffers()]
        ]
        ignore_in_ddp(model, ignored)
        device_ids = self.determine_ddp_device_ids()
        return DistributedDataParallel(
            module=model, device_ids=device_ids, process_group=self._member_group, **ddp_kwargs(self)
        )

    @override
    def _register_ddp_hooks(self) -> None:
        if not isinstance(self.model, DistributedDataParallel):
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook, wrapper, hook_state = ddp_comm_hook_settings(self)
        inner: Callable[..., Any] = hook or default_hooks.allreduce_hook
        if wrapper is not None:
            inner = wrapper(inner)
        state = hook_state if hook_state is not None else self._member_group
        ranks = tuple(dist.get_process_group_ranks(self._member_group))
        traffic = self.gradient_bytes

        # unannotated: DDP checks annotations by identity, and this module's are strings (__future__)
        def counted(hook_state, bucket):  # type: ignore[no-untyped-def]
            buffer = bucket.buffer()
            traffic[ranks] = traffic.get(ranks, 0) + buffer.numel() * buffer.element_size()
            return inner(hook_state, bucket)

        self.model.register_comm_hook(state, counted)

    # ------------------------------------------------------------------ data

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.layout is None or trainer is None or not trainer.training:
            return super().distributed_sampler_kwargs  # evaluation: data-parallel over every process
        shard = self.training_shard()
        kwargs: dict[str, Any] = {"num_replicas": shard.num_replicas, "rank": shard.rank}
        if self.data_order == "per_group":
            kwargs["seed"] = int(os.getenv("PL_GLOBAL_SEED", 0)) + shard.seed_offset
        return kwargs

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        sampler = getattr(dataloader, "sampler", None)
        if (
            trainer is not None
            and trainer.training
            and self.data_order == "shared"
            and isinstance(sampler, DistributedSamplerWrapper)
        ):
            # Keep the loader's own (seeded) order and only shard it; reshuffling it would give every run a
            # different order from the single-process one.
            sampler.shuffle = False
        return super().process_dataloader(dataloader)

    # ------------------------------------------------------------------ synchronisation

    def synchronize_members(self) -> None:
        """Give every process every member's current weights (a collective: call it on all processes).

        Each member's parameters and buffers are broadcast from the first process of the group that trains
        it. Called automatically before evaluation, before a checkpoint is written and at the end of fit.
        """
        module = self._ensemble()
        self.broadcast_from_owners(dict(enumerate(module.members)))

    def broadcast_from_owners(self, modules: Mapping[int, nn.Module]) -> None:
        """Broadcast per-member modules (members, or copies such as EMA weights) from their owners.

        A collective: every process calls it with the same member indices. Module ``i``'s parameters and
        buffers are sent from the first rank of the group that trains member ``i``.

        Args:
            modules: member index -> a module of that member (same structure on every process).
        """
        if self.layout is None or self.world_size == 1:
            return
        for member in sorted(modules):
            _broadcast(_member_tensors(modules[member]), src=self.layout.leader(member))

    def _broadcast_all_states(self, src: int) -> None:
        module = self.lightning_module
        assert module is not None
        _broadcast([*module.parameters(), *module.buffers()], src=src)

    @override
    def on_validation_start(self) -> None:
        self.synchronize_members()
        super().on_validation_start()

    @override
    def on_test_start(self) -> None:
        self.synchronize_members()
        super().on_test_start()

    @override
    def on_predict_start(self) -> None:
        self.synchronize_members()
        super().on_predict_start()

    @override
    def on_train_end(self) -> None:
        self.synchronize_members()
        super().on_train_end()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.synchronize_members()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict with every member's state, gathered from the processes that train it.

        A collective: Lightning calls it on every process when it writes a checkpoint.
        """
        state = super().optimizer_state(optimizer)
        if self.layout is None or self.world_size == 1:
            return state
        layout, rank = self.layout, self.global_rank
        mine: dict[int, Any] = {}
        if rank == layout.ranks_of_group(layout.group_of_rank(rank))[0]:
            owned = set(layout.members_of_rank(rank))
            for group in state["param_groups"]:
                match = _MEMBER_GROUP.match(str(group.get("name", "")))
                if match is None or int(match.group(1)) not in owned:
                    continue
                for index in group["params"]:
                    if index in state["state"]:
                        mine[index] = _to_cpu(state["state"][index])
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        owned_anywhere = {
            index
            for group in state["param_groups"]
            if _MEMBER_GROUP.match(str(group.get("name", "")))
            for index in group["params"]
        }
        others = {k: v for k, v in dict(state["state"]).items() if k not in owned_anywhere}
        return {**state, "state": dict(sorted({**others, **merged}.items()))}

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        super().teardown()
        if isinstance(module, PlacedMembers):
            module.assign_members(None)  # the module trains every member again outside this strategy

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        text = str(exception)
        if not isinstance(exception, RuntimeError) or not _PEER_LOST.search(text):
            return
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        checkpoint = getattr(getattr(trainer, "checkpoint_callback", None), "last_model_path", "") or ""
        resume = (
            f"The last checkpoint written is intact; resume with `--ckpt_path {checkpoint}`."
            if checkpoint
            else "No checkpoint was written in this run; add a ModelCheckpoint (e.g. every_n_train_steps) to resume."
        )
        exception.args = (
            f"member_parallel: another worker process stopped or cannot be reached (rank {self.global_rank} of "
            f"{self.world_size} lost its peer in a collective operation). Check the other workers' logs for the "
            f"cause. {resume}\n{text}",
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (
            ("member_parallel", "popen"),
            ("member_parallel_spawn", "spawn"),
            ("member_parallel_fork", "fork"),
        ):
            strategy_registry.register(
                name,
                cls,
                description=f"Member-parallel ensemble training (lightning-ensembles), start_method {start_method!r}",
                start_method=start_method,
                override=True,
            )


class _GroupSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's SyncBatchNorm plugin, restricted to one process group."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=self.process_group)


def _member_tensors(member: nn.Module) -> list[Tensor]:
    return [*member.parameters(), *member.buffers()]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


@torch.no_grad()
def _broadcast(tensors: list[Tensor], src: int) -> None:
    """Broadcast ``tensors`` in place from global rank ``src``, one flat buffer per device and dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.broadcast(flat, src=src)
        offset = 0
        for tensor in bucket:
            tensor.data.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


MemberParallelStrategy.register_strategies(StrategyRegistry)
