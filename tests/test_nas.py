"""The architecture search: tiny studies on the digits, shared storages, pruning, failures and bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.callbacks.optuna_pruning import OptunaPruning
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.nas.export import export_search
from lightning_ensembles.nas.search import NASSearch
from lightning_ensembles.nas.selection import choose_architectures, pareto_front, trial_records
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace
from lightning_ensembles.nas.storage import heartbeat_settings, open_storage
from tests.helpers import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
# Worker scripts import the package of this tree, not whichever copy is installed: a script's own folder, not
# the working directory, is first on its sys.path.
WORKER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
SPACE = NASSearchSpace(
    stages=[
        StageSpace(channels=[8, 16], expand_ratios=[1], max_blocks=1),
        StageSpace(channels=[16, 24], stride=2, expand_ratios=[3, 6], max_blocks=2),
    ],
    stem_channels=8,
    num_features=32,
)
# Architectures of nearly the same cost (kernel size and squeeze-excite only), for choosing arms by cost.
NARROW = NASSearchSpace(
    stages=[
        StageSpace(channels=[8], expand_ratios=[1], max_blocks=1),
        StageSpace(channels=[16], stride=2, expand_ratios=[3], max_blocks=1),
    ],
    stem_channels=8,
    num_features=32,
)
FAST = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2}


pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


def _search(**kwargs: Any) -> NASSearch:
    defaults: dict[str, Any] = dict(space=SPACE, n_trials=3, proxy_epochs=1, trainer=FAST, sampler="random")
    defaults.update(kwargs)
    return NASSearch(**defaults)


def _digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


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


def test_two_objective_search_completes_and_gives_the_pareto_set(tmp_path: Path) -> None:
    search = _search(space=NARROW, n_trials=4)
    study = search.optimize(_digits())
    records = [r for r in trial_records(study) if "duplicate_of" not in r]  # a small space: repeats happen
    assert len(records) == 4 and all(r["state"] == "COMPLETE" for r in records)
    for r in records:
        assert 0.0 <= r["top1"] <= 1.0 and r["gmacs"] > 0 and r["params"] > 0
        assert r["values"] == [r["top1"], r["gmacs"]]
    front = pareto_front(records)
    optuna_front = {(t.values[0], t.values[1]) for t in study.best_trials}
    assert {(r["top1"], r["gmacs"]) for r in front} == optuna_front
    assert [r["gmacs"] for r in front] == sorted(r["gmacs"] for r in front)

    result = export_search(search, study, _digits(), tmp_path, num_members=2, tolerance=0.9)
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
        export_search(search, study, _digits(), tmp_path, num_members=5, tolerance=0.9)
    assert (tmp_path / "pareto.yaml").is_file()
    # A rerun of a finished study trains nothing.
    assert len(search.optimize(_digits()).trials) == len(study.trials)


def test_reward_search_records_mnasnet_reward_and_prunes(tmp_path: Path) -> None:
    dm = _digits()
    target = 2 * _search().measure(SPACE.smallest(), dm)["gmacs"]
    search = _search(n_trials=5, proxy_epochs=3, target=target, pruner_startup_trials=1, sampler="tpe")
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


def test_pruning_callback_stops_training_after_a_pruned_epoch() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    callback = OptunaPruning(trial, "val/top1")
    module = EnsembleLightningModule(member=lambda: SPACE.smallest().build(in_channels=1), num_classes=10)
    dm = _digits()
    Trainer(
        **trainer_kwargs(max_epochs=5, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    ).fit(module, datamodule=dm)
    assert callback.pruned_epoch == 0 and module.current_epoch == 1  # stopped after the first epoch of five
    assert list(study.trials[0].intermediate_values) == [0]
    with pytest.raises(ValueError, match="single-objective study for pruning"):
        OptunaPruning(optuna.create_study(directions=["maximize", "minimize"]).ask())


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
    study = _search(n_trials=3).optimize(_DivergesOnSecondFit(batch_size=32))
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
    study = _search(n_trials=3).optimize(_DivergesOnSecondFit(batch_size=32))
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
    dm = _digits()
    target = 2 * _search(space=one).measure(one.smallest(), dm)["gmacs"]
    study = _search(space=one, n_trials=2, target=target, pruner="none").optimize(dm)
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

    monkeypatch.setattr("lightning_ensembles.nas.search.Trainer", Spy)
    _search(n_trials=1, trainer={**FAST, "enable_progress_bar": False}).optimize(_digits())
    assert bars == [None]


def test_latency_objective_measures_milliseconds() -> None:
    study = _search(n_trials=2, objective="latency", latency_repeats=3).optimize(_digits())
    for r in trial_records(study):
        assert r["latency_ms"] > 0 and r["values"] == [r["top1"], r["latency_ms"]]


_WORKER = textwrap.dedent(
    """
    import sys, torch, optuna
    from lightning_ensembles.data import DigitsDataModule
    from lightning_ensembles.nas import NASSearch, NASSearchSpace, StageSpace

    torch.set_num_threads(1)
    space = NASSearchSpace(
        stages=[StageSpace(channels=[8, 16], expand_ratios=[1], max_blocks=1),
                StageSpace(channels=[16, 24], stride=2, expand_ratios=[3, 6], max_blocks=2)],
        stem_channels=8, num_features=32)
    search = NASSearch(space, n_trials=6, storage=sys.argv[1], study_name="shared", seed=int(sys.argv[2]),
                       sampler="random", proxy_epochs=1,
                       trainer={"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2})
    search.optimize(DigitsDataModule(batch_size=32))
    """
)


@pytest.mark.timeout(240)
def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), storage, str(seed)],
            cwd=ROOT,
            env=WORKER_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=220)
        assert worker.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # one numbering, no duplicates
    trained = [t for t in trials if not {"surplus", "duplicate_of"} & set(t.user_attrs)]
    surplus = [t for t in trials if "surplus" in t.user_attrs]
    # Exactly the requested architectures were trained, each once; a worker that started one more in the
    # instant another started the last marks it surplus and trains nothing.
    assert len(trained) == 6 and len(surplus) <= 1
    assert all(t.state.name == "COMPLETE" and "top1" in t.user_attrs for t in trained)
    assert all(t.state.name == "PRUNED" and "top1" not in t.user_attrs for t in trials if t not in trained)
    architectures = {json.dumps(t.params, sort_keys=True) for t in trained}
    assert len(architectures) == 6  # no architecture trained twice
    # Which worker trained how many depends on scheduling (on a loaded machine one may train all six before
    # the other starts), so it is not asserted; both exited cleanly on the one shared study above.
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} <= {str(w.pid) for w in workers}


def test_a_worker_that_loses_the_schema_race_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Two workers starting on a new SQLite file: the loser's CREATE TABLE fails with "already exists".
    # Deterministic stand-in for the race: the first attempt fails that way, the retry opens the storage.
    import sqlalchemy.exc

    calls = []
    real = optuna.storages.RDBStorage

    def racing(url: str, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE studies", {}, Exception("table studies already exists")
            )
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr("lightning_ensembles.nas.storage.time.sleep", lambda seconds: None)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(storage, real) and len(calls) == 2


_DYING_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from lightning_ensembles.data import DigitsDataModule
    from lightning_ensembles.nas import NASSearch, NASSearchSpace, StageSpace

    class DiesInSecondFit(DigitsDataModule):
        fits = 0

        def train_dataloader(self):
            type(self).fits += 1
            if type(self).fits == 2:
                os._exit(3)  # killed mid-trial: no exception, no `tell`, the trial stays RUNNING
            return super().train_dataloader()

    torch.set_num_threads(1)
    space = NASSearchSpace(
        stages=[StageSpace(channels=[8, 16], expand_ratios=[1], max_blocks=1),
                StageSpace(channels=[16, 24], stride=2, expand_ratios=[3, 6], max_blocks=2)],
        stem_channels=8, num_features=32)
    search = NASSearch(space, n_trials=3, storage=sys.argv[1], seed=0, sampler="random", proxy_epochs=1,
                       trainer={"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2})
    search.optimize(DiesInSecondFit(batch_size=32))
    """
)


@pytest.mark.timeout(180)
def test_a_dead_workers_trial_is_failed_and_its_architecture_trained_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    script = tmp_path / "worker.py"
    script.write_text(_DYING_WORKER)
    worker = subprocess.Popen(
        [sys.executable, str(script), storage], cwd=ROOT, env=WORKER_ENV, stderr=subprocess.PIPE, text=True
    )
    _, err = worker.communicate(timeout=150)
    assert worker.returncode == 3, err[-3000:]
    dead = optuna.load_study(study_name="nas", storage=storage).trials[1]
    assert dead.state.name == "RUNNING" and dead.user_attrs["worker"].endswith(f":{worker.pid}")
    # The dead worker recorded a heartbeat when the trial started. Instead of waiting out the grace period,
    # its heartbeat is moved an hour back: what another worker sees once the worker has been gone that long.
    connection = sqlite3.connect(db)
    with connection:
        moved = connection.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') "
            "WHERE trial_id IN (SELECT trial_id FROM trials WHERE state = 'RUNNING')"
        )
    assert moved.rowcount == 1
    connection.close()

    caplog.set_level(logging.INFO, logger="lightning_ensembles")
    search = _search(storage=storage, n_trials=3, seed=1)
    study = search.optimize(_digits())
    records = {r["number"]: r for r in trial_records(study)}
    # The dead trial failed; its architecture came back as the next trial, trained here, and counts once.
    assert records[1]["state"] == "FAIL" and records[1]["retried_as"] == 2
    assert records[1]["fail_reason"] == "its worker stopped (no heartbeat)"
    retry = study.trials[2]
    assert records[2]["retry_of"] == 1 and retry.state.name == "COMPLETE" and retry.params == dead.params
    assert records[2]["architecture"] == dead.user_attrs["architecture"] and "top1" in records[2]
    assert records[2]["worker"].endswith(f":{os.getpid()}")
    assert search._counts(study) == (3, len(study.trials))
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert len(trained) == 3 and not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert (
        f"Trial 1 (worker {dead.user_attrs['worker']}) sent no heartbeat for over 120 s, so its worker stopped; "
        "it is recorded as FAIL and its architecture is queued again (retry 1 of 1)." in caplog.text
    )
    assert "Trial 2, architecture 2 of 3, the retry of trial 1 (its worker stopped): top-1" in caplog.text


def test_stale_trials_count_once_and_retries_stop_after_stale_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study()
    params, distributions = {"stage0.kernel_size": 3}, {"stage0.kernel_size": CategoricalDistribution([3, 5])}

    def add(state: TrialState, history: list[int], **attrs: Any) -> None:
        system = {"failed_trial": history[0], "retry_history": history} if history else {}
        study.add_trial(
            create_trial(
                state=state,
                params=params,
                distributions=distributions,
                user_attrs=attrs,
                system_attrs=system,
                value=None if state != TrialState.COMPLETE else 1.0,
            )
        )

    add(TrialState.COMPLETE, [])  # 0: an architecture
    add(
        TrialState.FAIL, [], architecture={"stages": []}, gmacs=1.0, worker="gone:1"
    )  # 1: stale, retried as 2
    add(TrialState.FAIL, [1])  # 2: went stale again, retried as 3
    add(TrialState.WAITING, [1, 2])  # 3: queued, not yet an architecture
    add(TrialState.PRUNED, [], duplicate_of=0)  # 4: a repeat
    assert NASSearch._counts(study) == (1, 5)
    assert NASSearch._counts(study, before=3) == (1, 3)  # the stale trials count through their retry only
    # A retry is not queued again past `stale_retries`: the stale trial stays failed and counts.
    search = _search(stale_retries=1)
    heartbeat = heartbeat_settings(search.heartbeat_interval, search.grace_period, search.stale_retries)
    (retry,) = (value for key, value in heartbeat.items() if key.endswith("_callback"))
    retry(study, study.trials[2])
    assert len(study.trials) == 5 and "and not retried (`--search.stale_retries` 1 reached)" in caplog.text
    retry(study, study.trials[1])
    queued = study.trials[5]
    assert queued.state.name == "WAITING" and queued.params == params
    assert queued.user_attrs == {"architecture": {"stages": []}}  # cost, worker, top-1 are measured again
    assert NASSearch._counts(study) == (1, 6)


def test_database_storages_get_the_heartbeat_settings(tmp_path: Path) -> None:
    def storage(**kwargs: Any) -> optuna.storages.RDBStorage:
        url = f"sqlite:///{tmp_path / f'{len(kwargs)}.db'}"
        search = _search(storage=url, **kwargs)
        return open_storage(url, search.heartbeat_interval, search.grace_period, search.stale_retries)

    assert (storage().heartbeat_interval, storage().grace_period) == (60, 120)  # the defaults
    custom = storage(heartbeat_interval=5, grace_period=30)
    assert (custom.heartbeat_interval, custom.grace_period) == (5, 30)
    assert storage(heartbeat_interval=None).heartbeat_interval is None


def test_repeated_architectures_are_recorded_but_not_trained_or_counted() -> None:
    one = NASSearchSpace(
        stages=[StageSpace(channels=[8], expand_ratios=[1], kernel_sizes=[3, 5], max_blocks=1, se=[False])]
    )
    study = _search(space=one, n_trials=2).optimize(_digits())  # a space of two architectures
    trained = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(trained) == 2 and {t.params["stage0.kernel_size"] for t in trained} == {3, 5}
    assert all(t.state.name == "PRUNED" and "top1" not in t.user_attrs for t in repeats)
    # A space smaller than n_trials ends after 4 * n_trials trials with a warning, not an endless loop.
    study = _search(space=one, n_trials=3).optimize(_digits())
    assert len(study.trials) == 12 and sum("duplicate_of" not in t.user_attrs for t in study.trials) == 2


def test_unmeetable_target_fails_before_the_storage_is_touched(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    search = _search(target=1e-9, storage=f"sqlite:///{db}")
    with pytest.raises(
        ValueError,
        match=r"`--search.target` to be a cost some architecture .* can meet, but got 1e-09 GMACs: the cheapest architecture of the space \(ds_r1_k3_s1_c8, ir_r1_k3_s2_e3_c16\) costs",
    ):
        search.optimize(_digits())
    assert not db.exists()


def test_unreachable_storage_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'study.db'}"
    with pytest.raises(ConnectionError, match=r"`--search.storage` '" + url + "'.*folder exists"):
        _search(storage=url).create_study()
    # No PostgreSQL driver here (ImportError), or no server on port 1 (refused): unreachable either way.
    with pytest.raises(
        ConnectionError, match=r"`--search.storage` 'postgresql://nas:\*\*\*@127.0.0.1:1/nas'"
    ) as info:
        _search(storage="postgresql://nas:secret@127.0.0.1:1/nas").create_study()
    with pytest.raises(
        ValueError, match=r"`--search.storage` to be an Optuna storage URL .* got 'nosuchdb://host/db'"
    ):
        _search(storage="nosuchdb://host/db").create_study()
    assert "secret" not in str(info.value)  # passwords are not repeated in messages


def test_a_study_created_by_another_search_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _search(storage=storage).create_study()
    with pytest.raises(
        ValueError, match=r"study 'nas' in `--search.storage` to have been created by the same"
    ):
        _search(storage=storage, target=1.0).create_study()
    with pytest.raises(ValueError, match=r"created with proxy_epochs 1 \(here 3\)"):
        _search(storage=storage, proxy_epochs=3).create_study()
    _search(storage=storage, seed=7).create_study()  # another worker: its own sampler seed is expected
    other = NASSearchSpace(stages=[StageSpace(channels=[8])])
    with pytest.raises(ValueError, match=r"another space"):
        _search(storage=storage, space=other).create_study()


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
        _search(**kwargs)


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


def test_missing_optuna_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ensembles.nas import import_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # what an uninstalled package looks like to `import`
    with pytest.raises(ImportError, match=r'pip install "lightning-ensembles\[nas\]"'):
        import_optuna()
    with pytest.raises(ImportError, match=r"needs Optuna"):
        _search().create_study()
