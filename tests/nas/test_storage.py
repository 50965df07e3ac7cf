"""The storage the workers share: two workers on one SQLite study, the schema race, heartbeats, stale trials of
stopped workers queued again, and unreachable storages."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest

from lightning_ensembles.nas.search import NASSearch
from lightning_ensembles.nas.selection import trial_records
from lightning_ensembles.nas.storage import heartbeat_settings, open_storage
from tests.nas.common import digits, make_search

ROOT = Path(__file__).resolve().parents[2]
# Worker scripts import the package of this tree, not whichever copy is installed: a script's own folder, not
# the working directory, is first on its sys.path.
WORKER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


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
    import optuna.storages._heartbeat as heartbeat
    from lightning_ensembles.data import DigitsDataModule

    # Optuna's heartbeat thread never gets to write: the worker dies before its first heartbeat lands (a race
    # under load, made certain here). The search's own heartbeat at the start of the trial must be there.
    heartbeat.HeartbeatThread._record_heartbeat = staticmethod(lambda trial_id, beat, stop: stop.wait())
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


@pytest.mark.slow
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
    # The dead worker recorded a heartbeat when the trial started (the search's own, in the trial's thread: the
    # worker's heartbeat thread wrote none). Instead of waiting out the grace period,
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
    search = make_search(storage=storage, n_trials=3, seed=1)
    study = search.optimize(digits())
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
    search = make_search(stale_retries=1)
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
        search = make_search(storage=url, **kwargs)
        return open_storage(url, search.heartbeat_interval, search.grace_period, search.stale_retries)

    assert (storage().heartbeat_interval, storage().grace_period) == (60, 120)  # the defaults
    custom = storage(heartbeat_interval=5, grace_period=30)
    assert (custom.heartbeat_interval, custom.grace_period) == (5, 30)
    assert storage(heartbeat_interval=None).heartbeat_interval is None


def test_unreachable_storage_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'study.db'}"
    with pytest.raises(ConnectionError, match=r"`--search.storage` '" + url + "'.*folder exists"):
        make_search(storage=url).create_study()
    # No PostgreSQL driver here (ImportError), or no server on port 1 (refused): unreachable either way.
    with pytest.raises(
        ConnectionError, match=r"`--search.storage` 'postgresql://nas:\*\*\*@127.0.0.1:1/nas'"
    ) as info:
        make_search(storage="postgresql://nas:secret@127.0.0.1:1/nas").create_study()
    with pytest.raises(
        ValueError, match=r"`--search.storage` to be an Optuna storage URL .* got 'nosuchdb://host/db'"
    ):
        make_search(storage="nosuchdb://host/db").create_study()
    assert "secret" not in str(info.value)  # passwords are not repeated in messages
