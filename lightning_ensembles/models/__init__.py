"""Member architectures: the CIFAR Wide ResNet of Zagoruyko & Komodakis (arXiv 1605.07146), timm models, and
the NAS search space of MnasNet/EfficientNet-style networks (Tan et al., arXiv 1807.11626)."""

from lightning_ensembles.models.nas import NASArchitecture, NASNet, NASSearchSpace, StageArch, StageSpace
from lightning_ensembles.models.timm_member import TimmModel, resolution_of
from lightning_ensembles.models.wide_resnet import WideResNet

__all__ = [
    "NASArchitecture",
    "NASNet",
    "NASSearchSpace",
    "StageArch",
    "StageSpace",
    "TimmModel",
    "WideResNet",
    "resolution_of",
]
