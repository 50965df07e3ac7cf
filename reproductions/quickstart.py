"""Quickstart: one larger network against an ensemble of smaller ones at the same multiply-adds, offline.

    python reproductions/quickstart.py

Runs the CIFAR Wide ResNet recipe (cifar_wrn.py) twice on scikit-learn's handwritten digits, which ship with
scikit-learn and need no download: a single WRN-16-4, and four independently initialised WRN-16-2 (nearly
the same multiply-adds). Prints both results tables and a side-by-side summary; each run's TensorBoard logs
and results.json land under lightning_logs/digits/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_wrn import main as run_cifar_wrn  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
RUNS = {
    "single WRN-16-4": ["cifar/wrn-16-4.yaml"],
    "4 x WRN-16-2": ["cifar/wrn-16-2.yaml", "ensemble-4.yaml"],
}


def main(extra_args: list[str] | None = None) -> list[dict]:
    """Run both arms and print the summary; ``extra_args`` are appended to every run."""
    extra_args = sys.argv[1:] if extra_args is None else extra_args
    summary = []
    for name, configs in RUNS.items():
        args = ["--config", str(CONFIGS / "digits" / "quickstart.yaml")]
        for config in configs:
            args += ["--config", str(CONFIGS / config)]
        results = run_cifar_wrn(args + list(extra_args))
        results["name"] = name
        summary.append(results)
    print("\n## Quickstart: one larger model vs an ensemble of smaller ones (digits test split)\n")
    print("| run | members | GMACs / image | params (M) | top-1 (%) | NLL | ECE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for results in summary:
        full = results["sizes"][-1]
        ensemble = results["ensemble"]
        print(
            f"| {results['name']} | {results['num_members']} | {full['macs'] / 1e9:.4f} | "
            f"{full['params'] / 1e6:.2f} | {100 * full['top1']:.2f} | {full['nll']:.4f} | "
            f"{ensemble.get('ece', float('nan')):.4f} |"
        )
    return summary


if __name__ == "__main__":
    main()
