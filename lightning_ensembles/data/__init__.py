"""Datamodules for the reproductions of Kondratyuk et al. (arXiv 2005.00570), and their sampler.

:class:`CIFAR10DataModule` loads CIFAR-10 with the Wide ResNet augmentation; :class:`DigitsDataModule` is
scikit-learn's 8x8 digits, a small real dataset that works offline; :class:`FashionMNISTDataModule` reads
Fashion-MNIST's idx files (torchvision's layout or a flat folder such as Debian's package); :class:`EpochSeededRandomSampler`
shuffles by ``(seed, epoch)`` only, so resumed and separate runs see the same order.
"""

from lightning_ensembles.data.cifar import CIFAR10DataModule
from lightning_ensembles.data.digits import DigitsDataModule
from lightning_ensembles.data.fashion_mnist import FashionMNISTDataModule
from lightning_ensembles.data.gpu_cifar import GPUCIFAR10DataModule
from lightning_ensembles.data.imagenet import ImageNetDataModule
from lightning_ensembles.data.sampling import EpochSeededRandomSampler

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "EpochSeededRandomSampler",
    "FashionMNISTDataModule",
    "GPUCIFAR10DataModule",
    "ImageNetDataModule",
]
