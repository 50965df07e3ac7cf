"""The results of an architecture search as LightningCLI YAML: the Pareto set and the two arms of the comparison.

The third experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), compares one searched architecture replicated ``N`` times (arm a)
with ``N`` different searched architectures of the same total cost (arm b). :func:`export_search` writes both
arms, chosen by :func:`~lightning_ensembles.nas.choose_architectures`, as member configs of
:class:`~lightning_ensembles.models.NASNet` that the recipes train, with the search's evidence in their header.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from lightning.pytorch import LightningDataModule

from lightning_ensembles.models.nas import NASArchitecture
from lightning_ensembles.nas._optuna import import_optuna
from lightning_ensembles.nas.search import NASSearch, _input_shape
from lightning_ensembles.nas.selection import choose_architectures, pareto_front, trial_records
from lightning_ensembles.results import atomic_write_text, environment

if TYPE_CHECKING:
    import optuna

__all__ = ["export_search", "member_config"]

_NASNET = "lightning_ensembles.models.NASNet"


def member_config(record: Mapping[str, Any], name: str, member_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The LightningCLI ``class_path``/``init_args`` entry of a searched architecture.

    Args:
        record: A trial record with an ``architecture``.
        name: The member's name in results tables.
        member_kwargs: Further :class:`~lightning_ensembles.models.NASNet` arguments (``in_channels``, ...).

    Returns:
        ``{"class_path": "lightning_ensembles.models.NASNet", "init_args": {...}}``.
    """
    architecture = NASArchitecture.from_dict(record["architecture"]).to_dict()
    init_args = {
        **architecture,
        **{k: v for k, v in member_kwargs.items() if k != "num_classes"},
        "name": name,
    }
    if isinstance(init_args.get("input_size"), tuple):
        init_args["input_size"] = list(init_args["input_size"])
    return {"class_path": _NASNET, "init_args": init_args}


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("number", "top1", "gmacs", "params", "latency_ms", "reward", "fit_seconds", "epochs")
    return {k: record[k] for k in keys if k in record}


def export_search(
    search: NASSearch,
    study: optuna.Study,
    datamodule: LightningDataModule,
    out: str | Path,
    num_members: int = 3,
    budget: float | None = None,
    tolerance: float = 0.15,
) -> dict[str, Any]:
    """Write the Pareto set and the two arms as YAML, each file atomically.

    - ``pareto.yaml``: every non-dominated trial with its objective values and member config;
    - ``searched.yaml``: arm (a)'s member config, composable with ``configs/ensemble-N.yaml``;
    - ``diverse.yaml``: arm (b), a ``model.members`` list of ``num_members`` architectures;
    - ``trials.json``: every trial's record.

    Args:
        search: The search that ran.
        study: Its study.
        datamodule: The proxies' data (``in_channels``).
        out: The output folder.
        num_members: ``N`` of both arms.
        budget: Per-member cost for :func:`choose_architectures` (``None``: the median).
        tolerance: Cost window for :func:`choose_architectures`.

    Returns:
        ``{"records", "pareto", "selection", "files"}``.

    Raises:
        ValueError: If the arms cannot be chosen (see :func:`choose_architectures`).
    """
    out = Path(out)
    records = trial_records(study)
    cost_key = search.cost_key
    pareto = pareto_front(records, cost_key)
    kwargs = {k: v for k, v in search.member_init_args(datamodule).items() if k != "num_classes"}
    name = search.study_name

    states: dict[str, int] = {}
    trained = [r for r in records if not {"duplicate_of", "surplus", "retried_as"} & set(r)]
    for r in trained:
        states[r["state"]] = states.get(r["state"], 0) + 1
    repeats = sum("duplicate_of" in r for r in records)
    stale = sum("retried_as" in r for r in records)
    timed = [r for r in records if "seconds" in r]
    wall = ""
    if timed:
        starts = [datetime.datetime.fromisoformat(r["started"]) for r in timed]
        ends = [start + datetime.timedelta(seconds=r["seconds"]) for start, r in zip(starts, timed)]
        wall = f"; wall-clock {(max(ends) - min(starts)).total_seconds() / 60:.1f} min (first trial start to last end)"
    env = environment()
    hardware = (
        f"{env['gpu_count']} x {env['gpu']}"
        if env["gpu"]
        else f"CPU ({env['cpu_count']} cores, {env['processor']})"
    )
    objective = (
        f"maximise validation top-1 and minimise {cost_key} (Pareto)"
        if search.target is None
        else f"maximise top1 * ({cost_key} / {search.target:g}) ** w, w = {search.reward_exponents}"
    )
    header = [
        f"Architecture search of lightning_ensembles.nas, study {name!r}, written {datetime.datetime.now().isoformat(timespec='seconds')}.",
        f"Data: {type(datamodule).__name__}, input {tuple(_input_shape(datamodule))}; proxies trained {search.proxy_epochs} epochs each.",
        f"Trials: {len(records)}: {len(trained)} architectures trained "
        f"({', '.join(f'{v} {k.lower()}' for k, v in sorted(states.items()))}), {repeats} repeats of trained ones "
        f"(not trained again)"
        + (f", {stale} of stopped workers (trained again)" if stale else "")
        + f"{wall}.",
        f"Objective: {objective}.",
        f"Hardware: {hardware}; torch {env['torch']}, lightning {env['lightning']}, optuna {import_optuna().__version__}.",
    ]

    def dump(comment: list[str], data: Any) -> str:
        return "".join(f"# {line}\n" for line in comment) + yaml.safe_dump(
            data, sort_keys=False, default_flow_style=None, width=120
        )

    pareto_data = {
        "study": name,
        "objective": objective,
        "trials": [
            {**_summary(r), "member": member_config(r, f"{name}-t{r['number']}", kwargs)} for r in pareto
        ],
    }
    files = [
        atomic_write_text(out / "pareto.yaml", dump(header, pareto_data)),
        atomic_write_text(out / "trials.json", json.dumps(records, indent=2, default=str) + "\n"),
    ]
    # The Pareto set and the trials are written first: they stay useful when no arms can be chosen.
    selection = choose_architectures(records, num_members, budget, tolerance, cost_key)
    arm_a = selection["replicated"]
    searched_comment = header + [
        f"Arm (a): trial {arm_a['number']}, validation top-1 {arm_a['top1']:.4f}, {arm_a['gmacs']:.4g} GMACs"
        + (f", {arm_a['latency_ms']:.3g} ms" if "latency_ms" in arm_a else "")
        + f"; chosen at a per-member budget of {selection['budget']:.4g} {cost_key} ±{tolerance:.0%}.",
        "A member config: compose with configs/ensemble-N.yaml for N independently initialised copies.",
    ]
    searched_data = {"model": {"member": member_config(arm_a, f"{name}-t{arm_a['number']}", kwargs)}}
    diverse_comment = header + [
        f"Arm (b): trials {[r['number'] for r in selection['diverse']]}, validation top-1 "
        f"{[round(r['top1'], 4) for r in selection['diverse']]}, total {selection['diverse_cost']:.4g} {cost_key} "
        f"(arm (a): {selection['replicated_cost']:.4g}).",
    ]
    diverse_data = {
        "model": {
            "member": None,
            "members": [member_config(r, f"{name}-t{r['number']}", kwargs) for r in selection["diverse"]],
        }
    }
    files += [
        atomic_write_text(out / "searched.yaml", dump(searched_comment, searched_data)),
        atomic_write_text(out / "diverse.yaml", dump(diverse_comment, diverse_data)),
    ]
    return {"records": records, "pareto": pareto, "selection": selection, "files": [str(f) for f in files]}
