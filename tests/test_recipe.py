"""The CIFAR Wide ResNet recipe and its configs, through the real LightningCLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ensembles.cli import EnsembleCLI, check_devices
from lightning_ensembles.compare import compare
from lightning_ensembles.testing import write_fake_cifar10
from tests.helpers import fast_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
DEFAULT = CONFIGS / "cifar_wrn.yaml"
sys.path.insert(0, str(ROOT / "reproductions"))

import cifar_wrn  # noqa: E402
import quickstart  # noqa: E402
import uncertainty_digits  # noqa: E402

ALL_YAML = sorted(
    p.relative_to(CONFIGS).as_posix()
    for p in CONFIGS.rglob("*.yaml")
    # tested with their own recipes (tests/test_imagenet_recipe.py, tests/test_nas_recipe.py) or as sweeps
    # (tests/test_sweep.py)
    if not p.relative_to(CONFIGS).as_posix().startswith(("imagenet", "nas/", "sweeps/"))
)
# What each shipped config is composed with to make a complete run (cheap members where the file allows).
COMPOSE = {
    "ensemble-": ["cifar/wrn-16-1.yaml"],
    "digits/": ["cifar/wrn-16-1.yaml"],
    "fashion/base": ["cifar/wrn-16-1.yaml"],
    "fashion/": ["fashion/base.yaml", "cifar/wrn-16-1.yaml"],  # a schedule of the Fashion-MNIST sweeps
}


def _instantiate(*configs: str, extra: tuple[str, ...] = ()) -> EnsembleCLI:
    args = ["--config", str(DEFAULT)]
    for config in configs:
        args += ["--config", str(CONFIGS / config)]
    return EnsembleCLI(args=[*args, *extra])


def test_every_config_is_tested() -> None:
    assert "cifar_wrn.yaml" in ALL_YAML and "digits/quickstart.yaml" in ALL_YAML
    for arch in ("16-4", "16-8", "28-10", "40-4"):
        assert f"cifar/wrn-{arch}.yaml" in ALL_YAML
    assert {"ensemble-2.yaml", "ensemble-3.yaml", "ensemble-4.yaml"} <= set(ALL_YAML)


@pytest.mark.parametrize("config", ALL_YAML)
def test_config_parses_and_instantiates(config: str) -> None:
    extra = next((v for prefix, v in COMPOSE.items() if config.startswith(prefix)), [])
    cli = _instantiate(*extra, config)
    model = cli.model
    assert model.num_classes == cli.datamodule.num_classes == 10  # linked, never written twice
    name = Path(config).stem
    if name.startswith("wrn-"):
        assert model.members[0].name == f"WRN-{name[4:]}"
    if name.startswith("ensemble-"):
        assert model.num_members == int(name.split("-")[1])
    if config.startswith("fashion/"):
        assert (
            type(cli.datamodule).__name__ == "FashionMNISTDataModule"
            and model.members[0].stem.in_channels == 1
        )
        if config != "fashion/base.yaml":  # cosine per step over exactly the run's steps at batch 128
            steps = math.ceil((cli.datamodule.train_size or 60_000 - cli.datamodule.val_size) / 128)
            assert model.lr_scheduler_interval == "step"
            scheduler = model.lr_scheduler_factory(torch.optim.SGD(model.parameters(), lr=0.1))
            assert scheduler.T_max == steps * cli.trainer.max_epochs
    if config == "cifar_wrn.yaml":
        assert model.num_members == 1 and model.members[0].name == "WRN-28-10"
        optimizer = model.configure_optimizers()["optimizer"]
        assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["nesterov"] is True
        assert optimizer.defaults["weight_decay"] == 5e-4 and cli.trainer.max_epochs == 200
        assert cli.datamodule.hparams.batch_size == 128


def _fast(tmp_path: Path) -> list[str]:
    return fast_recipe_args(tmp_path / "logs")


def test_recipe_end_to_end_on_generated_cifar10(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_fake_cifar10(tmp_path / "data", num_train=64, num_test=32)
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "cifar/wrn-16-1.yaml"),
            "--config", str(CONFIGS / "ensemble-2.yaml"),
            f"--data.root={tmp_path / 'data'}",
            "--data.verify_checksums=false",
            "--data.num_workers=0",
            "--data.batch_size=16",
            *_fast(tmp_path),
        ]
    )  # fmt: skip
    assert [row["k"] for row in results["sizes"]] == [1, 2]
    assert results["sizes"][1]["macs"] == 2 * results["members"][0]["macs"] > 0
    assert results["checkpoint"] is None  # val_size 0: validation is the test split, so no selection on it
    assert results["tested"].startswith("final weights")
    saved = json.loads(Path(results["results_file"]).read_text())
    assert saved["sizes"] == results["sizes"] and saved["environment"]["torch"] == torch.__version__
    assert "| ensemble size k |" in capsys.readouterr().out
    run_dir = Path(results["results_file"]).parent
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "results.md").is_file()


def test_recipe_with_the_device_resident_loader(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path / "data", num_train=64, num_test=32)
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "cifar/wrn-10-1.yaml"),
            "--config", str(CONFIGS / "ensemble-2.yaml"),
            "--data", "lightning_ensembles.data.GPUCIFAR10DataModule",
            f"--data.root={tmp_path / 'data'}",
            "--data.verify_checksums=false",
            "--data.batch_size=16",
            "--model.execution=auto",
            *_fast(tmp_path),
        ]
    )  # fmt: skip
    assert [row["k"] for row in results["sizes"]] == [1, 2] and results["global_step"] == 4


TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_reports_seeds_pairs_and_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "quickstart"
    record = quickstart.main(["--seeds", "2", "--workers", "0", "--out", str(out), "--", *TINY])
    printed = capsys.readouterr().out
    assert "3 arms x 2 seeds = 6 runs" in printed and "[6/6]" in printed
    assert sorted(record["lines"]) == ["WRN-16-1", "WRN-16-2", "WRN-16-4"]
    assert [int(r["k"]) for r in record["lines"]["WRN-16-2"]] == [1, 2, 3, 4]
    assert all(int(r["seeds"]) == 2 for rows in record["lines"].values() for r in rows)
    pairs = [(p["name_a"], p["name_b"]) for p in record["pairs"]]
    assert pairs == [("4 x WRN-16-1", "WRN-16-2"), ("4 x WRN-16-2", "WRN-16-4")]
    for pair in record["pairs"]:
        gap = abs(pair["gmacs_a"] - pair["gmacs_b"]) / pair["gmacs_b"]
        assert gap < 0.05 and pair["seeds"] == [0, 1]  # FLOP-matched, paired seed by seed
        assert set(pair["differences"]) == {"top1", "nll", "ece", "aece", "aurc", "risk80"}  # no OOD set here
    assert "| WRN-16-2 | 4 | 0.0252 | 2 |" in printed and " ± " in printed
    assert "| 4 x WRN-16-2 | WRN-16-4 | 0.02521 vs 0.02452 | top1 | 2 |" in printed
    assert "- 4 x WRN-16-1 vs WRN-16-2: " in printed and "with 80% power" in printed
    (trend,) = record["trends"]  # the larger pair's gap against the smaller pair's, seed by seed
    assert (trend["kind"], trend["x"], trend["y"]) == (
        "model size",
        "4 x WRN-16-2 vs WRN-16-4",
        "4 x WRN-16-1 vs WRN-16-2",
    )
    assert f"- {trend['sentence']}" in printed
    assert len(record["verdicts"]) == 2 and all(f"- {v}" in printed for v in record["verdicts"])
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 6 and saved["environment"]["torch"] == torch.__version__
    assert {r["seed"] for r in saved["per_seed_points"]} == {0, 1}
    assert (out / "comparison" / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert list((out / "comparison" / "tensorboard").glob("events.out.tfevents.*"))

    # More seeds later: only the new seed trains.
    again = quickstart.main(["--seeds", "3", "--workers", "0", "--out", str(out), "--", *TINY])
    assert [r["skipped"] for r in again["runs"]] == [True] * 6 + [False] * 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_on_generated_fashion_mnist_tests_both_trends(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The Fashion-MNIST evidence sweep (configs/sweeps/fashion-cpu.yaml, unchanged) on generated idx files:
    two training-set sizes as separate lines, pairs within each, and both of the paper's trends tested."""
    from lightning_ensembles.testing import write_fake_fashion_mnist

    data = write_fake_fashion_mnist(tmp_path / "fashion", num_train=6_950, num_test=40)
    out = tmp_path / "fashion-cpu"
    fast = [*TINY, "--trainer.limit_test_batches=1", f"--data.root={data}", "--data.strict=false"]
    record = quickstart.main(
        ["--dataset", "fashion_mnist", "--seeds", "1", "--workers", "0", "--out", str(out), "--", *fast]
    )
    printed = capsys.readouterr().out
    assert "Paper figure 1 on fashion_mnist: 6 arms x 1 seeds = 6 runs" in printed
    assert "Fashion-MNIST test split (10,000 images)" in printed
    assert sorted(record["lines"]) == [
        f"WRN-10-{w} (train_size={size})" for w in (1, 2, 4) for size in ("5900", "None")
    ]
    pairs = sorted((p["name_a"], p["name_b"]) for p in record["pairs"])
    assert pairs == sorted(
        (f"4 x WRN-10-{small} (train_size={size})", f"WRN-10-{large} (train_size={size})")
        for small, large in ((1, 2), (2, 4))
        for size in ("5900", "None")
    )
    kinds = sorted(t["kind"] for t in record["trends"])
    assert kinds == ["data size", "data size", "model size", "model size"]
    # One seed (to keep the suite short): every contrast exists, and none can be resolved.
    assert all(t["outcome"] == "unresolved" and t["contrast"]["n"] == 1 for t in record["trends"])
    assert "Model size: the gap widens as the models grow?" in printed
    assert "Data size: the gap widens as the training set shrinks?" in printed
    assert record["group_by"] == "data/train_size"  # the power lines need 2 seeds: the digits test has them
    assert record["environment"]["cpu_model"] is not None or "cpu_model" in record["environment"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "fashion_mnist" and len(saved["runs"]) == 6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uncertainty_digits_compares_uncertainty_and_ood_seed_by_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "uncertainty"
    record = uncertainty_digits.main(["--seeds", "2", "--workers", "0", "--out", str(out), "--", *TINY])
    printed = capsys.readouterr().out
    metrics = {row["metric"]: row for row in record["metrics"]}
    assert {"nll", "ece", "aece", "aurc", "risk80", "ood/msp/auroc", "ood/entropy/fpr95"} <= set(metrics)
    for row in metrics.values():
        assert row["seeds"] == [0, 1] and len(row["single"]) == len(row["ensemble"]) == 2
        assert row["difference"]["mean"] == pytest.approx(
            sum(a - b for a, b in zip(row["ensemble"], row["single"])) / 2
        )
    assert "| OOD AUROC (entropy) |" in printed and " ± " in printed
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 4 and all("ood/entropy/auroc" in r["ensemble"] for r in saved["runs"])


def test_mixed_architecture_members_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "mixed.yaml"
    config.write_text(
        """
model:
  member: null
  members:
    - class_path: lightning_ensembles.models.WideResNet
      init_args: {depth: 10, width: 1, in_channels: 1}
    - class_path: lightning_ensembles.models.WideResNet
      init_args: {depth: 16, width: 2, in_channels: 1}
"""
    )
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "digits/quickstart.yaml"),
            "--config", str(config),
            "--config", str(ROOT / "callbacks" / "ablation.yaml"),
            *_fast(tmp_path),
            "--trainer.limit_train_batches=2",
        ]
    )  # fmt: skip
    assert [row["architecture"] for row in results["members"]] == ["WRN-10-1", "WRN-16-2"]
    assert results["architecture"] == "WRN-10-1+WRN-16-2"
    assert results["sizes"][1]["macs"] == sum(row["macs"] for row in results["members"])

    # The comparison draws the random-subset curve at the subsets' mean cost, the first-k curve at the
    # first members' (its k = 1 point at member 0's cost): they differ for mixed members.
    member_gmacs = [row["macs"] / 1e9 for row in results["members"]]
    random = compare(str(tmp_path / "logs"), curve="random")["lines"]["WRN-10-1+WRN-16-2"]
    first = compare(str(tmp_path / "logs"), curve="first")["lines"]["WRN-10-1+WRN-16-2"]
    assert random[0]["gmacs"] == pytest.approx(sum(member_gmacs) / 2, rel=1e-6)
    assert first[0]["gmacs"] == pytest.approx(member_gmacs[0], rel=1e-6)
    assert random[1]["gmacs"] == pytest.approx(sum(member_gmacs), rel=1e-6) == first[1]["gmacs"]


def test_recipe_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    base = [
        "--config",
        str(CONFIGS / "digits/quickstart.yaml"),
        "--config",
        str(CONFIGS / "cifar/wrn-16-1.yaml"),
    ]
    first = cifar_wrn.main(
        [*base, *_fast(tmp_path), "--trainer.limit_train_batches=2", "--test_weights=best"]
    )
    assert first["tested"] == "best checkpoint on the validation split"  # digits hold out a validation split
    last = Path(first["checkpoint"]).parent / "last.ckpt"
    resumed = cifar_wrn.main(
        [
            *base,
            *_fast(tmp_path),
            "--trainer.limit_train_batches=2",
            "--trainer.max_epochs=2",
            f"--ckpt_path={last}",
        ]
    )
    assert (first["global_step"], resumed["global_step"]) == (2, 4)


def test_last_checkpoint_is_the_last_epoch_even_when_the_best_is_earlier(tmp_path: Path) -> None:
    # Since Lightning 2.6, `ModelCheckpoint(save_last=True, monitor=...)` writes last.ckpt only when the
    # monitored checkpoint improves; the recipes keep a separate every-epoch last.ckpt for resuming.
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "digits/quickstart.yaml"),
            "--config", str(CONFIGS / "cifar/wrn-10-1.yaml"),
            *_fast(tmp_path),
            "--trainer.max_epochs=5",
            "--trainer.limit_train_batches=3",
            "--data.val_size=20",
            "--test_weights=best",
        ]
    )  # fmt: skip
    folder = Path(results["checkpoint"]).parent
    best = torch.load(results["checkpoint"], map_location="cpu", weights_only=True)
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] < 4  # the monitored best is an earlier epoch here (with the old config: last too)
    assert (last["epoch"], last["global_step"]) == (4, 15) == (results["epochs"] - 1, results["global_step"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["ddp", "member_parallel"])
def test_recipe_under_ddp_as_users_launch_it(tmp_path: Path, strategy: str) -> None:
    # `--trainer.devices 2` with Lightning's own launcher: the script runs again on each rank (gloo, CPU).
    # Every rank must take part in `trainer.log_dir` (a broadcast) for the results and ablation files.
    # The callbacks (FLOPs, ablation) and the results table work the same under both strategies.
    command = [
        sys.executable, str(ROOT / "reproductions" / "cifar_wrn.py"),
        "--config", str(CONFIGS / "digits/quickstart.yaml"),
        "--config", str(CONFIGS / "cifar/wrn-10-1.yaml"),
        "--config", str(CONFIGS / "ensemble-2.yaml"),
        "--config", str(ROOT / "callbacks/efficiency.yaml"),
        *_fast(tmp_path),
        "--trainer.devices=2",
        f"--trainer.strategy={strategy}",
        "--trainer.limit_train_batches=3",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (tmp_path / "logs").rglob("results.json")
    saved = json.loads(results_file.read_text())
    assert saved["world_size"] == 2 and [row["k"] for row in saved["sizes"]] == [1, 2]
    assert (results_file.parent / "ablation_test.json").is_file()
    ablation = json.loads((results_file.parent / "ablation_test.json").read_text())
    assert [row["k"] for row in ablation] == [1, 2] and saved["sizes"][-1]["macs"] > 0
    events = EventAccumulator(str(results_file.parent))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    assert {"flops/ensemble_gmacs", "flops/member_1_gmacs", "train/member_1/loss_epoch"} <= logged, logged
    assert any(tag.startswith("latency/") for tag in logged), logged


def test_too_many_devices_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"`--trainer.devices` to be at most \d+ on this machine.*got 4096"):
        _instantiate(extra=("--trainer.devices=4096", "--trainer.accelerator=cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"at most 2 \(the CUDA GPUs on this machine\), but got 8"):
        check_devices(8, "gpu")
    with pytest.raises(ValueError, match=r"at most 2 .*but got \[0, 5\]"):
        check_devices([0, 5], "auto")
    check_devices(2, "gpu")
    check_devices("auto", "gpu")


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py"):
        cifar_wrn.main([f"--data.root={tmp_path}", "--data.download=false", *_fast(tmp_path)])


def test_unknown_flag_value_names_the_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _instantiate(extra=("--model.aggregation=median",))
    assert "aggregation" in capsys.readouterr().err


def test_recipes_do_not_trigger_lightnings_args_and_argv_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    monkeypatch.setattr(sys, "argv", ["cifar_wrn.py", "--config", "x.yaml"])  # as a script launch has
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _instantiate("cifar/wrn-16-1.yaml")
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert sys.argv == ["cifar_wrn.py", "--config", "x.yaml"]  # restored for Lightning's DDP launcher


def test_a_dev_run_writes_nothing_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    results = cifar_wrn.main(
        [
            "--config", str(CONFIGS / "cifar/wrn-10-1.yaml"),
            "--config", str(ROOT / "callbacks/ablation.yaml"),
            "--data=DigitsDataModule",
            "--data.batch_size=32",
            "--model.member.init_args.in_channels=1",
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    assert "results_file" not in results and results["sizes"]  # evaluated, nothing saved
    assert sorted(p.name for p in work.iterdir()) == []  # was results.json, results.md, ablation_test.*
