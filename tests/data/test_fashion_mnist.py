"""Tests for FashionMNISTDataModule on a tiny Fashion-MNIST written in the real idx format."""

from __future__ import annotations

import functools
import gzip
import shutil
import struct
import urllib.error
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision.datasets

import lightning_ensembles.data.fashion_mnist as fashion_mnist
from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.data import FashionMNISTDataModule
from lightning_ensembles.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTCorruptedError,
    FashionMNISTNotFoundError,
    find_idx_file,
    read_idx,
)
from lightning_ensembles.models import WideResNet
from lightning_ensembles.testing import write_fake_fashion_mnist
from tests.helpers import sgd, trainer_kwargs

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
FILES = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
NUM_TRAIN, NUM_TEST = 200, 50


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake Fashion-MNIST (200 train, 50 test, flat, gzipped) that the tests only read."""
    root = tmp_path_factory.mktemp("fashion")
    write_fake_fashion_mnist(root, num_train=NUM_TRAIN, num_test=NUM_TEST)
    return root


@pytest.fixture
def own_root(tmp_path: Path) -> Path:
    """A private, plain (uncompressed) copy of the fake data that a test may damage."""
    write_fake_fashion_mnist(tmp_path, num_train=NUM_TRAIN, num_test=NUM_TEST, compress=False)
    return tmp_path


def _datamodule(root: Path, **kwargs: Any) -> FashionMNISTDataModule:
    options: dict[str, Any] = {"batch_size": 16, "val_size": 20, "strict": False}
    options.update(kwargs)
    return FashionMNISTDataModule(root=str(root), **options)


def _file(root: Path, name: str) -> tuple[np.ndarray, Path]:
    path = find_idx_file(root, name)
    return read_idx(path, 1 if "labels" in name else 3), path


def _normalised(images: np.ndarray) -> torch.Tensor:
    return (
        torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 255 - FASHION_MNIST_MEAN
    ) / FASHION_MNIST_STD


def _reason(error: pytest.ExceptionInfo[Exception], path: Path) -> str:
    """The message of ``error``, which must name ``path``, without it (a test's folder may hold any word), and
    without the closing advice every corrupted-file error ends with (checked here)."""
    message = str(error.value)
    assert str(path) in message
    if isinstance(error.value, FashionMNISTCorruptedError):
        advice = " To get intact files: `apt-get install --reinstall dataset-fashion-mnist`"
        assert advice in message and message.endswith("where the internet is reachable."), message
        message = message[: message.index(advice)]
    return message.replace(str(path), "<path>")


def _write_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


# --------------------------------------------------------------------------------------------- the fake data


def test_fake_files_have_the_idx_format(tmp_path: Path) -> None:
    folder = write_fake_fashion_mnist(tmp_path, num_train=23, num_test=10, compress=False)
    assert folder == tmp_path and sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    raw = (folder / TRAIN_IMAGES).read_bytes()
    assert struct.unpack(">4I", raw[:16]) == (2051, 23, 28, 28) and len(raw) == 16 + 23 * 28 * 28
    raw = (folder / TRAIN_LABELS).read_bytes()
    assert struct.unpack(">2I", raw[:8]) == (2049, 23) and len(raw) == 8 + 23
    counts = np.bincount(np.frombuffer(raw, np.uint8, offset=8), minlength=10)
    assert counts.tolist() == [3, 3, 3] + [2] * 7  # 23 // 10 each, the remainder spread
    # The gzipped variant holds the same bytes, replaces the plain files and lands in torchvision's layout.
    plain = {name: (folder / name).read_bytes() for name in FILES}
    gz_folder = write_fake_fashion_mnist(tmp_path, num_train=23, num_test=10, layout="torchvision")
    assert gz_folder == tmp_path / "FashionMNIST" / "raw"
    assert {name: gzip.decompress((gz_folder / f"{name}.gz").read_bytes()) for name in FILES} == plain
    write_fake_fashion_mnist(tmp_path, num_train=23, num_test=10, compress=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(f"{n}.gz" for n in FILES)
    other = write_fake_fashion_mnist(tmp_path / "other", num_train=23, num_test=10, compress=False, seed=1)
    assert (other / TRAIN_IMAGES).read_bytes() != plain[TRAIN_IMAGES]


def test_fake_images_are_learnable(shared_root: Path) -> None:
    """A linear classifier beats chance (10%) on the test split after a few full-batch steps."""
    torch.manual_seed(0)
    (train_x, _), (train_y, _) = _file(shared_root, TRAIN_IMAGES), _file(shared_root, TRAIN_LABELS)
    (test_x, _), (test_y, _) = _file(shared_root, TEST_IMAGES), _file(shared_root, TEST_LABELS)
    model = torch.nn.Linear(28 * 28, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _normalised(train_x).flatten(1), torch.from_numpy(train_y.astype(np.int64))
    for _ in range(10):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    predicted = model(_normalised(test_x).flatten(1)).argmax(1)
    assert (predicted == torch.from_numpy(test_y.astype(np.int64))).float().mean() > 0.8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": 0}, "Expected `num_train` to be an int >= 1, but got 0."),
        ({"num_test": 2.0}, "Expected `num_test` to be an int >= 1, but got 2.0."),
        ({"layout": "debian"}, "Expected `layout` to be one of ['flat', 'torchvision'], but got 'debian'."),
        ({"compress": "yes"}, "Expected `compress` to be a bool, but got 'yes'."),
        ({"seed": -1}, "Expected `seed` to be an int >= 0, but got -1."),
    ],
)
def test_fake_writer_validates_its_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        write_fake_fashion_mnist(tmp_path, **kwargs)
    assert str(info.value) == message
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [True, False])
def test_loads_both_layouts_plain_and_gzipped(tmp_path: Path, layout: str, compress: bool) -> None:
    folder = write_fake_fashion_mnist(tmp_path, num_train=60, num_test=30, layout=layout, compress=compress)
    dm = _datamodule(tmp_path, val_size=10)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 28, 28))
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 30)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    suffix = ".gz" if compress else ""
    test_images = read_idx(folder / f"{TEST_IMAGES}{suffix}", 3)
    test_labels = read_idx(folder / f"{TEST_LABELS}{suffix}", 1)
    x, y = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x, _normalised(test_images[:16]))
    assert y.tolist() == test_labels[:16].tolist()
    assert sum(len(batch) for batch, _ in dm.val_dataloader()) == 10


def test_plain_is_preferred_to_gz_and_torchvisions_layout_to_the_flat_folder(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path / "plain", num_train=20, num_test=10, compress=False)
    flat = write_fake_fashion_mnist(tmp_path, num_train=20, num_test=10, compress=True)
    shutil.copy(tmp_path / "plain" / TRAIN_IMAGES, flat / TRAIN_IMAGES)
    assert find_idx_file(tmp_path, TRAIN_IMAGES) == flat / TRAIN_IMAGES
    assert find_idx_file(tmp_path, TRAIN_LABELS) == flat / f"{TRAIN_LABELS}.gz"
    raw = write_fake_fashion_mnist(tmp_path, num_train=20, num_test=10, layout="torchvision")
    assert find_idx_file(tmp_path, TRAIN_IMAGES) == raw / f"{TRAIN_IMAGES}.gz"


def test_setup_is_idempotent_and_loaders_before_setup_raise(shared_root: Path) -> None:
    dm = _datamodule(shared_root)
    with pytest.raises(RuntimeError, match=r"call `setup\('fit'\)` first"):
        dm.train_dataloader()
    dm.setup("fit")
    train_set = dm.train_set
    for stage in ("fit", "validate", "test", "predict"):
        dm.setup(stage)
    assert dm.train_set is train_set and dm.predict_dataloader().dataset is dm.test_set
    with pytest.raises(ValueError, match="Expected `stage` to be one of"):
        dm.setup("train")


# --------------------------------------------------------------------------------------- damaged idx files


def test_truncated_plain_file_names_the_file(own_root: Path) -> None:
    path = own_root / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FashionMNISTCorruptedError) as info:
        read_idx(path, 3)
    assert _reason(info, path) == (
        "<path>: its idx header gives the shape (200, 28, 28), i.e. 156800 data bytes, but the file holds "
        "156700: the file is truncated."
    )
    with pytest.raises(FashionMNISTCorruptedError) as info:
        _datamodule(own_root).setup("fit")
    assert _reason(info, path).endswith("the file is truncated.")
    path.write_bytes(struct.pack(">I", 2051) + b"\0\0")  # not even the 16-byte header
    with pytest.raises(FashionMNISTCorruptedError) as info:
        read_idx(path, 3)
    assert _reason(info, path) == (
        "<path> holds 6 bytes, fewer than the 16-byte idx header: the file is truncated."
    )


def test_file_longer_than_its_header_says(own_root: Path) -> None:
    path = own_root / TEST_LABELS
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(FashionMNISTCorruptedError) as info:
        read_idx(path, 1)
    assert _reason(info, path).endswith("but the file holds 51: the file is longer than its header says.")


@pytest.mark.parametrize("cut", [1, 8, 500])
def test_truncated_gz_file_names_the_file(shared_root: Path, tmp_path: Path, cut: int) -> None:
    path = tmp_path / f"{TRAIN_IMAGES}.gz"
    path.write_bytes((shared_root / f"{TRAIN_IMAGES}.gz").read_bytes()[:-cut])
    with pytest.raises(FashionMNISTCorruptedError) as info:
        read_idx(path, 3)
    reason = _reason(info, path)
    assert reason.startswith("<path> could not be read (EOFError:") and "the file is truncated" in reason


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:40] + bytes(b ^ 0xFF for b in data[40:80]) + data[80:], "error: Error -3"),
        (lambda data: data[:-8] + b"\0\0\0\0" + data[-4:], "BadGzipFile: CRC check failed"),
        (lambda data: b"PK" + data[2:], "BadGzipFile: Not a gzipped file"),
    ],
    ids=["damaged deflate data", "wrong crc", "not gzip"],
)
def test_corrupted_gz_file_names_the_file(
    shared_root: Path, tmp_path: Path, damage: Any, reason: str
) -> None:
    path = tmp_path / f"{TEST_IMAGES}.gz"
    path.write_bytes(damage((shared_root / f"{TEST_IMAGES}.gz").read_bytes()))
    with pytest.raises(FashionMNISTCorruptedError) as info:
        read_idx(path, 3)
    message = _reason(info, path)
    assert (
        message.startswith(f"<path> could not be read ({reason}")
        and "delete it and fetch it again" in message
    )
    assert "truncated" not in message


def test_wrong_magic_number_names_the_file(own_root: Path) -> None:
    # The labels where the images belong: a valid idx file of the wrong kind.
    shutil.copy(own_root / TEST_LABELS, own_root / TEST_IMAGES)
    with pytest.raises(FashionMNISTCorruptedError) as info:
        _datamodule(own_root).setup("test")
    message = str(info.value)
    assert str(own_root / TEST_IMAGES) in message
    assert "magic number 2049 (0x00000801)" in message and "starts with 2051 (0x00000803)" in message
    path = own_root / "signed"
    path.write_bytes(struct.pack(">II", 0x0901, 3) + b"\0\0\0")  # type 0x09: signed bytes
    with pytest.raises(FashionMNISTCorruptedError, match="magic number 2305"):
        read_idx(path, 1)


def test_images_of_another_size_name_the_file(own_root: Path) -> None:
    path = own_root / TEST_IMAGES
    path.write_bytes(struct.pack(">4I", 2051, 50, 28, 27) + bytes(50 * 28 * 27))
    with pytest.raises(
        FashionMNISTCorruptedError, match="28x27 pixels, but Fashion-MNIST's are 28x28"
    ) as info:
        _datamodule(own_root).setup("test")
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------- the counts


def test_labels_and_images_of_different_counts_name_the_label_file(own_root: Path) -> None:
    labels, path = _file(own_root, TEST_LABELS)
    _write_labels(path, labels[:-1])
    with pytest.raises(FashionMNISTCorruptedError, match="do not belong together") as info:
        _datamodule(own_root).setup("test")
    assert str(info.value).startswith(f"{path} holds 49 labels but {own_root / TEST_IMAGES} holds 50 images")


def test_label_out_of_range_names_the_label_file(own_root: Path) -> None:
    labels, path = _file(own_root, TRAIN_LABELS)
    labels = labels.copy()
    labels[7] = 10
    _write_labels(path, labels)
    with pytest.raises(
        FashionMNISTCorruptedError, match=r"the label 10, but Fashion-MNIST's labels are 0\.\.9"
    ):
        _datamodule(own_root).setup("fit")


def test_strict_rejects_generated_counts(shared_root: Path) -> None:
    with pytest.raises(FashionMNISTCorruptedError) as info:
        _datamodule(shared_root, strict=True).setup("fit")
    message = str(info.value)
    assert str(shared_root / f"{TRAIN_IMAGES}.gz") in message
    assert "holds 200 images, but Fashion-MNIST's train split has 60000" in message
    assert "`--data.strict false`" in message and "write_fake_fashion_mnist" in message
    with pytest.raises(FashionMNISTCorruptedError, match="test split has 10000"):
        _datamodule(shared_root, strict=True).setup("test")


def test_strict_checks_balanced_classes(own_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fashion_mnist._PUBLISHED_COUNTS, "train", NUM_TRAIN)
    monkeypatch.setitem(fashion_mnist._PUBLISHED_COUNTS, "test", NUM_TEST)
    _datamodule(own_root, strict=True).setup("fit")  # balanced: 20 of each class
    labels, path = _file(own_root, TRAIN_LABELS)
    labels = labels.copy()
    labels[np.flatnonzero(labels == 3)[0]] = 4
    _write_labels(path, labels)
    with pytest.raises(FashionMNISTCorruptedError) as info:
        _datamodule(own_root, strict=True).setup("fit")
    assert _reason(info, path) == (
        f"<path> holds the class counts {[20, 20, 20, 19, 21, 20, 20, 20, 20, 20]}, but Fashion-MNIST's train "
        "split has 20 images of every class."
    )
    _datamodule(own_root, strict=False).setup("fit")  # not checked without strict


# ------------------------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("missing", [TEST_LABELS, TRAIN_IMAGES])
def test_missing_file_says_how_to_get_it(own_root: Path, missing: str) -> None:
    (own_root / missing).unlink()
    dm = _datamodule(own_root)
    dm.prepare_data()  # no download asked: nothing to do
    with pytest.raises(FashionMNISTNotFoundError) as info:
        dm.setup("test" if missing == TEST_LABELS else "fit")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"{missing} (or {missing}.gz) was not found" in message
    assert repr(str(own_root / "FashionMNIST" / "raw")) in message and repr(str(own_root)) in message
    assert "apt-get install dataset-fashion-mnist" in message and "`--data.download true`" in message


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise urllib.error.URLError("no network here")


def test_download_with_files_present_does_nothing(shared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _no_network)
    _datamodule(shared_root, download=True).prepare_data()


def test_failed_download_says_how_to_get_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _no_network)
    with pytest.raises(FashionMNISTNotFoundError) as info:
        _datamodule(tmp_path, download=True).prepare_data()
    message = str(info.value)
    assert message.startswith(f"Downloading Fashion-MNIST into {str(tmp_path)!r} failed (URLError:")
    assert "apt-get install dataset-fashion-mnist" in message and "`--data.download true`" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_fills_torchvisions_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        write_fake_fashion_mnist(root, num_train=40, num_test=20, layout="torchvision")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    dm = _datamodule(tmp_path, download=True, val_size=10)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set) == 30


# ---------------------------------------------------------------------------------------- splits and subsets


def test_train_size_draws_a_seeded_class_balanced_subset(shared_root: Path) -> None:
    labels, _ = _file(shared_root, TRAIN_LABELS)
    first = _datamodule(shared_root, train_size=37, val_size=30, seed=0)
    first.setup("fit")
    assert first.train_set is not None and len(first.train_set) == 37
    train, val = first.split_indices["train"], first.split_indices["val"]
    assert len(train) == 37 and len(set(train.tolist())) == 37 and not set(train.tolist()) & set(val.tolist())
    for indices in (train, val):
        counts = np.bincount(labels[indices], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert first.train_set.tensors[1].tolist() == labels[train].tolist()  # type: ignore[attr-defined]

    again = _datamodule(shared_root, train_size=37, val_size=30, seed=0)
    again.setup("fit")
    np.testing.assert_array_equal(again.split_indices["train"], train)
    other_seed = _datamodule(shared_root, train_size=37, val_size=30, seed=1)
    other_seed.setup("fit")
    assert not np.array_equal(other_seed.split_indices["train"], train)
    assert not np.array_equal(other_seed.split_indices["val"], val)
    larger = _datamodule(shared_root, train_size=100, val_size=30, seed=0)
    larger.setup("fit")
    np.testing.assert_array_equal(larger.split_indices["val"], val)  # the same validation split
    assert len(larger.split_indices["train"]) == 100
    assert not set(larger.split_indices["train"].tolist()) & set(val.tolist())
    everything = _datamodule(shared_root, val_size=30, seed=0)
    everything.setup("fit")
    assert sorted([*everything.split_indices["train"], *val]) == list(range(NUM_TRAIN))


def test_train_size_larger_than_available_names_the_flag(shared_root: Path) -> None:
    _datamodule(shared_root, train_size=180, val_size=20).setup("fit")  # exactly what is left
    with pytest.raises(ValueError) as info:
        _datamodule(shared_root, train_size=181, val_size=20).setup("fit")
    assert str(info.value) == (
        "Expected `--data.train_size` to be at most the 180 training images left after `--data.val_size` 20, "
        "or null, but got 181."
    )
    with pytest.raises(ValueError, match="Expected `--data.val_size` to be smaller than the 200 training"):
        _datamodule(shared_root, val_size=200).setup("fit")


def test_val_size_zero_validates_on_the_test_split(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=0)
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set) == NUM_TRAIN and "val" not in dm.split_indices
    assert dm.val_set is dm.test_set and dm.val_dataloader().dataset is dm.test_set
    assert dm.test_set is not None and len(dm.test_set) == NUM_TEST


# ------------------------------------------------------------------------------------------------------ OOD


@pytest.mark.parametrize("ood_classes", [[8, 9], [5, 0]])
def test_ood_classes_are_held_out_and_relabelled(shared_root: Path, ood_classes: list[int]) -> None:
    dm = _datamodule(shared_root, ood_classes=ood_classes)
    kept = [c for c in range(10) if c not in ood_classes]
    assert dm.num_classes == 8 and dm.classes == [FASHION_MNIST_CLASSES[c] for c in kept]
    dm.setup("fit")
    dm.setup("test")
    original = np.array(kept)
    train_labels, _ = _file(shared_root, TRAIN_LABELS)
    assert dm.train_set is not None and dm.val_set is not None
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        y = dataset.tensors[1]  # type: ignore[attr-defined]
        assert 0 <= int(y.min()) and int(y.max()) == 7
        assert original[y.numpy()].tolist() == train_labels[dm.split_indices[split]].tolist()
    assert len(dm.train_set) + len(dm.val_set) == 160  # 20 of each of the 8 classes
    test_images, _ = _file(shared_root, TEST_IMAGES)
    test_labels, _ = _file(shared_root, TEST_LABELS)
    assert dm.test_set is not None and dm.ood_set is not None
    test_y = dm.test_set.tensors[1]  # type: ignore[attr-defined]
    assert (
        len(test_y) == 40
        and original[test_y.numpy()].tolist() == test_labels[dm.split_indices["test"]].tolist()
    )
    assert len(dm.ood_set) == 10 and set(test_labels[dm.split_indices["ood"]].tolist()) == set(ood_classes)
    torch.testing.assert_close(
        dm.ood_set.tensors[0],  # type: ignore[attr-defined]
        _normalised(test_images[np.isin(test_labels, ood_classes)]),
    )
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and [loader.dataset for loader in loaders] == [dm.test_set, dm.ood_set]
    assert sum(len(x) for x, _ in loaders[1]) == 10


def test_ood_digits_is_the_second_test_loader(shared_root: Path) -> None:
    dm = _datamodule(shared_root, ood="digits", batch_size=512)
    assert dm.num_classes == 10
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2 and loaders[0].dataset is dm.test_set
    shapes = [tuple(x.shape[1:]) for x, _ in loaders[1]]
    assert sum(len(x) for x, _ in loaders[1]) == 1797 and set(shapes) == {(1, 28, 28)}
    plain = _datamodule(shared_root)
    plain.setup("test")
    assert not isinstance(plain.test_dataloader(), list) and plain.ood_set is None


def test_ood_and_ood_classes_together_are_an_error(shared_root: Path) -> None:
    with pytest.raises(ValueError, match="Expected at most one of `--data.ood` and `--data.ood_classes`"):
        _datamodule(shared_root, ood="digits", ood_classes=[8, 9])


# --------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "Expected `--data.batch_size` to be an int >= 1, but got 0."),
        ({"root": ""}, "Expected `--data.root` to be a non-empty directory path, but got ''."),
        ({"root": None}, "Expected `--data.root` to be a non-empty directory path, but got None."),
        ({"train_size": 0}, "Expected `--data.train_size` to be an int >= 1, but got 0."),
        ({"val_size": -1}, "Expected `--data.val_size` to be an int >= 0, but got -1."),
        ({"num_workers": -1}, "Expected `--data.num_workers` to be an int >= 0, but got -1."),
        ({"seed": True}, "Expected `--data.seed` to be an int >= 0, but got True."),
        ({"strict": "no"}, "Expected `--data.strict` to be a bool, but got 'no'."),
        ({"augment": 1}, "Expected `--data.augment` to be a bool, but got 1."),
        ({"ood": "mnist"}, "Expected `--data.ood` to be one of ['digits'] or null, but got 'mnist'."),
        ({"ood_classes": [9, 9]}, "Expected `--data.ood_classes` to be distinct ints in [0, 9]"),
    ],
)
def test_invalid_arguments_name_the_flag(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"root": "data"}
    options.update(kwargs)
    with pytest.raises(ValueError) as info:
        FashionMNISTDataModule(**options)
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------------------------------- augmentation


def test_augment_changes_training_images_only(shared_root: Path) -> None:
    plain = _datamodule(shared_root)
    augmented = _datamodule(shared_root, augment=True)
    for dm in (plain, augmented):
        dm.setup("fit")
        dm.setup("test")
    assert augmented.train_set is not None and plain.train_set is not None

    def draw(dataset: Any, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([dataset[i][0] for i in range(8)])

    first, second = draw(augmented.train_set, 0), draw(augmented.train_set, 1)
    assert first.shape == (8, 1, 28, 28) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    torch.testing.assert_close(draw(augmented.train_set, 0), first)  # the transform draws from torch's RNG
    unaugmented = draw(plain.train_set, 0)
    torch.testing.assert_close(draw(plain.train_set, 1), unaugmented)
    assert not torch.equal(first, unaugmented)
    assert [augmented.train_set[i][1] for i in range(8)] == [int(plain.train_set[i][1]) for i in range(8)]
    for split in ("val_set", "test_set"):
        torch.testing.assert_close(
            getattr(augmented, split).tensors[0], getattr(plain, split).tensors[0], rtol=0, atol=0
        )
    batch, _ = next(iter(augmented.train_dataloader()))
    assert batch.shape == (16, 1, 28, 28)


# ---------------------------------------------------------------------------------------------- end to end


def test_ensemble_fits_and_tests_with_held_out_classes(shared_root: Path, one_torch_thread: None) -> None:
    pl.seed_everything(0, verbose=False)
    dm = _datamodule(shared_root, ood_classes=[8, 9], batch_size=16)
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, depth=10, width=1, in_channels=1),
        num_members=2,
        num_classes=dm.num_classes,
        optimizer=sgd(lr=0.05),
    )
    trainer = pl.Trainer(
        **trainer_kwargs(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    trainer.test(module, datamodule=dm, verbose=False)
    ood = {name: value for name, value in trainer.callback_metrics.items() if name.startswith("test/ood/")}
    assert ood and all(0.0 <= float(value) <= 1.0 for name, value in ood.items() if name.endswith("auroc"))
    assert any(name.endswith("auroc") for name in ood)
    assert module.members[0](torch.zeros(1, 1, 28, 28)).shape == (1, 8)
