"""Cascade inference that really exits early: run an ensemble's members one at a time on what is left.

Wang, Kondratyuk, et al., *Wisdom of Committees* (ICLR 2022, arXiv 2012.01988) deploy an ensemble as a
cascade: members run in sequence, cheapest first, and a sample leaves as soon as the maximum probability of
the aggregated prediction of the members seen so far clears a threshold. :mod:`lightning_ensembles.cascade`
evaluates that exactly from precomputed member logits; :class:`CascadeEnsemble` *executes* it: member ``k``
of the running order is called on the samples that have not left before stage ``k`` only (the batch is
indexed down after every stage), so easy samples really skip the expensive members.

Its semantics are those of :func:`~lightning_ensembles.cascade.evaluate_cascade`, exactly: the same running
order (default ascending cost, ties by member index), the same aggregation of the first ``j`` members
(:func:`~lightning_ensembles.aggregation.cumulative_log_probs`, the module's ``aggregation``), the same
float64 comparison ``confidence >= thresholds[j - 1]`` at stages ``j < M``, the same
:data:`~lightning_ensembles.cascade.NEVER_EXIT`. Given the logits the members produce, every sample gets the
prediction and exit stage ``evaluate_cascade`` gives it. (A member run on a subset of the batch may round
differently from the same member run on the whole batch, in the last bits; only a sample whose confidence
lies within that rounding of a threshold can then exit elsewhere.)

:class:`CascadeLightningModule` wraps a cascade for ``trainer.predict``.

Example:
    >>> from torch import nn
    >>> from lightning_ensembles import EnsembleLightningModule
    >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=3, num_classes=3)
    >>> cascade = CascadeEnsemble(module, thresholds=0.0, costs=[1.0, 1.0, 1.0])
    >>> probs, exit_stage = cascade.forward_with_exits(torch.randn(5, 4))
    >>> tuple(probs.shape), exit_stage.tolist()  # threshold 0: every sample leaves after the first member
    ((5, 3), [1, 1, 1, 1, 1])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.cascade import (
    Thresholds,
    _check_costs,
    _check_thresholds,
    _expected_cost,
    cascade_order,
)
from lightning_ensembles.cost import count_macs
from lightning_ensembles.module import EnsembleLightningModule, as_ensemble

__all__ = ["CascadeEnsemble", "CascadeLightningModule", "CascadeOutput"]


class CascadeOutput(NamedTuple):
    """What a cascade predicts for a batch.

    Attributes:
        probs: each sample's probabilities ``(B, C)`` at the stage it exited, float32.
        exit_stage: each sample's exit stage in ``1..M`` ``(B,)``, int64: it ran the first ``exit_stage``
            members of the running order.
    """

    probs: Tensor
    exit_stage: Tensor


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the duration, each restored to its own mode afterwards.

    Entered for each member as it runs, not for the whole ``EnsembleLightningModule`` (whose metrics are
    modules too): walking every metric on every call cost more than running a small member at batch 1.
    """
    modes = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in modes):
        yield
        return
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class CascadeEnsemble(nn.Module):
    """An ensemble's members run as a cascade that exits early (Wisdom of Committees).

    Members run in ``order``; each runs only on the samples still below their stage's threshold. The
    members, their temperatures and the aggregation are the module's (shared, not copied: training the
    module later changes the cascade too).

    Inference only: :meth:`forward` runs under ``torch.no_grad`` with every member in eval mode (BatchNorm
    uses its running statistics, dropout is off), whatever mode the module is in, and restores each
    submodule's mode afterwards, so the prediction of a sample never depends on which other samples share
    its batch or stage. Members run one after another (``execution="vmap"`` does not apply: the members see
    different samples); with ``compile`` every new subset size may trigger a recompilation.

    Temperatures: member logits are divided by the module's ``member_temperature`` (ones unless
    ``temperature_scaling="members"`` has fitted them), as ``predict_step`` does; the ensemble temperature of
    ``temperature_scaling="ensemble"`` is not applied (it is not part of the cascade semantics of
    :func:`~lightning_ensembles.cascade.evaluate_cascade`; a warning says so when it is not 1).

    Args:
        module: the trained ensemble.
        thresholds: one threshold for every stage or ``M - 1`` of them, each in ``[0, 1]`` or
            :data:`~lightning_ensembles.cascade.NEVER_EXIT` (see :mod:`lightning_ensembles.cascade`);
            typically ``calibrate_threshold(...).threshold`` on validation logits.
        costs: the cost of each member (any unit), in member order; default: multiply-adds per sample counted
            with :func:`~lightning_ensembles.cost.count_macs` on ``input_shape``.
        order: member indices in running order; default ascending cost, ties by member index.
        input_shape: one sample's shape (no batch axis), to count ``costs``; only when ``costs`` is None.

    Raises:
        TypeError: for a ``module`` that is not an :class:`~lightning_ensembles.EnsembleLightningModule`.
        ValueError: for thresholds out of range or of the wrong number, costs that are not ``M`` finite values > 0 (or
            neither ``costs`` nor ``input_shape``), or an ``order`` that is not a permutation of
            ``range(M)``; each message names the argument, the value and what is allowed.

    Example:
        >>> from torch import nn
        >>> from lightning_ensembles import EnsembleLightningModule
        >>> from lightning_ensembles.cascade import NEVER_EXIT
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> cascade = CascadeEnsemble(module, thresholds=NEVER_EXIT, input_shape=(4,))
        >>> cascade.costs, cascade.order, cascade.stage_costs  # 12 multiply-adds per member
        ((12.0, 12.0), (0, 1), (12.0, 24.0))
    """

    def __init__(
        self,
        module: EnsembleLightningModule,
        thresholds: Thresholds,
        costs: Sequence[float] | None = None,
        order: Sequence[int] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        module = as_ensemble(module, "CascadeEnsemble(module=...)")
        num_members = len(module.members)
        if costs is None:
            if input_shape is None:
                raise ValueError(
                    f"Expected `costs` (M = {num_members} finite costs > 0, in member order) or `input_shape` "
                    "(one sample's shape, to count each member's multiply-adds), but got neither."
                )
            costs = [float(count_macs(member, input_shape)) for member in module.members]
        elif input_shape is not None:
            raise ValueError(
                f"Expected at most one of `costs` and `input_shape`, but got both ({costs!r} and "
                f"{input_shape!r})."
            )
        self.ensemble = module
        """The wrapped ensemble, whose members run."""
        self.costs: tuple[float, ...] = _check_costs(costs, num_members)
        """The cost of each member, in member order."""
        self.order: tuple[int, ...] = cascade_order(self.costs, order)
        """Member indices in running order."""
        self._thresholds = _check_thresholds(thresholds, num_members)
        if float(module.ensemble_temperature) != 1.0:
            rank_zero_warn(
                f"The ensemble temperature ({float(module.ensemble_temperature):.4g}) is not applied by "
                "CascadeEnsemble: confidences are those of the members' aggregated probabilities, as in "
                "evaluate_cascade."
            )

    @property
    def num_members(self) -> int:
        """``M``."""
        return len(self.order)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The threshold of each stage ``1..M-1``; assign one value or ``M - 1`` values to change them.

        Raises:
            ValueError: on assignment, as the constructor does for ``thresholds``.
        """
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Thresholds) -> None:
        self._thresholds = _check_thresholds(value, self.num_members)

    @property
    def stage_costs(self) -> tuple[float, ...]:
        """The cost of reaching stage ``j``: the sum of the costs of the first ``j`` members to run."""
        return tuple(math.fsum(self.costs[i] for i in self.order[: j + 1]) for j in range(self.num_members))

    def expected_cost(self, exit_stage: Tensor) -> float:
        """The mean over samples of the summed cost of the members each ran, as ``evaluate_cascade`` computes it.

        Args:
            exit_stage: exit stages in ``1..M``, shape ``(N,)`` with ``N >= 1``.

        Returns:
            The expected cost per sample, in the unit of :attr:`costs`.

        Raises:
            ValueError: for no samples or stages outside ``1..M``.
        """
        stages = exit_stage.detach().flatten().long().cpu()
        if stages.numel() < 1 or int(stages.min()) < 1 or int(stages.max()) > self.num_members:
            raise ValueError(
                f"Expected `exit_stage` to hold at least one stage in [1, {self.num_members}], but got "
                f"{stages.tolist()[:10]}{'...' if stages.numel() > 10 else ''}."
            )
        counts = torch.bincount(stages - 1, minlength=self.num_members).tolist()
        return _expected_cost(counts, stages.numel(), self.stage_costs)

    def _member_logits(self, index: int, x: Tensor) -> Tensor:
        logits = self.ensemble.member_logits(x, [index])[0]  # checks the (B, C) shape, channels_last
        return logits.float() / self.ensemble.member_temperature[index]

    @torch.no_grad()
    def forward_with_exits(self, x: Tensor) -> CascadeOutput:
        """Run the cascade on a batch: each member on the samples that have not exited yet.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.

        Returns:
            Each sample's probabilities ``(B, C)`` at its exit stage and the exit stage ``(B,)`` in ``1..M``.
        """
        num_members, num_samples = self.num_members, x.shape[0]
        probs = torch.zeros(num_samples, self.ensemble.num_classes, device=x.device)
        exit_stage = torch.full((num_samples,), num_members, dtype=torch.long, device=x.device)
        if num_samples == 0:
            return CascadeOutput(probs, exit_stage)
        remaining = torch.arange(num_samples, device=x.device)  # batch positions still running
        seen: list[Tensor] = []  # logits (b, C) of the members run so far, for the remaining samples
        with ExitStack() as eval_modes:  # a member is put in eval mode only if it runs
            for stage, index in enumerate(self.order, start=1):
                eval_modes.enter_context(_eval_mode(self.ensemble.members[index]))
                seen.append(self._member_logits(index, x))
                # The same aggregation as `cascade_stages`: entry j - 1 of the cumulative ensembles.
                stage_probs = cumulative_log_probs(torch.stack(seen), self.ensemble.aggregation)[-1]
                stage_probs = stage_probs.exp().clamp(0.0, 1.0)
                if stage == num_members:
                    probs[remaining] = stage_probs
                    break
                confidence = stage_probs.max(dim=-1).values.double()
                leaves = confidence >= self._thresholds[stage - 1]
                out = remaining[leaves]
                probs[out] = stage_probs[leaves]
                exit_stage[out] = stage
                stays = ~leaves
                if not bool(stays.any()):
                    break
                remaining, x = remaining[stays], x[stays]
                seen = [logits[stays] for logits in seen]
        return CascadeOutput(probs, exit_stage)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Run the cascade on a batch; see :meth:`forward_with_exits`.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.

        Returns:
            Each sample's probabilities ``(B, C)`` at the stage it exited.
        """
        return self.forward_with_exits(x).probs

    def as_lightning_module(self) -> CascadeLightningModule:
        """This cascade as a LightningModule for ``trainer.predict``.

        Returns:
            A :class:`CascadeLightningModule` around this cascade (sharing its members).
        """
        return CascadeLightningModule(self)


class CascadeLightningModule(LightningModule):
    """A :class:`CascadeEnsemble` for ``trainer.predict``: ``predict_step`` returns probabilities and exits.

    Args:
        cascade: the cascade to run.

    Raises:
        ValueError: if ``cascade`` is not a :class:`CascadeEnsemble`.

    Example:
        >>> from torch import nn
        >>> from lightning_ensembles import EnsembleLightningModule
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> predictor = CascadeEnsemble(module, thresholds=0.5, costs=[1.0, 2.0]).as_lightning_module()
        >>> sorted(predictor.predict_step(torch.randn(5, 4), 0))
        ['exit_stage', 'probs']
    """

    def __init__(self, cascade: CascadeEnsemble) -> None:
        super().__init__()
        if not isinstance(cascade, CascadeEnsemble):
            raise ValueError(f"Expected `cascade` to be a CascadeEnsemble, but got {type(cascade).__name__}.")
        self.cascade = cascade

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Each sample's probabilities ``(B, C)`` at the stage it exited; see :class:`CascadeEnsemble`."""
        return self.cascade(x)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The cascade's prediction for a batch ``x`` or ``(x, ...)`` (labels, if any, ignored).

        Returns:
            ``probs`` ``(B, C)`` and ``exit_stage`` ``(B,)`` (int64, ``1..M``); join the batches with
            ``torch.cat``.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs, exit_stage = self.cascade.forward_with_exits(x)
        return {"probs": probs, "exit_stage": exit_stage}
