"""``memory_frugal``: each member's forward and backward before the next member's forward.

Every test compares against the default path (Lightning's backward of the summed loss) run in the same test,
with exact equality: the per-member backward must give bit-identical gradients, clipping, AMP scaling,
optimizer state, NaN reports and checkpoints.
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn

from lightning_ensembles import _frugal
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import (
    NUM_CLASSES,
    TinyConvNet,
    TinyNet,
    assert_identical,
    make_loader,
    sgd,
    trainer_kwargs,
)

Dropout = functools.partial(TinyNet, dropout=0.3)  # BatchNorm and dropout: RNG and statistics order matter


class HookedNet(TinyNet):
    """A member whose head weight has a gradient hook that computes (a matmul), as gradient-surgery code does:
    run under autocast it would compute in bfloat16."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.head.weight.register_hook(lambda grad: grad @ torch.eye(grad.shape[1]))


class RecordSteps(pl.Callback):
    """What every optimizer step sees: gradients (unscaled, before clipping), AMP scale, and the step's loss."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []
        self.scales: list[float | None] = []
        self.losses: list[Tensor] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(None if scaler is None else scaler.get_scale())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].clone())


def _fp16_scaler() -> list[Any]:
    # growth_interval=1 doubles the scale every step until fp16 overflows: steps are skipped and the scale backs
    # off, so the scaler's inf path is compared too
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=1)
    return [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


def _run(
    memory_frugal: bool,
    epochs: int = 2,
    plugins: Callable[[], list[Any]] | None = None,
    callbacks: Callable[[], list[pl.Callback]] | None = None,
    module_kwargs: dict[str, Any] | None = None,
    **trainer_overrides: Any,
) -> tuple[EnsembleLightningModule, pl.Trainer, RecordSteps]:
    settings: dict[str, Any] = dict(member=Dropout, num_members=3, optimizer=sgd())
    settings.update(module_kwargs or {})
    if "members" in settings:
        settings.pop("member")
        settings.pop("num_members")
    torch.manual_seed(0)  # the dropout stream
    module = EnsembleLightningModule(num_classes=NUM_CLASSES, memory_frugal=memory_frugal, **settings)
    record = RecordSteps()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[record, *(callbacks() if callbacks is not None else [])],
        plugins=plugins() if plugins is not None else None,
        **trainer_kwargs(**trainer_overrides),
    )
    trainer.fit(module, make_loader(n=48, batch_size=16))
    return module, trainer, record


CASES: dict[str, dict[str, Any]] = {
    "sgd_momentum": {},
    "clip_norm": dict(gradient_clip_val=0.05),
    "clip_value": dict(gradient_clip_val=0.01, gradient_clip_algorithm="value"),
    "accumulate_2": dict(accumulate_grad_batches=2),  # 3 batches per epoch: windows [0, 1] and [2]
    "bf16_mixed": dict(precision="bf16-mixed"),
    "bf16_mixed_gradient_hooks": dict(precision="bf16-mixed", module_kwargs=dict(member=HookedNet)),
    "fp16_gradscaler_clip_accumulate": dict(
        plugins=_fp16_scaler, gradient_clip_val=0.5, accumulate_grad_batches=2
    ),
    "frozen_member": dict(module_kwargs=dict(frozen_members=[1])),
    "mixed_architectures_smoothing_auto": dict(
        module_kwargs=dict(members=[TinyNet, TinyConvNet, Dropout], label_smoothing=0.1, execution="auto")
    ),
    # its last epoch only recomputes BatchNorm statistics, with Lightning's backward skipped
    "stochastic_weight_averaging": dict(
        epochs=3, callbacks=lambda: [StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)]
    ),
    "compiled": dict(module_kwargs=dict(compile=True, compile_backend="eager")),
}


@pytest.mark.parametrize("case", CASES)
def test_gradients_steps_and_optimizer_state_equal_the_summed_backward(case: str) -> None:
    summed = _run(False, **CASES[case])
    frugal = _run(True, **CASES[case])
    (m_sum, t_sum, r_sum), (m_fru, t_fru, r_fru) = summed, frugal
    assert len(r_fru.grads) == len(r_sum.grads) > 0
    assert_identical(r_fru.grads, r_sum.grads, "grads")
    assert_identical(r_fru.losses, r_sum.losses, "losses")
    assert_identical(r_fru.scales, r_sum.scales, "scales")
    assert_identical(m_fru.state_dict(), m_sum.state_dict(), "state_dict")  # weights and BatchNorm statistics
    assert_identical(t_fru.optimizers[0].state_dict(), t_sum.optimizers[0].state_dict(), "optimizer")
    assert_identical(t_fru.precision_plugin.state_dict(), t_sum.precision_plugin.state_dict(), "scaler")
    assert_identical(dict(t_fru.callback_metrics), dict(t_sum.callback_metrics), "logged")
    if case == "fp16_gradscaler_clip_accumulate":
        assert min(r_sum.scales) < max(r_sum.scales)  # the scale backed off at least once: a step was skipped
    if case == "frozen_member":
        assert not any(name.startswith("members.1.") for name in r_fru.grads[0])


class RecordBatch(pl.Callback):
    """The storages of the current batch's tensors (inputs and targets are not activations)."""

    def __init__(self) -> None:
        self.storages: set[int] = set()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.storages = {t.untyped_storage().data_ptr() for t in batch}


def test_only_one_members_activations_are_alive_at_a_time() -> None:
    # At the start of each member's training forward, count the bytes of activations that autograd still
    # holds for a backward: saved tensors other than parameters, buffers and the batch.
    def alive_at_each_forward(memory_frugal: bool) -> list[int]:
        module = EnsembleLightningModule(
            member=Dropout,
            num_members=3,
            num_classes=NUM_CLASSES,
            optimizer=sgd(),
            memory_frugal=memory_frugal,
        )
        state = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        batch = RecordBatch()
        saved: list[weakref.ref[Tensor]] = []
        alive: list[int] = []

        def before_forward(member: nn.Module, args: tuple[Tensor, ...]) -> None:
            if torch.is_grad_enabled():
                live = [t for t in (ref() for ref in saved) if t is not None]
                skip = state | batch.storages
                alive.append(sum(t.nbytes for t in live if t.untyped_storage().data_ptr() not in skip))

        def pack(tensor: Tensor) -> Tensor:
            saved.append(weakref.ref(tensor))
            return tensor

        for member in module.members:
            member.register_forward_pre_hook(before_forward)
        trainer = pl.Trainer(max_steps=1, callbacks=[batch], **trainer_kwargs())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.fit(module, make_loader(n=16, batch_size=16))
        return alive

    summed, frugal = alive_at_each_forward(False), alive_at_each_forward(True)
    assert len(summed) == len(frugal) == 3
    # the default holds every earlier member's activations (3 x 16 x 16 floats and a mask each, at least)
    assert summed[0] == 0 and 3 * 16 * 16 * 4 <= summed[1] < summed[2] == 2 * summed[1]
    assert frugal == [0, 0, 0]


def test_nonfinite_loss_is_reported_as_by_default() -> None:
    messages, states = [], []
    for memory_frugal in (False, True):
        module = EnsembleLightningModule(
            member=TinyNet, num_members=3, num_classes=NUM_CLASSES, memory_frugal=memory_frugal
        )
        with torch.no_grad():
            module.members[1].head.bias.fill_(float("nan"))
        before = {name: p.clone() for name, p in module.named_parameters()}
        trainer = pl.Trainer(max_epochs=1, **trainer_kwargs())
        with pytest.raises(FloatingPointError, match=r"Member 1 .*global step 0") as error:
            trainer.fit(module, make_loader())
        assert_identical(dict(module.named_parameters()), before)  # raised before any optimizer step
        messages.append(str(error.value))
        states.append(module.state_dict())
    assert messages[0] == messages[1]
    assert_identical(states[1], states[0])  # BatchNorm statistics of the forward passes included


def test_checkpoints_are_identical_and_resume_across_the_option(tmp_path: Path) -> None:
    def fit(
        memory_frugal: bool, epochs: int, root: Path, ckpt_path: Path | None = None
    ) -> EnsembleLightningModule:
        torch.manual_seed(0)
        module = EnsembleLightningModule(
            member=Dropout,
            num_members=3,
            num_classes=NUM_CLASSES,
            optimizer=sgd(),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
            memory_frugal=memory_frugal,
        )
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        settings = trainer_kwargs(enable_checkpointing=True, callbacks=[checkpoint], gradient_clip_val=0.5)
        trainer = pl.Trainer(max_epochs=epochs, **settings)
        torch.manual_seed(123)  # a resumed run must take the dropout stream from its checkpoint
        trainer.fit(module, make_loader(n=48, batch_size=16), ckpt_path=ckpt_path)
        return module

    straight = fit(False, 3, tmp_path / "straight")
    fit(False, 1, tmp_path / "summed")
    fit(True, 1, tmp_path / "frugal")
    summed = torch.load(tmp_path / "summed" / "last.ckpt", weights_only=True)
    frugal = torch.load(tmp_path / "frugal" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "lightning_ensembles_rng", "loops"):
        assert_identical(frugal[key], summed[key], key)
    assert frugal["hyper_parameters"]["memory_frugal"] is True
    assert summed["hyper_parameters"]["memory_frugal"] is False

    # resumed with the option on from either checkpoint, or off from the frugal one: the uninterrupted run
    for memory_frugal, source in ((True, "frugal"), (True, "summed"), (False, "frugal")):
        resumed = fit(
            memory_frugal, 3, tmp_path / f"resumed_{source}_{memory_frugal}", tmp_path / source / "last.ckpt"
        )
        assert_identical(resumed.state_dict(), straight.state_dict(), f"{source} -> {memory_frugal}")
    loaded = EnsembleLightningModule.load_from_checkpoint(
        tmp_path / "frugal" / "last.ckpt", member=Dropout, memory_frugal=False
    )
    assert loaded.memory_frugal is False


def test_vmap_is_refused_and_auto_trains_with_the_loop() -> None:
    with pytest.raises(ValueError, match=r"`--model.memory_frugal true`.*`--model.execution vmap`.*'vmap'"):
        EnsembleLightningModule(
            member=TinyNet, num_members=2, num_classes=NUM_CLASSES, execution="vmap", memory_frugal=True
        )
    with pytest.raises(
        ValueError, match=r"Expected `--model.memory_frugal` to be true, false or 'auto', but got 'yes'"
    ):
        EnsembleLightningModule(member=TinyNet, num_classes=NUM_CLASSES, memory_frugal="yes")  # type: ignore[arg-type]


def test_data_parallel_ddp_is_refused_with_what_to_use(in_process_group: None) -> None:
    module = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, memory_frugal=True
    )
    trainer = pl.Trainer(max_steps=1, **trainer_kwargs(strategy="ddp"))
    with pytest.raises(
        ValueError,
        match=r"`--model.memory_frugal true`.*`--trainer.strategy` DDPStrategy.*`--trainer.strategy member_parallel`",
    ):
        trainer.fit(module, make_loader())


def test_a_custom_backward_is_refused() -> None:
    class OwnBackward(EnsembleLightningModule):
        def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
            loss.backward(*args, **kwargs)

    module = OwnBackward(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, memory_frugal=True)
    with pytest.raises(
        ValueError, match=r"`--model.memory_frugal true`.*\(OwnBackward\) overrides `backward`"
    ):
        pl.Trainer(max_steps=1, **trainer_kwargs()).fit(module, make_loader())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "num_members",
    [4, 1],
    ids=["2_processes_2_members_each", "1_member_on_2_processes_with_ddp"],
)
def test_member_parallel_layouts_equal_the_summed_backward(num_members: int) -> None:
    # W = 2. M = 4: each process trains 2 members one after the other (no DDP wrapper). M = 1: the member is
    # trained by both processes with DDP inside its group, where one local member makes the per-member backward
    # Lightning's own.
    from tests.test_distributed import Data, _fit, ensemble

    runs = []
    for memory_frugal in (False, True):
        module = ensemble(num_members=num_members, memory_frugal=memory_frugal)
        # no validation: distributed evaluation differs run to run in the last bit, whatever the backward
        trainer = _fit(module, Data(batch_size=16), devices=2, max_epochs=1, limit_val_batches=0)
        runs.append((module, trainer.callback_metrics))
    (summed, summed_metrics), (frugal, frugal_metrics) = runs
    assert_identical(frugal.state_dict(), summed.state_dict())  # every member, gathered from its process
    assert {f"train/member_{i}/loss_epoch" for i in range(num_members)} <= set(summed_metrics)
    assert_identical(dict(frugal_metrics), dict(summed_metrics))


# ------------------------------------------------------------------------------------------------ auto (default)


class _CountingModule(EnsembleLightningModule):
    """Counts the steps that took the per-member backward."""

    per_member_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.automatic_optimization and _frugal.frugal_this_step(self, self.local_members):
            self.per_member_steps += 1
        return super().training_step(batch, batch_idx)


class _NoPerMemberBackward(SingleDeviceStrategy):
    """A one-device strategy that declares it cannot take a backward per member (as one that reduces
    gradients across members would)."""

    supports_per_member_backward = False


def _auto_fit(
    caplog: pytest.LogCaptureFixture, module: EnsembleLightningModule, **trainer_overrides: Any
) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_steps=2, **trainer_kwargs(**trainer_overrides)).fit(module, make_loader())
    return [r.getMessage() for r in caplog.records if "memory_frugal auto" in r.getMessage()]


def test_auto_is_the_default_and_trains_member_by_member_with_the_same_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)  # weights and the dropout stream
    auto = _CountingModule(member=Dropout, num_members=3, num_classes=NUM_CLASSES, optimizer=sgd())
    assert auto.memory_frugal == "auto" and auto.hparams["memory_frugal"] == "auto"
    assert _auto_fit(caplog, auto) == []  # nothing to say where it applies
    assert auto.per_member_steps == 2
    torch.manual_seed(0)
    summed = _CountingModule(
        member=Dropout, num_members=3, num_classes=NUM_CLASSES, optimizer=sgd(), memory_frugal=False
    )
    assert _auto_fit(caplog, summed) == [] and summed.per_member_steps == 0
    assert_identical(auto.state_dict(), summed.state_dict())


@pytest.mark.parametrize(
    ("module_kwargs", "trainer_overrides", "reason"),
    [
        ({"execution": "vmap"}, {}, r"`--model.execution vmap` runs all members' forwards together"),
        ({"execution": "auto"}, {}, r"`--model.execution auto` runs all members' forwards together"),
        ({}, {"strategy": _NoPerMemberBackward(torch.device("cpu"))}, r"got `--trainer.strategy` _NoPer"),
        ({"automatic_optimization": False}, {}, r"sets `automatic_optimization = False`"),
    ],
    ids=["vmap", "execution_auto", "strategy_without_the_capability", "manual_optimization"],
)
def test_auto_falls_back_to_the_summed_backward_and_says_why_once(
    caplog: pytest.LogCaptureFixture,
    module_kwargs: dict[str, Any],
    trainer_overrides: dict[str, Any],
    reason: str,
) -> None:
    manual = module_kwargs.pop("automatic_optimization", True) is False

    class Module(_CountingModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.automatic_optimization = not manual

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.automatic_optimization:
                return super().training_step(batch, batch_idx)
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.repeat(self.num_members))
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
            return loss

    module = Module(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd(), **module_kwargs)
    messages = _auto_fit(caplog, module, **trainer_overrides)
    assert len(messages) == 1, messages  # once, at setup, not per step
    assert "training with one backward of the summed loss" in messages[0]
    assert re.search(reason, messages[0]), messages[0]
    assert module.per_member_steps == 0 and module.global_step == 2  # it trained, summed


def test_true_refuses_where_auto_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    module = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd(), memory_frugal=True
    )
    with pytest.raises(
        ValueError, match=r"`--model.memory_frugal true`.*`--trainer.strategy` _NoPerMemberBackward"
    ):
        _auto_fit(caplog, module, strategy=_NoPerMemberBackward(torch.device("cpu")))
    module = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd(), memory_frugal=False
    )
    assert (
        _auto_fit(caplog, module, strategy=_NoPerMemberBackward(torch.device("cpu"))) == []
    )  # false: silent


def test_auto_under_data_parallel_ddp_trains_summed(
    caplog: pytest.LogCaptureFixture, in_process_group: None
) -> None:
    module = _CountingModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd())
    (message,) = _auto_fit(caplog, module, strategy="ddp")
    assert (
        "`--trainer.strategy` DDPStrategy" in message and "Memory-frugal training back-propagates" in message
    )
    assert module.per_member_steps == 0 and module.global_step == 2
