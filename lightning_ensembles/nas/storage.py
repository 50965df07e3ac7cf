"""The Optuna storage that the workers of an architecture search share: opening it, heartbeats, stale trials.

The architecture search of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), trains one proxy per trial; :class:`~lightning_ensembles.nas.NASSearch`
keeps its Optuna study (Akiba et al., KDD 2019) in a database storage so that several worker processes or
machines can share it. Workers that start together race to create a new storage's tables, and the losers
retry; every running trial sends Optuna's heartbeat, and a trial whose worker stopped is recorded as failed
and its architecture queued again.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

from lightning_ensembles.nas._optuna import import_optuna

if TYPE_CHECKING:
    import optuna

__all__ = ["heartbeat_settings", "open_storage"]

# Lines about stale trials belong with the search's progress lines.
log = logging.getLogger("lightning_ensembles.nas")

_FLAG = "--search"
_STORAGE_ATTEMPTS = 6


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None, stale_retries: int = 0
) -> Any:
    """Open an Optuna database storage, retrying while other workers create its tables.

    Args:
        url: The storage URL (``sqlite:///search.db``, ``postgresql://...``, ``mysql://...``).
        heartbeat_interval: Seconds between the heartbeats of a running trial; ``None`` for none.
        grace_period: Seconds without a heartbeat after which a running trial is stale.
        stale_retries: How often a stale trial's architecture is queued again.

    Returns:
        The ``optuna.storages.RDBStorage``.

    Raises:
        ConnectionError: If the storage cannot be opened (no driver, no server), naming ``--search.storage``
            and the URL with any password hidden.
        ValueError: If the URL is malformed.
    """
    optuna = import_optuna()
    shown = _hide_password(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    heartbeat = heartbeat_settings(heartbeat_interval, grace_period, stale_retries)
    attempt = 0
    try:
        while True:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
            except Exception as err:
                import sqlalchemy.exc

                # Workers that start together race to create the tables of a new storage; the losers see
                # an integrity error, a locked SQLite file or "table ... already exists", and find the
                # schema there when they retry.
                racing = isinstance(err, sqlalchemy.exc.IntegrityError) or any(
                    text in str(err) for text in ("locked", "already exists")
                )
                attempt += 1
                if not racing or attempt == _STORAGE_ATTEMPTS:
                    raise
                time.sleep(0.5 * attempt)
    except ImportError as err:
        raise ConnectionError(
            f"Could not open the Optuna storage `{_FLAG}.storage` {shown!r}: its database driver is not "
            f"installed ({err}). Install the driver (e.g. `pip install psycopg2-binary` for PostgreSQL, "
            "`pip install pymysql` for MySQL) or use an SQLite URL ('sqlite:///path/search.db')."
        ) from err
    except Exception as err:
        import sqlalchemy.exc

        if isinstance(err, sqlalchemy.exc.ArgumentError) or (
            isinstance(err, ValueError) and not isinstance(err, sqlalchemy.exc.SQLAlchemyError)
        ):
            raise ValueError(
                f"Expected `{_FLAG}.storage` to be an Optuna storage URL such as 'sqlite:///search.db' or "
                f"'postgresql://user@host/db', but got {shown!r}: {err}"
            ) from err
        raise ConnectionError(
            f"Could not open the Optuna storage `{_FLAG}.storage` {shown!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''} Check that the database server is reachable "
            "from this machine (or, for SQLite, that the file's folder exists and is writable)."
        ) from err


def heartbeat_settings(
    heartbeat_interval: int | None, grace_period: int | None, stale_retries: int
) -> dict[str, Any]:
    """``RDBStorage`` arguments of the heartbeat: interval, grace period and the retry of stale trials.

    Args:
        heartbeat_interval: Seconds between the heartbeats of a running trial; ``None`` for none.
        grace_period: Seconds without a heartbeat after which a running trial is stale.
        stale_retries: How often a stale trial's architecture is queued again.

    Returns:
        Keyword arguments of ``optuna.storages.RDBStorage`` (none without heartbeats).

    Raises:
        ImportError: If Optuna is not installed.
    """
    optuna = import_optuna()
    if heartbeat_interval is None:
        return {}
    # Optuna 4.9 renamed the callback and its argument (the old names are deprecated).
    renamed = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    retry_class = (
        optuna.storages.RetryHeartbeatStaleTrialCallback
        if renamed
        else optuna.storages.RetryFailedTrialCallback
    )
    with warnings.catch_warnings():  # experimental in Optuna, chosen here and not by the user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_class(max_retry=stale_retries)
    callback = _RetryStaleTrial(retry, stale_retries, grace_period or 0)
    return {
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "heartbeat_stale_trial_callback" if renamed else "failed_trial_callback": callback,
    }


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: shown as given
        return url


class _RetryStaleTrial:
    """Optuna's heartbeat callback: say that a worker stopped, and queue its trial's architecture again.

    Optuna calls it once a running trial's heartbeat is older than the grace period, after recording the
    trial as ``FAIL``. The queued copy (a ``WAITING`` trial with the same parameters, made by Optuna's retry
    callback) keeps only the architecture of the stale trial's user attributes: its cost, top-1 and worker
    are measured again by whichever worker runs it.

    Args:
        retry: Optuna's ``RetryHeartbeatStaleTrialCallback`` (``RetryFailedTrialCallback`` before 4.9).
        max_retries: Its ``max_retry``, for the message.
        grace_period: Seconds without a heartbeat, for the message.
    """

    def __init__(self, retry: Any, max_retries: int, grace_period: int) -> None:
        self.retry = retry
        self.max_retries = max_retries
        self.grace_period = grace_period

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        worker = trial.user_attrs.get("worker", "unknown")
        retries = len(trial.system_attrs.get("retry_history", [])) + 1
        stopped = (
            f"Trial {trial.number} (worker {worker}) sent no heartbeat for over {self.grace_period} s, so its "
            "worker stopped; it is recorded as FAIL"
        )
        if retries > self.max_retries:
            log.warning(
                "%s and not retried (`%s.stale_retries` %d reached).", stopped, _FLAG, self.max_retries
            )
            return
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "architecture"}
        self.retry(study, trial)
        log.warning(
            "%s and its architecture is queued again (retry %d of %d).", stopped, retries, self.max_retries
        )
