"""The one import of Optuna (Akiba et al., KDD 2019), an optional dependency of the NAS recipe.

The architecture search of Kondratyuk et al. (arXiv 2005.00570, figure 3) runs on Optuna; everything else of
the package works without it, so it is imported on first use, with the install command when it is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["import_optuna", "record_heartbeat_now"]

_INSTALL = 'pip install "lightning-ensembles[nas]"'


def import_optuna() -> Any:
    """Import Optuna, which the search needs (an optional dependency).

    Returns:
        The ``optuna`` module.

    Raises:
        ImportError: If Optuna is not installed, saying how to install it.
    """
    try:
        import optuna
    except ImportError as err:
        raise ImportError(
            f"The architecture search needs Optuna (>= 3.6): `{_INSTALL}` or `pip install optuna`."
        ) from err
    return optuna


def record_heartbeat_now(trial: Any) -> None:
    """Record a running trial's heartbeat now, in this thread, when its storage keeps heartbeats.

    Optuna records a trial's heartbeats from a thread it starts with the trial, so a worker that dies (killed,
    out of memory) before that thread's first write leaves a trial with no heartbeat row, which
    ``fail_stale_trials`` never sees as stale: it would stay ``RUNNING`` for good. Recording one at the start of
    the objective closes that gap. Reads ``trial.study._storage`` and ``trial._trial_id`` (Optuna has no public
    name for either; ``lightning_ensembles._compat`` does not cover Optuna, an optional dependency, so the
    tests of the search check them).

    Args:
        trial: an ``optuna.Trial`` being run.
    """
    storage = getattr(getattr(trial, "study", None), "_storage", None)
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if storage is not None and interval is not None:
        storage.record_heartbeat(trial._trial_id)
