"""Uncertainty per multiply-add on digits: 4 x WRN-16-2 against WRN-16-4, over seeds, offline.

    python reproductions/uncertainty_digits.py [--seeds 8] [--workers 2] [--out runs/uncertainty_digits]

Kondratyuk et al. 2020 ask whether an ensemble of small networks beats one large network in accuracy at the
same multiply-adds. This asks the same of what ensembles are trained for beyond accuracy: NLL, calibration
(ECE, adaptive ECE), selective classification (AURC, the error at 80% coverage) and out-of-distribution
detection. The digits 8 and 9 are held out of training (``--data.ood_classes [8, 9]``) and form the OOD test
set; the models learn digits 0-7. Both arms of a seed share the split and the data order (a paired design):
4 x WRN-16-2 (25.2 M multiply-adds per image) and WRN-16-4 (24.5 M), each trained with the digits recipe
(``configs/digits/quickstart.yaml``, 10 epochs). Prints, per arm, the mean ± std over seeds of every metric,
and the paired difference (ensemble minus single model) with its 95% confidence interval and wins/ties/losses;
writes ``results.json`` (every per-seed number, versions, threads) into ``--out``. Finished runs are kept.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from lightning_ensembles.cli import split_at_dashes
from lightning_ensembles.results import atomic_write_text, environment
from lightning_ensembles.stats import format_difference, paired_difference, spread, verdict
from lightning_ensembles.sweep import default_workers, plan, progress_line, run_sweep

HERE = Path(__file__).resolve().parent
BASE = ["digits/quickstart.yaml", "digits/sweep.yaml"]
ARMS = {"WRN-16-4": ["cifar/wrn-16-4.yaml"], "4 x WRN-16-2": ["cifar/wrn-16-2.yaml", "ensemble-4.yaml"]}
OOD_ARGS = ["--data.ood_classes=[8, 9]"]
METRICS = (
    ("top1", "top-1 (%)", 100.0),
    ("nll", "NLL", 1.0),
    ("ece", "ECE", 1.0),
    ("aece", "adaptive ECE", 1.0),
    ("aurc", "AURC", 1.0),
    ("risk80", "error at 80% coverage", 1.0),
    ("ood/msp/auroc", "OOD AUROC (max prob.)", 1.0),
    ("ood/entropy/auroc", "OOD AUROC (entropy)", 1.0),
    ("ood/entropy/fpr95", "OOD FPR at 95% TPR (entropy)", 1.0),
)
DEFAULT_SEEDS = 8


def run(seeds: int | list[int], workers: int | None, out: str, recipe_args: list[str]) -> dict[str, Any]:
    """Run the sweep, print the evidence and write ``results.json`` into ``out``.

    Args:
        seeds: how many seeds (``0..n-1``), or the list of seeds.
        workers: parallel runs (default: one per CPU core, one torch thread each); 0 runs them here.
        out: the sweep's folder.
        recipe_args: extra flags given to every recipe run.

    Returns:
        The contents of ``results.json``.
    """
    out_dir = Path(out)
    jobs = plan(ARMS, seeds, out_dir, BASE, [*OOD_ARGS, *recipe_args], config_dir=HERE / "configs")
    auto_workers, threads = default_workers()
    workers = auto_workers if workers is None else workers
    seed_list = sorted({j.seed for j in jobs})
    print(
        f"Uncertainty on digits (8 and 9 held out as OOD): {len(ARMS)} arms x {len(seed_list)} seeds",
        flush=True,
    )
    started = time.perf_counter()
    sweep = run_sweep(
        HERE / "cifar_wrn.py", jobs, workers, threads, on_done=lambda *a: print(progress_line(*a))
    )
    if sweep.failed:
        raise SystemExit(sweep.failure_message("Run it again to retry them; finished runs are kept."))
    values: dict[str, dict[str, dict[int, float]]] = {arm: {} for arm in ARMS}
    for outcome in sweep.outcomes:
        ensemble = (outcome.results or {}).get("ensemble", {})
        for key, _, _ in METRICS:
            if key in ensemble:
                values[outcome.job.arm].setdefault(key, {})[outcome.job.seed] = float(ensemble[key])
    single, ensemble_arm = "WRN-16-4", "4 x WRN-16-2"
    print(f"\n## Digits 0-7 test split and the held-out 8s and 9s, {len(seed_list)} seeds: mean ± std\n")
    print(f"| metric | {single} | {ensemble_arm} | ensemble - single [95% CI] | W/T/L |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    sentences: list[str] = []
    for key, label, factor in METRICS:
        a, b = values[ensemble_arm].get(key, {}), values[single].get(key, {})
        shared = sorted(set(a) & set(b))
        if not shared:
            continue
        single_spread = spread([factor * b[s] for s in shared])
        ensemble_spread = spread([factor * a[s] for s in shared])
        difference = paired_difference([a[s] for s in shared], [b[s] for s in shared], key)
        row = {
            "metric": key,
            "single": [b[s] for s in shared],
            "ensemble": [a[s] for s in shared],
            "seeds": shared,
            "difference": difference.as_dict(),
        }
        rows.append(row)
        digits = 2 if factor == 100.0 else 4
        print(
            f"| {label} | {single_spread.mean:.{digits}f} ± {single_spread.std:.{digits}f} | "
            f"{ensemble_spread.mean:.{digits}f} ± {ensemble_spread.std:.{digits}f} | "
            f"{format_difference(difference, factor, digits)} | "
            f"{difference.wins}/{difference.ties}/{difference.losses} |"
        )
        sentences.append(verdict(difference, ensemble_arm, single, factor, digits=digits) + f" ({label})")
    print()
    for sentence in sentences:
        print(f"- {sentence}")
    wall = time.perf_counter() - started
    trained = sum(not o.skipped for o in sweep.outcomes)
    print(f"\nWall time {wall / 60:.1f} min: {trained} runs trained in {sweep.seconds:.0f} s.")
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seeds": seed_list,
        "wall_seconds": round(wall, 1),
        "workers": workers,
        "torch_threads_per_worker": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.node(),
        "environment": environment(),
        "metrics": rows,
        "runs": [
            {
                "arm": o.job.arm,
                "seed": o.job.seed,
                "directory": str(o.job.directory),
                "ensemble": (o.results or {}).get("ensemble"),
            }
            for o in sweep.outcomes
        ],
    }
    results_file = atomic_write_text(out_dir / "results.json", json.dumps(record, indent=2) + "\n")
    print(f"Every per-seed number: {results_file}")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line); flags after ``--`` go to every recipe run."""
    from jsonargparse import CLI

    argv, recipe_args = split_at_dashes(argv)

    def command(
        seeds: int | list[int] = DEFAULT_SEEDS,
        workers: int | None = None,
        out: str = "runs/uncertainty_digits",
    ) -> dict[str, Any]:
        """Uncertainty per multiply-add on digits over seeds; flags after ``--`` go to every recipe run.

        See the module docstring. For example ``uncertainty_digits.py --seeds 3 -- --trainer.max_epochs=5``.

        Args:
            seeds: how many seeds (0..n-1), or a list of seeds.
            workers: parallel runs (default: one per CPU core); 0 runs them in this process.
            out: the folder of the runs and of results.json.
        """
        return run(seeds, workers, out, recipe_args)

    return CLI(command, args=argv, as_positional=False)  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
