"""Callback presets composed with the real LightningCLI, and the cross-run comparison command."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ensembles.callbacks import CascadeMonitor, EnsembleSizeAblation, FlopsMonitor, LatencyMonitor
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.compare import compare, main
from lightning_ensembles.testing import write_fake_cifar10
from tests.conftest import fast_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
PRESETS = ROOT / "callbacks"
sys.path.insert(0, str(ROOT / "reproductions"))

import cifar_wrn  # noqa: E402


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_presets_add_to_the_recipes_callbacks(preset: str) -> None:
    cli = EnsembleCLI(args=["--config", str(CONFIGS / "cifar_wrn.yaml"), "--config", str(PRESETS / preset)])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert ModelCheckpoint in kinds and LearningRateMonitor in kinds  # the recipe's own, kept
    expected = {
        "efficiency.yaml": {FlopsMonitor, LatencyMonitor, EnsembleSizeAblation},
        "flops.yaml": {FlopsMonitor},
        "latency.yaml": {LatencyMonitor},
        "ablation.yaml": {EnsembleSizeAblation},
        "cascade.yaml": {CascadeMonitor},
    }[preset]
    assert expected <= set(kinds)


def test_efficiency_preset_runs_with_the_digits_recipe(tmp_path: Path) -> None:
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "digits/quickstart.yaml"),
            "--config", str(CONFIGS / "cifar/wrn-16-1.yaml"),
            "--config", str(CONFIGS / "ensemble-2.yaml"),
            "--config", str(PRESETS / "efficiency.yaml"),
            *fast_recipe_args(tmp_path),
            "--trainer.limit_train_batches=2",
        ]
    )  # fmt: skip
    events = EventAccumulator(str(Path(results["results_file"]).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "flops/ensemble_gmacs",
        "latency/sequential/size_2/batch1_ms_p50",
        "latency/sequential/size_2/batch256_samples_per_s",
        "ablation/test/random/size_2/top1",
        "ablation/val/first/size_1/nll",
    } <= tags
    assert events.Scalars("flops/ensemble_gmacs")[-1].value == pytest.approx(
        results["sizes"][-1]["macs"] / 1e9
    )


def _recipe_run(tmp_path: Path, data: Path, *configs: str) -> dict:
    args = []
    for config in configs:
        args += ["--config", str(CONFIGS / config)]
    return cifar_wrn.main(
        [
            *args,
            "--config", str(PRESETS / "flops.yaml"),
            "--config", str(PRESETS / "ablation.yaml"),
            f"--data.root={data}",
            "--data.verify_checksums=false",
            "--data.num_workers=0",
            "--data.batch_size=32",
            *fast_recipe_args(tmp_path / "logs"),
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("compare")
    data = tmp_path / "data"
    write_fake_cifar10(data, num_train=64, num_test=32)
    _recipe_run(tmp_path, data, "cifar/wrn-16-1.yaml", "ensemble-3.yaml")
    _recipe_run(tmp_path, data, "cifar/wrn-16-2.yaml", "ensemble-2.yaml")
    _recipe_run(tmp_path, data, "cifar/wrn-16-2.yaml")  # a single model: merged into the WRN-16-2 line
    return tmp_path / "logs"


def test_compare_draws_one_line_per_architecture(cifar_runs: Path, capsys: pytest.CaptureFixture) -> None:
    results = main([str(cifar_runs)])
    assert sorted(results["lines"]) == ["WRN-16-1", "WRN-16-2"]
    assert [row["k"] for row in results["lines"]["WRN-16-1"]] == [1, 2, 3]
    wrn162 = results["lines"]["WRN-16-2"]
    assert [(row["k"], row["runs"]) for row in wrn162] == [(1, 2), (2, 1)]  # k=1 averaged over two runs
    assert wrn162[1]["gmacs"] == pytest.approx(2 * wrn162[0]["gmacs"])

    out = cifar_runs / "comparison"
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["architecture"], r["k"]) for r in rows] == [
        ("WRN-16-1", "1"),
        ("WRN-16-1", "2"),
        ("WRN-16-1", "3"),
        ("WRN-16-2", "1"),
        ("WRN-16-2", "2"),
    ]
    assert "| WRN-16-2 | 2 | 1 |" in (out / "comparison.md").read_text()
    assert "wrote" in capsys.readouterr().out

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    assert "comparison/accuracy_vs_gmacs" in board.Tags()["images"]
    sessions = [
        p.parent
        for p in (out / "tensorboard").rglob("events.out.tfevents.*")
        if p.parent != out / "tensorboard"
    ]
    assert len(sessions) == 3  # one HParams session per run

    # Running again ignores its own output folder.
    assert sorted(compare(str(cifar_runs))["runs"]) == sorted(results["runs"])


def test_compare_bad_input(tmp_path: Path, cifar_runs: Path) -> None:
    with pytest.raises(ValueError, match="Found no TensorBoard runs"):
        compare(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="`logdir`"):
        compare(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="`--stage` to be 'val' or 'test', but got 'train'"):
        compare(str(cifar_runs), stage="train")  # type: ignore[arg-type]

    bare = tmp_path / "bare"
    with SummaryWriter(str(bare / "plain_run")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    with pytest.raises(ValueError, match=r"lack the `ablation/test/...` tags.*plain_run"):
        compare(str(bare), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written

    mixed = tmp_path / "mixed"
    (mixed).mkdir()
    (mixed / "ensembles").symlink_to(cifar_runs, target_is_directory=True)
    (mixed / "plain_run").symlink_to(bare / "plain_run", target_is_directory=True)
    results = compare(str(mixed), skip_incomplete=True, out=str(tmp_path / "out2"))
    assert results["skipped"] == ["plain_run"] and len(results["runs"]) == 3
