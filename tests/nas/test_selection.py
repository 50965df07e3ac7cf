"""From a finished study to the two arms: the replicated best and diverse architectures of equal cost."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_ensembles.nas.selection import choose_architectures
from tests.nas.common import SPACE

pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


def _record(number: int, top1: float, gmacs: float, same_as: int | None = None) -> dict[str, Any]:
    arch = SPACE.smallest().to_dict()
    arch["stem_channels"] = 8 + (number if same_as is None else same_as)  # one architecture per number
    return {"number": number, "state": "COMPLETE", "top1": top1, "gmacs": gmacs, "architecture": arch}


def test_choose_architectures_replicates_the_best_and_diversifies_at_equal_cost() -> None:
    records = [
        _record(0, 0.90, 1.00),
        _record(1, 0.95, 1.10),
        _record(2, 0.93, 0.95),
        _record(3, 0.99, 3.00),  # outside the cost window
        _record(4, 0.80, 0.90),
        {"number": 5, "state": "FAIL"},
        _record(6, 0.94, 1.05, same_as=1),  # the same architecture as trial 1: not a second member
    ]
    chosen = choose_architectures(records, num_members=3, budget=1.0, tolerance=0.2)
    assert chosen["replicated"]["number"] == 1
    assert [r["number"] for r in chosen["diverse"]] == [1, 2, 0]
    assert chosen["replicated_cost"] == pytest.approx(3.3) and chosen["diverse_cost"] == pytest.approx(3.05)
    assert choose_architectures(records, num_members=2)["budget"] == 1.0  # the median completed trial
    with pytest.raises(ValueError, match=r"at least `--select.num_members` = 5 distinct .* found 4"):
        choose_architectures(records, num_members=5, budget=1.0, tolerance=0.2)
    with pytest.raises(ValueError, match=r"`--select.tolerance` to be a float in \(0, 1\)"):
        choose_architectures(records, tolerance=1.5)
