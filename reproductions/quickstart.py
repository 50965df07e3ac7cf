"""Quickstart: the paper's figure 1 on scikit-learn's digits, over seeds, with paired evidence, offline.

    python reproductions/quickstart.py [--seeds 6] [--workers 2] [--out runs/quickstart] [-- recipe flags]

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
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_ensembles.cli import split_at_dashes
from lightning_ensembles.compare import compare, pair_verdicts, pairs_table
from lightning_ensembles.results import atomic_write_text, environment
from lightning_ensembles.sweep import default_workers, plan, progress_line, run_sweep

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "configs" / "sweeps" / "digits-figure1.yaml"
PAIRS = ["WRN-16-2@4 vs WRN-16-4@1", "WRN-16-1@4 vs WRN-16-2@1"]
DEFAULT_SEEDS = 6


def run(seeds: int | list[int], workers: int | None, out: str, recipe_args: list[str]) -> dict[str, Any]:
    """Run the digits figure-1 sweep, print the evidence, and write ``results.json`` into ``out``.

    Args:
        seeds: how many seeds (``0..n-1``), or the list of seeds.
        workers: parallel runs (default: one per CPU core, one torch thread each); 0 runs them here.
        out: the sweep's folder: runs, comparison and ``results.json``.
        recipe_args: flags given to every recipe run.

    Returns:
        The contents of ``results.json``.
    """
    config = yaml.safe_load(SWEEP.read_text())
    out_dir = Path(out)
    jobs = plan(config["arms"], seeds, out_dir, config["base"], recipe_args, config_dir=HERE / "configs")
    auto_workers, auto_threads = default_workers()
    workers = auto_workers if workers is None else workers
    threads = auto_threads
    seed_list = sorted({j.seed for j in jobs})
    print(
        f"Paper figure 1 on digits: {len(config['arms'])} arms x {len(seed_list)} seeds = {len(jobs)} runs, "
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
    comparison = compare(str(out_dir), pairs=PAIRS, out=str(out_dir / "comparison"))
    wall = time.perf_counter() - started

    print(f"\n## Digits test split (300 images), {len(seed_list)} seeds: mean ± std over seeds\n")
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
        "runs": [
            {
                "arm": o.job.arm,
                "seed": o.job.seed,
                "directory": str(o.job.directory),
                "seconds": round(o.seconds, 1),
                "skipped": o.skipped,
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
    return run(options["seeds"], options["workers"], options["out"], recipe_args)


def _options(
    seeds: int | list[int] = DEFAULT_SEEDS, workers: int | None = None, out: str = "runs/quickstart"
) -> dict:
    """Paper figure 1 on digits over seeds, with paired evidence; flags after ``--`` go to every recipe run.

    For example ``quickstart.py --seeds 3 -- --trainer.max_epochs=5``.

    Args:
        seeds: how many seeds (0..n-1), or the list of seeds.
        workers: parallel runs (default: one per CPU core, one torch thread each); 0 runs them in this process.
        out: the sweep's folder: runs, comparison and results.json.
    """
    return {"seeds": seeds, "workers": workers, "out": out}


if __name__ == "__main__":
    main()
