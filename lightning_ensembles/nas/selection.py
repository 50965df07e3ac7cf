"""Choosing from a finished architecture search: trial records, the Pareto set, the two arms of the comparison.

The third experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), asks whether one searched architecture replicated ``N`` times is
as good as ``N`` different searched architectures of the same total cost. These pure functions turn an Optuna
study (Akiba et al., KDD 2019) into plain records, the records into the accuracy/cost Pareto set, and the
Pareto search's results into those two arms (:func:`choose_architectures`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_ensembles._validation import check_int

if TYPE_CHECKING:
    import optuna

__all__ = ["choose_architectures", "pareto_front", "trial_records"]


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Every finished trial as a plain dict (for tables, YAML and selection).

    Args:
        study: The study.

    Returns:
        One dict per trial, by number: ``number``, ``state`` (``"COMPLETE"``, ``"PRUNED"``, ``"FAIL"``, ...),
        ``values``, and the user attributes (``architecture``, ``top1``, ``gmacs``, ``params``, ``latency_ms``,
        ``reward``, ``fit_seconds``, ``fail_reason``, ``duplicate_of``, ...). A trial that ran again because its
        worker stopped has ``retry_of`` (the stale trial), and the stale trial ``retried_as``.
    """
    trials = study.get_trials(deepcopy=False)
    records = [_record(trial) for trial in trials]
    retried_as = {r["retry_of"]: r["number"] for r in records if "retry_of" in r}
    for record in records:
        if record["number"] in retried_as:
            record["retried_as"] = retried_as[record["number"]]
            record.setdefault("fail_reason", "its worker stopped (no heartbeat)")
    return sorted(records, key=lambda r: r["number"])


def _record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    record: dict[str, Any] = {"number": trial.number, "state": trial.state.name, "values": trial.values}
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        record["started"] = trial.datetime_start.isoformat(timespec="seconds")
        record["seconds"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    record.update(trial.user_attrs)
    history = trial.system_attrs.get("retry_history")
    if history:
        record["retry_of"] = history[-1]
    return record


def _completed(records: Sequence[Mapping[str, Any]], cost_key: str) -> list[Mapping[str, Any]]:
    return [
        r
        for r in records
        if r["state"] == "COMPLETE" and "top1" in r and cost_key in r and r.get("duplicate_of") is None
    ]


def pareto_front(records: Sequence[Mapping[str, Any]], cost_key: str = "gmacs") -> list[dict[str, Any]]:
    """The completed trials no other completed trial beats on both top-1 and cost, by increasing cost.

    Args:
        records: From :func:`trial_records`.
        cost_key: ``"gmacs"`` or ``"latency_ms"``.

    Returns:
        The non-dominated records (one per architecture), cheapest first.

    Example:
        >>> rows = [{"number": i, "state": "COMPLETE", "top1": t, "gmacs": c}
        ...         for i, (t, c) in enumerate([(0.9, 1.0), (0.8, 2.0), (0.95, 3.0), (0.9, 0.5)])]
        >>> [r["number"] for r in pareto_front(rows)]
        [3, 2]
    """
    done = _completed(records, cost_key)
    front = [
        dict(r)
        for r in done
        if not any(
            (o["top1"] >= r["top1"] and o[cost_key] <= r[cost_key])
            and (o["top1"] > r["top1"] or o[cost_key] < r[cost_key])
            for o in done
        )
    ]
    unique: dict[str, dict[str, Any]] = {}
    for r in sorted(front, key=lambda r: (r[cost_key], -r["top1"], r["number"])):
        unique.setdefault(json.dumps(r.get("architecture", r["number"]), sort_keys=True), r)
    return list(unique.values())


def choose_architectures(
    records: Sequence[Mapping[str, Any]],
    num_members: int = 3,
    budget: float | None = None,
    tolerance: float = 0.15,
    cost_key: str = "gmacs",
) -> dict[str, Any]:
    """Choose the two arms of the comparison from the completed trials.

    Arm (a), *replicated*, is the most accurate (validation top-1) completed architecture whose cost lies
    within ``tolerance`` of the per-member ``budget``; it is trained ``num_members`` times with different seeds.
    Arm (b), *diverse*, is that architecture and the ``num_members - 1`` most accurate other architectures
    whose cost lies within ``tolerance`` of arm (a)'s, one member each. The two arms' total costs therefore
    differ by at most ``tolerance``; both are reported.

    Args:
        records: From :func:`trial_records`.
        num_members: ``N``, the ensemble size of both arms (>= 2).
        budget: Per-member cost (GMACs or ms, as ``cost_key``); ``None`` takes the median cost of the
            completed trials.
        tolerance: Relative cost window, in ``(0, 1)``.
        cost_key: ``"gmacs"`` or ``"latency_ms"``.

    Returns:
        ``{"replicated": record, "diverse": [records], "budget": ..., "replicated_cost": N * cost,
        "diverse_cost": sum of costs, "cost_key": ...}``.

    Raises:
        ValueError: For an invalid argument, or too few distinct architectures in a window (naming how many
            there are and what to change).
    """
    check_int(num_members, "--select.num_members", 2)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0.0 < tolerance < 1.0:
        raise ValueError(f"Expected `--select.tolerance` to be a float in (0, 1), but got {tolerance!r}.")
    done = _completed(records, cost_key)
    if not done:
        raise ValueError(
            "Expected completed trials to choose from, but the study has none (see its failed trials)."
        )
    if budget is None:
        costs = sorted(r[cost_key] for r in done)
        budget = costs[(len(costs) - 1) // 2]
    elif not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"Expected `--select.budget` to be a positive number or null, but got {budget!r}.")

    def best_within(center: float) -> list[dict[str, Any]]:
        low, high = center * (1 - tolerance), center * (1 + tolerance)
        ranked = sorted(
            (r for r in done if low <= r[cost_key] <= high),
            key=lambda r: (-r["top1"], r[cost_key], r["number"]),
        )
        distinct: dict[str, Mapping[str, Any]] = {}
        for r in ranked:
            distinct.setdefault(json.dumps(r.get("architecture", r["number"]), sort_keys=True), r)
        return [dict(r) for r in distinct.values()]

    hint = "Run more trials, widen `--select.tolerance` or move `--select.budget`."
    around_budget = best_within(budget)
    if not around_budget:
        raise ValueError(
            f"Expected a completed architecture within ±{tolerance:.0%} of the per-member `--select.budget` "
            f"{budget:.4g} ({cost_key}), but found none among {len(done)} completed trials. {hint}"
        )
    replicated = around_budget[0]
    others = [r for r in best_within(replicated[cost_key]) if r["number"] != replicated["number"]]
    diverse = [replicated, *others[: num_members - 1]]
    if len(diverse) < num_members:
        raise ValueError(
            f"Expected at least `--select.num_members` = {num_members} distinct completed architectures within "
            f"±{tolerance:.0%} of the cost of the replicated one (trial {replicated['number']}, "
            f"{replicated[cost_key]:.4g} {cost_key}), but found {1 + len(others)} among {len(done)} completed "
            f"trials. {hint}"
        )
    return {
        "budget": budget,
        "cost_key": cost_key,
        "replicated": replicated,
        "diverse": diverse,
        "replicated_cost": num_members * replicated[cost_key],
        "diverse_cost": sum(r[cost_key] for r in diverse),
    }
