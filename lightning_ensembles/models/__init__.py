"""Member architectures: the CIFAR Wide ResNet of Zagoruyko & Komodakis (arXiv 1605.07146), timm models, and
the searched MnasNet/EfficientNet-style networks of the NAS recipe (Tan et al., arXiv 1807.11626)."""

from typing import TYPE_CHECKING

from lightning_ensembles._lazy import lazy_getattr
from lightning_ensembles.models.nas import NASArchitecture, NASNet, StageArch
from lightning_ensembles.models.timm_member import TimmModel, resolution_of
from lightning_ensembles.models.wide_resnet import WideResNet

if TYPE_CHECKING:
    from lightning_ensembles.nas.space import NASSearchSpace, StageSpace

# The search space moved to `lightning_ensembles.nas.space` (it is the search's, not a member's); these names
# stay importable from here for code written before. Looked up on first use, not imported with this package:
# `nas` builds on `models`, and models never import the search.
__getattr__ = lazy_getattr(
    __name__, dict.fromkeys(("NASSearchSpace", "StageSpace"), "lightning_ensembles.nas.space")
)

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
