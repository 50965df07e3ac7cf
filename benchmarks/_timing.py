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
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured in alternation so drift hits all alike.

    With ``deadline`` (a ``time.perf_counter()`` value) no new round starts once it has passed, after at
    least one round: fewer than ``repeats`` samples come back rather than a late result.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(repeats):
        if deadline is not None and index > 0 and time.perf_counter() >= deadline:
            break
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


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> dict[str, float] | None:
    """Peak CUDA memory of one call of ``fn`` (``torch.cuda.max_memory_allocated``), in MiB; ``None`` off CUDA.

    Returns ``{"peak_mb": ..., "before_mb": ...}``: the peak during the call, and what was allocated before it
    (parameters, optimizer state, cached inputs), so ``peak_mb - before_mb`` is what the call itself needs.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "before_mb": before / 2**20}
