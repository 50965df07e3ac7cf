"""lightning-ensembles: ensembles of independently initialised networks for PyTorch Lightning.

Follows Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570): M members trained independently, predictions averaged, and every ensemble size costed.
"""

from typing import TYPE_CHECKING

from lightning_ensembles._lazy import lazy_getattr
from lightning_ensembles.aggregation import aggregate, cumulative_probs
from lightning_ensembles.cascade_inference import CascadeEnsemble
from lightning_ensembles.distributed import MemberParallelStrategy  # importing registers `member_parallel`
from lightning_ensembles.metrics import EnsembleMetrics
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.parallel import ParallelEnsemble

if TYPE_CHECKING:
    from lightning_ensembles.export import ExportableEnsemble, export_ensemble

# Imported on first use, not with the package: `python -m lightning_ensembles.export` would otherwise find the
# module imported already and warn that it runs twice.
__getattr__ = lazy_getattr(
    __name__, dict.fromkeys(("ExportableEnsemble", "export_ensemble"), "lightning_ensembles.export")
)

__version__ = "0.1.0.dev0"
__all__ = [
    "CascadeEnsemble",
    "EnsembleLightningModule",
    "EnsembleMetrics",
    "ExportableEnsemble",
    "MemberParallelStrategy",
    "ParallelEnsemble",
    "aggregate",
    "cumulative_probs",
    "export_ensemble",
]
