"""A finished two-objective study exported: the Pareto set, the trials and both arms as LightningCLI YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ensembles.nas.export import export_search
from lightning_ensembles.nas.selection import pareto_front, trial_records
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace
from tests.nas.common import digits, make_search

# Architectures of nearly the same cost (kernel size and squeeze-excite only), for choosing arms by cost.
NARROW = NASSearchSpace(
    stages=[
        StageSpace(channels=[8], expand_ratios=[1], max_blocks=1),
        StageSpace(channels=[16], stride=2, expand_ratios=[3], max_blocks=1),
    ],
    stem_channels=8,
    num_features=32,
)


pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


def test_two_objective_search_completes_and_gives_the_pareto_set(tmp_path: Path) -> None:
    search = make_search(space=NARROW, n_trials=4)
    study = search.optimize(digits())
    records = [r for r in trial_records(study) if "duplicate_of" not in r]  # a small space: repeats happen
    assert len(records) == 4 and all(r["state"] == "COMPLETE" for r in records)
    for r in records:
        assert 0.0 <= r["top1"] <= 1.0 and r["gmacs"] > 0 and r["params"] > 0
        assert r["values"] == [r["top1"], r["gmacs"]]
    front = pareto_front(records)
    optuna_front = {(t.values[0], t.values[1]) for t in study.best_trials}
    assert {(r["top1"], r["gmacs"]) for r in front} == optuna_front
    assert [r["gmacs"] for r in front] == sorted(r["gmacs"] for r in front)

    result = export_search(search, study, digits(), tmp_path, num_members=2, tolerance=0.9)
    best = max(records, key=lambda r: (r["top1"], -r["gmacs"], -r["number"]))
    assert result["selection"]["replicated"]["number"] == best["number"]  # every cost is in the window
    assert {Path(f).name for f in result["files"]} == {
        "pareto.yaml",
        "trials.json",
        "searched.yaml",
        "diverse.yaml",
    }
    assert json.loads((tmp_path / "trials.json").read_text())[0]["number"] == 0
    # When no arms can be chosen, the Pareto set and the trials are still written, then the error is raised.
    (tmp_path / "pareto.yaml").unlink()
    with pytest.raises(ValueError, match=r"`--select.num_members` = 5 distinct"):
        export_search(search, study, digits(), tmp_path, num_members=5, tolerance=0.9)
    assert (tmp_path / "pareto.yaml").is_file()
    # A rerun of a finished study trains nothing.
    assert len(search.optimize(digits()).trials) == len(study.trials)
