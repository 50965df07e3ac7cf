"""Seed sweeps: the grid, the seed flags, local runs (in process and in worker processes), resume, SLURM tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ensembles.sweep import (
    SEED_STRIDE,
    arm_args,
    main,
    plan,
    progress_line,
    resolve_seeds,
    resume_args,
    run_sweep,
    seed_args,
    slug,
    sweep,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "reproductions" / "cifar_wrn.py"
CONFIGS = ROOT / "reproductions" / "configs"
ARMS = {"WRN-16-1": ["cifar/wrn-16-1.yaml"], "2 x WRN-10-1": ["cifar/wrn-10-1.yaml", "ensemble-2.yaml"]}
BASE = ["digits/quickstart.yaml", "digits/sweep.yaml"]
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
]


def test_plan_is_seed_major_with_one_folder_per_run(tmp_path: Path) -> None:
    jobs = plan(ARMS, [3, 5], tmp_path, BASE, ["--trainer.max_epochs=1"], config_dir=CONFIGS)
    assert [(j.arm, j.seed) for j in jobs] == [
        ("WRN-16-1", 3),
        ("2 x WRN-10-1", 3),
        ("WRN-16-1", 5),
        ("2 x WRN-10-1", 5),
    ]
    assert [j.index for j in jobs] == [0, 1, 2, 3]
    assert jobs[1].directory == tmp_path / "2_x_WRN-10-1" / "seed_3"
    args = list(jobs[1].args)
    configs = [
        Path(args[i + 1]).relative_to(CONFIGS).as_posix() for i, a in enumerate(args) if a == "--config"
    ]
    assert configs == [
        "digits/quickstart.yaml",
        "digits/sweep.yaml",
        "cifar/wrn-10-1.yaml",
        "ensemble-2.yaml",
    ]
    assert {"--seed_everything=3", f"--model.seed={3 * SEED_STRIDE}", "--data.seed=3"} <= set(args)
    assert f"--trainer.logger.init_args.save_dir={tmp_path}" in args
    assert args[-1] == "--trainer.max_epochs=1"  # shared flags come last, so they override the configs


def test_seed_flags_never_share_a_member_initialisation() -> None:
    member_seeds = [
        int(seed_args(s)[1].split("=")[1]) + i for s in range(20) for i in range(SEED_STRIDE // 10)
    ]
    assert len(set(member_seeds)) == len(member_seeds)
    assert resolve_seeds(3) == [0, 1, 2] and resolve_seeds([7, 2]) == [7, 2]


def test_bad_sweeps_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`--seeds` to be an int >= 1, but got 0"):
        plan(ARMS, 0, tmp_path)
    with pytest.raises(ValueError, match=r"seeds in `--seeds` to be distinct"):
        resolve_seeds([1, 1])
    with pytest.raises(ValueError, match=r"`--seeds` to be a count >= 1 or a list"):
        resolve_seeds([-1])
    with pytest.raises(ValueError, match="at least one arm"):
        plan({}, 1, tmp_path)
    with pytest.raises(ValueError, match="distinct folder names"):
        plan({"a b": [], "a_b": []}, 1, tmp_path)
    with pytest.raises(FileNotFoundError, match="'missing.yaml'"):
        arm_args(["missing.yaml"], CONFIGS)
    with pytest.raises(ValueError, match="at least one letter"):
        slug(" / ")
    with pytest.raises(ValueError, match=r"`--task_index` to be in \[0, 3\].*got 4"):
        sweep(str(RECIPE), ARMS, seeds=2, out=str(tmp_path), base=BASE, task_index=4)


def _events_seed(directory: Path) -> int:
    return yaml.safe_load((directory / "config.yaml").read_text())["seed_everything"]


@pytest.mark.timeout(300)
def test_sweep_in_process_then_resume_and_skip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = sweep(str(RECIPE), ARMS, seeds=2, out=str(tmp_path), base=BASE, args=TINY, workers=0)
    assert len(report["jobs"]) == 4 and not any(j["error"] for j in report["jobs"])
    printed = capsys.readouterr().out
    assert "[4/4] 2 x WRN-10-1  seed 1  top-1" in printed
    jobs = plan(ARMS, 2, tmp_path, BASE, TINY, config_dir=CONFIGS)
    for job in jobs:
        saved = json.loads(job.results_file.read_text())
        assert saved["tested"] == "final weights"
        assert saved["config"]["model"]["seed"] == job.seed * SEED_STRIDE
        assert saved["config"]["data"]["init_args"]["seed"] == job.seed
        assert _events_seed(job.directory) == job.seed
        assert (job.directory / "ablation_test.json").is_file()

    # Members of different seeds start from different weights; arms of one seed share the data split.
    first = torch.load(jobs[0].directory / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    other = torch.load(jobs[2].directory / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = next(k for k in first if k.endswith("weight") and first[k].ndim == 4)
    assert not torch.equal(first[key], other[key])

    # Run again: everything is skipped. Remove one result: that run alone resumes from its last.ckpt.
    again = run_sweep(RECIPE, jobs, workers=0)
    assert all(o.skipped for o in again.outcomes)
    jobs[3].results_file.unlink()
    assert resume_args(jobs[3]) == [f"--ckpt_path={jobs[3].directory / 'checkpoints' / 'last.ckpt'}"]
    resumed = run_sweep(RECIPE, jobs, workers=0)
    assert [o.skipped for o in resumed.outcomes] == [True, True, True, False]
    assert jobs[3].done and resumed.failed == []


@pytest.mark.timeout(300)
def test_sweep_in_worker_processes_records_failures(tmp_path: Path) -> None:
    arms = {
        "WRN-10-1": ["cifar/wrn-10-1.yaml"],
        "broken": ["cifar/wrn-10-1.yaml", "--model.aggregation=median"],
    }
    with pytest.raises(RuntimeError, match=r"1 of 2 sweep runs failed: broken seed 0 .*console.log"):
        sweep(str(RECIPE), arms, seeds=1, out=str(tmp_path), base=BASE, args=TINY, workers=2)
    good = tmp_path / "WRN-10-1" / "seed_0"
    assert json.loads((good / "results.json").read_text())["architecture"] == "WRN-10-1"
    assert (good / "console.log").stat().st_size > 0  # the run's console went to its log
    assert "aggregation" in (tmp_path / "broken" / "seed_0" / "console.log").read_text()


def test_slurm_task_index_runs_exactly_one_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {"recipe": str(RECIPE), "arms": {"WRN-10-1": ["cifar/wrn-10-1.yaml"]}, "base": BASE, "args": TINY}
        )
    )
    listing = main(
        ["--config", str(config), "--seeds", "3", "--out", str(tmp_path / "runs"), "--dry_run", "true"]
    )
    assert [j["seed"] for j in listing["jobs"]] == [0, 1, 2]
    assert "--array=0-2" in capsys.readouterr().out
    main(["--config", str(config), "--seeds", "3", "--out", str(tmp_path / "runs"), "--task_index", "1"])
    done = sorted(p.parent.name for p in (tmp_path / "runs").rglob("results.json"))
    assert done == ["seed_1"]


def test_progress_line_estimates_the_time_left(tmp_path: Path) -> None:
    from lightning_ensembles.sweep import Outcome

    (job,) = plan({"WRN-16-4": []}, 1, tmp_path)
    line = progress_line(Outcome(job, {"sizes": [{"top1": 0.9867}]}, seconds=41.2), 3, 12, 120.0)
    assert line == "[ 3/12] WRN-16-4  seed 0  top-1 98.67%  41 s · 2:00 elapsed, about 6:00 left"
    # With two workers the sweep passes its own estimate: mean run time x runs left / workers.
    assert progress_line(Outcome(job, {}, seconds=40.0), 1, 18, 40.0, left=40.0 * 17 / 2).endswith(
        "40 s · 0:40 elapsed, about 5:40 left"
    )
    failed = progress_line(Outcome(job, None, "ValueError: bad"), 12, 12, 60.0)
    assert "FAILED (ValueError: bad)" in failed and "left" not in failed


@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_parses_and_plans(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    listing = main(
        ["--config", str(CONFIGS / "sweeps" / config), "--out", str(tmp_path), "--dry_run", "true"]
    )
    arms = {job["arm"] for job in listing["jobs"]}
    import yaml

    seeds = yaml.safe_load((CONFIGS / "sweeps" / config).read_text()).get("seeds", 5)  # the default: 5
    assert len(listing["jobs"]) == seeds * len(arms) > 0
    assert "SLURM array of --array=0-" in capsys.readouterr().out


def test_dry_run_estimates_training_cost_from_counted_macs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lightning_ensembles.cost import count_macs
    from lightning_ensembles.models import WideResNet

    arms = {"2 x WRN-10-1": ["cifar/wrn-10-1.yaml", "ensemble-2.yaml"]}
    listing = sweep(
        str(RECIPE), arms, seeds=3, out=str(tmp_path), base=BASE, dry_run=True, train_samples=1000,
        sustained_tflops=0.5,
    )  # fmt: skip
    cost = listing["costs"]["2 x WRN-10-1"]
    macs = 2 * count_macs(WideResNet(depth=10, width=1, in_channels=1), (1, 8, 8))
    assert cost["members"] == 2 and cost["epochs"] == 10
    assert cost["train_macs"] == 3 * macs * 1000 * 10
    assert cost["gpu_hours"] == pytest.approx(2 * cost["train_macs"] * 3 / 0.5e12 / 3600)
    assert "| 2 x WRN-10-1 | 2 |" in capsys.readouterr().out

    # A training subset (Fashion-MNIST's --data.train_size) trains on that many samples per epoch.
    fashion = {
        "WRN-10-1, 600": ["fashion/base.yaml", "cifar/wrn-10-1.yaml", "--data.train_size=600"],
        "WRN-10-1, all": ["fashion/base.yaml", "cifar/wrn-10-1.yaml"],
    }
    costs = sweep(
        str(RECIPE), fashion, seeds=1, out=str(tmp_path), dry_run=True, train_samples=60000,
        args=["--trainer.max_epochs=2"],
    )["costs"]  # fmt: skip
    member = count_macs(WideResNet(depth=10, width=1, in_channels=1), (1, 28, 28))
    assert costs["WRN-10-1, 600"]["train_samples"] == 600
    assert costs["WRN-10-1, 600"]["train_macs"] == 3 * member * 600 * 2
    assert costs["WRN-10-1, all"]["train_samples"] == 60000
    with pytest.raises(ValueError, match=r"`--sustained_tflops` to be a number > 0, but got 0"):
        sweep(str(RECIPE), arms, seeds=1, out=str(tmp_path), base=BASE, dry_run=True, train_samples=10,
              sustained_tflops=0)  # fmt: skip


def test_worker_initialiser_pins_one_gpu_and_sets_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    from lightning_ensembles import sweep as sweep_module

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    threads = torch.get_num_threads()
    devices: queue.Queue[int] = queue.Queue()
    devices.put(3)
    try:
        sweep_module._init_worker(devices, 1)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_sweep_command_line_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"recipe": str(RECIPE), "arms": {"a": ["missing.yaml"]}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--out", str(tmp_path), "--dry_run", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lightning_ensembles.sweep: error: Expected the sweep config entry 'missing.yaml'" in err


def test_data_seed_can_be_left_out_for_datamodules_without_one(tmp_path: Path) -> None:
    (job,) = plan({"a": []}, [4], tmp_path, data_seed=False)
    assert "--seed_everything=4" in job.args and not [a for a in job.args if a.startswith("--data.seed")]
