"""``EnsembleLightningModule``: M independently initialised members trained in one Lightning module.

Implements the setting of Kondratyuk et al. 2020 (arXiv 2005.00570): members share an architecture (or
not: mixed architectures are allowed) and differ in their random initialisation, are trained on the same
batches, and their predictions are averaged at evaluation.

Semantics that make the ensemble exactly M separate runs:

- the training loss is the SUM of the members' losses, so every member receives exactly the gradient it
  would receive alone (peers that average the losses shrink each gradient by 1/M);
- the optimizer has one parameter group per member and gradient clipping is applied per member;
- a non-finite loss is reported with the member and the step it came from.

By default (``memory_frugal="auto"``) the same summed loss is differentiated one member at a time (each
member's forward, then its backward) wherever that is exact, so only one member's activations are alive at
once; gradients are bit-identical.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import AttributeDict
from torch import Tensor, nn
from typing_extensions import override

from lightning_ensembles._compat import CLI_INSTANTIATOR_KEY, backward_skipped, initial_hparams
from lightning_ensembles._validation import check_checkpoint_file, check_choice, check_int, check_shape
from lightning_ensembles.aggregation import Aggregation, cumulative_log_probs, validate_aggregation
from lightning_ensembles.calibration import MODES as TEMPERATURE_MODES
from lightning_ensembles.calibration import EvaluationLogits, fit_temperature, scale
from lightning_ensembles.fused import EXECUTIONS, check_fusable, choose_execution, vmap_forward
from lightning_ensembles.members import (
    MemberFactory,
    MemberSpec,
    build_members,
    describe_factory,
    is_plain_data,
    load_member_state_dicts,
    load_member_weights,
    resolve_member_spec,
)
from lightning_ensembles.metrics import EnsembleMetrics, MemberLossMean
from lightning_ensembles.ood import OODMetrics
from lightning_ensembles.uncertainty import uncertainty_scores

__all__ = ["EnsembleLightningModule", "as_ensemble"]

log = logging.getLogger(__name__)

_RNG_KEY = "lightning_ensembles_rng"
_INPUT_SHAPE_KEY = "lightning_ensembles_input_shape"


class EnsembleLightningModule(LightningModule):
    """An ensemble of ``M`` independently initialised members.

    Give either ``member`` (one factory, built ``num_members`` times) or ``members`` (one factory or module
    per member, for mixed architectures or already-trained members).

    Args:
        member: a callable returning a fresh ``nn.Module`` (a class, a ``functools.partial``, or on the CLI a
            ``class_path``/``init_args`` entry), or a timm model name (``"resnet18"``: a
            :class:`~lightning_ensembles.models.TimmModel`); member ``i`` is built under seed ``seed + i``.
        num_members: ``M`` when ``member`` is given; with ``members`` it defaults to (and must equal) their
            count.
        members: one factory, timm model name or ``nn.Module`` per member. Modules are used as they are.
        num_classes: ``C``, the size of every member's output; linked from ``--data.num_classes`` by the CLI.
            A member factory that takes ``num_classes`` and leaves it unset (``TimmModel``'s default) is given
            this one.
        seed: base seed of member initialisation.
        aggregation: ``"mean_probs"`` (default), ``"mean_logits"`` or ``"vote"``.
        label_smoothing: label smoothing of each member's training cross-entropy, in ``[0, 1)``. With soft
            training targets ``(B, C)`` (Mixup/CutMix, smoothed by the datamodule) it warns once: keep it 0.
        optimizer: called with one parameter group per trainable member (``name`` = ``member_{i}``).
        lr_scheduler: called with the optimizer; stepped every ``lr_scheduler_interval``.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``.
        frozen_members: indices of members that are not trained (kept in eval mode, excluded from the
            optimizer); :meth:`grow` sets this.
        predict_members: if true, ``predict_step`` also returns each member's probabilities.
        detect_nonfinite: check every training step for a NaN/inf member loss (one device sync per step).
        channels_last: keep 4-d weights and inputs in ``torch.channels_last`` memory format (faster convolutions
            on GPUs with tensor cores, especially under AMP).
        execution: ``"loop"`` runs members one after another; ``"vmap"`` runs identical members as one
            vectorised computation (:mod:`lightning_ensembles.fused`: same outputs, gradients and BatchNorm
            statistics); ``"auto"`` times both once on the first batch and keeps the faster, and uses the
            loop for mixed architectures.
        compile: compile every member with ``torch.compile`` (``nn.Module.compile``: in place, so parameter names
            and checkpoints are unchanged); compilation happens at the first batch.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"eager"`` to debug).
        ood_criteria: OOD scores evaluated when the test datamodule has an OOD loader
            (:mod:`~lightning_ensembles.ood`: ``msp``, ``entropy``, ``mutual_information``); ``None``: each that
            applies (MI needs ``M >= 2``).
        temperature_scaling: ``"none"``, ``"ensemble"`` or ``"members"`` post-hoc temperature scaling. One
            temperature for the aggregated prediction, or one per member before aggregation
            (:mod:`~lightning_ensembles.calibration`), fitted on the validation split at the end of every
            validation epoch and applied at test and predict; buffers, so checkpoints keep them.
        memory_frugal: differentiate the summed loss one member at a time: member ``m``'s forward, loss and
            backward run before member ``m + 1``'s forward, so only one member's activations are alive at once
            (peak activation memory of one member instead of ``M``). Gradients, clipping, AMP loss scaling,
            gradient accumulation, NaN reporting and checkpoints are bit-identical to one backward of the
            summed loss; see :meth:`training_step`. It needs one device or a strategy that declares
            ``supports_per_member_backward`` (``member_parallel``; data-parallel ``ddp``, FSDP and DeepSpeed
            reduce one backward of all members), Lightning's own precision plugins and its automatic
            optimization. ``"auto"`` (default): on wherever that holds and ``execution`` is ``"loop"``, else
            one backward of the summed loss, said once at setup. ``True``: on, and a setting under which it
            is not exact is refused at setup (with ``execution="auto"`` training then uses the loop; ``"vmap"``
            is refused here). ``False``: always one backward of the summed loss.

    Raises:
        ValueError: for an invalid argument, naming its CLI flag, the value and what is allowed.
        TypeError: if a member factory returns something that is not an ``nn.Module``.

    Example:
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> module(torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])
    """

    member_temperature: Tensor
    """The members' temperatures ``(M,)`` (ones unless ``temperature_scaling="members"`` has fitted them)."""
    ensemble_temperature: Tensor
    """The ensemble's temperature (one unless ``temperature_scaling="ensemble"`` has fitted it)."""

    def __init__(
        self,
        member: MemberFactory | str | None = None,
        num_members: int | None = None,
        members: list[MemberFactory | str] | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        aggregation: Aggregation = "mean_probs",
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        frozen_members: Sequence[int] = (),
        predict_members: bool = False,
        detect_nonfinite: bool = True,
        channels_last: bool = False,
        execution: Literal["loop", "vmap", "auto"] = "loop",
        compile: bool = False,
        compile_backend: str = "inductor",
        ood_criteria: Sequence[str] | None = None,
        temperature_scaling: Literal["none", "ensemble", "members"] = "none",
        memory_frugal: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        specs = self._member_specs(member, num_members, members)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(
                "Expected `--model.num_classes` to be an int >= 2 (the CLI links it from "
                f"`--data.num_classes`), but got {num_classes!r}."
            )
        if not isinstance(seed, int):
            raise ValueError(f"Expected `--model.seed` to be an int, but got {seed!r}.")
        validate_aggregation(aggregation)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"Expected `--model.label_smoothing` to be in [0, 1), but got {label_smoothing!r}."
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                "Expected `--model.lr_scheduler_interval` to be 'epoch' or 'step', "
                f"but got {lr_scheduler_interval!r}."
            )
        specs = [
            resolve_member_spec(spec, num_classes, _spec_name(member, i)) for i, spec in enumerate(specs)
        ]
        self.save_hyperparameters()
        self._record_factories()
        for key in [k for k, v in self.hparams.items() if not is_plain_data(v)]:
            # Other code (lambdas, local classes, optimizers) is not data: checkpoints stay
            # `weights_only=True`-loadable and `load_from_checkpoint` takes it as arguments. Under LightningCLI
            # the hyperparameters are config dicts and kept.
            del self.hparams[key]
        self._member_spec = member
        self.num_classes = num_classes
        self.seed = seed
        self.aggregation = aggregation
        self.label_smoothing = label_smoothing
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.predict_members = predict_members
        self.detect_nonfinite = detect_nonfinite
        self.channels_last = channels_last
        self._own_hparams: dict[str, Any] | None = None
        self._warned_padding: set[str] = set()
        self.execution = check_choice(execution, "--model.execution", EXECUTIONS)
        self._auto_choice: str | None = None
        self.members = nn.ModuleList(build_members(specs, seed))
        if channels_last:
            self.members.to(memory_format=torch.channels_last)
        self.frozen_members: tuple[int, ...] = ()
        self._set_frozen(frozen_members)
        self._assigned: tuple[int, ...] | None = None  # set by MemberParallelStrategy
        self.ood_criteria = ood_criteria  # checked by OODMetrics in _make_metrics (and again after grow)
        self.temperature_scaling = check_choice(
            temperature_scaling, "--model.temperature_scaling", TEMPERATURE_MODES
        )
        # Identity (1) until fitted; buffers, so checkpoints carry them and a loaded module predicts calibrated.
        self.register_buffer("member_temperature", torch.ones(len(self.members)))
        self.register_buffer("ensemble_temperature", torch.ones(()))
        self._make_metrics()
        if execution == "vmap":
            check_fusable(list(self.members))
        if not isinstance(memory_frugal, bool) and memory_frugal != "auto":
            raise ValueError(
                f"Expected `--model.memory_frugal` to be true, false or 'auto', but got {memory_frugal!r}."
            )
        if memory_frugal is True and execution == "vmap":
            raise ValueError(
                "`--model.memory_frugal true` runs each member's forward and backward on its own, which the fused "
                "`--model.execution vmap` cannot (it runs all members as one computation), but got 'vmap'. Use "
                "`--model.execution loop` (or `auto`, which trains with the loop when memory_frugal is on), or "
                "`--model.memory_frugal false`."
            )
        self.memory_frugal: bool | Literal["auto"] = memory_frugal
        # whether this fit differentiates member by member: `memory_frugal` resolved at setup
        self._frugal_active = False
        # memory_frugal: this step's gradients were zeroed (and computed) in `training_step` already
        self._zeroed_in_step = False
        if compile and execution != "loop":
            raise ValueError(
                f"`--model.compile true` compiles each member on its own and needs `--model.execution loop`, but got "
                f"{execution!r}: vmap over compiled members is not supported."
            )
        self.compile_backend = compile_backend
        if compile:
            for member in self.members:
                member.compile(backend=compile_backend)

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _member_specs(
        member: MemberSpec | None, num_members: int | None, members: Sequence[MemberSpec] | None
    ) -> list[MemberSpec]:
        if num_members is not None:
            check_int(num_members, "--model.num_members", 1)
        if (member is None) == (members is None):
            raise ValueError(
                "Expected exactly one of `--model.member` (one factory, repeated `--model.num_members` "
                "times) or `--model.members` (a list, one per member), but got "
                + ("neither." if member is None else "both.")
            )
        if members is not None:
            members = list(members)
            if not members:
                raise ValueError("Expected `--model.members` to hold at least one member, but got [].")
            if num_members is not None and num_members != len(members):
                raise ValueError(
                    f"Expected `--model.num_members` to equal the {len(members)} entries of "
                    f"`--model.members` (or be left unset), but got {num_members}."
                )
            return members
        if isinstance(member, nn.Module) and (num_members or 1) > 1:
            raise ValueError(
                "Expected `member` to be a factory when `num_members` > 1 (an nn.Module instance cannot be "
                f"initialised independently {num_members} times), but got a {type(member).__name__} module."
            )
        return [member] * (num_members or 1)  # type: ignore[list-item]

    def _record_factories(self) -> None:
        """Keep ``member``/``members`` given in Python as data (class path and arguments) where they are a class
        or a ``functools.partial`` of one with plain arguments, so ``load_from_checkpoint(path)`` needs no
        arguments, as for CLI checkpoints."""
        for key in ("member", "members"):
            value = self.hparams.get(key)
            if value is None or is_plain_data(value):
                continue
            described: Any = (
                [describe_factory(v) for v in value] if key == "members" else describe_factory(value)
            )
            if described is not None and (key == "member" or all(d is not None for d in described)):
                self.hparams[key] = described

    def _set_frozen(self, frozen_members: Sequence[int]) -> None:
        frozen = tuple(sorted(set(int(i) for i in frozen_members)))
        bad = [i for i in frozen if not 0 <= i < len(self.members)]
        if bad or len(frozen) == len(self.members):
            raise ValueError(
                f"Expected `--model.frozen_members` to be distinct member indices in [0, {len(self.members)}) "
                f"that leave at least one member to train, but got {list(frozen_members)}."
            )
        self.frozen_members = frozen
        for i, member in enumerate(self.members):
            member.requires_grad_(i not in frozen)
            if i in frozen:
                member.eval()

    def _make_metrics(self) -> None:
        self.train_member_loss = MemberLossMean(len(self.members))
        self.val_metrics = EnsembleMetrics(len(self.members), self.num_classes, self.aggregation)
        self.test_metrics = EnsembleMetrics(len(self.members), self.num_classes, self.aggregation)
        self.val_logits = EvaluationLogits()  # filled only with temperature scaling
        self.test_ood_metrics = OODMetrics(
            len(self.members), self.num_classes, self.aggregation, self.ood_criteria
        )

    @property
    def num_members(self) -> int:
        """``M``, the number of members."""
        return len(self.members)

    @property
    def trainable_members(self) -> list[int]:
        """Indices of the members that are trained (all but the frozen ones)."""
        return [i for i in range(len(self.members)) if i not in self.frozen_members]

    @property
    def local_members(self) -> list[int]:
        """Indices of the trainable members this process trains: all of them unless a member-parallel
        strategy (:class:`~lightning_ensembles.distributed.MemberParallelStrategy`) assigned a subset."""
        if self._assigned is None:
            return self.trainable_members
        return [i for i in self.trainable_members if i in self._assigned]

    def assign_members(self, indices: Sequence[int] | None) -> None:
        """Train only ``indices`` in this process (``None``: every trainable member).

        The other members are still held, evaluated and checkpointed, but get no forward pass, loss or
        gradient in ``training_step``. :class:`~lightning_ensembles.distributed.MemberParallelStrategy` calls
        this; it is not a way to freeze members (see ``frozen_members``).

        Args:
            indices: member indices in ``[0, M)``, or ``None``.

        Raises:
            ValueError: if an index is out of range.
        """
        if indices is None:
            self._assigned = None
            return
        chosen = tuple(sorted({int(i) for i in indices}))
        if any(not 0 <= i < len(self.members) for i in chosen):
            raise ValueError(
                f"Expected member indices in [0, {len(self.members)}) to assign to this process, but got "
                f"{list(indices)}."
            )
        self._assigned = chosen

    # ------------------------------------------------------------------ forward

    def _stack(self, outputs: list[Tensor], indices: Sequence[int]) -> Tensor:
        expected = (outputs[0].shape[0], self.num_classes)
        for i, out in zip(indices, outputs):
            if not isinstance(out, Tensor) or out.ndim != 2 or tuple(out.shape) != expected:
                shapes = {f"member {j}": tuple(o.shape) for j, o in zip(indices, outputs)}
                raise ValueError(
                    f"Expected every member to output logits of shape (B, C) = {expected} "
                    f"(C = `--model.num_classes`, linked from `--data.num_classes`), but member {i} gave "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; "
                    f"member outputs: {shapes}. A member whose own num_classes is set (e.g. "
                    "`--model.member.init_args.num_classes`) must match; leave it unset (null) where the "
                    "member takes it from the ensemble."
                )
        return torch.stack(outputs)

    def member_logits(self, x: Tensor, indices: Sequence[int] | None = None) -> Tensor:
        """Logits of the selected members.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.
            indices: which members (default: all), in order.

        Returns:
            Shape ``(len(indices), B, C)``.

        Raises:
            ValueError: if ``indices`` is empty or holds anything but member indices ``0..M-1``.
        """
        num_members = len(self.members)
        indices = list(range(num_members) if indices is None else indices)
        bad = [
            i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_members
        ]
        if bad or not indices:
            raise ValueError(
                f"Expected `indices` of member_logits to be a non-empty list of member indices in "
                f"[0, {num_members - 1}] (the ensemble has {num_members} members), but got {list(indices)}."
            )
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        members = [self.members[i] for i in indices]
        if len(members) > 1 and self._execution_for(members, x) == "vmap":
            logits = vmap_forward(members, x)
            expected = (len(members), x.shape[0], self.num_classes)
            if tuple(logits.shape) != expected:
                raise ValueError(
                    f"Expected the fused members to output logits of shape (M, B, C) = {expected} "
                    f"(C = `--model.num_classes`), but got {tuple(logits.shape)}."
                )
            return logits
        return self._stack([member(x) for member in members], indices)

    def _execution_for(self, members: list[nn.Module], x: Tensor) -> str:
        if self.execution != "auto":
            return self.execution
        if self._auto_choice is None:
            self._auto_choice = choose_execution(members, x)
        return self._auto_choice

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits of every member.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.

        Returns:
            Logits of shape ``(M, B, C)``.
        """
        return self.member_logits(x)

    @override
    def train(self, mode: bool = True) -> EnsembleLightningModule:
        super().train(mode)
        for i in self.frozen_members:
            self.members[i].eval()
        return self

    def summary(self, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
        """What a run is, for the HParams dashboard and results tables.

        Args:
            input_shape: one sample's shape; when given, multiply-adds are counted (meta device, no compute).

        Returns:
            ``architecture`` (e.g. ``"WRN-16-2"``, ``"+"``-joined when mixed), ``num_members``, ``depth`` and
            ``width`` when every member has them and they agree, ``member_gmacs`` (mean) and
            ``ensemble_gmacs`` when ``input_shape`` is given.
        """
        from lightning_ensembles.cost import member_macs
        from lightning_ensembles.results import member_name

        names = sorted({member_name(m) for m in self.members})
        info: dict[str, Any] = {"architecture": "+".join(names), "num_members": len(self.members)}
        for attribute in ("depth", "width"):
            values = {getattr(m, attribute, None) for m in self.members}
            if len(values) == 1 and isinstance(next(iter(values)), int):
                info[attribute] = values.pop()
        if input_shape is not None:
            macs = [member_macs(m, input_shape, scope=self._trainer) for m in self.members]  # shared in a run
            info["member_gmacs"] = sum(macs) / len(macs) / 1e9
            info["ensemble_gmacs"] = sum(macs) / 1e9
        return info

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._frugal_active = self._resolve_memory_frugal()
        if stage == "fit" and self.temperature_scaling != "none":
            self._check_validation_split()
        # Lightning logs `hparams_initial` to the loggers (TensorBoard's HParams dashboard) right after setup;
        # the summary goes there only, so checkpoints keep exactly the constructor's arguments.
        datamodule = getattr(self.trainer, "datamodule", None)
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None and self.input_shape is None:
            self.record_input_shape(input_shape)
        try:
            summary = self.summary(input_shape)
        except ValueError as err:  # informational only: a shape that does not fit fails later, with context
            rank_zero_warn(f"Could not count multiply-adds for the HParams summary: {err}")
            summary = self.summary()
        # Logged under `model/`: Lightning merges module and datamodule hparams for the loggers and fails on a
        # shared key with different values (both have `seed`, for instance).
        initial = cast(AttributeDict, initial_hparams(self))
        if self._own_hparams is None:
            self._own_hparams = {k: v for k, v in initial.items() if not k.startswith("_")}
        initial.clear()
        initial.update({f"model/{k}": v for k, v in self._own_hparams.items()})
        initial.update({f"ensemble/{k}": v for k, v in summary.items()})

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One sample's shape without the batch axis, as the module saw it: from the datamodule's
        ``input_shape`` at ``setup``, else from the first batch; kept in checkpoints. ``None`` until known."""
        return getattr(self, "_input_shape", None)

    def record_input_shape(self, shape: Sequence[int]) -> None:
        """Record one sample's shape (see :attr:`input_shape`) and set Lightning's ``example_input_array``.

        With ``example_input_array`` set, Lightning's model summary counts the ensemble's FLOPs, and export
        needs no ``--input_shape``.

        Args:
            shape: one sample's shape without the batch axis, e.g. ``(1, 28, 28)``.

        Raises:
            ValueError: if ``shape`` is not a non-empty sequence of ints >= 1.
        """
        self._input_shape = check_shape(shape, "input_shape")
        self.example_input_array = torch.zeros(1, *self._input_shape)

    @override
    def configure_callbacks(self) -> list[Callback]:
        trainer = self._trainer
        if trainer is not None and any(
            isinstance(c, _NameUnreadableCheckpoint) for c in getattr(trainer, "callbacks", [])
        ):
            return []  # added by an earlier fit/test of this trainer: adding it again makes Lightning say so
        return [_NameUnreadableCheckpoint()]

    # ------------------------------------------------------------------ steps

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        """The sum of the local members' cross-entropy losses (see the module docstring).

        With ``memory_frugal`` (and more than one member to train in this process) the gradients of that sum
        are computed here, one member at a time, and the returned sum carries no graph:

        1. on the first batch of an accumulation window (when Lightning would zero them, after this step)
           the optimizer's gradients are zeroed with ``optimizer.zero_grad()``, and Lightning's own
           ``optimizer_zero_grad`` of this step is skipped;
        2. for each member ``m`` in order: its forward and loss ``loss_m``, then the backward of ``loss_m``
           exactly as Lightning would transform the returned sum: divided by
           ``trainer.accumulate_grad_batches``, multiplied by the precision plugin's ``GradScaler`` scale if
           it has one, outside autocast. The upstream gradient reaching ``loss_m`` is therefore the same
           number, computed by the same operations, as when Lightning back-propagates the sum (the other
           terms of the sum contribute nothing to ``θ_m``), so every gradient is bit-identical; then the
           member's graph and activations are freed before the next member's forward;
        3. the detached sum is returned as a leaf that requires grad: Lightning's backward of it reaches no
           parameter, and everything after it (``on_after_backward``, per-member clipping, the scaler's
           unscale, inf check, step and update, the optimizer step) sees the same gradients as by default.

        Forwards run in the same member order as by default, so dropout masks and BatchNorm statistics are
        the same. A non-finite loss is reported after the members' backward passes (one device sync, as by
        default), with the same member and message, before any optimizer step.

        Why this way: Lightning's automatic optimization stays in charge, so ``--trainer.gradient_clip_val``,
        ``accumulate_grad_batches``, precision plugins and every hook keep working (manual optimization would
        forbid Trainer-level clipping and accumulation). A custom autograd Function that hands stashed
        gradients to Lightning's backward would need the upstream gradient before Lightning computes it and a
        second copy of every gradient; here each backward is the one Lightning would run, per member.

        Returns:
            The summed loss (detached, a leaf requiring grad, with ``memory_frugal``), or ``None`` when this
            process has no member to train.

        Raises:
            FloatingPointError: if a member's loss is NaN/inf (with ``detect_nonfinite``), naming the member
                and the step.
        """
        x, y = batch
        if self.input_shape is None:
            self.record_input_shape(x.shape[1:])
        soft = isinstance(y, Tensor) and y.is_floating_point()
        if soft and self.label_smoothing > 0 and batch_idx == 0 and self.global_step == 0:
            rank_zero_warn(
                "The training targets are soft (B, C), e.g. Mixup/CutMix targets, which the datamodule smooths "
                "itself (`--data.label_smoothing`); `--model.label_smoothing` > 0 smooths them a second time. "
                "Set it to 0."
            )
        indices = self.local_members
        self._zeroed_in_step = False
        if not indices:  # member-parallel: every member of this process is frozen
            return None
        frugal = self._per_member_backward(indices)
        if frugal:
            losses = self._backward_per_member(x, y, indices, batch_idx)
        else:
            logits = self.member_logits(x, indices)
            losses = torch.stack(
                [
                    F.cross_entropy(logits[j], y, label_smoothing=self.label_smoothing)
                    for j in range(len(indices))
                ]
            )
        if self.detect_nonfinite and not bool(torch.isfinite(losses).all()):
            j = int((~torch.isfinite(losses)).nonzero()[0])
            raise FloatingPointError(
                f"Member {indices[j]} produced a non-finite training loss ({losses[j].item()}) at global step "
                f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}). The other members are "
                "unaffected; lower the learning rate or enable gradient clipping (`--trainer.gradient_clip_val`,"
                " applied per member)."
            )
        loss = losses.sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/member_{i}/loss": losses[j] for j, i in enumerate(indices)})
        self.train_member_loss.update(losses, indices)
        if frugal:  # the gradients are computed: a leaf, whose backward by Lightning reaches no parameter
            return loss.requires_grad_()
        return loss

    def _per_member_backward(self, indices: Sequence[int]) -> bool:
        """Whether this step computes its gradients member by member (``memory_frugal``).

        With one member to train the per-member backward is the backward of the sum, so Lightning's is kept
        (this also keeps DDP inside a member group of ``member_parallel`` untouched); and when Lightning skips
        the backward of this step (``trainer.fit_loop._skip_backward``, set by StochasticWeightAveraging)
        so does this module.
        """
        if not self._frugal_active or len(indices) < 2 or self._trainer is None:
            return False
        return not backward_skipped(self.trainer)

    def _backward_per_member(self, x: Tensor, y: Tensor, indices: Sequence[int], batch_idx: int) -> Tensor:
        """Zero the gradients when Lightning would, then each member's forward, loss and backward in turn.

        Args:
            x: the inputs ``(B, ...)``.
            y: the targets ``(B,)``.
            indices: the members to train, in order.
            batch_idx: the batch index Lightning's accumulation window is counted in.

        Returns:
            The members' detached losses ``(len(indices),)``.
        """
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # Lightning's `_make_zero_grad_fn` condition
            for optimizer in trainer.optimizers:
                optimizer.zero_grad()
            self._zeroed_in_step = True  # so Lightning's zero_grad after this step is skipped
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        losses = []
        for i in indices:
            loss = F.cross_entropy(self.member_logits(x, [i])[0], y, label_smoothing=self.label_smoothing)
            # the transformations Lightning applies to the returned sum, in its order: the closure divides by
            # the accumulation count, the precision plugin's `pre_backward` scales
            closure_loss = loss / accumulate
            if scaler is not None:
                closure_loss = scaler.scale(closure_loss)
            # Lightning's backward runs outside `train_step_context`: autocast does not reach autograd's own
            # backward kernels, but Python code run by the backward (tensor hooks, custom Functions) it would
            with _autocast_disabled():
                closure_loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses)

    @override
    def on_train_epoch_end(self) -> None:
        # Every member's epoch-mean loss, whichever process trained it (member-parallel logs each member's
        # per-step loss on its own process only).
        means = self.train_member_loss.compute().reshape(-1)  # a collective under DDP: every process calls it
        self.train_member_loss.reset()
        self.log_dict(
            {
                f"train/member_{i}/loss_epoch": means[i]
                for i in self.trainable_members
                if not means[i].isnan()
            },
            sync_dist=True,
        )

    def _evaluation_step(
        self, batch: tuple[Tensor, Tensor], metrics: EnsembleMetrics, calibrated: bool = True
    ) -> dict[str, Tensor]:
        x, y = batch
        if self.input_shape is None:
            self.record_input_shape(x.shape[1:])
        logits = self(x)
        if calibrated and self.temperature_scaling != "none":
            logits = self._with_member_temperatures(logits)
            first_k = metrics.update(logits, y, temperature=self.ensemble_temperature)
        else:
            first_k = metrics.update(logits, y)
        # Returned so callbacks (the ensemble-size ablation, the cascade monitor) read them in
        # `on_*_batch_end`: the members' logits, with their temperatures at test (the ensemble's temperature
        # acts on the aggregate only), and the first-k ensembles the metrics aggregated, so that no callback
        # aggregates them again.
        return {"logits": logits.detach(), "target": y, "first_k_log_probs": first_k}

    def evaluation_metrics(self, stage: str) -> EnsembleMetrics:
        """The metrics this module accumulates over the current ``"val"`` or ``"test"`` epoch.

        Callbacks read their values (``size_{k}/...``: the first ``k`` members) in their own
        ``on_*_epoch_end``, which Lightning calls before the module's, where they are logged and reset;
        :meth:`~torchmetrics.Metric.compute` caches, so they are synchronised across processes once.

        Raises:
            ValueError: for another stage.
        """
        if stage not in ("val", "test"):
            raise ValueError(f"Expected `stage` to be 'val' or 'test', but got {stage!r}.")
        return self.val_metrics if stage == "val" else self.test_metrics

    def calibrated_log_probs(self, logits: Tensor) -> Tensor:
        """The ensemble's log-probabilities ``(B, C)`` from member logits ``(M, B, C)``, at the fitted
        temperatures (the identity until :attr:`temperature_scaling` has fitted them)."""
        log_probs = cumulative_log_probs(self._with_member_temperatures(logits.float()), self.aggregation)[-1]
        return scale(log_probs, self.ensemble_temperature)

    def _with_member_temperatures(self, logits: Tensor) -> Tensor:
        return logits / self.member_temperature.view(-1, 1, 1)

    def _log_metrics(self, stage: str, metrics: EnsembleMetrics) -> None:
        values = metrics.compute()  # synchronised across processes by torchmetrics
        metrics.reset()
        # Already equal on every process; `sync_dist` only averages equal values (and tells Lightning so).
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, sync_dist=True)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        # Uncalibrated: the temperatures are fitted on these logits at the epoch's end.
        outputs = self._evaluation_step(batch, self.val_metrics, calibrated=False)
        if self.temperature_scaling != "none" and not self.trainer.sanity_checking:
            self.val_logits.update(outputs["logits"], outputs["target"])
        return outputs

    @override
    def on_validation_start(self) -> None:
        self._warn_if_padded("val", self.trainer.val_dataloaders)

    @override
    def on_test_start(self) -> None:
        self._warn_if_padded("test", self.trainer.test_dataloaders)

    def _warn_if_padded(self, stage: str, loaders: Any) -> None:
        """Say once per stage when Lightning's padding ``DistributedSampler`` makes samples count twice."""
        from lightning_ensembles.data.sampling import padded_samples

        if self.trainer.world_size < 2 or stage in self._warned_padding:
            return
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        repeated = sum(padded_samples(loader) for loader in loaders if loader is not None)
        if repeated:
            self._warned_padding.add(stage)
            rank_zero_warn(
                f"The {stage} loader's DistributedSampler repeats {repeated} sample(s) to even out the "
                f"{self.trainer.world_size} processes' shards, so {stage}/ metrics count them twice. Give the "
                "datamodule's evaluation loaders `sampler=lightning_ensembles.data.sampling.evaluation_sampler"
                "(dataset)` (or use `make_loader`, as the library's datamodules do) to evaluate every sample "
                "exactly once."
            )

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        if self.temperature_scaling != "none" and not self.trainer.sanity_checking:
            self._fit_temperatures()

    def _check_validation_split(self) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        flag = f"`--model.temperature_scaling {self.temperature_scaling}`"
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "val_size", None) == 0:
            raise ValueError(
                f"{flag} fits its temperatures on a validation split of its own, but `--data.val_size` is 0 "
                "(validation runs on the test split, so fitting there would tune on the test set). Set "
                "`--data.val_size` > 0, or `--model.temperature_scaling none`."
            )
        no_loader = datamodule is not None and not is_overridden("val_dataloader", datamodule)
        if no_loader or self.trainer.limit_val_batches == 0:
            raise ValueError(
                f"{flag} fits its temperatures on the validation split, but this run has none (no "
                "`val_dataloader`, or `--trainer.limit_val_batches 0`). Give it a validation split, or set "
                "`--model.temperature_scaling none`."
            )

    def _fit_temperatures(self) -> None:
        """Fit the temperatures on this validation epoch's logits (gathered from every process, so each fits
        the same values) and log the validation NLL and ECE before and after."""
        from torchmetrics.functional.classification import multiclass_calibration_error

        from lightning_ensembles.metrics import ECE_BINS

        logits, target = self.val_logits.compute()
        self.val_logits.reset()
        before = cumulative_log_probs(logits, self.aggregation)[-1]
        if self.temperature_scaling == "members":
            member = torch.tensor(
                [fit_temperature(member_logits, target) for member_logits in logits], device=logits.device
            )
            self.member_temperature.copy_(member)
            self.ensemble_temperature.fill_(1.0)
        else:
            self.member_temperature.fill_(1.0)
            self.ensemble_temperature.fill_(fit_temperature(before, target))
        after = self.calibrated_log_probs(logits)
        values: dict[str, Tensor | float] = {}
        for name, log_probs in (("uncalibrated", before), ("calibrated", after)):
            values[f"val/{name}/nll"] = F.nll_loss(log_probs.clamp_min(-1e4), target)
            values[f"val/{name}/ece"] = multiclass_calibration_error(
                log_probs.exp(), target, self.num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False
            )
        if self.temperature_scaling == "members":
            values.update({f"val/member_{i}/temperature": t for i, t in enumerate(self.member_temperature)})
        else:
            values["val/temperature"] = self.ensemble_temperature
        # equal on every process already (gathered logits); `sync_dist` tells Lightning so
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}, sync_dist=True)

    @override
    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor] | None:
        """Loader 0 (in-distribution): the test metrics and the OOD metrics' negatives; loader 1 (an OOD set,
        :mod:`~lightning_ensembles.ood`): the OOD metrics' positives only, its labels (if any) ignored.

        Returns:
            ``{"logits": (M, B, C), "target": (B,), "first_k_log_probs": (M, B, C)}`` for loader 0 (see
            :meth:`~lightning_ensembles.metrics.EnsembleMetrics.update`), ``{"logits": (M, B, C)}`` for loader
            1 (``None`` when ``ood_criteria`` is ``[]``).

        Raises:
            ValueError: for a third test loader, or an OOD batch whose per-sample shape differs from loader 0's.
        """
        if dataloader_idx == 0:
            self.test_ood_metrics.check_inputs(batch[0], is_ood=False)
            outputs = self._evaluation_step(batch, self.test_metrics)
            self.test_ood_metrics.update(outputs["logits"], is_ood=False, temperature=self._ood_temperature())
            return outputs
        if dataloader_idx != 1:
            raise ValueError(
                "Expected at most two test loaders, [in_distribution, ood] (dataloader_idx 0 and 1), but got a "
                f"batch from dataloader_idx {dataloader_idx}."
            )
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.test_ood_metrics.check_inputs(x, is_ood=True)
        if not self.test_ood_metrics.criteria:
            return None
        logits = self(x).detach()
        if self.temperature_scaling != "none":  # the member temperatures loader 0's logits carry
            logits = self._with_member_temperatures(logits)
        self.test_ood_metrics.update(logits, is_ood=True, temperature=self._ood_temperature())
        return {"logits": logits}

    def _ood_temperature(self) -> Tensor | None:
        return self.ensemble_temperature if self.temperature_scaling == "ensemble" else None

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)
        ood = self.test_ood_metrics.compute()  # synchronised; empty unless an OOD sample was seen
        self.test_ood_metrics.reset()
        if ood:
            self.log_dict({f"test/ood/{name}": value for name, value in ood.items()}, sync_dist=True)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The prediction of every sample, with its uncertainty.

        Returns:
            ``probs``: the aggregated probabilities ``(B, C)``; ``msp``, ``entropy``, ``mutual_information``
            and ``variation_ratio``: per-sample scores ``(B,)`` (:func:`~lightning_ensembles.uncertainty.
            uncertainty_scores`); with ``predict_members`` also ``member_probs`` ``(M, B, C)``. All at the
            fitted temperatures (``temperature_scaling``).
            :func:`~lightning_ensembles.uncertainty.concat_predictions` joins the batches ``trainer.predict``
            returns.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        raw = self(x).float()
        logits, log_probs = self._with_member_temperatures(raw), self.calibrated_log_probs(raw)
        output = {"probs": log_probs.exp().clamp(0.0, 1.0), **uncertainty_scores(logits, log_probs=log_probs)}
        if self.predict_members:
            output["member_probs"] = logits.softmax(dim=-1)
        return output

    # ------------------------------------------------------------------ optimisation

    @override
    def configure_optimizers(self) -> Any:
        indices = self.trainable_members
        groups = [{"params": list(self.members[i].parameters()), "name": f"member_{i}"} for i in indices]
        optimizer = self.optimizer_factory(groups)
        self._check_optimizer(optimizer, groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if len(indices) > 1:
                raise ValueError(
                    "ReduceLROnPlateau (`--model.lr_scheduler`) would set every member's learning rate from "
                    "one ensemble-level metric, coupling members that must train independently; use a "
                    "schedule that does not monitor a metric (MultiStepLR, CosineAnnealingLR, ...)."
                )
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _check_optimizer(self, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
        name = type(optimizer).__name__
        if len(optimizer.param_groups) != len(groups) or any(
            {id(p) for p in g["params"]} != {id(p) for p in expected["params"]}
            for g, expected in zip(optimizer.param_groups, groups)
        ):
            raise ValueError(
                f"Expected `--model.optimizer` ({name}) to keep the {len(groups)} parameter groups it is given "
                f"(one per member), but it has {len(optimizer.param_groups)} groups that do not match them."
            )
        if len(groups) > 1:
            for key in ("max_grad_norm", "clip_threshold_global"):
                if optimizer.defaults.get(key) not in (None, 0, 0.0):
                    raise ValueError(
                        f"`--model.optimizer` {name} has {key}={optimizer.defaults[key]!r}, which rescales "
                        "gradients by their global norm across all parameter groups and so couples ensemble "
                        f"members. Set {key}=None and use `--trainer.gradient_clip_val`, which clips each "
                        "member separately."
                    )

    @override
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning's ``optimizer.zero_grad()``, skipped when ``memory_frugal`` has zeroed the gradients at
        the start of this step's ``training_step`` and computed them since."""
        if self._zeroed_in_step:
            self._zeroed_in_step = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _resolve_memory_frugal(self) -> bool:
        """Whether this fit differentiates member by member: ``true`` where it is exact (else an error),
        ``"auto"`` wherever it is exact (else the summed backward, said once at setup), ``false`` never."""
        if self.memory_frugal is False:
            return False
        if self.memory_frugal == "auto" and self.execution != "loop":
            rank_zero_info(
                f"`--model.memory_frugal auto`: training with one backward of the summed loss, because "
                f"`--model.execution {self.execution}` runs all members' forwards together. Memory-frugal "
                "training needs `--model.execution loop`; `--model.memory_frugal false` silences this."
            )
            return False
        refusal = self._memory_frugal_refusal()
        if refusal is None:
            return True
        if self.memory_frugal is True:
            raise ValueError(refusal)
        rank_zero_info(
            "`--model.memory_frugal auto`: training with one backward of the summed loss (every member's "
            "activations alive until it), because member-by-member backward is not exact here. "
            + refusal.replace("`--model.memory_frugal true` ", "Memory-frugal training ", 1)
        )
        return False

    def _memory_frugal_refusal(self) -> str | None:
        """Why the per-member backward would not be exact under this trainer, or ``None`` when it is."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        strategy = self.trainer.strategy
        # a strategy declares that a member's gradients may be computed by a backward of its own (nothing
        # reduces them across members): `MemberParallelStrategy.supports_per_member_backward`
        if not getattr(strategy, "supports_per_member_backward", isinstance(strategy, SingleDeviceStrategy)):
            return (
                "`--model.memory_frugal true` back-propagates each member on its own inside `training_step`, "
                f"which needs one device or `--trainer.strategy member_parallel`, but got `--trainer.strategy` "
                f"{type(strategy).__name__}. Data-parallel DDP (`ddp`, `ddp_spawn`, ...) wraps all members in one "
                "DistributedDataParallel that all-reduces one backward per forward, and sharded strategies (FSDP, "
                "DeepSpeed) run their own backward. Use `--trainer.strategy member_parallel` (each process trains "
                "its own members and no gradient crosses members), or `--model.memory_frugal false`."
            )
        plugin = type(strategy.precision_plugin)
        if plugin.pre_backward not in (Precision.pre_backward, MixedPrecision.pre_backward) or (
            plugin.backward is not Precision.backward
        ):
            return (
                "`--model.memory_frugal true` repeats the precision plugin's loss scaling for each member, which "
                f"it knows for Lightning's own plugins only, but got {plugin.__name__}, whose backward differs. "
                "Use `--trainer.precision` 32-true, 16-mixed, bf16-mixed, 16-true or bf16-true, or "
                "`--model.memory_frugal false`."
            )
        if not self.automatic_optimization or type(self).backward is not LightningModule.backward:
            return (
                "`--model.memory_frugal true` computes the gradients inside `training_step` under Lightning's "
                "automatic optimization with its default `backward`, but this module "
                + (
                    "sets `automatic_optimization = False`."
                    if not self.automatic_optimization
                    else f"({type(self).__name__}) overrides `backward`."
                )
                + " Set `--model.memory_frugal false`."
            )
        return None

    @override
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each member's gradients on their own, never by a norm over the whole ensemble."""
        if not gradient_clip_val:
            return
        for i in self.local_members:
            params = [p for p in self.members[i].parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[_RNG_KEY] = rng
        if self.input_shape is not None:
            checkpoint[_INPUT_SHAPE_KEY] = list(self.input_shape)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> EnsembleLightningModule:
        """Lightning's ``load_from_checkpoint``, after checking that the file is a readable checkpoint.

        Args:
            checkpoint_path: the checkpoint file (or a URL, left to Lightning).
            *args: forwarded to ``LightningModule.load_from_checkpoint``.
            **kwargs: forwarded too (``member=``/``members=`` for a Python-built ensemble, ``map_location``...).

        Returns:
            The module with the checkpoint's weights.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if it is truncated, corrupted or not loadable with ``weights_only=True`` (unless
                ``weights_only=False`` is passed), naming the file.
        """
        kwargs.setdefault("weights_only", True)  # explicit, whatever torch's default
        if kwargs["weights_only"] is not False:
            checkpoint = check_checkpoint_file(checkpoint_path, "checkpoint_path")
            given = any(kwargs.get(key) is not None for key in ("member", "members"))
            hparams = (
                checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) if isinstance(checkpoint, dict) else None
            )
            if isinstance(checkpoint, dict) and not given and not _recorded_architecture(hparams):
                raise ValueError(
                    f"Cannot load {os.fspath(checkpoint_path)!r} without `member=`: {_PYTHON_FACTORY_HINT}"
                )
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[return-value,arg-type]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and any(k.startswith("members.") for k in state):
            # checkpoints written before temperature scaling existed: the identity
            state.setdefault("member_temperature", torch.ones_like(self.member_temperature))
            state.setdefault("ensemble_temperature", torch.ones_like(self.ensemble_temperature))
        saved = len({k.split(".")[1] for k in checkpoint.get("state_dict", {}) if k.startswith("members.")})
        if saved and saved != len(self.members):
            raise ValueError(
                f"The checkpoint holds {saved} members but this module has {len(self.members)}: build the "
                f"module with `num_members={saved}` (or the matching `members` list)."
            )
        shape = checkpoint.get(_INPUT_SHAPE_KEY)
        if shape is not None and self.input_shape is None:
            self.record_input_shape(shape)
        rng = checkpoint.get(_RNG_KEY)
        # Restore the random state only when resuming training, so that a resumed run draws the same
        # dropout masks and augmentations as an uninterrupted one (numpy's too: timm's Mixup and CutMix draw
        # from np.random); loading for evaluation leaves it alone. Checkpoints written before numpy's state
        # was saved resume without it.
        if rng is not None and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_random_state(rng["python"]))
            if "numpy" in rng:
                _set_numpy_state(rng["numpy"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[str | os.PathLike[str]],
        member: MemberFactory | None = None,
        members: Sequence[MemberSpec] | None = None,
        **kwargs: Any,
    ) -> EnsembleLightningModule:
        """Combine separately trained checkpoints into one ensemble.

        Every member found in the checkpoints, in order, becomes a member of the new ensemble.

        Args:
            checkpoints: Lightning checkpoints of ensemble modules (any number of members each) or plain
                member ``state_dict`` files.
            member: the architecture of every member (a factory), or
            members: one factory per member found in the checkpoints (mixed architectures). With neither,
                each checkpoint's recorded architecture is used (CLI checkpoints, and Python-built ensembles
                whose factories are classes or partials of them with plain arguments).
            **kwargs: the other arguments of :class:`EnsembleLightningModule`; ``num_classes`` defaults to
                the checkpoints' when they record one.

        Returns:
            The combined ensemble, weights loaded.

        Raises:
            ValueError: if ``checkpoints`` is empty, the factory count differs from the member count, or a
                checkpoint comes from another architecture (naming the checkpoint and member).
        """
        if not checkpoints:
            raise ValueError("Expected `checkpoints` to name at least one checkpoint file, but got none.")
        per_checkpoint = [(os.fspath(path), load_member_state_dicts(path)) for path in checkpoints]
        found = [(path, j, state) for path, states in per_checkpoint for j, state in enumerate(states)]
        if member is None and members is None:
            members, num_classes = _recorded_members([(path, len(states)) for path, states in per_checkpoint])
            if kwargs.get("num_classes") is None and num_classes is not None:
                kwargs["num_classes"] = num_classes
        if members is not None and len(members) != len(found):
            raise ValueError(
                f"Expected one entry of `members` per member in the checkpoints ({len(found)}), "
                f"but got {len(members)}."
            )
        if member is not None:
            kwargs["num_members"] = len(found)
        module = cls(member=member, members=list(members) if members is not None else None, **kwargs)
        for i, (path, j, state) in enumerate(found):
            load_member_weights(module.members[i], state, f"member {j} of checkpoint {path!r}")
        return module

    def extract_member(self, index: int) -> nn.Module:
        """A copy of member ``index`` as a plain ``nn.Module`` (same device, same train/eval mode).

        Args:
            index: in ``[0, M)``.

        Returns:
            An independent copy: changing it does not change the ensemble.

        Raises:
            IndexError: for an index outside ``[0, M)``.
        """
        if not isinstance(index, int) or not 0 <= index < len(self.members):
            raise IndexError(f"Expected `index` in [0, {len(self.members)}), but got {index!r}.")
        return copy.deepcopy(self.members[index])

    def grow(self, num_new_members: int = 1, member: MemberSpec | None = None) -> None:
        """Add members and freeze the existing ones: the next ``fit`` trains only the new members.

        New member ``M + j`` is built under seed ``seed + M + j``, exactly as if the ensemble had been
        created with more members. The old members keep bit-identical weights and BatchNorm statistics
        (they are excluded from the optimizer and held in eval mode).

        Args:
            num_new_members: how many members to add (>= 1).
            member: the factory for the new members; defaults to this ensemble's ``member``.

        Raises:
            ValueError: for ``num_new_members < 1`` or no factory to build the new members from.
        """
        check_int(num_new_members, "num_new_members", 1)
        spec = member if member is not None else self._member_spec
        if spec is None:
            raise ValueError(
                "This ensemble was built from a `members` list: pass `member=` (a factory) to grow it."
            )
        old = len(self.members)
        device = next(self.parameters()).device
        for new in build_members([spec] * num_new_members, self.seed, first_index=old):
            new = new.to(device)
            self.members.append(new.to(memory_format=torch.channels_last) if self.channels_last else new)
        if self.execution == "vmap":
            check_fusable(list(self.members))
        self._auto_choice = None  # the member count changed: decide again
        self._set_frozen(range(old))
        self.member_temperature = torch.ones(
            len(self.members), device=device
        )  # refitted at the next validation
        self.ensemble_temperature.fill_(1.0)
        self._make_metrics()
        self.hparams["num_members"] = len(self.members)
        self.hparams["frozen_members"] = list(self.frozen_members)


def _recorded_members(checkpoints: list[tuple[str, int]]) -> tuple[list[Any], int | None]:
    """The member specs and ``num_classes`` recorded in each checkpoint's hyperparameters, one per member.

    Args:
        checkpoints: each checkpoint file with the number of members whose weights it holds.
    """
    specs: list[Any] = []
    classes: set[int] = set()
    for path, count in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(hparams, dict):
            raise ValueError(
                f"Expected `member=` or `members=` to say how to build the members of {path!r}: it is a plain "
                "state_dict, which records no architecture."
            )
        if hparams.get("member") is None and hparams.get("members") is None:
            raise ValueError(
                f"Cannot combine {path!r} without `member=` or `members=`: {_PYTHON_FACTORY_HINT}"
            )
        recorded = hparams["members"] if hparams.get("members") is not None else [hparams["member"]] * count
        if len(recorded) != count:
            raise ValueError(
                f"Checkpoint {path!r} records {len(recorded)} members but holds weights for {count}."
            )
        specs.extend(recorded)
        if isinstance(hparams.get("num_classes"), int):
            classes.add(hparams["num_classes"])
    return specs, classes.pop() if len(classes) == 1 else None


def _spec_name(member: Any, index: int) -> str:
    return "`--model.member`" if member is not None else f"`--model.members[{index}]`"


def _recorded_architecture(hparams: Any) -> bool:
    return isinstance(hparams, dict) and (
        hparams.get("member") is not None
        or hparams.get("members") is not None
        or CLI_INSTANTIATOR_KEY in hparams
    )


_PYTHON_FACTORY_HINT = (
    "its members were built in Python from a factory that is code, not data (a lambda, a local function or "
    "class, a class defined in a script's __main__, or a partial holding objects), so the checkpoint cannot "
    "rebuild them. Pass the factory again, e.g. `EnsembleLightningModule.load_from_checkpoint(path, "
    "member=MyNet)`, or build members from an importable nn.Module class (or a functools.partial of one "
    "with plain arguments), which checkpoints record."
)


class _NameUnreadableCheckpoint(Callback):
    """When ``Trainer.fit/validate/test(ckpt_path=...)`` fails, say whether the checkpoint is the cause.

    Lightning reports a truncated or corrupted checkpoint as a bare ``OSError: [Errno 22] Invalid argument``
    with no path, and restores it after every hook a module could check it in. This adds a note to the
    exception naming the file and what is wrong with it; the exception itself, and Lightning's teardown, are
    unchanged.
    """

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        ckpt_path = trainer.ckpt_path
        if ckpt_path is None or not isinstance(exception, Exception):
            return
        try:
            check_checkpoint_file(ckpt_path, "ckpt_path")
        except (ValueError, FileNotFoundError) as err:
            if hasattr(exception, "add_note"):  # Python >= 3.11
                exception.add_note(str(err))
            else:
                log.error("%s", err)


def _numpy_state() -> dict[str, Any]:
    """numpy's global random state as plain values and a tensor, so that ``weights_only=True`` loads it."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_numpy_state` saved."""
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["kind"], keys, state["position"], state["has_gauss"], state["cached_gaussian"])
    )


def _as_random_state(state: Any) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


@contextmanager
def _autocast_disabled() -> Iterator[None]:
    """Leave every enabled ``torch.autocast`` region (as Lightning's backward, outside ``train_step_context``)."""
    with ExitStack() as stack:
        for device_type in ("cpu", "cuda", "xpu", "hpu", "mps"):
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def as_ensemble(obj: object, who: str, hint: str = "") -> EnsembleLightningModule:
    """Return ``obj`` if it is an :class:`~lightning_ensembles.EnsembleLightningModule`; raise ``TypeError`` if not.

    The one check for "is this an ensemble module?" (a subclass is one; a LightningModule that merely has a
    ``members`` attribute is not).

    Args:
        obj: the module to check.
        who: what needs the ensemble, as the user spells it: a callback's class name (it checks the trainer's
            model), ``"CascadeEnsemble(module=...)"`` for an argument, or a CLI flag.
        hint: an optional sentence appended to the message, e.g. what to use instead.

    Returns:
        ``obj``, typed as an ensemble module.

    Raises:
        TypeError: if ``obj`` is not an ensemble module.

    Example:
        >>> from torch import nn
        >>> as_ensemble(nn.Linear(4, 3), "LatencyMonitor")
        Traceback (most recent call last):
        ...
        TypeError: LatencyMonitor needs an EnsembleLightningModule, but got Linear.
    """
    if not isinstance(obj, EnsembleLightningModule):
        extra = f" {hint}" if hint else ""
        raise TypeError(f"{who} needs an EnsembleLightningModule, but got {type(obj).__name__}.{extra}")
    return obj
