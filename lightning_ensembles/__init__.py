"""lightning-ensembles: ensembles of independently initialised networks for PyTorch Lightning.

Follows Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570): M members trained independently, predictions averaged, and every ensemble size costed.
"""

__version__ = "0.1.0.dev0"
