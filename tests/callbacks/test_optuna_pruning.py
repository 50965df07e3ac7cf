"""OptunaPruning: a pruned trial stops training after the epoch it was pruned in."""

from __future__ import annotations

import optuna
import pytest
from lightning.pytorch import Trainer

from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.callbacks.optuna_pruning import OptunaPruning
from tests.helpers import trainer_kwargs
from tests.nas.common import SPACE, digits

pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


def test_pruning_callback_stops_training_after_a_pruned_epoch() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()
    callback = OptunaPruning(trial, "val/top1")
    module = EnsembleLightningModule(member=lambda: SPACE.smallest().build(in_channels=1), num_classes=10)
    dm = digits()
    Trainer(
        **trainer_kwargs(max_epochs=5, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    ).fit(module, datamodule=dm)
    assert callback.pruned_epoch == 0 and module.current_epoch == 1  # stopped after the first epoch of five
    assert list(study.trials[0].intermediate_values) == [0]
    with pytest.raises(ValueError, match="single-objective study for pruning"):
        OptunaPruning(optuna.create_study(directions=["maximize", "minimize"]).ask())
