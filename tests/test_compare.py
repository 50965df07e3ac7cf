"""Callback presets composed with the real LightningCLI, and the cross-run comparison command."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ensembles.callbacks import (
    CascadeMonitor,
    EnsembleSizeAblation,
    FlopsMonitor,
    LatencyMonitor,
    ReliabilityDiagram,
)
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.compare import Pair, Point, compare, main
from lightning_ensembles.stats import paired_difference
from lightning_ensembles.testing import write_fake_cifar10
from tests.helpers import fast_recipe_args

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
        "reliability.yaml": {ReliabilityDiagram},
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

    # The run's HParams session (its only one) holds its results, data/ arguments, no internal keys.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    keys = set(start.session_start_info.hparams)
    assert {"ensemble/architecture", "model/num_members", "data/batch_size", "data/seed"} <= keys
    assert not [k for k in keys if k.startswith("_") or "/_" in k or k in ("batch_size", "seed")]
    metrics = {info.name.tag for info in experiment.experiment.metric_infos}
    assert {"hparams/test_top1", "hparams/test_nll", "hparams/val_top1", "hparams/ensemble_gmacs"} <= metrics
    assert "hp_metric" not in metrics
    assert events.Scalars("hparams/test_top1")[-1].value == pytest.approx(results["ensemble"]["top1"])


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


def _fake_run(
    root: Path, name: str, architecture: str, seed: int | None, points: dict, logged: dict | None = None
) -> Path:
    """A run directory as a recipe run with the ablation writes it: events, HParams and config.yaml."""
    from torch.utils.tensorboard.summary import hparams

    directory = root / name
    with SummaryWriter(str(directory)) as writer:
        for summary in hparams({"ensemble/architecture": architecture, **(logged or {})}, {}):
            writer.file_writer.add_summary(summary)
        for k, columns in points.items():
            for column, value in columns.items():
                if column == "gmacs":
                    writer.add_scalar(f"ablation/test/size_{k}/gmacs", value, 0)
                    writer.add_scalar(f"ablation/test/random/size_{k}/gmacs", value, 0)
                else:
                    writer.add_scalar(f"ablation/test/random/size_{k}/{column}", value, 0)
                    writer.add_scalar(f"ablation/test/first/size_{k}/{column}", value - 0.5, 0)
    if seed is not None:
        (directory / "config.yaml").write_text(f"seed_everything: {seed}\n")
    return directory


# Per-seed test metrics of a 4-member WRN-16-2 ensemble and a single WRN-16-4 (k = 4 vs k = 1).
ENSEMBLE_TOP1 = [0.9900, 0.9933, 0.9867, 0.9933, 0.9900]
SINGLE_TOP1 = [0.9867, 0.9900, 0.9867, 0.9833, 0.9867]
ENSEMBLE_NLL = [0.040, 0.035, 0.045, 0.038, 0.041]
SINGLE_NLL = [0.045, 0.046, 0.044, 0.050, 0.047]


@pytest.fixture
def seeded_runs(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for seed in range(5):
        _fake_run(
            root,
            f"4_x_WRN-16-2/seed_{seed}",
            "WRN-16-2",
            seed,
            {
                1: {"gmacs": 0.0063, "top1": 0.98 + 0.001 * seed, "nll": 0.06, "ece": 0.02},
                4: {"gmacs": 0.0252, "top1": ENSEMBLE_TOP1[seed], "nll": ENSEMBLE_NLL[seed], "ece": 0.01},
            },
        )
        _fake_run(
            root,
            f"WRN-16-4/seed_{seed}",
            "WRN-16-4",
            seed,
            {1: {"gmacs": 0.0245, "top1": SINGLE_TOP1[seed], "nll": SINGLE_NLL[seed], "ece": 0.015}},
        )
    return root


def test_compare_over_seeds_reports_spread_and_paired_differences(seeded_runs: Path) -> None:
    from scipy import stats as scipy_stats

    from lightning_ensembles.stats import paired_difference, verdict

    results = compare(str(seeded_runs))
    ensemble = results["lines"]["WRN-16-2"][1]
    assert (ensemble["k"], ensemble["runs"], ensemble["seeds"]) == (4, 5, 5)
    assert ensemble["top1"] == pytest.approx(sum(ENSEMBLE_TOP1) / 5)
    assert ensemble["top1_std"] == pytest.approx(
        float(np.std(ENSEMBLE_TOP1, ddof=1)), rel=1e-4
    )  # float32 events

    (pair,) = results["pairs"]  # the automatic match: WRN-16-2@4 (0.0252) with WRN-16-4@1 (0.0245)
    assert (str(pair.a), str(pair.b), pair.seeds) == ("WRN-16-2@4", "WRN-16-4@1", [0, 1, 2, 3, 4])
    top1 = pair.differences["top1"]
    expected = paired_difference(ENSEMBLE_TOP1, SINGLE_TOP1)
    assert top1.mean == pytest.approx(expected.mean, abs=1e-7)
    assert top1.t == pytest.approx(scipy_stats.ttest_rel(ENSEMBLE_TOP1, SINGLE_TOP1).statistic, rel=1e-4)
    assert (top1.wins, top1.ties, top1.losses) == (4, 1, 0)
    assert (pair.differences["nll"].wins, pair.differences["nll"].losses) == (4, 1)  # lower is better
    assert top1.ci_low < 0 < top1.ci_high  # 4 of 5 seeds won, but the interval covers 0
    assert results["verdicts"][0] == verdict(top1, "4 x WRN-16-2", "WRN-16-4", scale=100, unit=" points")
    assert results["verdicts"][0].startswith("No significant difference between 4 x WRN-16-2 and WRN-16-4")

    out = seeded_runs / "comparison"
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"top1_std", "nll_std", "ece_std", "seeds"} <= set(rows[0])
    markdown = (out / "comparison.md").read_text()
    assert "| 4 x WRN-16-2 | WRN-16-4 | 0.0252 vs 0.0245 | top1 | 5 |" in markdown
    # One `mean ± std` cell per metric in the markdown (the CSV keeps them apart): 4 + 4 columns, not 4 + 8.
    header = markdown.splitlines()[0]
    assert header == "| architecture | k | runs | seeds | GMACs | top-1 (%) | nll | ece |"
    top1 = 100 * sum(ENSEMBLE_TOP1) / 5, 100 * float(np.std(ENSEMBLE_TOP1, ddof=1))
    assert f"| WRN-16-2 | 4 | 5 | 5 | 0.0252 | {top1[0]:.2f} ± {top1[1]:.2f} |" in markdown
    saved = json.loads((out / "comparison.json").read_text())
    assert sorted(r["seed"] for r in saved["runs"] if r["architecture"] == "WRN-16-4") == [0, 1, 2, 3, 4]
    assert saved["pairs"][0]["differences"]["top1"]["wins"] == 4


def test_compare_metric_explicit_pairs_and_unpaired_runs(seeded_runs: Path, tmp_path: Path) -> None:
    results = compare(
        str(seeded_runs), metric="nll", pairs=["WRN-16-2@1 vs WRN-16-4@1"], out=str(tmp_path / "o")
    )
    (pair,) = results["pairs"]
    assert (str(pair.a), str(pair.b)) == ("WRN-16-2@1", "WRN-16-4@1")
    assert (
        results["verdicts"][0].startswith("No significant difference") or "on nll" in results["verdicts"][0]
    )
    assert compare(str(seeded_runs), pairs=[], out=str(tmp_path / "none"))["pairs"] == []
    with pytest.raises(ValueError, match=r"`--pairs` to name logged points .*got 'WRN-16-8@1'"):
        compare(str(seeded_runs), pairs=["WRN-16-2@4 vs WRN-16-8@1"], out=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"look like 'WRN-16-2@4 vs WRN-16-4@1'.*got 'WRN-16-2 vs WRN-16-4'"):
        compare(str(seeded_runs), pairs=["WRN-16-2 vs WRN-16-4"], out=str(tmp_path / "bad"))
    with pytest.raises(
        ValueError,
        match=r"`--metric` to be one of top1, nll, ece, aece, aurc, risk80, ood_auroc, but got 'top5'",
    ):
        compare(str(seeded_runs), metric="top5")  # type: ignore[arg-type]

    # Runs trained from Python (no config.yaml) take their seed from the module's `seed` hyperparameter: in
    # the HParams session, or else in the hparams.yaml Lightning's TensorBoard logger writes.
    python_runs = tmp_path / "python_runs"
    for seed in (3, 4):
        logged = {"seed": seed} if seed == 4 else None
        ensemble = {4: {"gmacs": 0.0252, "top1": 0.99, "nll": 0.04, "ece": 0.01}}
        _fake_run(python_runs, f"a{seed}", "WRN-16-2", None, ensemble, logged)
        single = {1: {"gmacs": 0.0245, "top1": 0.98, "nll": 0.05, "ece": 0.01}}
        _fake_run(python_runs, f"b{seed}", "WRN-16-4", None, single, {"seed": seed})
    (python_runs / "a3" / "hparams.yaml").write_text("seed: 3\n")
    by_seed = compare(str(python_runs))
    assert by_seed["lines"]["WRN-16-2"][0]["seeds"] == 2 and by_seed["pairs"][0].seeds == [3, 4]

    # Runs without any seed draw on the figure but cannot be paired.
    loose = tmp_path / "loose"
    _fake_run(loose, "a", "WRN-16-2", None, {4: {"gmacs": 0.0252, "top1": 0.99, "nll": 0.04, "ece": 0.01}})
    _fake_run(loose, "b", "WRN-16-4", None, {1: {"gmacs": 0.0245, "top1": 0.98, "nll": 0.05, "ece": 0.01}})
    unpaired = compare(str(loose))
    assert unpaired["pairs"][0].differences == {} and "no shared seeds" in unpaired["verdicts"][0]


# Per-seed top-1 of the FLOP-matched pairs of a grouped sweep: {train_size: {line: [seed 0, 1, 2]}}.
GROUPED_TOP1 = {
    "59000": {"small@4": [0.880, 0.884, 0.882], "mid@1": [0.879, 0.880, 0.881]},
    "5900": {"small@4": [0.840, 0.845, 0.842], "mid@1": [0.820, 0.826, 0.821]},
}


def test_group_by_draws_a_line_per_group_pairs_within_it_and_contrasts_pairs(tmp_path: Path) -> None:
    from lightning_ensembles.compare import pair_contrast

    root = tmp_path / "grouped"
    for size, lines in GROUPED_TOP1.items():
        for seed in range(3):
            _fake_run(
                root,
                f"4_x_small_{size}/seed_{seed}",
                "small",
                seed,
                {
                    1: {"gmacs": 0.01, "top1": 0.8, "nll": 0.5, "ece": 0.02},
                    4: {"gmacs": 0.04, "top1": lines["small@4"][seed], "nll": 0.4, "ece": 0.02},
                },
                {"data/train_size": size},
            )
            _fake_run(
                root,
                f"mid_{size}/seed_{seed}",
                "mid",
                seed,
                {1: {"gmacs": 0.039, "top1": lines["mid@1"][seed], "nll": 0.45, "ece": 0.02}},
                {"data/train_size": size},
            )
    ungrouped = compare(str(root), out=str(tmp_path / "plain"))
    assert sorted(ungrouped["lines"]) == ["mid", "small"]  # the two sizes are averaged together

    results = compare(str(root), group_by="data/train_size", out=str(tmp_path / "grouped_out"))
    assert sorted(results["lines"]) == [
        "mid (train_size=5900)",
        "mid (train_size=59000)",
        "small (train_size=5900)",
        "small (train_size=59000)",
    ]
    # Automatic pairs stay within a training-set size, although the other size has the same multiply-adds.
    pairs = {str(p.a): p for p in results["pairs"]}
    assert {a: str(p.b) for a, p in pairs.items()} == {
        "small (train_size=5900)@4": "mid (train_size=5900)@1",
        "small (train_size=59000)@4": "mid (train_size=59000)@1",
    }
    small_data, all_data = pairs["small (train_size=5900)@4"], pairs["small (train_size=59000)@4"]
    expected = [e - s for e, s in zip(GROUPED_TOP1["5900"]["small@4"], GROUPED_TOP1["5900"]["mid@1"])]
    assert list(small_data.per_seed["top1"].values()) == pytest.approx(expected, abs=1e-6)  # float32 events

    # The gap is larger on the subset on every seed: the contrast is its per-seed excess, with wins 3 of 3.
    contrast = pair_contrast(small_data, all_data)
    assert contrast is not None and (contrast.n, contrast.wins) == (3, 3)
    excess = [a - b for a, b in zip(expected, [e - s for e, s in zip(*GROUPED_TOP1["59000"].values())])]
    assert contrast.mean == pytest.approx(sum(excess) / 3, abs=1e-6) and contrast.ci_low > 0
    reverse = pair_contrast(all_data, small_data)
    assert reverse is not None and reverse.mean == pytest.approx(-contrast.mean) and reverse.wins == 0

    # The data-size trend is that contrast (the less data first); one pair per group: no model-size trend.
    (trend,) = results["trends"]
    assert (trend.kind, trend.x, trend.y, trend.outcome) == ("data size", small_data, all_data, "seen")
    assert trend.contrast.mean == pytest.approx(contrast.mean)
    assert "Data size: the gap widens as the training set shrinks? SEEN." in results["table"]

    saved = json.loads((tmp_path / "grouped_out" / "comparison.json").read_text())
    assert saved["group_by"] == "data/train_size" and saved["trends"][0]["outcome"] == "seen"
    assert saved["pairs"][0]["per_seed"]["top1"].keys() == {"0", "1", "2"}
    assert {r["group"] for r in saved["runs"]} == {"5900", "59000"}

    with pytest.raises(ValueError, match=r"`--group_by` to name a hyperparameter .* no 'data/val_size'"):
        compare(str(root), group_by="data/val_size", out=str(tmp_path / "bad"))


def test_command_line_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in (
        ([str(tmp_path / "missing")], "Expected `logdir` to be a directory of TensorBoard runs"),
        ([str(tmp_path)], "Found no TensorBoard runs"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m lightning_ensembles.compare: error: {message}")
        assert err.count("\n") == 1 and "Traceback" not in err


def _latency(directory: Path, latency: dict[int, dict[str, float]]) -> None:
    """Add the ablation's latency tags: ``latency_ms`` and, for keys other than it, ``latency_ms/{mode}``."""
    with SummaryWriter(str(directory)) as writer:
        for k, columns in latency.items():
            for column, value in columns.items():
                writer.add_scalar(f"ablation/test/size_{k}/{column}", value, 0)


def test_latency_figure_has_one_line_per_architecture_and_mode_and_reads_old_runs(tmp_path: Path) -> None:
    from lightning_ensembles.compare import collect, comparison_figure, find_runs, read_run

    root = tmp_path / "runs"
    points = {1: {"gmacs": 0.1, "top1": 0.9}, 2: {"gmacs": 0.2, "top1": 0.92}}
    for seed in range(2):
        new = _fake_run(root, f"new/seed_{seed}", "WRN-16-2", seed, points)
        _latency(
            new,
            {
                k: {"latency_ms": 2.0 * k, "latency_ms/sequential": 2.0 * k, "latency_ms/parallel": 1.0 + k}
                for k in (1, 2)
            },
        )
        old = _fake_run(root, f"old/seed_{seed}", "WRN-16-4", seed, points)
        _latency(old, {k: {"latency_ms": 3.0 * k} for k in (1, 2)})  # a result file from before the modes

    results = compare(str(root), out=str(tmp_path / "out"))
    new_rows = results["lines"]["WRN-16-2"]
    assert [r["latency_ms/parallel"] for r in new_rows] == [2.0, 3.0]
    assert [r["latency_ms/sequential"] for r in new_rows] == [2.0, 4.0]
    assert [r["latency_ms"] for r in results["lines"]["WRN-16-4"]] == [3.0, 6.0]
    assert (tmp_path / "out" / "comparison_latency.png").stat().st_size > 0
    header = (tmp_path / "out" / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"latency_ms", "latency_ms/parallel", "latency_ms/sequential"} <= set(header)

    runs = [read_run(p, root, "test", "random") for p in find_runs(root)]
    lines = collect(runs)
    figure = comparison_figure(lines, "latency_ms", "top1", "t")
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert sorted(labels) == [
        "WRN-16-2, parallel (up to 2 runs)",
        "WRN-16-2, sequential (up to 2 runs)",
        "WRN-16-4 (up to 2 runs)",  # only `latency_ms`: one line, next to the others
    ]
    old_only = {"WRN-16-4": lines["WRN-16-4"]}
    labels = comparison_figure(old_only, "latency_ms", "top1", "t").axes[0].get_legend_handles_labels()[1]
    assert labels == ["WRN-16-4 (up to 2 runs)"]


def _pair(a: str, b: str, gmacs_b: float, diffs: list[float], metric: str = "top1") -> Pair:
    d = paired_difference([1.0 + v for v in diffs], [1.0] * len(diffs), metric)
    return Pair(
        Point(a, 4), Point(b, 1), gmacs_b, gmacs_b, [0, 1, 2], {metric: d}, {metric: dict(enumerate(diffs))}
    )


def test_paper_trends_order_pairs_by_model_size_and_data_size() -> None:
    from lightning_ensembles.compare import paper_trends

    pairs = [  # listed out of order: the trends sort by the single model's multiply-adds and by data size
        _pair("A (n=100)", "B (n=100)", 0.03, [0.030, 0.028, 0.033]),
        _pair("S (n=100)", "A (n=100)", 0.01, [0.010, 0.011, 0.009]),
        _pair("S (n=None)", "A (n=None)", 0.01, [0.001, 0.002, 0.000]),
        _pair("A (n=None)", "B (n=None)", 0.03, [0.002, 0.001, -0.001]),
        _pair("S (n=1000)", "A (n=1000)", 0.01, [0.004, 0.006, 0.005]),
    ]
    trends = paper_trends(pairs)
    described = [(t.kind, str(t.x.a), str(t.y.a), t.outcome) for t in trends]
    assert described == [
        ("model size", "A (n=100)@4", "S (n=100)@4", "seen"),  # 100 < 1000 < None (all data)
        ("model size", "A (n=None)@4", "S (n=None)@4", "unresolved"),
        ("data size", "A (n=100)@4", "A (n=None)@4", "seen"),  # pairs in the order they first appear
        ("data size", "S (n=100)@4", "S (n=1000)@4", "seen"),
        ("data size", "S (n=1000)@4", "S (n=None)@4", "seen"),
    ]
    assert trends[0].contrast.mean == pytest.approx(0.0203333, abs=1e-6)
    # A smaller gap for the larger pair is the trend reversed; NLL counts a lower difference as the ensemble's.
    (reversed_,) = paper_trends(
        [_pair("S", "A", 0.01, [0.03, 0.031, 0.029]), _pair("A", "B", 0.03, [0.0, 0.001, 0.0])]
    )
    assert reversed_.outcome == "reversed" and "REVERSED" in reversed_.sentence()
    (nll,) = paper_trends(
        [
            _pair("S", "A", 0.01, [-0.01, -0.011, -0.009], "nll"),
            _pair("A", "B", 0.03, [-0.05, -0.06, -0.055], "nll"),
        ],
        metric="nll",
    )
    assert nll.outcome == "seen" and nll.as_dict()["kind"] == "model size"


def test_one_list_of_metrics_for_the_ablation_and_compare() -> None:
    import typing

    from lightning_ensembles import compare as compare_module
    from lightning_ensembles.callbacks import ablation
    from lightning_ensembles.metrics import SIZE_METRIC_HEADERS, SIZE_METRIC_LABELS, SIZE_METRICS
    from lightning_ensembles.stats import LOWER_IS_BETTER

    assert compare_module.METRICS is SIZE_METRICS and ablation.METRICS is SIZE_METRICS
    assert tuple(EnsembleSizeAblation().metric_names) == SIZE_METRICS
    assert typing.get_args(typing.get_type_hints(compare)["metric"]) == SIZE_METRICS  # the `--metric` choices
    assert list(SIZE_METRIC_HEADERS) == list(SIZE_METRIC_LABELS) == list(SIZE_METRICS)
    assert {m for m in SIZE_METRICS if m not in LOWER_IS_BETTER} == {"top1", "ood_auroc"}


def _assert_same(got: object, expected: object, where: str = "record") -> None:
    """Equal nested data, numbers to float32 precision (TensorBoard keeps scalars as float32, the files float64)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(got, (int, float)), where
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7, nan_ok=True), where
    else:
        assert got == expected, where


@pytest.fixture(scope="module")
def run_sources(cifar_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The recipe runs three times over: as written (result files and event files), with their result files
    only, and with their event files only (runs from before the result files)."""
    import shutil

    root = tmp_path_factory.mktemp("sources")
    trees = {}
    for source in ("both", "files", "events"):
        trees[source] = root / source
        shutil.copytree(cifar_runs, trees[source], ignore=shutil.ignore_patterns("comparison", "checkpoints"))
    for path in trees["files"].rglob("events.out.tfevents.*"):
        path.unlink()
    for pattern in ("ablation_*", "results.*"):
        for path in trees["events"].rglob(pattern):
            path.unlink()
    return trees


@pytest.mark.parametrize(
    ("stage", "curve", "group_by"), [("test", "random", None), ("val", "first", "data/batch_size")]
)
def test_compare_gives_the_same_result_from_result_files_and_from_event_files(
    run_sources: dict[str, Path], tmp_path: Path, stage: Any, curve: Any, group_by: str | None
) -> None:
    got = {
        source: compare(
            str(tree),
            stage=stage,
            curve=curve,
            group_by=group_by,
            out=str(tmp_path / source),
        )
        for source, tree in run_sources.items()
    }
    # The result files come first: a run folder with both reads exactly what one without event files reads.
    assert got["both"]["record"] == got["files"]["record"]
    assert got["both"]["table"] == got["files"]["table"]
    assert (tmp_path / "both" / "comparison.csv").read_text() == (
        tmp_path / "files" / "comparison.csv"
    ).read_text()
    # The event files hold the same values (as float32): the same lines, points, seeds, groups and pairs.
    _assert_same(got["events"]["record"], got["files"]["record"])
    lines = sorted(got["files"]["lines"])
    assert lines == (
        ["WRN-16-1", "WRN-16-2"]
        if group_by is None
        else ["WRN-16-1 (batch_size=32)", "WRN-16-2 (batch_size=32)"]
    )
    assert [row["k"] for row in got["files"]["lines"][lines[0]]] == [1, 2, 3]
    assert {run["seed"] for run in got["files"]["record"]["runs"]} == {0}

    # The points are the ablation's rows: for every k, the last row's values of the curve.
    for saved in got["files"]["record"]["runs"]:
        rows = json.loads((run_sources["files"] / saved["name"] / f"ablation_{stage}.json").read_text())
        for k, point in saved["points"].items():
            last = [row for row in rows if row["k"] == k][-1]
            assert point["top1"] == last[f"{curve}_top1"] and point["gmacs"] == last[f"{curve}_gmacs"]


def test_compare_reads_old_runs_from_event_files_only(
    run_sources: dict[str, Path], cifar_runs: Path, tmp_path: Path
) -> None:
    events = run_sources["events"]
    assert not [*events.rglob("ablation_*.json"), *events.rglob("results.json")]
    results = compare(str(events), group_by="data/batch_size", out=str(tmp_path / "old"))
    wrn162 = results["lines"]["WRN-16-2 (batch_size=32)"]
    assert [(row["k"], row["runs"]) for row in wrn162] == [(1, 2), (2, 1)]
    assert [row["k"] for row in results["lines"]["WRN-16-1 (batch_size=32)"]] == [1, 2, 3]

    # A run with the ablation's JSON but a results.json from before it recorded the hyperparameters: the points
    # come from the JSON, the `data/` hyperparameters from its TensorBoard HParams session.
    import shutil

    before = tmp_path / "before"
    shutil.copytree(run_sources["both"], before)
    for path in before.rglob("results.json"):
        results_json = json.loads(path.read_text())
        del results_json["hparams"]
        path.write_text(json.dumps(results_json))
    again = compare(str(before), group_by="data/batch_size", out=str(tmp_path / "before_out"))
    assert (
        again["lines"]
        == compare(str(run_sources["files"]), group_by="data/batch_size", out=str(tmp_path / "files"))[
            "lines"
        ]
    )


@pytest.mark.slow
def test_compare_reads_runs_without_a_tensorboard_logger(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_ensembles.module import EnsembleLightningModule
    from tests.helpers import NUM_CLASSES, TinyDataModule, TinyNet, sgd, trainer_kwargs

    data, logs = tmp_path / "data", tmp_path / "logs"
    write_fake_cifar10(data, num_train=64, num_test=32)
    recipe_runs = [
        cifar_wrn.main(
            [
                *(arg for config in configs for arg in ("--config", str(CONFIGS / config))),
                "--config",
                str(PRESETS / "ablation.yaml"),
                f"--data.root={data}",
                "--data.verify_checksums=false",
                "--data.num_workers=0",
                "--data.batch_size=32",
                "--trainer.max_epochs=1",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={logs / 'csv'}",
            ]
        )  # fmt: skip
        for configs in (("cifar/wrn-16-1.yaml", "ensemble-2.yaml"), ("cifar/wrn-16-2.yaml",))
    ]
    # A run trained from Python without any logger: its ablation writes into the Trainer's default_root_dir.
    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd())
    ablation = EnsembleSizeAblation(latency_batch_size=None, figures=False, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1, default_root_dir=logs / "python_run", **trainer_kwargs(callbacks=[ablation])
    )
    trainer.fit(module, datamodule=TinyDataModule())
    trainer.test(module, datamodule=TinyDataModule(), verbose=False)
    assert not list(logs.rglob("events.out.tfevents.*"))

    results = compare(str(logs), out=str(tmp_path / "out"))  # before: "Found no TensorBoard runs"
    # The architecture from the recipes' results.json (a run without recorded hyperparameters: its folder).
    assert sorted(results["lines"]) == ["WRN-16-1", "WRN-16-2", "python_run"]
    seeds = {run["name"]: run["seed"] for run in results["record"]["runs"]}
    assert seeds == {"csv/cifar_wrn/version_0": 0, "csv/cifar_wrn/version_1": 0, "python_run": None}
    python_rows = [row for row in ablation.history if row["stage"] == "test"]
    for rows, line in (
        (
            json.loads((Path(recipe_runs[0]["results_file"]).parent / "ablation_test.json").read_text()),
            "WRN-16-1",
        ),
        (
            json.loads((Path(recipe_runs[1]["results_file"]).parent / "ablation_test.json").read_text()),
            "WRN-16-2",
        ),
        (python_rows, "python_run"),
    ):
        points = results["lines"][line]
        assert [p["k"] for p in points] == [row["k"] for row in rows]
        for point, row in zip(points, rows):
            assert point["top1"] == row["random_top1"] and point["nll"] == row["random_nll"]
            assert point["gmacs"] == row["random_gmacs"]
    assert all(row["latency_ms"] > 0 for row in results["lines"]["WRN-16-1"])
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0

    # The `data/` hyperparameters come from the recipes' results.json: the same lines as with TensorBoard.
    grouped = compare(str(logs / "csv"), group_by="data/batch_size", out=str(tmp_path / "grouped"))
    assert sorted(grouped["lines"]) == ["WRN-16-1 (batch_size=32)", "WRN-16-2 (batch_size=32)"]
