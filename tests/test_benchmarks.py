"""The benchmark scripts run in their tiny mode so they cannot rot; no timing is asserted."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_covered() -> None:
    assert {
        "data_pipeline",
        "ensemble_overhead",
        "fused_vs_loop",
        "hot_paths",
        "member_parallel",
        "training_memory",
        "parallel_latency",
        "export_latency",
        "cascade_inference",
    } <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_in_tiny_mode_and_records_its_hardware(name: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module(name)
        report = module.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(BENCHMARKS))
    saved = json.loads((tmp_path / f"{report['benchmark']}.json").read_text())
    assert saved["rows"] and saved["environment"]["cpu_count"] >= 1 and "torch" in saved["environment"]
