"""The study runner: tiny studies on the digits, one progress line per trial, repeats, failures and bad input."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

import lightning_ensembles.nas.search
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.nas.selection import trial_records
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace
from tests.nas.common import FAST, SPACE, digits, make_search

pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


@pytest.fixture
def optuna_info_to_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Optuna at its default verbosity (INFO), its records reaching ``caplog`` as well as its own handler."""
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.logging.enable_propagation()
    caplog.set_level(logging.INFO)
    yield caplog
    optuna.logging.disable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _lines_about(caplog: pytest.LogCaptureFixture, number: int) -> list[str]:
    """Every logged line, of any logger, about trial ``number``."""
    return [r.getMessage() for r in caplog.records if re.match(rf"Trial {number}\b", r.getMessage())]


def test_reward_search_records_mnasnet_reward_and_prunes(tmp_path: Path) -> None:
    dm = digits()
    target = 2 * make_search().measure(SPACE.smallest(), dm)["gmacs"]
    search = make_search(n_trials=5, proxy_epochs=3, target=target, pruner_startup_trials=1, sampler="tpe")
    study = search.optimize(dm)
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    for r in trial_records(study):
        assert r["state"] in ("COMPLETE", "PRUNED")
        w = -0.07
        assert r["values"] is None or r["values"][0] == pytest.approx(r["top1"] * (r["gmacs"] / target) ** w)
        if r["state"] == "COMPLETE":
            assert r["epochs"] == 3
    # Trials far below the median of the earlier ones at the same epoch stop early (here two of five).
    pruned = [r for r in trial_records(study) if r["state"] == "PRUNED" and "duplicate_of" not in r]
    assert pruned and all(r["epochs"] < 3 for r in pruned)


class _DivergesOnSecondFit(DigitsDataModule):
    """Digits whose second training run (the second trial) sees NaN images."""

    fits = 0

    def train_dataloader(self) -> DataLoader:
        type(self).fits += 1
        if type(self).fits == 2:
            x, y = self.train_set.tensors  # type: ignore[union-attr]
            return DataLoader(TensorDataset(torch.full_like(x, float("nan")), y), batch_size=self.batch_size)
        return super().train_dataloader()


def test_diverging_trial_is_recorded_failed_and_the_study_continues(caplog: pytest.LogCaptureFixture) -> None:
    _DivergesOnSecondFit.fits = 0
    study = make_search(n_trials=3).optimize(_DivergesOnSecondFit(batch_size=32))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    reason = study.trials[1].user_attrs["fail_reason"]
    assert reason.startswith("diverged: Member 0 produced a non-finite training loss")
    assert "recorded as FAIL; the study continues" in caplog.text


def test_each_finished_trial_is_one_line_with_progress_best_and_time_left(
    optuna_info_to_caplog: pytest.LogCaptureFixture,
) -> None:
    caplog = optuna_info_to_caplog
    _DivergesOnSecondFit.fits = 0
    study = make_search(n_trials=3).optimize(_DivergesOnSecondFit(batch_size=32))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    # One line per trial, the library's: Optuna's "Trial 0 finished with values ..." and its two warnings
    # (with a traceback) about the failed trial are left out.
    lines = [_lines_about(caplog, number) for number in range(3)]
    assert [len(about) for about in lines] == [1, 1, 1], lines
    first, failed, last = (about[0] for about in lines)
    assert re.match(
        r"Trial 0, architecture 1 of 3: top-1 [\d.]+ at [\d.e-]+ GMACs, [\d.e-]+ M params, [\d.]+ s \(ds_r1_.*\)\. "
        r"Best so far: top-1 [\d.]+ \(trial 0, [\d.e-]+ GMACs\), 1 on the Pareto set\. "
        r"About \d+ s left \(2 architectures at [\d.]+ s each in this process\)\.$",
        first,
    ), first
    assert failed.startswith(
        "Trial 1, architecture 2 of 3: failed and is recorded as FAIL; the study continues. "
    )
    assert "diverged: Member 0" in failed and "About" in failed and "(1 architecture at" in failed
    assert last.startswith("Trial 2, architecture 3 of 3: top-1 ") and last.endswith(
        "All 3 architectures trained."
    )
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert (levels[first], levels[failed]) == (logging.INFO, logging.WARNING)
    assert {r.name for r in caplog.records if r.getMessage() in (first, failed, last)} == {
        "lightning_ensembles.nas"
    }
    # The user's Optuna verbosity holds again after the search, and nothing is left filtering Optuna's loggers.
    assert optuna.logging.get_verbosity() == optuna.logging.INFO
    assert not logging.getLogger("optuna.study._optimize").filters
    assert not logging.getLogger("optuna.study.study").filters


def test_repeats_are_one_line_each_and_the_reward_search_reports_the_best_reward(
    optuna_info_to_caplog: pytest.LogCaptureFixture,
) -> None:
    caplog = optuna_info_to_caplog
    one = NASSearchSpace(
        stages=[StageSpace(channels=[8], expand_ratios=[1], kernel_sizes=[3, 5], max_blocks=1, se=[False])]
    )
    dm = digits()
    target = 2 * make_search(space=one).measure(one.smallest(), dm)["gmacs"]
    study = make_search(space=one, n_trials=2, target=target, pruner="none").optimize(dm)
    for trial in study.trials:
        (line,) = _lines_about(caplog, trial.number)
        if "duplicate_of" in trial.user_attrs:
            assert (
                f"a repeat of trial {trial.user_attrs['duplicate_of']} (not trained, not counted): pruned"
                in line
            )
        else:
            assert re.search(r"architecture \d of 2: reward [\d.]+, top-1 [\d.]+ at", line), line
        assert "Best so far: reward " in line


def test_proxies_train_without_a_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    bars = []

    class Spy(Trainer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            bars.append(self.progress_bar_callback)

    monkeypatch.setattr(lightning_ensembles.nas.search, "Trainer", Spy)
    make_search(n_trials=1, trainer={**FAST, "enable_progress_bar": False}).optimize(digits())
    assert bars == [None]


def test_latency_objective_measures_milliseconds() -> None:
    study = make_search(n_trials=2, objective="latency", latency_repeats=3).optimize(digits())
    for r in trial_records(study):
        assert r["latency_ms"] > 0 and r["values"] == [r["top1"], r["latency_ms"]]


def test_repeated_architectures_are_recorded_but_not_trained_or_counted() -> None:
    one = NASSearchSpace(
        stages=[StageSpace(channels=[8], expand_ratios=[1], kernel_sizes=[3, 5], max_blocks=1, se=[False])]
    )
    study = make_search(space=one, n_trials=2).optimize(digits())  # a space of two architectures
    trained = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(trained) == 2 and {t.params["stage0.kernel_size"] for t in trained} == {3, 5}
    assert all(t.state.name == "PRUNED" and "top1" not in t.user_attrs for t in repeats)
    # A space smaller than n_trials ends after 4 * n_trials trials with a warning, not an endless loop.
    study = make_search(space=one, n_trials=3).optimize(digits())
    assert len(study.trials) == 12 and sum("duplicate_of" not in t.user_attrs for t in study.trials) == 2


def test_unmeetable_target_fails_before_the_storage_is_touched(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    search = make_search(target=1e-9, storage=f"sqlite:///{db}")
    with pytest.raises(
        ValueError,
        match=r"`--search.target` to be a cost some architecture .* can meet, but got 1e-09 GMACs: the cheapest architecture of the space \(ds_r1_k3_s1_c8, ir_r1_k3_s2_e3_c16\) costs",
    ):
        search.optimize(digits())
    assert not db.exists()


def test_a_study_created_by_another_search_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    make_search(storage=storage).create_study()
    with pytest.raises(
        ValueError, match=r"study 'nas' in `--search.storage` to have been created by the same"
    ):
        make_search(storage=storage, target=1.0).create_study()
    with pytest.raises(ValueError, match=r"created with proxy_epochs 1 \(here 3\)"):
        make_search(storage=storage, proxy_epochs=3).create_study()
    make_search(storage=storage, seed=7).create_study()  # another worker: its own sampler seed is expected
    other = NASSearchSpace(stages=[StageSpace(channels=[8])])
    with pytest.raises(ValueError, match=r"another space"):
        make_search(storage=storage, space=other).create_study()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_trials": 0}, r"^Expected `--search.n_trials` to be an int >= 1, but got 0.$"),
        ({"objective": "flops"}, r"`--search.objective` to be 'macs' or 'latency', but got 'flops'"),
        ({"target": -1.0}, r"`--search.target` to be a positive number"),
        ({"reward_exponents": (0.1, -1.0)}, r"`--search.reward_exponents` to be two numbers <= 0"),
        ({"proxy_epochs": 0}, r"`--search.proxy_epochs` to be an int >= 1"),
        ({"storage": ""}, r"`--search.storage` to be an Optuna storage URL"),
        ({"trainer": {"devices": 4}}, r"`--search.trainer.devices` to be 1 .* but got 4"),
        ({"trainer": {"max_epochs": 9}}, r"`--search.trainer` not to set 'max_epochs'"),
        ({"member_kwargs": {"in_channels": 3}}, r"`--search.member_kwargs` not to set 'in_channels'"),
        ({"sampler": "grid"}, r"`--search.sampler` to be 'tpe' or 'random'"),
        (
            {"trainer": {"enable_progress_bar": True}},
            r"`--search.trainer.enable_progress_bar` to be false or unset .* but got True",
        ),
        (
            {"heartbeat_interval": 0},
            r"^Expected `--search.heartbeat_interval` to be an int >= 1, but got 0.$",
        ),
        ({"heartbeat_interval": 2.5}, r"`--search.heartbeat_interval` to be an int >= 1, but got 2.5"),
        (
            {"heartbeat_interval": 60, "grace_period": 60},
            r"^Expected `--search.grace_period` to be an int > `--search.heartbeat_interval` \(60 s\) or null "
            r"\(twice the interval\), but got 60.$",
        ),
        (
            {"heartbeat_interval": None, "grace_period": 120},
            r"`--search.grace_period` to be null, as `--search.heartbeat_interval` is null .* but got 120",
        ),
        ({"stale_retries": -1}, r"`--search.stale_retries` to be an int >= 0, but got -1"),
    ],
)
def test_bad_search_arguments_name_the_flag(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_search(**kwargs)


def test_missing_optuna_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ensembles.nas import import_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # what an uninstalled package looks like to `import`
    with pytest.raises(ImportError, match=r'pip install "lightning-ensembles\[nas\]"'):
        import_optuna()
    with pytest.raises(ImportError, match=r"needs Optuna"):
        make_search().create_study()
