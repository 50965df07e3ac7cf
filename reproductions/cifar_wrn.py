"""CIFAR-10 Wide ResNets, single models and ensembles (Kondratyuk et al. 2020, figure 1).

    python reproductions/cifar_wrn.py --trainer.devices 8
    python reproductions/cifar_wrn.py --config reproductions/configs/cifar/wrn-40-4.yaml \
        --config reproductions/configs/ensemble-4.yaml

The default configuration (configs/cifar_wrn.yaml) is the standard WRN recipe of Zagoruyko & Komodakis
2016 with WRN-28-10. The script trains, tests the final weights (``--test_weights best``: the best checkpoint), then prints the results table and saves
it as results.json / results.md next to the TensorBoard logs.
"""

from __future__ import annotations

from pathlib import Path

from lightning_ensembles.cli import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cifar_wrn.yaml"


def main(args: list[str] | None = None) -> dict:
    """Run the recipe with ``args`` (default: the command line), print and return its results."""
    return recipe_main(args, DEFAULT_CONFIG)


if __name__ == "__main__":
    main()
