"""Member architectures: the CIFAR Wide ResNet of Zagoruyko & Komodakis (arXiv 1605.07146)."""

from lightning_ensembles.models.timm_member import TimmModel
from lightning_ensembles.models.wide_resnet import WideResNet

__all__ = ["TimmModel", "WideResNet"]
