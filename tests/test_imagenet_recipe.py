"""The ImageNet EfficientNet recipe, committees of pretrained models, and EfficientNet FLOPs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

from lightning_ensembles.callbacks import MemberEMA
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.cost import count_macs, count_params
from lightning_ensembles.testing_imagenet import write_fake_imagefolder
from tests.helpers import fast_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
DEFAULT = CONFIGS / "imagenet_efficientnet.yaml"
sys.path.insert(0, str(ROOT / "reproductions"))

import imagenet_efficientnet  # noqa: E402

TINY = "test_efficientnet"
IMAGENET_YAML = sorted(p.name for p in (CONFIGS / "imagenet").glob("*.yaml"))
# EfficientNet paper, Table 2 (multiply-adds, billions; parameters, millions); rounded to 2 digits.
PAPER = {
    0: (0.39, 5.3),
    1: (0.70, 7.8),
    2: (1.0, 9.2),
    3: (1.8, 12),
    4: (4.2, 19),
    5: (9.9, 30),
    6: (19, 43),
    7: (37, 66),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_imagefolder(tmp_path_factory.mktemp("imagenet"), classes=("a", "b", "c"), size=40)


@pytest.mark.parametrize("config", [c for c in IMAGENET_YAML if c != "committee.yaml"])
def test_model_configs_parse_and_instantiate(config: str, tmp_path: Path) -> None:
    cli = EnsembleCLI(args=["--config", str(DEFAULT), "--config", str(CONFIGS / "imagenet" / config)])
    member = cli.model.members[0]
    b = int(Path(config).stem[1:])
    assert member.name == f"tf_efficientnet_b{b}"
    assert member.native_input_size[1] == (224, 240, 260, 300, 380, 456, 528, 600)[b]
    # The data's size comes from the member's name, linked by the CLI, not from the model.
    assert cli.config.data.init_args.model_name == member.name
    assert cli.datamodule.input_shape == member.native_input_size
    assert any(isinstance(c, MemberEMA) for c in cli.trainer.callbacks)
    optimizer = cli.model.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == "RMSpropTF" and optimizer.defaults["eps"] == 0.001


def test_committee_config_parses(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:  # parse only: building it would download weights
        EnsembleCLI(
            args=[
                "--config",
                str(DEFAULT),
                "--config",
                str(CONFIGS / "imagenet/committee.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "train: false" in printed and "tf_efficientnet_b2" in printed and "pretrained: true" in printed


def _tiny_args(tree: Path, tmp_path: Path) -> list[str]:
    return [
        f"--data.root={tree}",
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--trainer.precision=32-true",
        *fast_recipe_args(tmp_path / "logs"),
    ]


@pytest.mark.slow
def test_recipe_end_to_end_on_a_generated_imagefolder(tmp_path: Path) -> None:
    # Two classes, and no num_classes given anywhere: the ImageFolder's count reaches the timm members.
    two = write_fake_imagefolder(tmp_path / "two", classes=("cat", "dog"), size=40)
    results = imagenet_efficientnet.main(
        [
            "--config", str(CONFIGS / "imagenet/b0.yaml"),
            "--config", str(CONFIGS / "ensemble-2.yaml"),
            "--config", str(ROOT / "callbacks/ablation.yaml"),
            f"--model.member.init_args.model_name={TINY}",
            "--model.member.init_args.input_size=[3, 64, 64]",
            *_tiny_args(two, tmp_path),
        ]
    )  # fmt: skip
    assert results["architecture"] == TINY and [r["k"] for r in results["sizes"]] == [1, 2]
    assert results["input_shape"] == [3, 64, 64]  # the data took the members' resolution
    run = Path(results["results_file"]).parent
    assert (run / "ablation_test.json").is_file()


def test_committee_of_local_pretrained_weights_evaluates_without_training(tree: Path, tmp_path: Path) -> None:
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model(TINY, num_classes=3)
        paths.append(tmp_path / f"weights{seed}.pth")
        torch.save(model.state_dict(), paths[-1])
    committee = tmp_path / "committee.yaml"
    committee.write_text(
        "train: false\nmodel:\n  member: null\n  members:\n"
        + "".join(
            f"    - class_path: lightning_ensembles.models.TimmModel\n      init_args:\n"
            f"        model_name: {TINY}\n        num_classes: 3\n        checkpoint_path: {p}\n"
            f"        input_size: [3, {size}, {size}]\n"
            for p, size in zip(paths, (48, 64))
        )
    )
    results = imagenet_efficientnet.main(["--config", str(committee), *_tiny_args(tree, tmp_path)])
    assert results["tested"].startswith("members as built") and results["global_step"] == 0
    assert results["input_shape"] == [3, 64, 64]  # the largest member's resolution feeds both
    assert results["architecture"] == TINY and len(results["members"]) == 2
    # Each member is costed at its own native resolution although both are fed 64x64 images.
    for row, size in zip(results["members"], (48, 64), strict=True):
        with torch.device("meta"):
            alone = timm.create_model(TINY, num_classes=3)
        assert row["macs"] == count_macs(alone, (3, size, size))


def test_efficientnet_multiply_adds_match_the_published_table() -> None:
    for b in range(8):
        with torch.device("meta"):
            model = timm.create_model(f"tf_efficientnet_b{b}")
        macs = count_macs(model, model.pretrained_cfg["input_size"]) / 1e9
        params = count_params(model) / 1e6
        paper_macs, paper_params = PAPER[b]
        # The paper rounds to two digits and sits up to ~5% below an exact conv+linear count (B4: +4.6%).
        assert macs == pytest.approx(paper_macs, rel=0.05), b
        assert params == pytest.approx(paper_params, rel=0.02), b
        if b == 0:
            assert macs == pytest.approx(0.386, rel=0.01)  # exact count, REFERENCES.md
    assert 2 * 10.2664 < 37.7459  # the paper's comparison: two B5s cost less than one B7
