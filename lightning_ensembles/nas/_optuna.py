"""The one import of Optuna (Akiba et al., KDD 2019), an optional dependency of the NAS recipe.

The architecture search of Kondratyuk et al. (arXiv 2005.00570, figure 3) runs on Optuna; everything else of
the package works without it, so it is imported on first use, with the install command when it is missing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["import_optuna"]

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
