"""Quickstart: the paper's figure 1 on scikit-learn's digits, over seeds, with paired evidence, offline.

    python reproductions/quickstart.py [--seeds 6] [--workers 2] [--out runs/quickstart] [-- recipe flags]
    python reproductions/quickstart.py --dataset fashion_mnist [-- --data.root=/path/to/fashion-mnist]

Does an ensemble of smaller networks beat one larger network at the same multiply-adds (Kondratyuk et al.
2020)? Runs the seed sweep ``configs/sweeps/digits-figure1.yaml`` with the CIFAR Wide ResNet recipe
(cifar_wrn.py) on the 1,797 handwritten digits that ship with scikit-learn: WRN-16-4, 4 x WRN-16-2 and
4 x WRN-16-1, each under every seed, one run per CPU core in parallel (seed ``s`` fixes the data split and
order for every arm, so the arms are compared seed by seed). Then prints, per architecture and ensemble
size k, the mean ± std over seeds of top-1, NLL and ECE; for the FLOP-matched pairs 4 x WRN-16-2 vs
WRN-16-4 and 4 x WRN-16-1 vs WRN-16-2 the paired difference with its 95% confidence interval, t and
wins/ties/losses, and a verdict in plain words. Writes the figure (PNG and TensorBoard) and ``results.json``
with every per-seed number, the versions, thread counts and hardware into ``--out``. Finished runs are kept:
run it again with more ``--seeds`` and only the new ones train. Flags after ``--`` go to every recipe run.

Every pair is printed with the difference its seeds can resolve (the smallest true difference detected with 80%
power at the observed spread), and the paper's trend "as model sizes get larger, the performance gap widens" is
tested seed by seed: the gap of the larger pair minus the gap of the smaller one.

``--dataset fashion_mnist`` runs the Fashion-MNIST sweep ``configs/sweeps/fashion-cpu.yaml`` instead (about 90
minutes on 2 CPU cores; needs the four idx files, by default from Debian's ``dataset-fashion-mnist`` package in
/usr/share/datasets/fashion-mnist): WRN-10-1, -2 and -4 at 28x28, two FLOP-matched pairs, each on all 59,000
training images for one epoch and on a seeded tenth for ten epochs, so that both of the paper's trends are
tested: the gap as the models grow and the gap as the training set shrinks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml

from lightning_ensembles.cli import split_at_dashes
from lightning_ensembles.compare import compare, pair_verdicts, pairs_table
from lightning_ensembles.results import atomic_write_text, environment
from lightning_ensembles.sweep import default_workers, plan, progress_line, run_sweep

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "configs" / "sweeps" / "digits-figure1.yaml"
# The pair whose verdict held on both CPUs it was run on (Intel Xeon and AMD EPYC, README) comes first; the
# larger pair's verdict depended on the CPU's kernels at 6 seeds.
PAIRS = ["WRN-16-1@4 vs WRN-16-2@1", "WRN-16-2@4 vs WRN-16-4@1"]
DEFAULT_SEEDS = 6

DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "sweep": SWEEP,
        "pairs": PAIRS,
        "pair_tolerance": 0.1,
        "group_by": None,
        "seeds": DEFAULT_SEEDS,
        "out": "runs/quickstart",
        "title": "Digits test split (300 images)",
    },
    "fashion_mnist": {
        "sweep": HERE / "configs" / "sweeps" / "fashion-cpu.yaml",
        "pairs": None,  # every ensemble with its FLOP-matched single model, within a training-set size
        "pair_tolerance": 0.15,  # 4 x WRN-10-1 has 10.6% more multiply-adds than WRN-10-2 (37.4 M vs 33.8 M)
        "group_by": "data/train_size",
        "seeds": 3,
        "out": "runs/fashion-cpu",
        "title": "Fashion-MNIST test split (10,000 images)",
    },
}
"""What ``--dataset`` selects: the sweep, its pairs, how runs are grouped into lines, default seeds and folder."""


def run(
    seeds: int | list[int] | None,
    workers: int | None,
    out: str | None,
    recipe_args: list[str],
    dataset: str = "digits",
) -> dict[str, Any]:
    """Run a figure-1 sweep, print the evidence, and write ``results.json`` into ``out``.

    Args:
        seeds: how many seeds (``0..n-1``), or the list of seeds; ``None``: the data set's default.
        workers: parallel runs (default: one per CPU core, one torch thread each); 0 runs them here.
        out: the sweep's folder: runs, comparison and ``results.json``; ``None``: the data set's default.
        recipe_args: flags given to every recipe run.
        dataset: ``"digits"`` or ``"fashion_mnist"`` (see :data:`DATASETS`).

    Returns:
        The contents of ``results.json``.
    """
    spec = DATASETS[dataset]
    seeds = spec["seeds"] if seeds is None else seeds
    config = yaml.safe_load(Path(spec["sweep"]).read_text())
    out_dir = Path(out if out is not None else spec["out"])
    jobs = plan(config["arms"], seeds, out_dir, config["base"], recipe_args, config_dir=HERE / "configs")
    auto_workers, auto_threads = default_workers()
    workers = auto_workers if workers is None else workers
    threads = auto_threads
    seed_list = sorted({j.seed for j in jobs})
    print(
        f"Paper figure 1 on {dataset}: {len(config['arms'])} arms x {len(seed_list)} seeds = {len(jobs)} runs, "
        f"{workers or 1} at a time ({threads or 'default'} torch thread each); "
        f"consoles in {out_dir}/<arm>/seed_<s>/console.log",
        flush=True,
    )
    started = time.perf_counter()
    sweep = run_sweep(
        HERE / "cifar_wrn.py",
        jobs,
        workers,
        threads,
        on_done=lambda *a: print(progress_line(*a), flush=True),
    )
    if sweep.failed:
        raise SystemExit(
            sweep.failure_message("Run the quickstart again to retry them; finished runs are kept.")
        )
    comparison = compare(
        str(out_dir),
        pairs=spec["pairs"],
        out=str(out_dir / "comparison"),
        group_by=spec["group_by"],
        pair_tolerance=spec["pair_tolerance"],
    )
    wall = time.perf_counter() - started

    print(f"\n## {spec['title']}, {len(seed_list)} seeds: mean ± std over seeds\n")
    print("k = 1 of an ensemble run is the mean of its members; k > 1 the mean over all k-member subsets.\n")
    print("| architecture | k | GMACs / image | seeds | top-1 (%) | NLL | ECE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for architecture, rows in comparison["lines"].items():
        for row in rows:
            print(
                f"| {architecture} | {int(row['k'])} | {row['gmacs']:.4f} | {int(row['seeds'])} | "
                f"{100 * row['top1']:.2f} ± {100 * row['top1_std']:.2f} | "
                f"{row['nll']:.4f} ± {row['nll_std']:.4f} | {row['ece']:.4f} ± {row['ece_std']:.4f} |"
            )
    print("\n## FLOP-matched pairs, seed by seed (ensemble minus single model)\n")
    print(pairs_table(comparison["pairs"]))
    for sentence in pair_verdicts(comparison["pairs"], "top1"):
        print(f"- {sentence}")
    print("\nWhat these seeds can resolve: the smallest true top-1 difference detected with 80% power:\n")
    for pair in comparison["pairs"]:
        d = pair.differences.get("top1")
        if d is not None and math.isfinite(d.detectable):
            print(
                f"- {pair.name_a} vs {pair.name_b}: {100 * d.detectable:.2f} points "
                f"(per-seed differences scatter by {100 * d.std:.2f}; {d.n} seeds)"
            )
    print("\n## The paper's trends, seed by seed (a gap is ensemble minus single model, top-1)\n")
    for trend in comparison["trends"]:
        print(f"- {trend.sentence()}")
    if not comparison["trends"]:
        print("- No two pairs share seeds, so no trend can be tested.")
    trained = sum(not o.skipped for o in sweep.outcomes)
    kept = f", {len(jobs) - trained} kept from an earlier call" if trained < len(jobs) else ""
    print(f"\nWall time {wall / 60:.1f} min: {trained} runs trained in {sweep.seconds:.0f} s{kept}.")

    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seeds": seed_list,
        "wall_seconds": round(wall, 1),
        "sweep_seconds": round(sweep.seconds, 1),
        "workers": workers,
        "torch_threads_per_worker": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.node(),
        "environment": environment(),
        "lines": comparison["lines"],
        "pairs": [p.as_dict() for p in comparison["pairs"]],
        "verdicts": comparison["verdicts"],
        "trends": comparison["record"]["trends"],
        "group_by": spec["group_by"],
        "dataset": dataset,
        "runs": [
            {
                "arm": o.job.arm,
                "seed": o.job.seed,
                "directory": str(o.job.directory),
                "seconds": round(o.seconds, 1),
                "skipped": o.skipped,
                "fit_seconds": (o.results or {}).get("fit_seconds"),  # the run's own, also when kept
                "sizes": (o.results or {}).get("sizes"),
                "ensemble": (o.results or {}).get("ensemble"),
            }
            for o in sweep.outcomes
        ],
        "per_seed_points": comparison["record"]["runs"],
        "figure": str(out_dir / "comparison" / "comparison.png"),
    }
    results_file = atomic_write_text(out_dir / "results.json", json.dumps(record, indent=2) + "\n")
    print(f"Figure: {record['figure']} (and TensorBoard: tensorboard --logdir {out_dir / 'comparison'})")
    print(f"Every per-seed number: {results_file}")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line); flags after ``--`` go to every recipe run."""
    from jsonargparse import CLI

    argv, recipe_args = split_at_dashes(argv)
    options = CLI(_options, args=argv)
    return run(options["seeds"], options["workers"], options["out"], recipe_args, options["dataset"])


def _options(
    seeds: int | list[int] | None = None,
    workers: int | None = None,
    out: str | None = None,
    dataset: Literal["digits", "fashion_mnist"] = "digits",
) -> dict:
    """Paper figure 1 over seeds, with paired evidence; flags after ``--`` go to every recipe run.

    For example ``quickstart.py --seeds 3 -- --trainer.max_epochs=5``.

    Args:
        seeds: how many seeds (0..n-1), or the list of seeds (default: 6 for digits, 3 for fashion_mnist).
        workers: parallel runs (default: one per CPU core, one torch thread each); 0 runs them in this process.
        out: the sweep's folder: runs, comparison and results.json (default: runs/quickstart for digits,
            runs/fashion-cpu for fashion_mnist).
        dataset: digits (embedded in scikit-learn, offline, about 5 minutes on 2 cores) or fashion_mnist
            (configs/sweeps/fashion-cpu.yaml: the idx files from --data.root, about 90 minutes on 2 cores).
    """
    return {"seeds": seeds, "workers": workers, "out": out, "dataset": dataset}


if __name__ == "__main__":
    main()
