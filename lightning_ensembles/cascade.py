"""Cascades of ensemble members: run members one at a time and stop once the prediction is confident.

Wang, Kondratyuk, et al., *Wisdom of Committees: An Overlooked Approach to Faster and More Accurate Models*
(ICLR 2022, arXiv 2012.01988), the follow-up of Kondratyuk et al. 2020 (arXiv 2005.00570), turn an ensemble
into a cascade: members are applied in sequence, and a sample leaves as soon as the maximum probability of
the averaged prediction of the members seen so far clears a threshold. Easy samples pay for one cheap member,
hard ones for the whole ensemble; their EfficientNet cascade matches B7's accuracy at 5.4x fewer average
multiply-adds.

Semantics, exactly:

- members run in ``order`` (default: ascending cost, ties by member index); stage ``j`` (1-based) has seen
  the first ``j`` members of that order, and its prediction is their aggregation (the same rules as
  :func:`~lightning_ensembles.aggregation.cumulative_log_probs`, default ``"mean_probs"``);
- the confidence of stage ``j`` is the maximum aggregated probability of a sample;
- a sample exits at the first stage ``j < M`` whose confidence is ``>= thresholds[j - 1]``; otherwise it runs
  all ``M`` members and takes the full ensemble's prediction;
- ``thresholds`` is one value for every stage, or ``M - 1`` values (one per stage but the last), each in
  ``[0, 1]`` or exactly :data:`NEVER_EXIT` (``math.inf``). Threshold ``0`` sends every sample out after the
  first member; :data:`NEVER_EXIT` sends none out early, which is the full ensemble;
- the cost of a sample is the sum of the costs of the members it ran; the expected cost is its mean over the
  samples. Costs are in whatever unit the caller gives (multiply-adds, GMACs, milliseconds).

Everything is computed exactly from precomputed member logits ``(M, N, C)`` (no model is called), so one
evaluation pass gives the whole accuracy-vs-cost curve (:func:`cascade_curve`) and the threshold for a
target accuracy or a cost budget (:func:`calibrate_threshold`), chosen on validation data and then applied
to test data with :func:`evaluate_cascade`. Those functions reduce the logits to :class:`CascadeStages`
(:func:`cascade_stages`): each stage's confidence, prediction, correctness and NLL for each sample, ``(M, N)``
values that hold everything any threshold needs; build it once (batch by batch and
:meth:`CascadeStages.cat`, if you like) to evaluate many thresholds without the ``(M, N, C)`` logits.

Example:
    >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 0.2]],    # member 0: sure of sample 0, unsure of 1
    ...                        [[0.0, 3.0], [0.0, 3.0]]])   # member 1
    >>> target = torch.tensor([0, 1])
    >>> result = evaluate_cascade(logits, target, costs=[1.0, 3.0], thresholds=0.9)
    >>> result.exit_fractions, result.expected_cost, result.accuracy
    ((0.5, 0.5), 2.5, 1.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor

from lightning_ensembles.aggregation import cumulative_log_probs, validate_aggregation
from lightning_ensembles.metrics import nll_per_sample

__all__ = [
    "NEVER_EXIT",
    "CascadeResult",
    "CascadeStages",
    "calibrate_threshold",
    "cascade_curve",
    "cascade_order",
    "cascade_stages",
    "evaluate_cascade",
]

NEVER_EXIT: float = math.inf
"""The threshold of a stage no sample leaves early from: with it everywhere, the cascade is the full ensemble."""

_CHUNK = 8192  # samples per chunk when computing the stage outcomes

Thresholds: TypeAlias = float | Sequence[float]


@dataclass(frozen=True)
class CascadeResult:
    """One operating point of a cascade.

    Attributes:
        accuracy: top-1 accuracy of the exit predictions, in ``[0, 1]``.
        nll: mean negative log-likelihood of the exit predictions (``inf`` where a target has probability 0,
            possible under ``"vote"``).
        expected_cost: mean over samples of the summed cost of the members each sample ran.
        exit_fractions: fraction of the samples leaving at each stage ``1..M`` (sums to 1).
        thresholds: the threshold of each stage ``1..M-1``.
        order: the member indices in the order they run.
        stage_costs: the cost of reaching stage ``j`` (the sum of the first ``j`` members' costs), ``j = 1..M``.
        num_samples: ``N``.
        exit_stage: per-sample exit stage in ``1..M``, shape ``(N,)``; ``None`` for the points of
            :func:`cascade_curve` (which would otherwise hold ``N`` values per point).
        prediction: per-sample predicted class, shape ``(N,)``; ``None`` where ``exit_stage`` is.
    """

    accuracy: float
    nll: float
    expected_cost: float
    exit_fractions: tuple[float, ...]
    thresholds: tuple[float, ...]
    order: tuple[int, ...]
    stage_costs: tuple[float, ...]
    num_samples: int
    exit_stage: Tensor | None = field(default=None, repr=False, compare=False)
    prediction: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def threshold(self) -> float | None:
        """The threshold shared by every stage, or ``None`` when the stages differ (or ``M = 1``)."""
        values = set(self.thresholds)
        return values.pop() if len(values) == 1 else None

    @property
    def full_cost(self) -> float:
        """The cost of running every member, i.e. of the full ensemble."""
        return self.stage_costs[-1]

    def as_dict(self) -> dict[str, Any]:
        """The scalars of this point, as plain Python values (the per-sample tensors are left out).

        Returns:
            ``accuracy``, ``nll``, ``expected_cost``, ``exit_fractions``, ``thresholds``, ``order``,
            ``stage_costs``, ``num_samples``; ``threshold`` as well when it is shared by every stage.
        """
        values: dict[str, Any] = {
            "accuracy": self.accuracy,
            "nll": self.nll,
            "expected_cost": self.expected_cost,
            "exit_fractions": list(self.exit_fractions),
            "thresholds": list(self.thresholds),
            "order": list(self.order),
            "stage_costs": list(self.stage_costs),
            "num_samples": self.num_samples,
        }
        if self.threshold is not None:
            values["threshold"] = self.threshold
        return values


# ---------------------------------------------------------------------- validation


def _check_costs(costs: Sequence[float], num_members: int) -> tuple[float, ...]:
    values = list(costs) if isinstance(costs, Sequence) and not isinstance(costs, str) else None
    if (
        values is None
        or len(values) != num_members
        or not all(
            isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) and c > 0
            for c in values
        )
    ):
        raise ValueError(
            f"Expected `costs` to be a sequence of M = {num_members} finite costs > 0 (one per member, in "
            f"member order), but got {costs!r}."
        )
    return tuple(float(c) for c in values)


def cascade_order(costs: Sequence[float], order: Sequence[int] | None = None) -> tuple[int, ...]:
    """The order members run in: ``order`` checked, or ascending cost with ties broken by member index.

    Args:
        costs: one cost per member, in member order.
        order: a permutation of ``range(M)``, or ``None`` for cheapest first.

    Returns:
        The member indices in running order.

    Raises:
        ValueError: if ``costs`` are not ``M`` finite values > 0 or ``order`` is not a permutation of
            ``range(M)``.

    Example:
        >>> cascade_order([4.0, 1.0, 2.0, 1.0])
        (1, 3, 2, 0)
    """
    num_members = len(costs) if isinstance(costs, Sequence) else -1
    checked = _check_costs(costs, num_members)
    if order is None:
        return tuple(sorted(range(num_members), key=lambda i: (checked[i], i)))
    given = list(order) if isinstance(order, Sequence) and not isinstance(order, str) else None
    if given is None or sorted(given) != list(range(num_members)) or any(isinstance(i, bool) for i in given):
        raise ValueError(
            f"Expected `order` to be None (cheapest member first) or a permutation of range({num_members}) "
            f"(member indices in running order), but got {order!r}."
        )
    return tuple(int(i) for i in given)


def _check_threshold_value(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and (value == NEVER_EXIT or 0.0 <= float(value) <= 1.0)
    )


def _check_thresholds(thresholds: Thresholds, num_members: int) -> tuple[float, ...]:
    allowed = (
        "a float in [0, 1] or NEVER_EXIT (math.inf) for every stage, or a sequence of "
        f"M - 1 = {num_members - 1} such floats (one per stage but the last)"
    )
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        if not _check_threshold_value(thresholds):
            raise ValueError(f"Expected `thresholds` to be {allowed}, but got {thresholds!r}.")
        return (float(thresholds),) * (num_members - 1)
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str):
        raise ValueError(f"Expected `thresholds` to be {allowed}, but got {thresholds!r}.")
    values = list(thresholds)
    if len(values) != num_members - 1:
        raise ValueError(
            f"Expected `thresholds` to be {allowed}, but got {len(values)} values: {thresholds!r}."
        )
    bad = [(j, v) for j, v in enumerate(values) if not _check_threshold_value(v)]
    if bad:
        j, v = bad[0]
        raise ValueError(
            f"Expected `thresholds` to be {allowed}, but got {thresholds!r} (entry {j}, the threshold of "
            f"stage {j + 1}, is {v!r})."
        )
    return tuple(float(v) for v in values)


def _check_calibration(target_accuracy: float | None, cost_budget: float | None) -> None:
    if (target_accuracy is None) == (cost_budget is None):
        raise ValueError(
            "Expected exactly one of `target_accuracy` and `cost_budget`, but got "
            + ("neither." if target_accuracy is None else f"both ({target_accuracy!r} and {cost_budget!r}).")
        )
    if target_accuracy is not None and not (
        isinstance(target_accuracy, numbers.Real)
        and not isinstance(target_accuracy, bool)
        and 0.0 <= target_accuracy <= 1.0
    ):
        raise ValueError(f"Expected `target_accuracy` to be a float in [0, 1], but got {target_accuracy!r}.")
    if cost_budget is not None and not (
        isinstance(cost_budget, numbers.Real)
        and not isinstance(cost_budget, bool)
        and math.isfinite(cost_budget)
        and cost_budget > 0
    ):
        raise ValueError(f"Expected `cost_budget` to be a finite float > 0, but got {cost_budget!r}.")


def _check_inputs(logits: Tensor, target: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3 or min(logits.shape) < 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected `logits` to be member logits of shape (M, N, C) with M, N, C >= 1, but got {shape}."
        )
    num_samples, num_classes = logits.shape[1], logits.shape[2]
    if not isinstance(target, Tensor) or tuple(target.shape) != (num_samples,):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"Expected `target` of shape (N,) = ({num_samples},), but got {shape}.")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"Expected `target` to hold integer class indices, but got dtype {target.dtype}.")
    if num_samples and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"Expected `target` to hold class indices in [0, {num_classes}), but got values in "
            f"[{int(target.min())}, {int(target.max())}]."
        )


# ---------------------------------------------------------------------- stage outcomes


def _expected_cost(exit_counts: Sequence[int], num_samples: int, stage_costs: Sequence[float]) -> float:
    # Fractions times costs: a point where every sample leaves at one stage costs exactly that stage.
    return math.fsum(count / num_samples * cost for count, cost in zip(exit_counts, stage_costs))


@dataclass(frozen=True)
class CascadeStages:
    """What every stage of a cascade predicts for every sample: all any threshold needs, exactly.

    Build it with :func:`cascade_stages`. Tensors are ``(M, N)`` on the CPU, stage axis first, stages in
    running order (row ``j - 1`` is stage ``j``, the aggregation of the first ``j`` members of ``order``).

    Attributes:
        confidence: the maximum aggregated probability, float64.
        prediction: the predicted class (argmax, ties to the lowest index), int64.
        correct: whether the prediction is the target, bool.
        nll: the negative log-likelihood of the target, float64 (``inf`` where its probability is 0).
        costs: the cost of each member, in member order.
        order: member indices in running order.
    """

    confidence: Tensor
    prediction: Tensor
    correct: Tensor
    nll: Tensor
    costs: tuple[float, ...]
    order: tuple[int, ...]

    @property
    def num_members(self) -> int:
        """``M``."""
        return len(self.order)

    @property
    def num_samples(self) -> int:
        """``N``."""
        return int(self.confidence.shape[1])

    @property
    def stage_costs(self) -> tuple[float, ...]:
        """The cost of reaching stage ``j``: the sum of the costs of the first ``j`` members to run."""
        return tuple(math.fsum(self.costs[i] for i in self.order[: j + 1]) for j in range(self.num_members))

    @staticmethod
    def cat(parts: Sequence[CascadeStages]) -> CascadeStages:
        """Join the stage outcomes of several batches of samples (same members, costs and order).

        Args:
            parts: one or more :class:`CascadeStages`.

        Returns:
            The outcomes of all their samples, in the order given.

        Raises:
            ValueError: for no parts, or parts whose costs or order differ.
        """
        if not parts:
            raise ValueError("Expected `parts` to hold at least one CascadeStages, but got none.")
        first = parts[0]
        for part in parts[1:]:
            if part.costs != first.costs or part.order != first.order:
                raise ValueError(
                    "Expected every part to have the same `costs` and `order`, but got "
                    f"{first.costs}/{first.order} and {part.costs}/{part.order}."
                )
        return CascadeStages(
            confidence=torch.cat([p.confidence for p in parts], dim=1),
            prediction=torch.cat([p.prediction for p in parts], dim=1),
            correct=torch.cat([p.correct for p in parts], dim=1),
            nll=torch.cat([p.nll for p in parts], dim=1),
            costs=first.costs,
            order=first.order,
        )

    def _check_samples(self) -> None:
        if self.num_samples < 1:
            raise ValueError("Expected at least one sample to evaluate a cascade on, but got none.")

    def evaluate(self, thresholds: Thresholds) -> CascadeResult:
        """The cascade with these thresholds; see :func:`evaluate_cascade`.

        Args:
            thresholds: one threshold for every stage or ``M - 1`` of them, each in ``[0, 1]`` or
                :data:`NEVER_EXIT`.

        Returns:
            The operating point, with per-sample ``exit_stage`` and ``prediction``.

        Raises:
            ValueError: for thresholds outside ``[0, 1]`` (other than :data:`NEVER_EXIT`), NaN or of the
                wrong number, or no samples.
        """
        checked = _check_thresholds(thresholds, self.num_members)
        self._check_samples()
        num_members, num_samples = self.num_members, self.num_samples
        # Stage j < M lets a sample out when its confidence clears the stage's threshold; stage M always.
        limits = torch.tensor(checked, dtype=torch.float64).view(-1, 1)
        leaves = torch.cat([self.confidence[:-1] >= limits, torch.ones(1, num_samples, dtype=torch.bool)])
        exit_index = leaves.int().argmax(dim=0)  # the first stage that lets the sample out, 0-based
        pick = exit_index.unsqueeze(0)
        correct = self.correct.gather(0, pick).squeeze(0)
        nll = self.nll.gather(0, pick).squeeze(0)
        counts = torch.bincount(exit_index, minlength=num_members).tolist()
        stage_costs = self.stage_costs
        return CascadeResult(
            accuracy=int(correct.sum()) / num_samples,
            nll=float(nll.sum()) / num_samples,
            expected_cost=_expected_cost(counts, num_samples, stage_costs),
            exit_fractions=tuple(c / num_samples for c in counts),
            thresholds=checked,
            order=self.order,
            stage_costs=stage_costs,
            num_samples=num_samples,
            exit_stage=exit_index + 1,
            prediction=self.prediction.gather(0, pick).squeeze(0),
        )

    def sizes(self) -> list[CascadeResult]:
        """The ensemble of the first ``k`` members to run, for ``k = 1..M`` (no early exit).

        Returns:
            ``M`` points; point ``k - 1`` has every sample leave at stage ``k``, at cost ``stage_costs[k - 1]``.
        """
        return [
            self.evaluate([0.0 if j == k else NEVER_EXIT for j in range(1, self.num_members)])
            for k in range(1, self.num_members + 1)
        ]

    def _candidates(self) -> Tensor:
        # With one threshold t for every stage, a sample leaves at stage <= j iff max(conf_1..conf_j) >= t, so
        # the outcome changes exactly at the running maxima of the confidences of stages 1..M-1.
        running_max = self.confidence[:-1].cummax(dim=0).values
        zero_and_never = torch.tensor([0.0, NEVER_EXIT], dtype=torch.float64)
        return torch.unique(torch.cat([zero_and_never, running_max.flatten()]))  # sorted ascending

    def _sweep(self, thresholds: Tensor) -> list[CascadeResult]:
        """One shared threshold, every value of ``thresholds`` at once: O(M N log N), exact counts."""
        num_members, num_samples, num = self.num_members, self.num_samples, thresholds.shape[0]
        running_max = self.confidence[:-1].cummax(dim=0).values  # (M-1, N), P[j]
        # Write every per-sample quantity q as q(stage M) + sum_{j<M} [P[j] >= t] (q(stage j) - q(stage j+1)):
        # the indicator is 1 exactly for the stages at or after the sample's exit stage.
        infinite = self.nll.isinf()
        quantities = (self.correct.long(), torch.where(infinite, 0.0, self.nll), infinite.long())
        totals = [q[-1].sum().expand(num).clone() for q in quantities]  # correct, finite NLL, infinite NLL
        leave_by = torch.full((num_members, num), num_samples, dtype=torch.int64)  # out at stage <= j
        for j in range(num_members - 1):
            values, sort = running_max[j].sort()
            start = torch.searchsorted(values, thresholds, side="left")  # first sorted entry >= t
            leave_by[j] = num_samples - start
            for total, quantity in zip(totals, quantities):
                delta = (quantity[j] - quantity[j + 1])[sort]
                suffix = torch.cat([delta.flip(0).cumsum(0).flip(0), delta.new_zeros(1)])
                total += suffix[start]
        correct, nll_sum, num_infinite = totals
        nll_sum = torch.where(num_infinite > 0, math.inf, nll_sum)
        exit_counts = torch.diff(leave_by, dim=0, prepend=torch.zeros(1, num, dtype=torch.int64)).T.tolist()
        stage_costs = self.stage_costs
        return [
            CascadeResult(
                accuracy=c / num_samples,
                nll=s / num_samples,
                expected_cost=_expected_cost(counts, num_samples, stage_costs),
                exit_fractions=tuple(n / num_samples for n in counts),
                thresholds=(t,) * (num_members - 1),
                order=self.order,
                stage_costs=stage_costs,
                num_samples=num_samples,
            )
            for t, c, s, counts in zip(thresholds.tolist(), correct.tolist(), nll_sum.tolist(), exit_counts)
        ]

    def curve(self, num_thresholds: int | None = None) -> list[CascadeResult]:
        """The accuracy-vs-expected-cost curve of one shared threshold; see :func:`cascade_curve`.

        Args:
            num_thresholds: keep this many thresholds, evenly spaced over the sorted candidates (``0`` and
                :data:`NEVER_EXIT` always kept); ``None`` keeps all of them.

        Returns:
            The points sorted by expected cost (ties by threshold), without per-sample tensors.

        Raises:
            ValueError: for ``num_thresholds`` that is not None or an int >= 2, or no samples.
        """
        if num_thresholds is not None and (
            not isinstance(num_thresholds, int) or isinstance(num_thresholds, bool) or num_thresholds < 2
        ):
            raise ValueError(
                f"Expected `num_thresholds` to be None or an int >= 2, but got {num_thresholds!r}."
            )
        self._check_samples()
        candidates = self._candidates()
        if num_thresholds is not None and candidates.numel() > num_thresholds:
            keep = torch.linspace(0, candidates.numel() - 1, num_thresholds, dtype=torch.float64).round()
            candidates = candidates[torch.unique(keep.long())]
        return sorted(self._sweep(candidates), key=lambda p: (p.expected_cost, p.thresholds[:1]))

    def calibrate(
        self, *, target_accuracy: float | None = None, cost_budget: float | None = None
    ) -> CascadeResult:
        """Choose the shared threshold for a target accuracy or a cost budget; see :func:`calibrate_threshold`.

        Args:
            target_accuracy: the accuracy to reach, in ``[0, 1]``.
            cost_budget: the largest expected cost per sample, in the unit of ``costs``.

        Returns:
            The chosen point, with per-sample tensors.

        Raises:
            ValueError: as :func:`calibrate_threshold`.
        """
        _check_calibration(target_accuracy, cost_budget)
        if cost_budget is not None and cost_budget < self.stage_costs[0]:
            cheapest = min(range(self.num_members), key=lambda i: (self.costs[i], i))
            raise ValueError(
                f"Expected `cost_budget` to be at least {self.stage_costs[0]!r}, the cost of member "
                f"{self.order[0]} that every sample runs first, but got {cost_budget!r}; the cheapest member "
                f"(member {cheapest}) costs {self.costs[cheapest]!r}."
            )
        self._check_samples()
        points = self._sweep(self._candidates())  # ascending threshold: the last is the full ensemble
        if target_accuracy is not None:
            reaching = [p for p in points if p.accuracy >= target_accuracy]
            if not reaching:
                best = max(points, key=lambda p: (p.accuracy, -p.expected_cost))
                raise ValueError(
                    f"Expected `target_accuracy` to be reachable, but got {target_accuracy!r}: the best "
                    f"accuracy along the cascade curve is {best.accuracy!r} (threshold {best.threshold!r}, "
                    f"expected cost {best.expected_cost!r}); the full ensemble reaches {points[-1].accuracy!r}."
                )
            chosen = min(reaching, key=lambda p: (p.expected_cost, -p.accuracy, p.thresholds[:1]))
        else:
            assert cost_budget is not None  # checked above
            within = [p for p in points if p.expected_cost <= cost_budget]
            chosen = max(within, key=lambda p: (p.accuracy, -p.expected_cost, [-t for t in p.thresholds[:1]]))
        return self.evaluate(chosen.thresholds)


def cascade_stages(
    logits: Tensor,
    target: Tensor,
    costs: Sequence[float],
    order: Sequence[int] | None = None,
    aggregation: str = "mean_probs",
    first_k_log_probs: Tensor | None = None,
) -> CascadeStages:
    """Reduce member logits to what every stage of the cascade predicts for every sample.

    Args:
        logits: member logits, shape ``(M, N, C)``, in member order, on any device and in any float dtype.
        target: class indices, shape ``(N,)``.
        costs: the cost of each member (any unit), in member order.
        order: member indices in running order; default ascending cost, ties by index.
        aggregation: ``"mean_probs"``, ``"mean_logits"`` or ``"vote"``, as in
            :func:`~lightning_ensembles.aggregation.cumulative_log_probs`.
        first_k_log_probs: ``cumulative_log_probs(logits, aggregation)``, ``(M, N, C)``, when already computed
            (an ``EnsembleLightningModule``'s evaluation step returns it); used only when the running order is
            the member order, where the stages are exactly the first ``k`` members.

    Returns:
        The stage outcomes, ``(M, N)`` tensors on the CPU.

    Raises:
        ValueError: for logits that are not ``(M, N, C)``, a target that does not match them, costs that are
            not ``M`` values > 0, an ``order`` that is not a permutation, an unknown aggregation, or
            ``first_k_log_probs`` of another shape than ``logits``.

    Example:
        >>> logits = torch.tensor([[[0.0, 3.0]], [[3.0, 0.0]], [[0.0, 0.0]]])  # M=3, N=1, C=2
        >>> stages = cascade_stages(logits, torch.tensor([1]), costs=[4.0, 1.0, 2.0])
        >>> stages.order, stages.stage_costs, stages.correct[:, 0].tolist()
        ((1, 2, 0), (1.0, 3.0, 7.0), [False, False, False])
    """
    validate_aggregation(aggregation, "aggregation")
    _check_inputs(logits, target)
    checked = _check_costs(costs, logits.shape[0])
    running = cascade_order(checked, order)
    if first_k_log_probs is not None and tuple(first_k_log_probs.shape) != tuple(logits.shape):
        raise ValueError(
            f"Expected `first_k_log_probs` to have the shape of the logits, {tuple(logits.shape)}, but got "
            f"{tuple(first_k_log_probs.shape)}."
        )
    reuse = first_k_log_probs is not None and running == tuple(range(logits.shape[0]))
    index = torch.tensor(running, device=logits.device)
    parts: list[tuple[Tensor, ...]] = []
    with torch.no_grad():
        # In chunks of samples, so the float32 copies of (M, chunk, C) stay small for any N.
        for start in range(0, logits.shape[1], _CHUNK):
            if reuse:
                assert first_k_log_probs is not None
                log_probs = first_k_log_probs[:, start : start + _CHUNK].detach().float()
            else:
                chunk = logits[:, start : start + _CHUNK].detach().index_select(0, index)
                log_probs = cumulative_log_probs(chunk, aggregation)  # (M, chunk, C)
            labels = target[start : start + _CHUNK].to(log_probs.device, torch.long)
            confidence, prediction = log_probs.exp().clamp(0.0, 1.0).max(dim=-1)  # ties: the lowest class
            nll = nll_per_sample(log_probs, labels)
            parts.append((confidence.double(), prediction, prediction == labels, nll.double()))
    confidence, prediction, correct, nll = (torch.cat(list(p), dim=1).cpu() for p in zip(*parts))
    return CascadeStages(confidence, prediction, correct, nll, costs=checked, order=running)


def evaluate_cascade(
    logits: Tensor,
    target: Tensor,
    costs: Sequence[float],
    thresholds: Thresholds,
    order: Sequence[int] | None = None,
    aggregation: str = "mean_probs",
) -> CascadeResult:
    """Evaluate a cascade exactly from precomputed member logits.

    Args:
        logits: member logits, shape ``(M, N, C)``, in member order (``order`` says which runs first).
        target: class indices, shape ``(N,)``.
        costs: the cost of each member (any unit), in member order.
        thresholds: one threshold for every stage or ``M - 1`` of them, each in ``[0, 1]`` or
            :data:`NEVER_EXIT`; see the module docstring.
        order: member indices in running order; default ascending cost, ties by index.
        aggregation: ``"mean_probs"``, ``"mean_logits"`` or ``"vote"``, as in
            :func:`~lightning_ensembles.aggregation.cumulative_log_probs`.

    Returns:
        The operating point, with per-sample ``exit_stage`` and ``prediction``.

    Raises:
        ValueError: for logits that are not ``(M, N, C)``, a target that does not match them, costs that are
            not ``M`` values > 0, an ``order`` that is not a permutation, thresholds outside ``[0, 1]`` (other
            than :data:`NEVER_EXIT`), NaN or of the wrong number, or an unknown aggregation.

    Example:
        >>> logits = torch.tensor([[[0.0, 3.0]], [[3.0, 0.0]], [[0.0, 0.0]]])  # M=3, N=1, C=2
        >>> result = evaluate_cascade(logits, torch.tensor([1]), costs=[4.0, 1.0, 2.0], thresholds=0.99)
        >>> result.order, result.stage_costs  # cheapest first
        ((1, 2, 0), (1.0, 3.0, 7.0))
        >>> result.exit_stage.tolist(), result.prediction.tolist(), result.expected_cost
        ([3], [0], 7.0)
        >>> evaluate_cascade(logits, torch.tensor([1]), [4.0, 1.0, 2.0], thresholds=0.0).expected_cost
        1.0
    """
    _check_thresholds(thresholds, logits.shape[0] if isinstance(logits, Tensor) and logits.ndim == 3 else 0)
    return cascade_stages(logits, target, costs, order, aggregation).evaluate(thresholds)


def cascade_curve(
    logits: Tensor,
    target: Tensor,
    costs: Sequence[float],
    order: Sequence[int] | None = None,
    aggregation: str = "mean_probs",
    num_thresholds: int | None = None,
) -> list[CascadeResult]:
    """The accuracy-vs-expected-cost curve of one threshold shared by every stage.

    The threshold sweeps every value that changes the outcome: ``0`` (every sample leaves after the first
    member), each distinct running maximum of the stage confidences (a sample's exit stage moves exactly
    there) and :data:`NEVER_EXIT` (the full ensemble). All points are computed at once in
    ``O(M N log N)``; each equals :func:`evaluate_cascade` at its threshold (the NLL up to float64 rounding).

    Args:
        logits: member logits, shape ``(M, N, C)``.
        target: class indices, shape ``(N,)``.
        costs: the cost of each member (any unit), in member order.
        order: member indices in running order; default ascending cost, ties by index.
        aggregation: see :func:`evaluate_cascade`.
        num_thresholds: keep this many thresholds, evenly spaced over the sorted candidates (the first, ``0``,
            and the last, :data:`NEVER_EXIT`, always kept); ``None`` keeps all of them.

    Returns:
        The points sorted by expected cost (ties by threshold), without per-sample tensors.

    Raises:
        ValueError: as :func:`evaluate_cascade`, or for ``num_thresholds`` that is not None or an int >= 2.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 0.5]], [[0.0, 3.0], [0.0, 3.0]]])  # M=2, N=2, C=2
        >>> curve = cascade_curve(logits, torch.tensor([0, 1]), costs=[1.0, 3.0])
        >>> [(round(p.threshold, 3), p.expected_cost, p.accuracy) for p in curve]
        [(0.0, 1.0, 1.0), (0.622, 1.0, 1.0), (0.881, 2.5, 1.0), (inf, 4.0, 0.5)]
    """
    return cascade_stages(logits, target, costs, order, aggregation).curve(num_thresholds)


def calibrate_threshold(
    logits: Tensor,
    target: Tensor,
    costs: Sequence[float],
    *,
    target_accuracy: float | None = None,
    cost_budget: float | None = None,
    order: Sequence[int] | None = None,
    aggregation: str = "mean_probs",
) -> CascadeResult:
    """Choose the shared threshold on validation data, for a target accuracy or for a cost budget.

    Every candidate threshold of :func:`cascade_curve` is considered. With ``target_accuracy``: the cheapest
    point whose accuracy is ``>= target_accuracy`` (ties: the more accurate, then the lower threshold). With
    ``cost_budget``: the most accurate point whose expected cost is ``<= cost_budget`` (ties: the cheaper,
    then the lower threshold). Apply the returned ``threshold`` to test data with :func:`evaluate_cascade`.

    Args:
        logits: validation member logits, shape ``(M, N, C)``.
        target: class indices, shape ``(N,)``.
        costs: the cost of each member (any unit), in member order.
        target_accuracy: the accuracy to reach, in ``[0, 1]``.
        cost_budget: the largest expected cost per sample, in the unit of ``costs``.
        order: member indices in running order; default ascending cost, ties by index.
        aggregation: see :func:`evaluate_cascade`.

    Returns:
        The chosen point, evaluated by :func:`evaluate_cascade` (with per-sample tensors).

    Raises:
        ValueError: unless exactly one of ``target_accuracy`` and ``cost_budget`` is given; for a target
            outside ``[0, 1]`` or one no threshold reaches (stating the best reachable accuracy); for a budget
            below the cost of the first member to run (stating what the cheapest member costs); and as
            :func:`evaluate_cascade`.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 0.5]], [[0.0, 3.0], [0.0, 3.0]]])  # M=2, N=2, C=2
        >>> target, costs = torch.tensor([0, 1]), [1.0, 3.0]
        >>> calibrate_threshold(logits, target, costs, target_accuracy=1.0).threshold
        0.0
        >>> calibrate_threshold(logits, target, costs, cost_budget=3.0).expected_cost
        1.0
    """
    _check_calibration(target_accuracy, cost_budget)
    stages = cascade_stages(logits, target, costs, order, aggregation)
    return stages.calibrate(target_accuracy=target_accuracy, cost_budget=cost_budget)
