"""The recipes' ``--help``: short, naming the library's members and callbacks, and short class names accepted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_ensembles._help import first_sentence, short_classes
from lightning_ensembles.callbacks import EnsembleSizeAblation
from lightning_ensembles.cli import EnsembleCLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "reproductions"))

import cifar_wrn  # noqa: E402
import imagenet_efficientnet  # noqa: E402


def _help(recipe: object, capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*args, "--help"])  # type: ignore[attr-defined]
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", [cifar_wrn, imagenet_efficientnet], ids=["cifar_wrn", "imagenet"])
def test_help_is_short_and_names_the_librarys_classes(
    recipe: object, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(recipe, capsys)
    lines = text.splitlines()
    assert len(lines) < 300, f"--help printed {len(lines)} lines"  # 3,197 and 3,219 before
    member = text[text.index("--model.member MEMBER") : text.index("--model.num_members")]
    for name in ("WideResNet", "TimmModel", "NASNet", "timm model name"):
        assert name in member
    assert "torch.nn.ReLU" not in text and "EnsembleMetrics" not in member  # no dumps, no non-members
    callbacks = text[text.index("--trainer.callbacks CALLBACKS") : text.index("--trainer.fast_dev_run")]
    for name in ("EnsembleSizeAblation", "FlopsMonitor", "LatencyMonitor", "CascadeMonitor", "MemberEMA"):
        assert name in callbacks
    assert "ModelCheckpoint" in callbacks
    assert "--trainer.callbacks.help EnsembleSizeAblation" in " ".join(text.split())


def test_class_help_and_flags_take_short_names(capsys: pytest.CaptureFixture) -> None:
    text = _help(cifar_wrn, capsys, "--trainer.callbacks.help", "EnsembleSizeAblation")
    assert "--trainer.callbacks.num_subsets" in text
    cli = EnsembleCLI(
        args=[
            "--config",
            str(ROOT / "reproductions" / "configs" / "cifar_wrn.yaml"),
            "--config",
            str(ROOT / "reproductions" / "configs" / "cifar" / "wrn-16-1.yaml"),
            "--trainer.callbacks+=EnsembleSizeAblation",
            "--trainer.callbacks.num_subsets=3",
            "--data=DigitsDataModule",
        ]
    )
    ablations = [c for c in cli.trainer.callbacks if isinstance(c, EnsembleSizeAblation)]
    assert len(ablations) == 1 and ablations[0].num_subsets == 3


def test_first_sentence_skips_abbreviations_and_parentheses() -> None:
    assert (
        first_sentence("Resume from this file (e.g. last.ckpt). More.")
        == "Resume from this file (e.g. last.ckpt)."
    )
    assert first_sentence("Uses ``M`` members, e.g. four. Then more.") == "Uses M members, e.g. four."
    assert first_sentence("no period at all") == "no period at all"


def test_short_classes_cuts_long_lists_to_the_librarys() -> None:
    paths = [f"torch.nn.Layer{i}" for i in range(40)] + ["lightning_ensembles.models.WideResNet"]
    assert (
        short_classes(paths, "nn.Module")
        == "WideResNet; or a timm model name, or any nn.Module by class path"
    )
    callbacks = [f"lightning.pytorch.callbacks.C{i}" for i in range(40)] + ["lightning_ensembles.callbacks.A"]
    text = short_classes(callbacks, "Callback")
    assert text.startswith("A, C0, C1") and text.endswith("...; or any Callback by class path")
