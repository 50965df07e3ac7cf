"""Callbacks that cost an ensemble (Kondratyuk et al. 2020): FLOPs, latency, the ensemble-size ablation,
cascades, the per-member EMA of the EfficientNet recipe, and the Optuna pruning of the NAS recipe's proxies.

Each is usable on its own in any Lightning run with an :class:`~lightning_ensembles.EnsembleLightningModule`;
ready-made LightningCLI presets live in the top-level ``callbacks/`` folder.
"""

from lightning_ensembles.callbacks.ablation import EnsembleSizeAblation
from lightning_ensembles.callbacks.cascade import CascadeMonitor
from lightning_ensembles.callbacks.ema import MemberEMA
from lightning_ensembles.callbacks.flops import FlopsMonitor
from lightning_ensembles.callbacks.latency import LatencyMonitor
from lightning_ensembles.callbacks.optuna_pruning import OptunaPruning
from lightning_ensembles.callbacks.reliability import ReliabilityDiagram

__all__ = [
    "CascadeMonitor",
    "EnsembleSizeAblation",
    "FlopsMonitor",
    "LatencyMonitor",
    "MemberEMA",
    "OptunaPruning",
    "ReliabilityDiagram",
]
