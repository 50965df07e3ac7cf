"""Shared search spaces, Trainer settings and search factory for the NAS tests.

The files under ``tests/nas/`` and ``tests/callbacks/test_optuna_pruning.py`` import these with
``from tests.nas.common import ...``; the ``quiet_optuna_one_thread`` fixture they use is in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Any

from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.nas.search import NASSearch
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace

__all__ = ["FAST", "SPACE", "digits", "make_search"]

SPACE = NASSearchSpace(
    stages=[
        StageSpace(channels=[8, 16], expand_ratios=[1], max_blocks=1),
        StageSpace(channels=[16, 24], stride=2, expand_ratios=[3, 6], max_blocks=2),
    ],
    stem_channels=8,
    num_features=32,
)
FAST = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2}


def make_search(**kwargs: Any) -> NASSearch:
    """A random-sampler search of three one-epoch trials on ``SPACE`` with ``FAST``; ``kwargs`` override these."""
    defaults: dict[str, Any] = dict(space=SPACE, n_trials=3, proxy_epochs=1, trainer=FAST, sampler="random")
    defaults.update(kwargs)
    return NASSearch(**defaults)


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)
