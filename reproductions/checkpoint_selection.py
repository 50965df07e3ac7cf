"""Which weights should a recipe test? The final weights against the best checkpoints, over a sweep's seeds.

    python reproductions/checkpoint_selection.py runs/quickstart

Every run of a seed sweep made with ``configs/digits/sweep.yaml`` keeps three sets of weights: the last
epoch's (``last.ckpt``), the best epoch by validation top-1 (the recipe's checkpoint) and the best epoch by
validation NLL (``best-nll-*.ckpt``). This script tests all three of every run on its test split, with the
run's own saved configuration, and compares each best checkpoint with the final weights of the same run,
seed by seed (:func:`lightning_ensembles.stats.paired_difference`). It writes
``checkpoint_selection.json`` into the sweep folder.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.results import atomic_write_text
from lightning_ensembles.stats import format_difference, paired_difference, spread

CHOICES = ("final", "best val top-1", "best val NLL")


def checkpoints(run: Path) -> dict[str, Path]:
    """The run's checkpoint for each choice in :data:`CHOICES` (those it has)."""
    folder = run / "checkpoints"
    found = {"final": folder / "last.ckpt"}
    top1 = sorted(p for p in folder.glob("epoch*-top1*.ckpt"))
    nll = sorted(p for p in folder.glob("best-nll-*.ckpt"))
    if top1:
        found["best val top-1"] = top1[-1]
    if nll:
        found["best val NLL"] = nll[-1]
    return {choice: path for choice, path in found.items() if path.is_file()}


def evaluate_run(run: Path) -> dict[str, dict[str, float]]:
    """Test each of the run's checkpoints on its test split, with its saved ``config.yaml``.

    Returns:
        ``{choice: {"top1", "nll", "epoch"}}``.
    """
    cli = EnsembleCLI(
        args=[
            "--config", str(run / "config.yaml"),
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        save_config_callback=None,  # nothing is written: no config.yaml in the working directory
    )  # fmt: skip
    results = {}
    for choice, path in checkpoints(run).items():
        (metrics,) = cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path=str(path), verbose=False
        )
        epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
        results[choice] = {"top1": metrics["test/top1"], "nll": metrics["test/nll"], "epoch": int(epoch)}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: ``checkpoint_selection.py SWEEP`` (jsonargparse; ``--help``)."""
    from jsonargparse import CLI

    return CLI(compare_checkpoints, args=argv, as_positional=True)  # type: ignore[no-any-return]


def compare_checkpoints(sweep: str) -> dict[str, Any]:
    """Test every run of a seed sweep at its three checkpoints and print the comparison with the final weights.

    Args:
        sweep: the sweep's folder, with one ``<arm>/seed_<s>/results.json`` per run (e.g. runs/quickstart).

    Returns:
        ``{arm: {choice: spread, epochs, per-seed numbers and the paired difference with final}}``.

    Raises:
        SystemExit: if the folder holds no sweep runs.
    """
    root = Path(sweep)
    runs = sorted(p.parent for p in root.glob("*/seed_*/results.json"))
    if not runs:
        raise SystemExit(f"Found no sweep runs (<arm>/seed_<s>/results.json) under {str(root)!r}.")
    tested: dict[str, dict[int, dict[str, dict[str, float]]]] = defaultdict(dict)
    for run in runs:
        tested[run.parent.name][int(run.name.split("_")[1])] = evaluate_run(run)

    print(
        f"\n## Tested weights, {len(runs)} runs under {root} (test split; best minus final, paired by seed)\n"
    )
    print("| arm | weights | seeds | median epoch | top-1 (%) | NLL | top-1 vs final (pts) | NLL vs final |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    report: dict[str, Any] = {}
    for arm, by_seed in sorted(tested.items()):
        report[arm] = {}
        for choice in CHOICES:
            seeds = [s for s in sorted(by_seed) if choice in by_seed[s] and "final" in by_seed[s]]
            if not seeds:
                continue
            top1 = [by_seed[s][choice]["top1"] for s in seeds]
            nll = [by_seed[s][choice]["nll"] for s in seeds]
            epochs = [by_seed[s][choice]["epoch"] for s in seeds]
            s_top1, s_nll = spread(top1), spread(nll)
            row: dict[str, Any] = {
                "seeds": seeds,
                "top1": s_top1.as_dict(),
                "nll": s_nll.as_dict(),
                "epochs": epochs,
                "per_seed": {s: by_seed[s][choice] for s in seeds},
            }
            cells = ["", ""]
            if choice != "final":
                final_top1 = [by_seed[s]["final"]["top1"] for s in seeds]
                final_nll = [by_seed[s]["final"]["nll"] for s in seeds]
                d_top1 = paired_difference(top1, final_top1, "top1")
                d_nll = paired_difference(nll, final_nll, "nll")
                row["vs_final"] = {"top1": d_top1.as_dict(), "nll": d_nll.as_dict()}
                cells = [
                    f"{format_difference(d_top1, 100)} ({d_top1.wins}/{d_top1.ties}/{d_top1.losses})",
                    f"{format_difference(d_nll, 1, 4)} ({d_nll.wins}/{d_nll.ties}/{d_nll.losses})",
                ]
            report[arm][choice] = row
            print(
                f"| {arm} | {choice} | {len(seeds)} | {statistics.median(epochs):g} | "
                f"{100 * s_top1.mean:.2f} ± {100 * s_top1.std:.2f} | {s_nll.mean:.4f} ± {s_nll.std:.4f} | "
                f"{cells[0]} | {cells[1]} |"
            )
    print("\nCells 'vs final': mean difference [95% CI] (wins/ties/losses of the best checkpoint).")
    path = atomic_write_text(root / "checkpoint_selection.json", json.dumps(report, indent=2) + "\n")
    print(f"Saved to {path}")
    return report


if __name__ == "__main__":
    main()
