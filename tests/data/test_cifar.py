"""Tests for CIFAR10DataModule on a tiny CIFAR-10 written in the real on-disk format."""

from __future__ import annotations

import os
import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils
from PIL import Image
from scipy.io import loadmat, savemat
from torchvision.datasets import CIFAR10, SVHN

from lightning_ensembles.data import CIFAR10DataModule, EpochSeededRandomSampler
from lightning_ensembles.data.cifar import (
    _SVHN,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10CorruptedError,
    CIFAR10NotFoundError,
)
from lightning_ensembles.testing import CIFAR10_CLASSES, write_fake_cifar10, write_fake_svhn

EXPECTED_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
EXPECTED_FILES += ["test_batch", "batches.meta"]
MEAN = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 (100 train, 50 test) that the tests only read."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, num_train=100, num_test=50, seed=0)
    return root


@pytest.fixture
def own_root(shared_root: Path, tmp_path: Path) -> Path:
    """A private copy of the fake CIFAR-10 that a test may damage."""
    shutil.copytree(shared_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    return tmp_path


def _datamodule(root: Path, **kwargs: Any) -> CIFAR10DataModule:
    options: dict[str, Any] = {
        "batch_size": 16,
        "num_workers": 0,
        "download": False,
        "verify_checksums": False,
    }
    options.update(kwargs)
    return CIFAR10DataModule(root=str(root), **options)


def _raw_images(root: Path, name: str) -> tuple[np.ndarray, list[int]]:
    """Read one batch file directly: images (N, 3, 32, 32) uint8 and labels."""
    with open(root / "cifar-10-batches-py" / name, "rb") as file:
        entry = pickle.load(file, encoding="latin1")
    return entry["data"].reshape(-1, 3, 32, 32), entry["labels"]


def _normalised(chw_uint8: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(chw_uint8.astype(np.float32)) / 255 - MEAN) / STD


# --------------------------------------------------------------------------------------------- the fake data


def test_fake_files_have_the_real_layout(shared_root: Path) -> None:
    batches = shared_root / "cifar-10-batches-py"
    assert sorted(path.name for path in batches.iterdir()) == sorted(EXPECTED_FILES)
    sizes = []
    for name in EXPECTED_FILES[:6]:
        with open(batches / name, "rb") as file:
            entry = pickle.load(file, encoding="bytes")  # like the Python 2 originals: bytes keys
        assert sorted(entry) == [b"batch_label", b"data", b"filenames", b"labels"]
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape[1] == 3072
        assert len(entry[b"labels"]) == len(entry[b"filenames"]) == len(entry[b"data"])
        assert all(isinstance(label, int) and 0 <= label < 10 for label in entry[b"labels"])
        sizes.append(len(entry[b"data"]))
    assert sizes == [20, 20, 20, 20, 20, 50]
    with open(batches / "batches.meta", "rb") as file:
        meta = pickle.load(file, encoding="latin1")
    assert meta["label_names"] == list(CIFAR10_CLASSES)


def test_fake_images_are_class_dependent(shared_root: Path) -> None:
    images, labels = _raw_images(shared_root, "test_batch")
    colours = images.reshape(len(images), 3, -1).mean(axis=2)
    class_means = np.stack([colours[np.array(labels) == c].mean(axis=0) for c in range(10)])
    distances = ((colours[:, None, :] - class_means[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == np.array(labels)).mean() > 0.9


def test_write_fake_cifar10_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `num_train` to be an int >= 1, but got 0\."):
        write_fake_cifar10(tmp_path, num_train=0)


# ------------------------------------------------------------------------------------------------- loading


def test_fake_data_loads_through_the_datamodule(shared_root: Path) -> None:
    dm = _datamodule(shared_root)
    assert (dm.num_classes, dm.input_shape) == (10, (3, 32, 32))
    dm.prepare_data()  # files are there: nothing to download
    dm.setup("fit")
    assert dm.train_set is not None and len(dm.train_set) == 100
    assert (
        dm.val_set is not None and dm.val_set is dm.test_set and len(dm.val_set) == 50
    )  # val_size == 0 validates on the test split
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < 10
    assert sum(len(batch) for batch, _ in dm.train_dataloader()) == 100  # drop_last=False
    assert sum(len(batch) for batch, _ in dm.val_dataloader()) == 50
    dm.setup("test")
    dm.setup("predict")
    assert dm.test_dataloader().dataset is dm.test_set
    assert dm.predict_dataloader().dataset is dm.test_set


def test_train_loader_settings(shared_root: Path) -> None:
    dm = _datamodule(shared_root, seed=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededRandomSampler) and loader.sampler.seed == 4
    assert loader.drop_last is False and loader.persistent_workers is False
    assert loader.pin_memory is torch.cuda.is_available()
    with_workers = _datamodule(shared_root, num_workers=2)
    with_workers.setup("fit")
    assert with_workers.train_dataloader().persistent_workers is True  # not iterated: no workers start


def test_loaders_before_setup_raise(shared_root: Path) -> None:
    dm = _datamodule(shared_root)
    with pytest.raises(RuntimeError, match=r"call `setup\('fit'\)` first"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"call `setup\('test'\)` first"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="Expected `stage` to be one of"):
        dm.setup("train")


def test_validate_stage_with_val_split_builds_only_what_it_needs(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=10)
    dm.setup("validate")
    assert dm.val_set is not None and len(dm.val_set) == 10
    assert dm.test_set is None


def test_images_and_labels_match_the_files(shared_root: Path) -> None:
    """Channel planes are R, G, B and the test split keeps the file's order and labels."""
    dm = _datamodule(shared_root)
    dm.setup("test")
    raw, labels = _raw_images(shared_root, "test_batch")
    assert dm.test_set is not None
    for index in (0, 17, 49):
        image, label = dm.test_set[index]
        torch.testing.assert_close(image, _normalised(raw[index]))
        assert label == labels[index]


# --------------------------------------------------------------------------------------- train/val split


def test_val_split_sizes_are_complementary_and_disjoint(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=30, seed=1)
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None
    assert (len(dm.train_set), len(dm.val_set)) == (70, 30)
    train, val = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train & val and train | val == set(range(100))
    assert dm.val_set is not dm.test_set

    same_seed = _datamodule(shared_root, val_size=30, seed=1)
    same_seed.setup("fit")
    assert same_seed.val_set is not None and same_seed.val_set.indices == dm.val_set.indices
    other_seed = _datamodule(shared_root, val_size=30, seed=2)
    other_seed.setup("fit")
    assert other_seed.val_set is not None and other_seed.val_set.indices != dm.val_set.indices


def test_val_split_uses_the_eval_transforms(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=30)
    dm.setup("fit")
    raw = np.concatenate([_raw_images(shared_root, name)[0] for name in EXPECTED_FILES[:5]])
    assert dm.val_set is not None
    first = [dm.val_set[i][0] for i in range(len(dm.val_set))]
    second = [image for images, _ in dm.val_dataloader() for image in images]
    for position, (a, b) in enumerate(zip(first, second, strict=True)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, _normalised(raw[dm.val_set.indices[position]]))


# ------------------------------------------------------------------------------------------- augmentation


def _padded(image: torch.Tensor) -> torch.Tensor:
    """Reflect-pad a (3, 32, 32) tensor by 4 on every side, independently of torchvision."""
    return torch.from_numpy(np.pad(image.numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect"))


def _pil(raw_chw: np.ndarray) -> Image.Image:
    return Image.fromarray(raw_chw.transpose(1, 2, 0))


def test_train_transform_is_a_seeded_reflect_pad_crop_and_flip(shared_root: Path) -> None:
    dm = _datamodule(shared_root)
    raw, _ = _raw_images(shared_root, "data_batch_1")
    padded = _padded(_normalised(raw[3]))
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        output = dm.train_transform(_pil(raw[3]))
        # Reproduce torchvision's draws: RandomCrop's top and left offsets, then RandomHorizontalFlip.
        torch.manual_seed(seed)
        top = int(torch.randint(0, 9, (1,)).item())
        left = int(torch.randint(0, 9, (1,)).item())
        flip = bool(torch.rand(1) < 0.5)
        expected = padded[:, top : top + 32, left : left + 32]
        if flip:
            expected = expected.flip(-1)
        torch.testing.assert_close(output, expected)
        flips.add(flip)
    assert flips == {True, False}


def test_train_outputs_are_crops_and_flips_of_the_padded_image(shared_root: Path) -> None:
    dm = _datamodule(shared_root)
    raw, _ = _raw_images(shared_root, "data_batch_2")
    padded = _padded(_normalised(raw[0]))
    candidates = {
        (top, left, flip): (lambda c: c.flip(-1) if flip else c)(padded[:, top : top + 32, left : left + 32])
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
    }
    torch.manual_seed(0)
    found = set()
    for _ in range(40):
        output = dm.train_transform(_pil(raw[0]))
        matches = [key for key, crop in candidates.items() if torch.allclose(output, crop, atol=1e-5)]
        assert matches, "a training image is not a crop/flip of the reflect-padded image"
        found.add(matches[0])
    assert len({(top, left) for top, left, _ in found}) > 10
    assert {flip for _, _, flip in found} == {True, False}


def test_augment_false_uses_the_eval_transforms(shared_root: Path) -> None:
    dm = _datamodule(shared_root, augment=False)
    dm.setup("fit")
    assert dm.train_set is not None
    raw = np.concatenate([_raw_images(shared_root, name)[0] for name in EXPECTED_FILES[:5]])
    for index in (0, 50, 99):
        torch.testing.assert_close(dm.train_set[index][0], _normalised(raw[dm.train_set.indices[index]]))


def test_normalisation_values() -> None:
    dm = CIFAR10DataModule()
    image = Image.new("RGB", (32, 32), color=(0, 128, 255))
    output = dm.eval_transform(image)
    expected = (torch.tensor([0.0, 128 / 255, 1.0]) - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(output, expected.view(3, 1, 1).expand(3, 32, 32))
    assert CIFAR10_MEAN == pytest.approx((0.4914, 0.4824, 0.4467), abs=1e-4)
    assert CIFAR10_STD == pytest.approx((0.2471, 0.2435, 0.2616), abs=1e-4)


# -------------------------------------------------------------------------------------- missing files


def test_missing_data_offline_raises_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(CIFAR10NotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert repr(str(tmp_path / "cifar-10-batches-py")) in message
    for name in EXPECTED_FILES:
        assert name in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "`--data.root`" in message
    assert "Temporary failure in name resolution" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_missing_data_without_download(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, verify_checksums=False)
    with pytest.raises(CIFAR10NotFoundError, match="`--data.download` is false"):
        dm.prepare_data()
    with pytest.raises(CIFAR10NotFoundError, match=str(tmp_path / "cifar-10-batches-py")):
        dm.setup("fit")


def test_one_missing_file_is_named_even_without_checksums(own_root: Path) -> None:
    os.remove(own_root / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(CIFAR10NotFoundError, match=r"\(missing: data_batch_4\)"):
        _datamodule(own_root).setup("fit")
    _datamodule(own_root).setup("test")  # the test split does not need the training batches


def test_present_files_are_not_downloaded_again(shared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("download attempted although the files exist")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fail)
    _datamodule(shared_root, download=True).prepare_data()


# ------------------------------------------------------------------------------------ corrupted files


def test_md5_check_names_the_first_file_checked(own_root: Path) -> None:
    """Every fake file mismatches the official md5s; the first one checked is data_batch_1."""
    dm = _datamodule(own_root, verify_checksums=True)
    with pytest.raises(CIFAR10CorruptedError) as info:
        dm.setup("fit")
    path = own_root / "cifar-10-batches-py" / "data_batch_1"
    expected_md5 = dict(CIFAR10.train_list)["data_batch_1"]
    assert (
        f"{path} failed its md5 check (expected {expected_md5}, got {tv_utils.calculate_md5(path)})"
        in str(info.value)
    )
    assert "`--data.verify_checksums false`" in str(info.value)


def test_md5_check_names_the_corrupted_file(own_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With md5 lists that match the fake files, flipping one pixel byte of data_batch_3 is caught."""
    batches = own_root / "cifar-10-batches-py"
    md5 = {path.name: tv_utils.calculate_md5(path) for path in batches.iterdir()}
    monkeypatch.setattr(CIFAR10, "train_list", [[name, md5[name]] for name in EXPECTED_FILES[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    _datamodule(own_root, verify_checksums=True).setup("fit")  # intact files pass

    content = bytearray((batches / "data_batch_3").read_bytes())
    content[-200] ^= 0xFF  # inside the pixel buffer: still unpickles fine
    (batches / "data_batch_3").write_bytes(bytes(content))
    _datamodule(own_root, verify_checksums=False).setup("fit")  # without md5 the change goes unnoticed
    with pytest.raises(CIFAR10CorruptedError, match=r"data_batch_3 failed its md5 check \(expected "):
        _datamodule(own_root, verify_checksums=True).setup("fit")


def test_unpicklable_file_is_named_without_checksums(own_root: Path) -> None:
    path = own_root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CIFAR10CorruptedError, match=r"data_batch_3 could not be unpickled"):
        _datamodule(own_root).setup("fit")


def _rewrite(path: Path, change: Any) -> None:
    with open(path, "rb") as file:
        entry = pickle.load(file, encoding="latin1")
    change(entry)
    with open(path, "wb") as file:
        pickle.dump(entry, file)


@pytest.mark.parametrize(
    ("name", "change", "problem"),
    [
        (
            "data_batch_2",
            lambda entry: entry.pop("data"),
            "has no uint8 array of shape (N, 3072) under 'data'",
        ),
        (
            "data_batch_5",
            lambda entry: entry.update(data=entry["data"][:, :100]),
            "has no uint8 array of shape (N, 3072) under 'data' (got uint8 array of shape (20, 100)",
        ),
        ("data_batch_4", lambda entry: entry["labels"].pop(), "does not have one label per image"),
        (
            "data_batch_1",
            lambda entry: entry["labels"].__setitem__(0, 10),
            "has labels outside the ints 0..9",
        ),
        ("batches.meta", lambda entry: entry.pop("label_names"), "has no list of 10 class names"),
    ],
)
def test_malformed_file_is_named(own_root: Path, name: str, change: Any, problem: str) -> None:
    _rewrite(own_root / "cifar-10-batches-py" / name, change)
    with pytest.raises(CIFAR10CorruptedError) as info:
        _datamodule(own_root).setup("fit")
    assert f"{own_root / 'cifar-10-batches-py' / name} {problem}" in str(info.value)


# ------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "Expected `--data.batch_size` to be an int >= 1, but got 0."),
        ({"batch_size": 2.0}, "Expected `--data.batch_size` to be an int >= 1, but got 2.0."),
        ({"num_workers": -1}, "Expected `--data.num_workers` to be an int >= 0, but got -1."),
        ({"val_size": -1}, "Expected `--data.val_size` to be an int in [0, 50000), but got -1."),
        ({"val_size": 50000}, "Expected `--data.val_size` to be an int in [0, 50000), but got 50000."),
        ({"val_size": True}, "Expected `--data.val_size` to be an int in [0, 50000), but got True."),
        ({"seed": -3}, "Expected `--data.seed` to be an int >= 0, but got -3."),
        ({"download": "yes"}, "Expected `--data.download` to be a bool, but got 'yes'."),
        ({"verify_checksums": 1}, "Expected `--data.verify_checksums` to be a bool, but got 1."),
        ({"augment": None}, "Expected `--data.augment` to be a bool, but got None."),
        ({"root": ""}, "Expected `--data.root` to be a non-empty directory path, but got ''."),
    ],
)
def test_invalid_arguments_name_the_flag(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        CIFAR10DataModule(**kwargs)
    assert str(info.value) == message


def test_val_size_must_be_smaller_than_the_training_set_found(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=100)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert str(info.value).startswith(
        "Expected `--data.val_size` to be smaller than the 100 training images found in "
    )
    assert str(info.value).endswith("but got 100.")


def test_hyperparameters_are_saved(shared_root: Path) -> None:
    dm = _datamodule(shared_root, val_size=5, seed=3)
    assert dm.hparams["val_size"] == 5 and dm.hparams["seed"] == 3 and dm.hparams["root"] == str(shared_root)


# ------------------------------------------------------------------------------ SVHN as the OOD test set


@pytest.fixture(scope="module")
def svhn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake SVHN test split (20 images) in the real format, which the tests only read."""
    root = tmp_path_factory.mktemp("svhn")
    write_fake_svhn(root, num_test=20, seed=0)
    return root


def test_fake_svhn_has_the_real_format(svhn_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mat = loadmat(svhn_root / "test_32x32.mat")
    assert mat["X"].shape == (32, 32, 3, 20) and mat["X"].dtype == np.uint8
    assert mat["y"].shape == (20, 1) and set(mat["y"].ravel().tolist()) <= set(range(1, 11))
    url, name, _ = SVHN.split_list["test"]
    monkeypatch.setitem(SVHN.split_list, "test", [url, name, None])  # torchvision itself, md5 aside
    svhn = SVHN(str(svhn_root), split="test")
    assert len(svhn) == 20 and svhn[0][0].size == (32, 32)


def test_svhn_is_the_second_test_loader_with_the_cifar_normalisation(
    shared_root: Path, svhn_root: Path
) -> None:
    dm = _datamodule(shared_root, ood="svhn", ood_root=str(svhn_root))
    dm.setup("fit")
    assert dm.ood_set is None  # only the test stage loads it
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert loaders[0].dataset is dm.test_set and len(loaders[1].dataset) == 20  # type: ignore[arg-type]
    images, _ = next(iter(loaders[1]))
    assert images.shape == (16, 3, 32, 32)
    raw = loadmat(svhn_root / "test_32x32.mat")["X"].transpose(3, 2, 0, 1)  # (N, C, H, W), as torchvision
    torch.testing.assert_close(images, _normalised(raw[:16]))
    default = CIFAR10DataModule(root=str(shared_root), ood="svhn")
    assert default.ood_root == os.path.join(str(shared_root), "svhn")


def test_svhn_missing_corrupted_and_malformed_files_are_named(tmp_path: Path, shared_root: Path) -> None:
    dm = _datamodule(shared_root, ood="svhn", ood_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"test_32x32.mat' does not exist.*`--data.ood_root`"):
        dm.setup("test")
    path = write_fake_svhn(tmp_path, num_test=3)
    with pytest.raises(
        RuntimeError, match=rf"{path} failed its md5 check \(expected eb5a983be6a315427106f1b164d9cef3"
    ):
        _SVHN(tmp_path, verify_checksums=True, transform=None)
    savemat(path, {"X": np.zeros((28, 28, 1, 3), dtype=np.uint8), "y": np.ones((3, 1), dtype=np.uint8)})
    with pytest.raises(
        RuntimeError, match=r"holds 'X' of shape \(28, 28, 1, 3\).*`--data.verify_checksums false`"
    ):
        _SVHN(tmp_path, verify_checksums=False, transform=None)
    path.write_bytes(b"not a MATLAB file")
    with pytest.raises(RuntimeError, match=r"test_32x32.mat could not be read"):
        _SVHN(tmp_path, verify_checksums=False, transform=None)


def test_prepare_data_downloads_a_missing_svhn(
    tmp_path: Path, shared_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))
        write_fake_svhn(root, num_test=2)

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    dm = _datamodule(shared_root, ood="svhn", ood_root=str(tmp_path / "svhn"), download=True)
    dm.prepare_data()
    dm.prepare_data()  # present now: not downloaded again
    assert calls == [
        (SVHN.split_list["test"][0], str(tmp_path / "svhn"), "test_32x32.mat", SVHN.split_list["test"][2])
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ood": "mnist"}, "Expected `--data.ood` to be one of ['svhn'] or null, but got 'mnist'."),
        (
            {"ood": "svhn", "ood_root": ""},
            "Expected `--data.ood_root` to be a non-empty directory path or null",
        ),
    ],
)
def test_invalid_ood_arguments_name_the_flag(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        CIFAR10DataModule(root="data", **kwargs)
    assert str(info.value).startswith(message)
