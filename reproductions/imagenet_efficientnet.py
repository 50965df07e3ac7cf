"""ImageNet EfficientNets, single models and ensembles (Kondratyuk et al. 2020, figure 2).

    python reproductions/imagenet_efficientnet.py --config reproductions/configs/imagenet/b5.yaml \
        --config reproductions/configs/ensemble-2.yaml --trainer.devices 8          # 2 x B5 (19.8 B MACs)
    python reproductions/imagenet_efficientnet.py --config reproductions/configs/imagenet/b7.yaml \
        --trainer.devices 8                                                          # B7 (37 B MACs)
    python reproductions/imagenet_efficientnet.py --config reproductions/configs/imagenet/committee.yaml

Members are timm models at their native resolution (from timm's pretrained config). The default
configuration (configs/imagenet_efficientnet.yaml) follows timm's published EfficientNet-B2 training recipe.
The committee config evaluates pretrained models without training (``--train false``). Like the CIFAR
recipe it trains, tests, then prints and saves the results table next to the TensorBoard logs.
"""

from __future__ import annotations

from pathlib import Path

from lightning_ensembles.cli import recipe_main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "imagenet_efficientnet.yaml"


def main(args: list[str] | None = None) -> dict:
    """Run the recipe with ``args`` (default: the command line), print and return its results."""
    return recipe_main(args, DEFAULT_CONFIG)


if __name__ == "__main__":
    main()
