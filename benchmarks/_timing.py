"""Shared timing for the benchmarks: medians and spreads of ratios measured within one run.

The machines these run on are shared and noisy, so every result is a ratio of two things timed in the same
process, interleaved (A, B, A, B, ...), with the median and the 10th-90th percentile spread over repeats.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_ensembles.results import atomic_write_text, environment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured in alternation so drift hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles, in milliseconds."""
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=10) if len(ordered) >= 2 else [ordered[0]] * 9
    return {"median_ms": 1e3 * statistics.median(ordered), "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1]}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median of the per-repeat ratios, with their 10th/90th percentiles."""
    per = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
    q = statistics.quantiles(per, n=10) if len(per) >= 2 else [per[0]] * 9
    return {"median": statistics.median(per), "p10": q[0], "p90": q[-1]}


def save(name: str, rows: list[dict[str, Any]], out: str | None) -> dict[str, Any]:
    """Print a compact table and, with ``out``, write ``{name}.json`` (rows + hardware) atomically."""
    report = {"benchmark": name, "environment": environment(), "rows": rows}
    for row in rows:
        print(json.dumps(row))
    if out:
        atomic_write_text(Path(out) / f"{name}.json", json.dumps(report, indent=2) + "\n")
    return report
