"""Optuna pruning for the proxies of an architecture search: report a metric each epoch, stop a pruned trial.

The architecture search of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), trains a proxy per architecture; with MnasNet's single reward
(Tan et al., arXiv 1807.11626) bad proxies are stopped early by an Optuna pruner (Akiba et al., KDD 2019).
:class:`~lightning_ensembles.nas.NASSearch` adds this callback to each proxy's ``Trainer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

if TYPE_CHECKING:
    import optuna

__all__ = ["OptunaPruning"]


class OptunaPruning(Callback):
    """Report a validation metric to an Optuna trial after every epoch and stop training when it is pruned.

    Training is stopped the Lightning way (``trainer.should_stop``), so the run ends cleanly; the caller then
    raises ``optuna.TrialPruned`` when :attr:`pruned_epoch` is set. Optuna prunes single-objective studies
    only.

    Args:
        trial: The Optuna trial.
        monitor: The logged metric, e.g. ``"val/top1"``.
        transform: Maps the metric to the value reported (e.g. accuracy to MnasNet's reward); identity if
            ``None``.

    Raises:
        ValueError: If the trial belongs to a multi-objective study.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val/top1", transform: Any = None) -> None:
        if len(trial.study.directions) > 1:
            raise ValueError(
                "Expected a single-objective study for pruning (Optuna prunes only those), but the trial's "
                f"study has {len(trial.study.directions)} objectives."
            )
        self.trial = trial
        self.monitor = monitor
        self.transform = transform
        self.pruned_epoch: int | None = None
        """The epoch after which the trial was pruned, or ``None``."""
        self.last_value: float | None = None
        """The last value reported."""

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            raise KeyError(
                f"OptunaPruning monitors {self.monitor!r}, which the run did not log; logged: "
                f"{sorted(trainer.callback_metrics)}."
            )
        value = float(metric)
        if self.transform is not None:
            value = float(self.transform(value))
        self.last_value = value
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch
            trainer.should_stop = True
