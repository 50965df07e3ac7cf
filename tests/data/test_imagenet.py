"""Tests for ImageNetDataModule on a tiny ImageFolder tree of real JPEG files (CPU, no downloads)."""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torchvision import transforms

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.data import ImageNetDataModule
from lightning_ensembles.models import TimmModel, resolution_of
from lightning_ensembles.models.timm_member import timm_pretrained_cfg
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.testing_imagenet import write_fake_imagefolder
from tests.helpers import trainer_kwargs

CLASSES = ("n01", "n02", "n03")
TINY = "test_efficientnet"  # timm's tiny test EfficientNet: native 160x160, crop_pct 0.95


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 4 train and 2 val JPEGs each; tests only read it."""
    return write_fake_imagefolder(tmp_path_factory.mktemp("imagenet"), classes=CLASSES, size=40)


def _dm(root: Path, **kwargs: Any) -> ImageNetDataModule:
    kwargs = {"input_size": 32, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageNetDataModule(root=str(root), **kwargs)


def test_fake_tree_is_real_jpeg(root: Path) -> None:
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 3 * (4 + 2)
    assert files[0].read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG magic
    assert sorted(p.name for p in (root / "val").iterdir()) == list(CLASSES)


def test_loaders_give_model_sized_batches(root: Path) -> None:
    dm = _dm(root, model_name=TINY, input_size=None, auto_augment=None)
    assert dm.input_shape == (3, 160, 160) and dm.num_classes == 3  # counted before setup
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 160, 160) and labels.dtype == torch.int64
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 160, 160) and labels.tolist() == [0, 0, 1, 1]
    assert dm.classes == list(CLASSES) and len(dm.train_set) == 12 and len(dm.val_set) == 6  # type: ignore[arg-type]


def test_input_size_overrides_the_model_and_sets_the_eval_crop(root: Path) -> None:
    dm = _dm(root, model_name=TINY, input_size=32, crop_pct=0.5)
    assert dm.input_shape == (3, 32, 32)
    assert dm.data_config["crop_pct"] == 0.5 and dm.data_config["interpolation"] == "bicubic"
    steps = dm.eval_transform.transforms  # type: ignore[attr-defined]
    resize = next(t for t in steps if isinstance(t, transforms.Resize))
    crop = next(t for t in steps if isinstance(t, transforms.CenterCrop))
    assert resize.size == 64 and tuple(crop.size) == (32, 32)  # 32 / 0.5, then the center 32x32
    dm.setup("validate")
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert next(iter(loader))[0].shape == (4, 3, 32, 32)
    assert dm.train_set is None  # validate only indexes val


def test_crop_pct_comes_from_the_model_config() -> None:
    assert ImageNetDataModule("no/such", model_name=TINY).data_config["crop_pct"] == 0.95
    dm = ImageNetDataModule("no/such", model_name="tf_efficientnet_b5")
    assert dm.input_shape == (3, 456, 456) and dm.data_config["crop_pct"] == 0.934
    assert dm.num_classes == 1000  # no train folder yet: ImageNet-1k


def test_mixup_soft_targets_in_training_batches_only(root: Path) -> None:
    dm = _dm(root, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, auto_augment=None)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=False)  # type: ignore[assignment]
    assert dm.on_after_batch_transfer((x.clone(), y), 0)[1] is y  # evaluation: untouched
    dm.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    mixed, soft = dm.on_after_batch_transfer((x.clone(), y), 0)
    assert mixed.shape == x.shape and soft.shape == (4, 3) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert float(soft.min()) >= 0.1 / 3 - 1e-6
    # An odd last batch: all but the last image are mixed; the last gets its smoothed one-hot label.
    _, odd = dm.on_after_batch_transfer((x[:3].clone(), y[:3]), 0)
    expected = torch.full((3,), 0.1 / 3).scatter_(0, y[2:3], 1 - 0.1 + 0.1 / 3)
    assert odd.shape == (3, 3)
    torch.testing.assert_close(odd[2], expected)


class _RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.train_targets: list[torch.Tensor] = []
        self.val_targets: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.train_targets.append(batch[1])

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.val_targets.append(batch[1])


def test_one_training_step_with_mixup_and_timm_members(root: Path) -> None:
    dm = _dm(root, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, re_prob=0.25)
    member = functools.partial(TimmModel, model_name=TINY, num_classes=3, input_size=(3, 32, 32))
    module = EnsembleLightningModule(member=member, num_members=2, num_classes=dm.num_classes)
    record = _RecordBatches()
    trainer = pl.Trainer(  # the model summary runs the example input through the batch hooks, Mixup's too
        **trainer_kwargs(
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=1,
            callbacks=[record],
            enable_model_summary=True,
        )
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and module.input_shape == (3, 32, 32)
    assert record.train_targets[0].shape == (4, 3) and record.train_targets[0].is_floating_point()
    assert record.val_targets[0].dtype == torch.int64
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("model_smoothing", [0.0, 0.1])
def test_the_module_warns_when_it_smooths_mixup_targets_again(root: Path, model_smoothing: float) -> None:
    dm = _dm(root, mixup_alpha=0.2, label_smoothing=0.1)
    member = functools.partial(TimmModel, model_name=TINY, num_classes=3, input_size=(3, 32, 32))
    module = EnsembleLightningModule(
        member=member, num_members=1, num_classes=dm.num_classes, label_smoothing=model_smoothing
    )
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=2, limit_val_batches=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    twice = [
        w for w in caught if "`--model.label_smoothing` > 0 smooths them a second time" in str(w.message)
    ]
    assert len(twice) == (1 if model_smoothing > 0 else 0)  # once per run, not per step


def test_lightning_cli_links_num_classes_and_builds_timm_members(root: Path, tmp_path: Path) -> None:
    member = {"class_path": "lightning_ensembles.models.TimmModel", "init_args": {"model_name": TINY}}
    member["init_args"].update(num_classes=3, input_size=[3, 32, 32])  # type: ignore[attr-defined]
    cli = EnsembleCLI(
        args=[
            "--data=lightning_ensembles.data.ImageNetDataModule",
            f"--data.root={root}",
            "--data.input_size=32",
            "--data.num_workers=0",
            f"--model.member={json.dumps(member)}",
            "--model.num_members=2",
            "--trainer.logger=false",
            "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.model.num_classes == cli.datamodule.num_classes == 3
    assert [m.name for m in cli.model.members] == [TINY, TINY]


def test_missing_split_folders_name_the_flag_and_path(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "absent")
    assert dm.num_classes == 1000
    with pytest.raises(
        FileNotFoundError, match=r"train folder '.*absent/train' does not exist.*`--data.root`"
    ):
        dm.setup("fit")
    write_fake_imagefolder(tmp_path / "noval", size=16)
    shutil.rmtree(tmp_path / "noval" / "val")
    with pytest.raises(FileNotFoundError, match=r"val folder '.*noval/val' does not exist.*`--data.root`"):
        _dm(tmp_path / "noval").setup("validate")


def test_split_without_classes_or_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"'.*empty/train' \(under `--data.root`.*\) has no class folders"
    ):
        _dm(tmp_path / "empty").setup("fit")
    write_fake_imagefolder(tmp_path / "noimages", val_per_class=0, size=16)
    with pytest.raises(FileNotFoundError, match=r"'.*noimages/val' \(under `--data.root`.*without images"):
        _dm(tmp_path / "noimages").setup("fit")


def test_different_class_sets_are_listed(tmp_path: Path) -> None:
    write_fake_imagefolder(tmp_path, classes=("a", "b", "c"), val_per_class=0, size=16)
    shutil.rmtree(tmp_path / "val")
    write_fake_imagefolder(tmp_path / "other", classes=("a", "b", "d", "e"), train_per_class=0, size=16)
    (tmp_path / "other" / "val").rename(tmp_path / "val")
    with pytest.raises(ValueError, match=r"`--data.root`.*only in train: 'c'; only in val: 'd', 'e'"):
        _dm(tmp_path).setup("fit")
    with pytest.raises(ValueError, match="only in train: 'c'"):  # also when only evaluating
        _dm(tmp_path).setup("test")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"re_prob": 1.5}, "re_prob"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"cutmix_alpha": -0.1}, "cutmix_alpha"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"input_size": 0}, "input_size"),
        ({"seed": -1}, "seed"),
        ({"auto_augment": "no-such-policy"}, "auto_augment"),
        ({"model_name": "efficientnet_b9", "input_size": None}, "model_name"),
        ({"mixup_alpha": 0.2, "batch_size": 3}, "batch_size"),
        ({"root": ""}, "root"),
    ],
)
def test_bad_arguments_name_their_flag_and_value(root: Path, kwargs: dict[str, Any], flag: str) -> None:
    args = {"root": str(root), "input_size": 32, **kwargs}
    with pytest.raises(ValueError, match=rf"`--data\.{flag}`") as info:
        ImageNetDataModule(**args)
    assert repr(args[flag]) in str(info.value) or str(args[flag]) in str(info.value)


def test_resolution_of_the_timm_members_feeds_the_largest(root: Path) -> None:
    small = functools.partial(TimmModel, model_name=TINY, num_classes=3, input_size=(3, 32, 32))
    large = functools.partial(TimmModel, model_name=TINY, num_classes=3, input_size=(3, 48, 48))
    module = EnsembleLightningModule(members=[small, large], num_classes=len(CLASSES))
    dm = ImageNetDataModule(
        root=str(root), batch_size=4, num_workers=0, auto_augment=None, **resolution_of(module.members)
    )
    assert dm.input_shape == (3, 48, 48)  # the largest member's resolution; the other resizes to its own
    assert dm.data_config["crop_pct"] == timm_pretrained_cfg(TINY, "model_name")["crop_pct"]
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=1, limit_val_batches=1))
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1


def test_resolution_of_skips_other_members_and_rejects_a_non_square_override() -> None:
    assert resolution_of([torch.nn.Linear(4, 3)]) == {}
    assert resolution_of([(TINY, None), (TINY, [3, 48, 48])]) == {"model_name": TINY, "input_size": None}
    with pytest.raises(ValueError, match=r"`--data.input_size`.*\(3, 48, 64\)"):
        resolution_of([(TINY, [3, 48, 64])])


def test_model_name_or_input_size_is_required(root: Path) -> None:
    with pytest.raises(
        ValueError, match=r"`--data.model_name`.*`--data.input_size`.*got neither.*resolution_of"
    ):
        ImageNetDataModule(root=str(root), batch_size=4, num_workers=0)


def _cli(root: Path, tmp_path: Path, *args: str, sizes: tuple[int, ...] = (48, 64)) -> EnsembleCLI:
    members = [
        {
            "class_path": "lightning_ensembles.models.TimmModel",
            "init_args": {"model_name": TINY, "num_classes": 3, "input_size": [3, size, size]},
        }
        for size in sizes
    ]
    return EnsembleCLI(
        args=[
            "--data=lightning_ensembles.data.ImageNetDataModule",
            f"--data.root={root}",
            "--data.num_workers=0",
            f"--model.members={json.dumps(members)}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *args,
        ]
    )


def test_cli_links_the_largest_timm_member_into_the_data_when_neither_is_given(
    root: Path, tmp_path: Path
) -> None:
    cli = _cli(root, tmp_path)
    assert cli.datamodule.input_shape == (3, 64, 64)
    linked = cli.config.data.init_args
    assert (linked.model_name, linked.input_size) == (TINY, 64)  # in the config saved with the run


@pytest.mark.parametrize(
    ("flag", "shape"), [("--data.input_size=40", (3, 40, 40)), (f"--data.model_name={TINY}", (3, 160, 160))]
)
def test_cli_link_yields_to_a_size_the_user_gives(
    root: Path, tmp_path: Path, flag: str, shape: tuple[int, ...]
) -> None:
    cli = _cli(root, tmp_path, flag)
    assert cli.datamodule.input_shape == shape


def test_cli_without_timm_members_asks_for_the_flags(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`--data.model_name`.*`--data.input_size`.*got neither"):
        EnsembleCLI(
            args=[
                "--data=lightning_ensembles.data.ImageNetDataModule",
                f"--data.root={root}",
                "--model.member=torch.nn.Flatten",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_label_smoothing_without_mixup_warns(root: Path) -> None:
    with pytest.warns(UserWarning, match="--model.label_smoothing"):
        _dm(root, label_smoothing=0.1)


def test_loaders_before_setup_raise(root: Path) -> None:
    with pytest.raises(RuntimeError, match=r"setup\('fit'\)"):
        _dm(root).train_dataloader()


def test_ood_root_is_an_image_folder_tested_after_val_with_the_eval_transforms(
    root: Path, tmp_path: Path
) -> None:
    other = write_fake_imagefolder(
        tmp_path / "other", classes=("x", "y"), train_per_class=0, val_per_class=3, size=56
    )
    dm = _dm(root, ood_root=str(other / "val"))
    dm.setup("validate")
    assert dm.ood_set is None and not isinstance(dm.val_dataloader(), list)  # only the test stage loads it
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and [len(loader.dataset) for loader in loaders] == [6, 6]  # type: ignore[arg-type]
    assert loaders[0].dataset is dm.val_set and dm.ood_set is not None
    assert dm.ood_set.transform is dm.eval_transform
    ood_images, _ = next(iter(loaders[1]))
    assert ood_images.shape == (4, 3, 32, 32)  # 56x56 files, resized and cropped like the val images
    assert dm.num_classes == 3 and dm.classes == list(CLASSES)  # the OOD folder names are not classes


def test_ood_root_errors_name_the_flag(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`--data.ood_root` .*missing' does not exist"):
        _dm(root, ood_root=str(tmp_path / "missing")).setup("test")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`--data.ood_root` .*flat' has no sub-folders"):
        _dm(root, ood_root=str(tmp_path / "flat")).setup("test")
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`--data.ood_root` .*has sub-folders without images"):
        _dm(root, ood_root=str(tmp_path / "flat")).setup("test")
    with pytest.raises(
        ValueError, match=r"Expected `--data.ood_root` to be a non-empty directory path or null"
    ):
        _dm(root, ood_root="")
