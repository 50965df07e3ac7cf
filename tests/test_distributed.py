"""Member-parallel training (gloo on CPU): equality with one process, checkpoints both ways, no cross-group
gradients, and the bad inputs of the strategy."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lightning_ensembles import EnsembleLightningModule, MemberParallelStrategy
from lightning_ensembles.callbacks import EnsembleSizeAblation, MemberEMA
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.data.sampling import EpochSeededRandomSampler, make_loader
from lightning_ensembles.distributed import plan_members
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyConvNet, TinyNet, make_data, trainer_kwargs

pytestmark = pytest.mark.slow  # DDP with gloo: spawned processes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
TRAIN_SEED = 3


class Data(pl.LightningDataModule):
    """64 training samples shuffled by ``(seed, epoch)``, 32 evaluation samples (divisible by 2 processes)."""

    def __init__(self, batch_size: int = 8, order: Any = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.order = order  # a sampler factory for the training set, or None for the standard one

    def train_dataloader(self) -> DataLoader:
        data = make_data(64)
        if self.order is not None:
            return DataLoader(data, batch_size=self.batch_size, sampler=self.order(data))
        return make_loader(data, self.batch_size, 0, seed=TRAIN_SEED, train=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(make_data(32, seed=1), 8, 0, seed=0, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def mlp() -> nn.Module:
    """A member without BatchNorm, so DDP inside a member group equals one process on the whole batch."""
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def ensemble(member: Any = TinyNet, num_members: int = 2, **kwargs: Any) -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=member,
        num_members=num_members,
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        **kwargs,
    )


class RecordPlacement(pl.Callback):
    """Checks, inside every worker, what the strategy placed and reduced."""

    def __init__(self, members_per_rank: list[list[int]], group_bytes: dict[int, int], wrapped: bool) -> None:
        self.members_per_rank = members_per_rank
        self.group_bytes = group_bytes  # rank -> expected gradient bytes within its group
        self.wrapped = wrapped

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, MemberParallelStrategy) and isinstance(pl_module, EnsembleLightningModule)
        rank = trainer.global_rank
        assert pl_module.local_members == self.members_per_rank[rank]
        assert isinstance(strategy.model, DistributedDataParallel) == self.wrapped
        group = tuple(strategy.member_group_ranks)
        expected = {group: self.group_bytes[rank]} if self.group_bytes[rank] else {}
        # Every gradient byte this process all-reduced went to its own member group, and nowhere else.
        assert strategy.gradient_bytes == expected, (rank, strategy.gradient_bytes, expected)
        if self.wrapped:
            ddp = strategy.model
            assert isinstance(ddp, DistributedDataParallel)
            assert torch.distributed.get_process_group_ranks(ddp.process_group) == list(group)


def _fit(
    module: pl.LightningModule, data: pl.LightningDataModule, devices: int = 1, **kwargs: Any
) -> pl.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    settings = trainer_kwargs(**{"max_epochs": 2, **kwargs})
    if devices > 1:
        settings.update(devices=devices)
        settings.setdefault("strategy", "member_parallel_spawn")
    trainer = pl.Trainer(**settings)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _checkpointer(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0)


def _assert_same_weights(got: nn.Module | dict, expected: nn.Module | dict, atol: float = 1e-6) -> None:
    got = got if isinstance(got, dict) else got.state_dict()
    expected = expected if isinstance(expected, dict) else expected.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].float(), expected[key].float(), atol=atol, rtol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------- placement


def test_plan_members_places_whole_members_or_member_groups() -> None:
    layout = plan_members(world_size=2, num_members=4)
    assert (layout.group_size, layout.num_groups) == (1, 2)
    assert [layout.members_of_rank(r) for r in range(2)] == [[0, 1], [2, 3]]
    assert [layout.leader(m) for m in range(4)] == [0, 0, 1, 1]
    layout = plan_members(world_size=8, num_members=2)
    assert (layout.group_size, layout.num_groups) == (4, 2)
    assert layout.ranks_of_group(1) == [4, 5, 6, 7] and layout.members_of_rank(5) == [1]
    assert plan_members(world_size=1, num_members=3).members_of_rank(0) == [0, 1, 2]  # trivially one process
    with pytest.raises(
        ValueError, match=r"W = `--trainer.devices` × `--trainer.num_nodes` = 3\) to divide .*= 4\)"
    ):
        plan_members(world_size=3, num_members=4)


def test_cli_rejects_a_strategy_typo_and_an_impossible_placement_before_launching() -> None:
    args = [
        "--config", str(CONFIGS / "cifar_wrn.yaml"),
        "--config", str(CONFIGS / "digits/quickstart.yaml"),
        "--config", str(CONFIGS / "ensemble-4.yaml"),
        "--trainer.accelerator=cpu",
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"`--trainer.strategy`.*got 'member_paralel'\. Did you mean 'member_parallel'"
    ):
        EnsembleCLI(args=[*args, "--trainer.strategy=member_paralel"])
    with pytest.raises(
        ValueError, match=r"= 3\) to divide the number of members \(`--model.num_members` = 4\)"
    ):
        EnsembleCLI(args=[*args, "--trainer.strategy=member_parallel", "--trainer.devices=3"])
    # The class given by path, with or without arguments, is the same strategy.
    strategy = "--trainer.strategy=lightning_ensembles.MemberParallelStrategy"
    cli = EnsembleCLI(args=[*args, strategy, "--trainer.strategy.data_order=per_group"])
    assert (
        isinstance(cli.trainer.strategy, MemberParallelStrategy)
        and cli.trainer.strategy.data_order == "per_group"
    )
    with pytest.raises(ValueError, match=r"= 3\) to divide the number of members"):
        EnsembleCLI(args=[*args, strategy, "--trainer.devices=3"])
    with pytest.raises(
        ValueError, match=r"`--trainer.strategy.data_order` to be 'shared' or 'per_group'.*'random'"
    ):
        MemberParallelStrategy(data_order="random")  # type: ignore[arg-type]


def test_member_parallel_needs_an_ensemble_module(in_process_group: None) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(IN_FEATURES, NUM_CLASSES)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # pragma: no cover
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="needs an EnsembleLightningModule, but got Plain"):
        _fit(Plain(), Data(), strategy="member_parallel")


def test_one_process_is_trivially_the_plain_run(in_process_group: None) -> None:
    single, member_parallel = ensemble(), ensemble()
    _fit(single, Data())
    trainer = _fit(member_parallel, Data(), strategy="member_parallel")
    assert isinstance(trainer.strategy, MemberParallelStrategy) and trainer.strategy.gradient_bytes == {}
    _assert_same_weights(member_parallel, single)
    assert member_parallel._assigned is None  # the placement ends with the run


def test_a_gloo_group_is_destroyed_at_exit_before_the_interpreter_tears_down(
    in_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning registers its exit handler for NCCL only; a gloo group left to interpreter finalisation can
    # abort a spawned worker (SIGABRT after a finished fit, seen once in CI). The strategy registers one, once.
    import lightning_ensembles.distributed as distributed

    registered: list[Callable[[], None]] = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    monkeypatch.setattr(distributed, "_EXIT_HANDLER_REGISTERED", False)
    _fit(ensemble(), Data(), strategy="member_parallel", max_epochs=1)
    _fit(ensemble(), Data(), strategy="member_parallel", max_epochs=1)
    assert len(registered) == 1
    assert torch.distributed.is_initialized()
    registered[0]()
    assert not torch.distributed.is_initialized()
    registered[0]()  # a second call (a user destroyed it first) does nothing


def test_a_spawned_worker_exits_at_once_after_its_work_and_not_after_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `member_parallel_spawn` ends a worker whose run returned with os._exit, as multiprocessing ends a forked
    # child, so that no gloo thread can abort it during interpreter finalisation (SIGABRT after a finished fit,
    # seen twice in CI). An exception still takes Lightning's path (the parent reports it).
    import lightning_ensembles.distributed as distributed

    trainer = pl.Trainer(**trainer_kwargs(devices=2, strategy="member_parallel_spawn"))
    launcher = trainer.strategy.launcher
    assert isinstance(launcher, distributed._ExitingSpawnLauncher)
    plain = pl.Trainer(**trainer_kwargs(devices=2, strategy="member_parallel"))  # popen: the user's script
    assert not isinstance(plain.strategy.launcher, distributed._ExitingSpawnLauncher)

    events: list[str] = []
    base = type(launcher).__mro__[1]
    monkeypatch.setattr(base, "_wrapping_function", lambda self, *a, **k: events.append("work"))
    monkeypatch.setattr(distributed, "_destroy_default_process_group", lambda: events.append("destroy"))
    monkeypatch.setattr(distributed.os, "_exit", lambda code: events.append(f"exit {code}"))
    launcher._wrapping_function(0, None, None, (), {}, None)
    assert events == ["work", "destroy", "exit 0"]

    def failing(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the run failed")

    events.clear()
    monkeypatch.setattr(base, "_wrapping_function", failing)
    with pytest.raises(RuntimeError, match="the run failed"):
        launcher._wrapping_function(0, None, None, (), {}, None)
    assert events == []


def test_a_module_left_by_a_member_parallel_run_trains_every_member_again() -> None:
    module = ensemble()
    module.assign_members([1])
    assert module.local_members == [1]
    before = [p.detach().clone() for p in module.members[0].parameters()]
    _fit(module, Data(), max_epochs=1)  # single-device: nothing assigns, and member 0 is not trained
    assert all(torch.equal(a, b) for a, b in zip(before, module.members[0].parameters()))
    module.assign_members(None)
    _fit(module, Data(), max_epochs=1)
    assert not all(torch.equal(a, b) for a, b in zip(before, module.members[0].parameters()))
    with pytest.raises(
        ValueError, match=r"member indices in \[0, 2\) to assign to this process, but got \[2\]"
    ):
        module.assign_members([2])


# ---------------------------------------------------------------------------------------------- 2 processes


@pytest.mark.timeout(300)
def test_two_ranks_two_members_equal_one_process_with_checkpoints_both_ways(tmp_path: Path) -> None:
    # The single-process references: one epoch (with its checkpoint), and two epochs.
    one_epoch = ensemble()
    reference_trainer = _fit(one_epoch, Data(), max_epochs=1, callbacks=[_checkpointer(tmp_path / "single")],
                             enable_checkpointing=True)  # fmt: skip
    two_epochs = ensemble()
    _fit(two_epochs, Data())

    # Member-parallel, stopped after one epoch: each rank trains one member, no gradient is communicated.
    placement = RecordPlacement([[0], [1]], group_bytes={0: 0, 1: 0}, wrapped=False)
    stopped = ensemble()
    trainer = _fit(stopped, Data(), devices=2, max_epochs=1, enable_checkpointing=True,
                   callbacks=[_checkpointer(tmp_path / "mp"), placement])  # fmt: skip
    _assert_same_weights(stopped, one_epoch)
    # Each member's epoch-mean training loss reaches rank 0's loggers, although rank 1 trained member 1.
    for i in range(2):
        key = f"train/member_{i}/loss_epoch"
        assert trainer.callback_metrics[key].item() == pytest.approx(
            reference_trainer.callback_metrics[key].item()
        )

    # Its checkpoint has the single-process format: every member's weights and optimizer state.
    saved = torch.load(tmp_path / "mp" / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "single" / "last.ckpt", weights_only=True)
    _assert_same_weights(saved["state_dict"], reference["state_dict"])
    got, expected = saved["optimizer_states"][0], reference["optimizer_states"][0]
    assert got["param_groups"] == expected["param_groups"] and got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        torch.testing.assert_close(got["state"][index]["momentum_buffer"], state["momentum_buffer"])
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "mp" / "last.ckpt", member=TinyNet)
    _assert_same_weights(loaded, one_epoch)

    # Resume member-parallel from its own checkpoint, and from the single-process one: both end where two
    # uninterrupted single-process epochs end.
    for checkpoint in (tmp_path / "mp" / "last.ckpt", tmp_path / "single" / "last.ckpt"):
        resumed = ensemble()
        _fit(resumed, Data(), devices=2, ckpt_path=str(checkpoint))
        _assert_same_weights(resumed, two_epochs)

    # Evaluation combines every member's predictions: the metrics equal one process's on the gathered weights.
    test = trainer_kwargs(devices=2, strategy="member_parallel_spawn")
    (distributed,) = pl.Trainer(**test).test(resumed, datamodule=Data(), verbose=False)
    (single,) = pl.Trainer(**trainer_kwargs()).test(two_epochs, datamodule=Data(), verbose=False)
    assert set(distributed) == set(single) and "test/size_2/top1" in single
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.timeout(300)
def test_per_group_data_order_with_mixed_members_equals_single_member_runs(tmp_path: Path) -> None:
    # Members of different architectures, each group shuffling with its own seed: member g must end where a
    # single-member run over group g's order ends (the wrapper Lightning puts around the loader's sampler,
    # reshuffled with seed PL_GLOBAL_SEED + g, here 0 + g).
    members = [TinyNet, TinyConvNet]
    strategy = MemberParallelStrategy(data_order="per_group", start_method="spawn")
    mixed = EnsembleLightningModule(
        members=members, num_classes=NUM_CLASSES, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    _fit(mixed, Data(), devices=2, strategy=strategy)
    for g, member in enumerate(members):

        def order(data: Any, g: int = g) -> DistributedSamplerWrapper:
            inner = EpochSeededRandomSampler(data, seed=TRAIN_SEED)
            return DistributedSamplerWrapper(inner, num_replicas=1, rank=0, shuffle=True, seed=g)

        alone = EnsembleLightningModule(
            members=[member],
            num_classes=NUM_CLASSES,
            seed=g,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        _fit(alone, Data(order=order))
        _assert_same_weights(mixed.members[g], alone.members[0])
    # and the shared order would have given member 1 a different result
    shared = EnsembleLightningModule(
        members=members, num_classes=NUM_CLASSES, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    _fit(shared, Data())
    assert not torch.allclose(shared.members[1].head.weight, mixed.members[1].head.weight)


@pytest.mark.timeout(300)
def test_member_ema_is_kept_by_each_member_group_and_shared_for_evaluation(tmp_path: Path) -> None:
    # Each process updates the EMA of the members it trains; evaluation and checkpoints get every member's
    # EMA from its owner, so validation metrics and the saved EMA weights equal one process's.
    runs = {}
    for devices in (1, 2):
        module = ensemble()
        trainer = _fit(module, Data(), devices=devices, enable_checkpointing=True,
                       callbacks=[MemberEMA(decay=0.5), _checkpointer(tmp_path / str(devices))])  # fmt: skip
        checkpoint = torch.load(tmp_path / str(devices) / "last.ckpt", weights_only=True)
        (ema_key,) = [k for k in checkpoint["callbacks"] if k.startswith("MemberEMA")]
        runs[devices] = (module, trainer.callback_metrics, checkpoint["callbacks"][ema_key]["members"])
    (single, single_metrics, single_ema), (mp, mp_metrics, mp_ema) = runs[1], runs[2]
    _assert_same_weights(mp, single)  # the trained (not EMA) weights are back in place after evaluation
    for key in ("val/top1", "val/nll", "val/member_0/nll", "val/member_1/nll"):
        assert mp_metrics[key].item() == pytest.approx(single_metrics[key].item(), abs=1e-5), key
    assert sorted(mp_ema) == sorted(single_ema) == [0, 1]
    for i in (0, 1):
        _assert_same_weights(mp_ema[i], single_ema[i])


# ---------------------------------------------------------------------------------------------- 4 processes


@pytest.mark.timeout(300)
def test_member_groups_reduce_gradients_only_inside_the_group() -> None:
    # W = 4, M = 2: each member trained by 2 processes with DDP in that group only. With members that have no
    # BatchNorm, that equals one process on batches twice as large (the group's two shards of the same order).
    single = ensemble(mlp)
    _fit(single, Data(batch_size=16))
    params_per_member = sum(p.numel() for p in mlp().parameters())
    steps = 2 * 64 // 16
    placement = RecordPlacement(
        [[0], [0], [1], [1]], group_bytes=dict.fromkeys(range(4), steps * params_per_member * 4), wrapped=True
    )
    member_groups = ensemble(mlp)
    _fit(member_groups, Data(batch_size=8), devices=4, callbacks=[placement])
    _assert_same_weights(member_groups, single)


# ---------------------------------------------------------------------------------------------- failures

KILLED_RUN = """
import functools, os, signal, sys
sys.path.insert(0, {root!r})
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers import TinyNet, NUM_CLASSES
from tests.test_distributed import Data, ensemble

class KillRankOne(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 10:
            os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="member_parallel", max_epochs=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath={checkpoints!r}, save_last=True, save_top_k=0, every_n_train_steps=4),
                   KillRankOne()],
    )
    trainer.fit(ensemble(), datamodule=Data())
"""


@pytest.mark.timeout(300)
def test_a_killed_worker_ends_the_run_and_the_last_checkpoint_resumes(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(root=str(ROOT), checkpoints=str(tmp_path / "ckpt"))))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    # Either rank 0 reports the lost peer first, or Lightning's launcher kills it, naming the dead process.
    assert "member_parallel: another worker process stopped" in output or "terminated with code -9" in output
    assert "intact; resume with `--ckpt_path" in output or "terminated with code -9" in output
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 8  # the last one written before rank 1 died at step 10
    resumed = ensemble()
    trainer = _fit(resumed, Data(), max_epochs=3, ckpt_path=str(last))
    assert trainer.global_step == 3 * 64 // 8


def test_a_lost_peer_is_reported_with_what_to_do() -> None:
    # Which of the two (this message, or Lightning's launcher killing the process) comes first in the killed
    # worker test above is a race, so the message itself is checked here.
    strategy = MemberParallelStrategy()
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer.")
    strategy.on_exception(lost)
    assert str(lost).startswith("member_parallel: another worker process stopped or cannot be reached")
    assert "No checkpoint was written in this run" in str(lost) and str(lost).endswith(
        "Connection reset by peer."
    )
    other = RuntimeError("shape mismatch")
    strategy.on_exception(other)
    assert str(other) == "shape mismatch"


class UnevenData(pl.LightningDataModule):
    """201 evaluation samples, an odd number for 2 processes; ``plain`` leaves the sampler to Lightning."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.plain = plain

    def val_dataloader(self) -> DataLoader:
        data = make_data(201, seed=2)
        if self.plain:
            return DataLoader(data, batch_size=50)  # Lightning's padded DistributedSampler
        return make_loader(data, 50, 0, seed=0, train=False)  # 101 and 100 samples: 3 and 2 batches

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _evaluate(module: EnsembleLightningModule, root: Path, data: UnevenData, **kwargs: Any) -> dict:
    ablation = EnsembleSizeAblation(num_subsets=2, latency_batch_size=None, figures=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=root, callbacks=[ablation], **kwargs))
    (validated,) = trainer.validate(module, datamodule=data, verbose=False)
    (tested,) = trainer.test(module, datamodule=data, verbose=False)
    rows = {stage: json.loads((root / f"ablation_{stage}.json").read_text()) for stage in ("val", "test")}
    return {**validated, **tested, "ablation": rows}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp_spawn", "member_parallel_spawn"])
def test_uneven_evaluation_counts_every_sample_once(tmp_path: Path, strategy: str) -> None:
    module = ensemble(num_members=2).eval()
    single = _evaluate(module, tmp_path / "one", UnevenData())
    distributed = _evaluate(module, tmp_path / "two", UnevenData(), devices=2, strategy=strategy)
    rows = distributed.pop("ablation")
    expected_rows = single.pop("ablation")
    assert set(distributed) == set(single) and {"val/nll", "test/nll", "test/size_2/top1"} <= set(single)
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-6), key
    for stage in ("val", "test"):
        for got, expected in zip(rows[stage], expected_rows[stage]):
            for name in ("first_top1", "first_nll", "random_top1", "random_nll"):
                assert got[name] == pytest.approx(expected[name], abs=1e-6), (stage, name)
    if strategy == "ddp_spawn":
        # The negative control: Lightning's padded sampler evaluates 202 samples, one of them twice.
        padded = _evaluate(module, tmp_path / "padded", UnevenData(plain=True), devices=2, strategy=strategy)
        assert padded["test/nll"] != pytest.approx(single["test/nll"], abs=1e-6)


def test_padded_evaluation_samplers_are_counted_and_ours_repeat_nothing(in_process_group: None) -> None:
    from torch.utils.data import DistributedSampler

    from lightning_ensembles.data.sampling import evaluation_sampler, padded_samples

    data = make_data(201, seed=2)
    padded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert padded_samples(padded) == 1 and padded_samples(DataLoader(data)) == 0
    assert evaluation_sampler(data) is None  # one process: the loader's own order
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    assert evaluation_sampler(data) is None  # a group of one is not distributed either
