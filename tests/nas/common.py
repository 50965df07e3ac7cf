"""Shared search spaces, Trainer settings and search factory for the NAS tests.

The files under ``tests/nas/`` and ``tests/callbacks/test_optuna_pruning.py`` import these with
``from tests.nas.common import ...``; the ``quiet_optuna_one_thread`` fixture they use is in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Any

from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.nas.search import NASSearch
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace

__all__ = ["FAST", "SPACE", "THREE_STAGES", "digits", "make_search"]

SPACE = NASSearchSpace(
    stages=[
        StageSpace(channels=[8, 16], expand_ratios=[1], max_blocks=1),
        StageSpace(channels=[16, 24], stride=2, expand_ratios=[3, 6], max_blocks=2),
    ],
    stem_channels=8,
    num_features=32,
)
# Three stages, each field with one or several choices (its size is the product of their counts): the
# space of the space's own tests and of the NASNet member's.
THREE_STAGES = NASSearchSpace(
    stages=[
        StageSpace(channels=[8, 16], kernel_sizes=[3, 5], expand_ratios=[1], max_blocks=1),
        StageSpace(
            channels=[16, 24], stride=2, kernel_sizes=[3, 5, 7], expand_ratios=[1, 3, 6], max_blocks=3
        ),
        StageSpace(channels=[24, 40], stride=2, expand_ratios=[3, 6], min_blocks=2, max_blocks=3, se=[True]),
    ],
    stem_channels=8,
    num_features=64,
)
FAST = {"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2}


def make_search(**kwargs: Any) -> NASSearch:
    """A random-sampler search of three one-epoch trials on ``SPACE`` with ``FAST``; ``kwargs`` override these."""
    defaults: dict[str, Any] = dict(space=SPACE, n_trials=3, proxy_epochs=1, trainer=FAST, sampler="random")
    defaults.update(kwargs)
    return NASSearch(**defaults)


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)
