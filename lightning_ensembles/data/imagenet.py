"""ImageNet (ILSVRC-2012) as a LightningDataModule, with timm's EfficientNet preprocessing.

The ImageNet experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 2), trains ensembles of EfficientNets (Tan & Le, arXiv 1905.11946)
and compares them with single larger EfficientNets. Each EfficientNet has its own resolution (B0 224 ...
B7 600) and evaluation crop; this module reads both from timm's pretrained config of ``model_name`` (a name in
timm's registry: no model is built or read), so the data matches a member
(:class:`~lightning_ensembles.models.TimmModel`) of that name. A committee of different EfficientNets should
name its largest member here: smaller members resize their input themselves. The datamodule never looks at
the model: :class:`~lightning_ensembles.cli.EnsembleCLI` links ``--data.model_name`` from the members when
neither it nor ``--data.input_size`` is given, and :func:`~lightning_ensembles.models.resolution_of` gives the
same arguments in Python.

Images are read with :class:`torchvision.datasets.ImageFolder` from the standard layout
``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (the validation images sorted into class
folders, as the usual ``valprep.sh`` does). Training images get timm's ``RandomResizedCrop``, flip,
RandAugment (``auto_augment``) and random erasing (``re_prob``); evaluation images are resized to
``size / crop_pct`` and center-cropped. Mixup and CutMix (Zhang et al. 2018; Yun et al. 2019; timm's
:class:`~timm.data.Mixup`) mix training batches after they reach the device and turn the labels into soft
targets ``(B, C)``, which the cross-entropy of
:class:`~lightning_ensembles.module.EnsembleLightningModule` accepts as they are.

For out-of-distribution evaluation (:mod:`lightning_ensembles.ood`), ``ood_root`` names an image folder of
the user's choice (ImageNet-O, iNaturalist, Textures, OpenImage-O, ...) that is tested as a second test
loader with the same evaluation transforms.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data import Mixup, create_transform, resolve_data_config
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from typing_extensions import override

from lightning_ensembles._timm import timm_pretrained_cfg
from lightning_ensembles._validation import check_float, check_int
from lightning_ensembles.data.sampling import SplitDataModule

__all__ = ["ImageNetDataModule"]

_STAGES = ("fit", "validate", "test", "predict")
_DEFAULT_NUM_CLASSES = 1000
_SHOWN = 5


def _class_folders(split_dir: str) -> list[str]:
    """Return the sorted names of the sub-folders of ``split_dir`` (ImageFolder's classes).

    Args:
        split_dir: The split's folder.

    Returns:
        The class names, sorted as :class:`~torchvision.datasets.ImageFolder` sorts them.
    """
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


class ImageNetDataModule(SplitDataModule):
    """ImageNet from ``<root>/train/<class>/`` and ``<root>/val/<class>/`` with timm's transforms.

    The input size, interpolation, mean/std and evaluation ``crop_pct`` come from timm's pretrained config
    of ``model_name`` (read from timm's registry; no model is built), and ``input_size``/``crop_pct``
    override them. Given only ``input_size``, timm's defaults apply (bicubic, ImageNet mean/std, crop 0.875).
    One of the two is required: from the command line, :class:`~lightning_ensembles.cli.EnsembleCLI` links
    ``model_name`` (and ``input_size`` if needed) from the model's largest ``TimmModel`` member when neither
    is given; in Python, ``ImageNetDataModule(root, **resolution_of(module.members))``
    (:func:`~lightning_ensembles.models.resolution_of`) does the same.

    :attr:`num_classes` is the number of class folders in ``<root>/train``, counted when the module is
    created (so the CLI can link it into ``--model.num_classes``); if that folder does not exist yet it is
    1000 (ImageNet-1k) until :meth:`setup` counts the folders, with a warning if the count differs.

    Label smoothing: with Mixup/CutMix on, ``label_smoothing`` is applied here, to the soft targets, and
    ``--model.label_smoothing`` should stay 0 (else the targets are smoothed twice). Without Mixup/CutMix
    ``label_smoothing`` has no effect: set ``--model.label_smoothing`` instead (the module's cross-entropy).

    The training loader shuffles by ``(seed, epoch)``; validation, test and prediction use the ``val`` split.

    Out-of-distribution evaluation: ``ood_root`` is an :class:`~torchvision.datasets.ImageFolder` root
    **itself**: its sub-folders hold the images (``<ood_root>/<any folder>/*.JPEG``, as ImageNet-O ships;
    for a dataset with a ``val`` split, pass that split's folder, e.g. ``data/inaturalist/val``; put a flat
    folder of images into one sub-folder). Its folder names are ignored. ``setup("test")`` indexes it with
    the evaluation transforms, and :meth:`test_dataloader` returns ``[val_loader, ood_loader]``: Lightning's
    multiple test loaders, ``dataloader_idx`` 1 being the OOD set, which
    :class:`~lightning_ensembles.module.EnsembleLightningModule` logs as ``test/ood/...``.

    Args:
        root: Folder holding ``train/`` and ``val/`` (``--data.root``).
        model_name: timm model whose pretrained config sets the image size and crop (e.g.
            ``"tf_efficientnet_b5"``); for a committee, its member with the largest resolution.
        input_size: Side of the square images, overriding the model's; required without ``model_name``.
        batch_size: Images per batch, for every loader; even when Mixup/CutMix is on.
        num_workers: DataLoader worker processes (0 loads in the main process).
        auto_augment: timm's augmentation policy string (``"rand-m9-mstd0.5"`` is RandAugment with
            magnitude 9, timm's EfficientNet recipe); ``None`` or ``""`` disables it.
        re_prob: Probability of random erasing of a training image.
        mixup_alpha: Mixup's Beta(alpha, alpha) parameter; 0 disables Mixup.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 disables CutMix. With both on, each batch
            uses one of them (timm's ``switch_prob`` 0.5).
        label_smoothing: Label smoothing of the Mixup/CutMix soft targets, in [0, 1).
        crop_pct: Evaluation center-crop fraction, overriding the model's (e.g. 0.934 for B5).
        seed: Seed of the training order.
        ood_root: An image folder tested as the out-of-distribution set (see above); ``None``: none.

    Raises:
        ValueError: If an argument is out of range, naming its ``--data.*`` flag and the value, or if neither
            ``model_name`` nor ``input_size`` is given.

    Example:
        >>> dm = ImageNetDataModule(root="no/such/folder", model_name="tf_efficientnet_b3")
        >>> dm.input_shape, dm.data_config["crop_pct"], dm.num_classes
        ((3, 300, 300), 0.904, 1000)
        >>> ImageNetDataModule(root="no/such/folder", input_size=128, crop_pct=1.0).data_config["input_size"]
        (3, 128, 128)
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        model_name: str | None = None,
        input_size: int | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        auto_augment: str | None = "rand-m9-mstd0.5",
        re_prob: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        crop_pct: float | None = None,
        seed: int = 0,
        ood_root: str | None = None,
    ) -> None:
        super().__init__()
        if model_name is None and input_size is None:
            raise ValueError(
                "Expected `--data.model_name` (argument `model_name`: a timm model whose pretrained config sets "
                "the image size and crop, e.g. 'tf_efficientnet_b0') or `--data.input_size` (argument "
                "`input_size`: an int >= 1), but got neither. EnsembleCLI links `--data.model_name` from the "
                "model's TimmModel members; in Python, pass `**lightning_ensembles.models.resolution_of(members)`."
            )
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ValueError(f"Expected `--data.root` to be a non-empty directory path, but got {root!r}.")
        if input_size is not None:
            check_int(input_size, "--data.input_size", 1)
        self.root = os.fspath(root)
        self.model_name = model_name
        self.input_size = input_size
        self.crop_pct = crop_pct
        self.batch_size = check_int(batch_size, "--data.batch_size", 1)
        self.num_workers = check_int(num_workers, "--data.num_workers", 0)
        if auto_augment is not None and not isinstance(auto_augment, str):
            raise ValueError(
                "Expected `--data.auto_augment` to be a timm policy string (e.g. 'rand-m9-mstd0.5') or null, "
                f"but got {auto_augment!r}."
            )
        self.auto_augment = auto_augment or None
        self.re_prob = check_float(re_prob, "--data.re_prob", 0.0, 1.0)
        for flag, alpha in (("--data.mixup_alpha", mixup_alpha), ("--data.cutmix_alpha", cutmix_alpha)):
            check_float(alpha, flag, 0.0)  # 0 disables it
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.label_smoothing = check_float(
            label_smoothing, "--data.label_smoothing", 0.0, 1.0, include_maximum=False
        )
        if crop_pct is not None:
            if not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool) or not 0 < crop_pct <= 1:
                raise ValueError(
                    f"Expected `--data.crop_pct` to be a float in (0, 1] or null, but got {crop_pct!r}."
                )
        self.seed = check_int(seed, "--data.seed", 0)
        if ood_root is not None and (not isinstance(ood_root, (str, os.PathLike)) or not os.fspath(ood_root)):
            raise ValueError(
                f"Expected `--data.ood_root` to be a non-empty directory path or null, but got {ood_root!r}."
            )
        self.ood_root = os.fspath(ood_root) if ood_root is not None else None
        mixing = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if mixing and self.batch_size % 2:
            raise ValueError(
                "Expected `--data.batch_size` to be even when `--data.mixup_alpha` or `--data.cutmix_alpha` "
                f"is > 0 (Mixup pairs each image with another), but got {batch_size}."
            )
        if not mixing and self.label_smoothing > 0:
            rank_zero_warn(
                f"`--data.label_smoothing` ({self.label_smoothing}) only smooths Mixup/CutMix targets, and both "
                "are off; set `--model.label_smoothing` to smooth the training cross-entropy."
            )
        self.save_hyperparameters()

        self.data_config: dict[str, Any] = {}
        """timm's data config used: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
        ``crop_mode``."""
        self.input_shape: tuple[int, int, int] | None = None
        """The shape ``(C, H, W)`` of one image tensor, for training and evaluation alike."""
        self._configure(model_name)

        self.mixup: Mixup | None = None
        """timm's Mixup/CutMix, built in :meth:`setup` once :attr:`num_classes` is known (when enabled)."""
        self.num_classes: int = self._count_classes_early()
        """The number of classes: class folders in ``<root>/train`` (1000 until they can be counted)."""
        self.classes: list[str] = []
        """Class names in label order, set by :meth:`setup`."""
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None
        self.ood_set: ImageFolder | None = None
        """The OOD image folder, indexed by ``setup("test")`` when ``ood_root`` is given."""

    def _split_dir(self, split: str) -> str:
        return os.path.join(self.root, split)

    def _count_classes_early(self) -> int:
        train_dir = self._split_dir("train")
        if os.path.isdir(train_dir):
            classes = _class_folders(train_dir)
            if classes:
                return len(classes)
        rank_zero_info(
            f"{train_dir!r} does not exist (or has no class folders) yet: `num_classes` is "
            f"{_DEFAULT_NUM_CLASSES} (ImageNet-1k) until `setup` counts the class folders."
        )
        return _DEFAULT_NUM_CLASSES

    def _classes_of(self, split: str) -> list[str]:
        """Return the class folders of one split, checking that the split folder exists and has some.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            The sorted class names.

        Raises:
            FileNotFoundError: If the folder is missing or holds no class folders.
        """
        path = os.path.abspath(self._split_dir(split))
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"The ImageNet {split} folder {path!r} does not exist. Expected `--data.root` "
                f"({self.root!r}) to hold train/<class>/*.JPEG and val/<class>/*.JPEG (validation images "
                "sorted into class folders, e.g. with the usual valprep.sh)."
            )
        classes = _class_folders(path)
        if not classes:
            raise FileNotFoundError(
                f"The ImageNet {split} folder {path!r} (under `--data.root` {self.root!r}) has no class "
                f"folders; expected one sub-folder of images per class, e.g. {split}/n01440764/*.JPEG."
            )
        return classes

    def _load(self, split: str, transform: Callable[[Any], Tensor]) -> ImageFolder:
        path = os.path.abspath(self._split_dir(split))
        try:
            return ImageFolder(path, transform=transform)
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            raise FileNotFoundError(
                f"The ImageNet {split} folder {path!r} (under `--data.root` {self.root!r}) has class folders "
                f"without images ({err}). Supported extensions: {', '.join(IMG_EXTENSIONS)}."
            ) from err

    def _load_ood(self, folder: str) -> ImageFolder:
        """Index the OOD image folder with the evaluation transforms.

        Args:
            folder: ``ood_root``.

        Returns:
            The folder as an :class:`~torchvision.datasets.ImageFolder`.

        Raises:
            FileNotFoundError: If it does not exist, has no sub-folders, or they hold no images.
        """
        path = os.path.abspath(folder)
        if not os.path.isdir(path) or not _class_folders(path):
            problem = "does not exist" if not os.path.isdir(path) else "has no sub-folders"
            raise FileNotFoundError(
                f"The OOD image folder `--data.ood_root` {path!r} {problem}. Expected an ImageFolder root: "
                "sub-folders of images, e.g. <ood_root>/<folder>/*.JPEG (put a flat folder of images into one "
                "sub-folder)."
            )
        try:
            return ImageFolder(path, transform=self.eval_transform)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"The OOD image folder `--data.ood_root` {path!r} has sub-folders without images ({err}). "
                f"Supported extensions: {', '.join(IMG_EXTENSIONS)}."
            ) from err

    def _configure(self, model_name: str | None) -> None:
        """Set the image size, crop and transforms from timm's pretrained config of ``model_name``."""
        cfg = timm_pretrained_cfg(model_name, "--data.model_name") if model_name is not None else None
        args: dict[str, Any] = {}
        if self.input_size is not None:
            args["input_size"] = (3, self.input_size, self.input_size)
        elif cfg is not None and "input_size" in cfg:
            args["input_size"] = tuple(cfg["input_size"])
        if self.crop_pct is not None:
            args["crop_pct"] = float(self.crop_pct)
        config = resolve_data_config(args, pretrained_cfg=cfg)
        self.data_config = dict(config)
        c, h, w = (int(v) for v in config["input_size"])
        self.input_shape = (c, h, w)

        common = dict(interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
        try:
            train_transform = create_transform(
                (c, h, w), is_training=True, auto_augment=self.auto_augment, re_prob=self.re_prob, **common
            )
        except Exception as err:  # timm parses the policy string here; re-raised naming the flag
            raise ValueError(
                "Expected `--data.auto_augment` to be a timm augmentation policy such as 'rand-m9-mstd0.5', "
                f"'augmix-m5-w3' or 'original', but got {self.auto_augment!r} ({type(err).__name__}: {err})."
            ) from err
        self.train_transform: Callable[[Any], Tensor] = train_transform
        """timm's training transform: random resized crop, flip, ``auto_augment``, random erasing."""
        self.eval_transform: Callable[[Any], Tensor] = create_transform(
            (c, h, w),
            is_training=False,
            crop_pct=config["crop_pct"],
            crop_mode=config.get("crop_mode"),
            **common,
        )
        """timm's evaluation transform: resize to ``size / crop_pct``, center crop ``size``."""

    @override
    def setup(self, stage: str) -> None:
        """Index the images of the splits a stage needs (once; later calls reuse them).

        ``"fit"`` loads ``train`` and ``val``; the other stages load ``val`` (and check its classes against
        ``train`` when that folder exists, since the labels are the sorted class names of both).

        Args:
            stage: One of ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``.

        Raises:
            ValueError: If ``stage`` is unknown or ``train`` and ``val`` have different class folders.
            FileNotFoundError: If a split folder is missing, has no class folders, or a class has no images; or,
                for ``"test"``, if ``ood_root`` is given and is not a folder of image sub-folders.
        """
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` to be one of {', '.join(_STAGES)}, but got {stage!r}.")
        need_train = stage == "fit"
        train_classes = self._classes_of("train") if need_train else None
        val_classes = self._classes_of("val")
        if train_classes is None and os.path.isdir(self._split_dir("train")):
            train_classes = self._classes_of("train")
        if train_classes is not None:
            if train_classes != val_classes:
                only_train = sorted(set(train_classes) - set(val_classes))
                only_val = sorted(set(val_classes) - set(train_classes))
                raise ValueError(
                    f"Expected the train and val folders under `--data.root` {os.path.abspath(self.root)!r} "
                    f"to have the same class folders (labels are their sorted names), but "
                    f"{len(train_classes)} and {len(val_classes)} differ: only in train: "
                    f"{_few(only_train) or 'none'}; only in val: {_few(only_val) or 'none'}."
                )
        if self.val_set is None:
            self.val_set = self._load("val", self.eval_transform)
        if stage == "test" and self.ood_root is not None and self.ood_set is None:
            self.ood_set = self._load_ood(self.ood_root)
        if need_train and self.train_set is None:
            self.train_set = self._load("train", self.train_transform)
        self.classes = list(self.val_set.classes)
        if len(self.classes) != self.num_classes:
            rank_zero_warn(
                f"`num_classes` was {self.num_classes} when the model was built, but "
                f"{os.path.abspath(self.root)!r} has {len(self.classes)} class folders; it is now "
                f"{len(self.classes)}. Build the model after the data exists (or set `--model.num_classes`)."
            )
            self.num_classes = len(self.classes)
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup is None:
            self.mixup = Mixup(
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                label_smoothing=self.label_smoothing,
                num_classes=self.num_classes,
            )

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply Mixup/CutMix to training batches (only while training, only when enabled).

        The images are mixed on the device, in place; the labels become soft targets ``(B, C)`` (float)
        with ``label_smoothing`` applied. An odd last batch mixes all but its last image, whose target is
        its smoothed one-hot label. Validation, test and prediction batches are returned unchanged.

        Args:
            batch: ``(images (B, 3, H, W), labels (B,))``.
            dataloader_idx: The loader's index.

        Returns:
            ``(images, targets (B, C))`` while training with Mixup/CutMix; ``batch`` unchanged otherwise.
        """
        trainer = self.trainer
        if self.mixup is None or trainer is None or not trainer.training:
            return batch
        if not (
            isinstance(batch, (tuple, list)) and len(batch) == 2
        ):  # e.g. the model summary's example input
            return batch
        x, y = batch
        if len(x) % 2 == 0:
            return self.mixup(x, y)
        if len(x) == 1:
            return x, self._smoothed_one_hot(y)
        x_mixed, y_mixed = self.mixup(x[:-1], y[:-1])
        x = torch.cat([x_mixed, x[-1:]])
        return x, torch.cat([y_mixed, self._smoothed_one_hot(y[-1:])])

    def _smoothed_one_hot(self, y: Tensor) -> Tensor:
        off = self.label_smoothing / self.num_classes
        target = torch.full((len(y), self.num_classes), off, device=y.device)
        return target.scatter_(1, y.view(-1, 1), 1.0 - self.label_smoothing + off)

    @override
    def test_dataloader(self) -> DataLoader[Any] | list[DataLoader[Any]]:
        """Return the ``val`` split (ImageNet's labelled test set) in a fixed order, and the OOD folder after it
        when ``ood_root`` is given.

        Returns:
            Batches ``(images (B, 3, S, S), labels (B,))``; ``[val loader, OOD loader]`` with ``ood_root`` (the
            OOD labels are its folder indices, ignored).

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        if self.ood_root is not None:
            return [
                self._loader(self.val_set, "validation", "test"),
                self._loader(self.ood_set, "OOD", "test"),
            ]
        return self._loader(self.val_set, "validation", "test")

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """Return the ``val`` split for prediction.

        Returns:
            Batches ``(images (B, 3, S, S), labels (B,))``.

        Raises:
            RuntimeError: If :meth:`setup` has not run.
        """
        return self._loader(self.val_set, "validation", "predict")
