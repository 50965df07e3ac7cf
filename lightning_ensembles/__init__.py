"""lightning-ensembles: ensembles of independently initialised networks for PyTorch Lightning.

Follows Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570): M members trained independently, predictions averaged, and every ensemble size costed.
"""

from lightning_ensembles.aggregation import aggregate, cumulative_probs
from lightning_ensembles.cascade_inference import CascadeEnsemble
from lightning_ensembles.distributed import MemberParallelStrategy  # importing registers `member_parallel`
from lightning_ensembles.metrics import EnsembleMetrics
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.parallel import ParallelEnsemble

__version__ = "0.1.0.dev0"
__all__ = [
    "CascadeEnsemble",
    "EnsembleLightningModule",
    "EnsembleMetrics",
    "MemberParallelStrategy",
    "ParallelEnsemble",
    "aggregate",
    "cumulative_probs",
]
