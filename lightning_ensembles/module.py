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
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.parsing import AttributeDict
from torch import Tensor, nn
from typing_extensions import override

from lightning_ensembles import _frugal, _saving
from lightning_ensembles._compat import initial_hparams
from lightning_ensembles._saving import CheckpointFormat
from lightning_ensembles._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_shape,
    expected,
    is_int,
)
from lightning_ensembles.aggregation import Aggregation, validate_aggregation
from lightning_ensembles.calibration import MODES as TEMPERATURE_MODES
from lightning_ensembles.calibration import (
    EvaluationLogits,
    TemperatureScaling,
    check_validation_split,
    load_old_temperature_keys,
)
from lightning_ensembles.fused import EXECUTIONS, check_fusable, choose_execution, vmap_forward
from lightning_ensembles.members import (
    MemberFactory,
    MemberSpec,
    build_members,
    check_frozen,
    check_member_optimizer,
    member_specs,
    resolve_member_spec,
    stack_member_logits,
)
from lightning_ensembles.metrics import EnsembleMetrics, MemberLossMean
from lightning_ensembles.ood import OODMetrics
from lightning_ensembles.uncertainty import uncertainty_scores

__all__ = ["EnsembleLightningModule", "as_ensemble"]

log = logging.getLogger(__name__)


class EnsembleLightningModule(CheckpointFormat, LightningModule):  # type: ignore[misc]
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
        memory_frugal: each member's forward, loss and backward before the next member's forward, so only one
            member's activations are alive at once, with bit-identical gradients. ``"auto"`` (default): wherever that is exact (one device or a strategy declaring
            ``supports_per_member_backward``, ``execution="loop"``, Lightning's precision plugins, automatic
            optimization), else one backward of the summed loss, said once at setup. ``True``: refuse a
            setting where it is not exact. ``False``: always one backward of the summed loss.

    Raises:
        ValueError: for an invalid argument, naming its CLI flag, the value and what is allowed.
        TypeError: if a member factory returns something that is not an ``nn.Module``.

    Example:
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> module(torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])
    """

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
        # every argument is checked before any member is built (a member can take minutes to build)
        specs = member_specs(member, num_members, members)
        if not is_int(num_classes) or num_classes < 2:  # type: ignore[operator]
            raise expected(
                "--model.num_classes", "an int >= 2 (the CLI links it from `--data.num_classes`)", num_classes
            )
        num_classes = cast(int, num_classes)
        check_int(seed, "--model.seed", 0)
        validate_aggregation(aggregation)
        label_smoothing = check_float(
            label_smoothing, "--model.label_smoothing", 0.0, 1.0, include_maximum=False
        )
        check_choice(lr_scheduler_interval, "--model.lr_scheduler_interval", ("epoch", "step"))
        check_choice(execution, "--model.execution", EXECUTIONS)
        check_choice(temperature_scaling, "--model.temperature_scaling", TEMPERATURE_MODES)
        _frugal.check_argument(memory_frugal, execution)
        flags = {"predict_members": predict_members, "detect_nonfinite": detect_nonfinite, "compile": compile}
        for flag, value in {**flags, "channels_last": channels_last}.items():
            check_bool(value, f"--model.{flag}")
        if compile and execution != "loop":
            raise ValueError(
                f"`--model.compile true` compiles each member on its own and needs `--model.execution loop`, but got "
                f"{execution!r}: vmap over compiled members is not supported."
            )
        specs = [
            resolve_member_spec(spec, num_classes, _spec_name(member, i)) for i, spec in enumerate(specs)
        ]
        self.save_hyperparameters()
        _saving.record_factories(
            self.hparams
        )  # code that is not data is passed to load_from_checkpoint again
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
        self.execution = execution
        self._auto_choice: str | None = None
        self.members = nn.ModuleList(build_members(specs, seed))
        if channels_last:
            self.members.to(memory_format=torch.channels_last)
        self.frozen_members: tuple[int, ...] = ()
        self._set_frozen(frozen_members)
        self._assigned: tuple[int, ...] | None = None  # set by MemberParallelStrategy
        self.ood_criteria = ood_criteria  # checked by OODMetrics in _make_metrics (and again after grow)
        self.temperature_scaling = temperature_scaling
        # Identity (1) until fitted; buffers, so checkpoints carry them and a loaded module predicts calibrated.
        self.temperature = TemperatureScaling(len(self.members))
        self.register_load_state_dict_pre_hook(load_old_temperature_keys)  # checkpoints before the submodule
        self._make_metrics()
        if execution == "vmap":
            check_fusable(list(self.members))
        self.memory_frugal: bool | Literal["auto"] = memory_frugal
        # whether this fit differentiates member by member: `memory_frugal` resolved at setup
        self._frugal_active = False
        # memory_frugal: this step's gradients were zeroed (and computed) in `training_step` already
        self._zeroed_in_step = False
        self.compile_backend = compile_backend
        if compile:
            for member in self.members:
                member.compile(backend=compile_backend)

    # ------------------------------------------------------------------ construction helpers

    def _set_frozen(self, frozen_members: Sequence[int]) -> None:
        self.frozen_members = frozen = check_frozen(frozen_members, len(self.members))
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
        return stack_member_logits([member(x) for member in members], indices, self.num_classes)

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
        from lightning_ensembles.results import ensemble_summary

        # the Trainer as the cache's scope: a run counts each member's multiply-adds once
        return ensemble_summary(list(self.members), input_shape, scope=self._trainer)

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._frugal_active = _frugal.resolve(self)
        if stage == "fit" and self.temperature_scaling != "none":
            check_validation_split(self.trainer, self.temperature_scaling)
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
            isinstance(c, _saving.NameUnreadableCheckpoint) for c in getattr(trainer, "callbacks", [])
        ):
            return []  # added by an earlier fit/test of this trainer: adding it again makes Lightning say so
        return [_saving.NameUnreadableCheckpoint()]

    # ------------------------------------------------------------------ steps

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        """The sum of the local members' cross-entropy losses (see the module docstring).

        With memory-frugal training (:attr:`memory_frugal`, and more than one member to train in this
        process) the gradients of that sum are computed here, one member at a time, exactly as Lightning's
        backward of the sum would compute them, and the detached sum is returned as a leaf that requires grad:
        see :mod:`lightning_ensembles._frugal` for the steps and why they are bit-identical.

        Returns:
            The summed loss (detached, a leaf requiring grad, when memory-frugal), or ``None`` when this
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
        frugal = _frugal.frugal_this_step(self, indices)
        if frugal:
            losses = _frugal.backward_each_member(self, x, y, indices, batch_idx)
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

    @override
    def on_train_epoch_end(self) -> None:
        # Every member's epoch-mean loss, whichever process trained it (member-parallel logs each member's
        # per-step loss on its own process only).
        means = self.train_member_loss.compute().reshape(-1)  # a collective under DDP: every process calls it
        self.train_member_loss.reset()
        self._log_synchronised(
            {f"train/member_{i}/loss_epoch": means[i] for i in self.trainable_members if not means[i].isnan()}
        )

    def _evaluation_step(
        self, batch: tuple[Tensor, Tensor], metrics: EnsembleMetrics, calibrated: bool = True
    ) -> dict[str, Tensor]:
        x, y = batch
        if self.input_shape is None:
            self.record_input_shape(x.shape[1:])
        logits = self(x)
        if calibrated and self.temperature_scaling != "none":
            logits = self.temperature.member_logits(logits)
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

        Callbacks read their values (``size_{k}/...``: the first ``k`` members) from
        :meth:`~lightning_ensembles.metrics.EnsembleMetrics.compute` in their own ``on_*_epoch_end``, which
        Lightning calls before the module's, where they are logged and reset; ``compute`` keeps its values until
        then, so they are computed and synchronised across processes once.

        Raises:
            ValueError: for another stage.
        """
        if stage not in ("val", "test"):
            raise ValueError(f"Expected `stage` to be 'val' or 'test', but got {stage!r}.")
        return self.val_metrics if stage == "val" else self.test_metrics

    def calibrated_log_probs(self, logits: Tensor) -> Tensor:
        """The ensemble's log-probabilities ``(B, C)`` from member logits ``(M, B, C)``, at the fitted
        temperatures (the identity until :attr:`temperature_scaling` has fitted them)."""
        return self.temperature.log_probs(logits, self.aggregation)

    @property
    def member_temperature(self) -> Tensor:
        """The member temperatures ``(M,)`` (ones unless ``temperature_scaling="members"`` has fitted them)."""
        return self.temperature.member

    @property
    def ensemble_temperature(self) -> Tensor:
        """The ensemble's temperature (one unless ``temperature_scaling="ensemble"`` has fitted it)."""
        return self.temperature.ensemble

    def _log_metrics(self, stage: str, metrics: EnsembleMetrics) -> None:
        # synchronised across processes once, by torchmetrics (and already computed if a callback read them)
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        self._log_synchronised(values)

    def _log_synchronised(self, values: dict[str, Tensor]) -> None:
        """Log values that are equal on every process already (torchmetrics synchronised them), as they are:
        ``sync_dist`` would reduce them a second time (one all-reduce per name, averaging equal values).
        Lightning cannot know that and would advise ``sync_dist=True`` once per name under DDP; that advice
        is silenced for these names only."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and values:
            names = "|".join(re.escape(name) for name in values)
            warnings.filterwarnings(
                "ignore",
                message=rf"It is recommended to use `self\.log\('(?:{names})'",
                category=PossibleUserWarning,
            )
        self.log_dict(values, sync_dist=False)

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
        from lightning_ensembles.data.sampling import padding_warning

        if self.trainer.world_size > 1 and stage not in self._warned_padding:
            message = padding_warning(stage, loaders, self.trainer.world_size)
            if message:
                self._warned_padding.add(stage)
                rank_zero_warn(message)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        if self.temperature_scaling != "none" and not self.trainer.sanity_checking:
            self._fit_temperatures()

    def _fit_temperatures(self) -> None:
        """Fit the temperatures on this validation epoch's logits (gathered from every process, so each fits
        the same values) and log the validation NLL and ECE before and after."""
        logits, target = self.val_logits.compute()
        self.val_logits.reset()
        values = self.temperature.fit(
            logits, target, self.temperature_scaling, self.aggregation, self.num_classes
        )
        # equal on every process already (fitted on the logits gathered from every process)
        self._log_synchronised(
            {f"val/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}
        )

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
            logits = self.temperature.member_logits(logits)
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
            self._log_synchronised({f"test/ood/{name}": value for name, value in ood.items()})

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
        logits, log_probs = self.temperature.member_logits(raw), self.calibrated_log_probs(raw)
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
        check_member_optimizer(optimizer, groups)
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

    @override
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning's ``optimizer.zero_grad()``, skipped when ``memory_frugal`` has zeroed the gradients at
        the start of this step's ``training_step`` and computed them since."""
        if self._zeroed_in_step:
            self._zeroed_in_step = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

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
        self.temperature.reset(len(self.members))  # refitted at the next validation
        self._make_metrics()
        self.hparams["num_members"] = len(self.members)
        self.hparams["frozen_members"] = list(self.frozen_members)


def _spec_name(member: Any, index: int) -> str:
    return "`--model.member`" if member is not None else f"`--model.members[{index}]`"


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
