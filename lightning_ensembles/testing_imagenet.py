"""Helpers for tests and smoke runs: a tiny ImageNet-style folder tree of real JPEG files.

The ImageNet reproduction of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 2), reads ILSVRC-2012 from the usual ``ImageFolder`` layout
``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``
(:class:`~lightning_ensembles.data.ImageNetDataModule`). Tests and CPU smoke runs cannot use the 150 GB
dataset, yet they should go through the real decoding and transforms, so :func:`write_fake_imagefolder`
writes a few JPEG files (Pillow) in exactly that layout. Every class has its own colour plus noise, so a
tiny model can tell the classes apart.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_ensembles._validation import check_int

__all__ = ["write_fake_imagefolder"]


def _class_colour(index: int, num_classes: int) -> np.ndarray:
    """An RGB colour (0..255) per class: hues evenly spaced around the colour wheel."""
    r, g, b = colorsys.hsv_to_rgb(index / max(num_classes, 1), 0.8, 0.85)
    return np.array([r, g, b]) * 255.0


def write_fake_imagefolder(
    root: str | os.PathLike[str],
    classes: Sequence[str] = ("a", "b", "c"),
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """Write ``<root>/{train,val}/<class>/<class>_<i>.JPEG``: real JPEG images with class-dependent colours.

    Each image is ``size`` x ``size`` RGB: its class's colour plus Gaussian noise (std 20), and a brighter
    square whose corner depends on the class. With ``train_per_class`` or ``val_per_class`` 0 the class
    folders of that split are created empty (for testing error messages).

    Args:
        root: The folder to write into (created if missing); existing files with the same names are replaced.
        classes: The class folder names (distinct, non-empty, no path separators).
        train_per_class: Images per class in ``train``.
        val_per_class: Images per class in ``val``.
        size: Side of the square images, in pixels.
        seed: Seed of the noise.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``classes`` is empty, has duplicates or unusable names, or a number is out of range.

    Example:
        >>> import tempfile
        >>> root = write_fake_imagefolder(tempfile.mkdtemp(), classes=("cat", "dog"), size=16)
        >>> sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))[:3]
        ['train/cat/cat_0.JPEG', 'train/cat/cat_1.JPEG', 'train/cat/cat_2.JPEG']
        >>> len(list(root.rglob("*.JPEG")))
        12
    """
    names = list(classes) if not isinstance(classes, str) else []
    if (
        not names
        or len(set(names)) != len(names)
        or not all(
            isinstance(n, str) and n and n not in (".", "..") and "/" not in n and os.sep not in n
            for n in names
        )
    ):
        raise ValueError(
            f"Expected `classes` to be distinct, non-empty folder names (no path separators), but got {classes!r}."
        )
    check_int(train_per_class, "train_per_class", 0)
    check_int(val_per_class, "val_per_class", 0)
    check_int(size, "size", 8)
    check_int(seed, "seed", 0)

    root = Path(root)
    rng = np.random.default_rng(seed)
    square = max(size // 4, 2)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = _class_colour(index, len(names))
            for i in range(count):
                image = colour + rng.normal(0.0, 20.0, size=(size, size, 3))
                top = 0 if index % 2 == 0 else size - square
                left = 0 if (index // 2) % 2 == 0 else size - square
                image[top : top + square, left : left + square] += 60.0
                pixels = np.clip(image, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.JPEG", format="JPEG", quality=90)
    return root
