"""The GPU suite runs every stage in its tiny mode on the CPU, keeps to its budget and renders its section.

No timing is asserted: on a CPU at toy sizes the numbers mean nothing. What is checked is the contract a
lent GPU run relies on: one JSON file per stage with the environment, skipped stages recorded rather than
missing, and the Markdown section written only where it is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
ENVIRONMENT_FIELDS = ("gpu", "driver", "cuda", "torch", "lightning", "device", "cpu_count")


@pytest.fixture(scope="module")
def suite() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_suite")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(suite: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu")
    before = _digest(suite.RESULTS_MD)
    report = suite.main(["--tiny", "--device", "cpu", "--out", str(out)])
    return out, report, before


def test_every_stage_writes_its_json_with_the_environment_and_budget(
    suite: ModuleType, tiny_run: tuple[Path, dict[str, Any], str]
) -> None:
    out, report, _ = tiny_run
    assert [row["stage"] for row in report["rows"]] == list(suite.STAGE_NAMES)
    for name in suite.STAGE_NAMES:
        saved = json.loads((out / f"{name}.json").read_text())
        assert saved["benchmark"] == name and saved["suite"] == "gpu_suite"
        assert saved["status"] == "measured", (name, saved["errors"], saved["skipped"])
        assert saved["rows"] and saved["errors"] == [] and saved["skipped"] == []
        assert all(field in saved["environment"] for field in ENVIRONMENT_FIELDS)
        assert saved["environment"]["device"] == "cpu" and saved["device"] == "cpu" and saved["tiny"] is True
        assert saved["budget"]["budget_s"] == 420 and saved["budget"]["wall_s"] >= 0
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert summary["status"] == "ok" and summary["skipped"] == [] and summary["goals"]
    assert {goal["stage"] for goal in summary["goals"]} >= {
        "fused_vs_loop",
        "ensemble_overhead",
        "data_pipeline",
        "parallel_latency",
        "training_memory",
    }


def test_the_deployment_stages_compare_parallel_outputs_and_record_no_cpu_peak(
    tiny_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = tiny_run
    parallel = json.loads((out / "parallel_latency.json").read_text())
    assert [row["batch"] for row in parallel["rows"]] == [1, 2]
    for row in parallel["rows"]:
        assert row["workers"] == 2 and set(row["p50_ms"]) == {"sequential", "parallel", "parallel_traced"}
        assert row["max_abs_diff_probs"] <= 1e-5 and row["parallel_over_sequential"]["median"] > 0
        assert row["parallel_traced_over_sequential"]["median"] > 0
    memory = json.loads((out / "training_memory.json").read_text())
    (row,) = memory["rows"]
    assert set(row["fit_s"]) == {"summed", "frugal", "one"} and row["other_members_mb"]["weights"] > 0
    if not torch.cuda.is_available():  # a CPU's resident set is not per candidate: no number, a reason
        assert row["peak_mb"] is None and row["goal_ratio"] is None and "CUDA" in row["reason"]
        assert memory["goals"][0]["value"] is None and memory["goals"][0]["met"] is None


def test_the_training_memory_goal_ratio_on_cuda_numbers(
    suite: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path without a GPU: ``training_memory.child`` faked, the ratios and the rendered table checked."""
    mib = 2**20
    peaks = {"summed": 400 * mib, "frugal": 120 * mib, "one": 100 * mib}
    others = {"weights": 3 * mib, "optimizer_state": 3 * mib, "gradients": 3 * mib}

    def child(config: dict[str, Any]) -> dict[str, Any]:
        assert config["device"] == "cuda" and config["members"] == 2
        return {"candidate": config["candidate"], "peak_above_imports_bytes": peaks[config["candidate"]],
                "fit_s": 0.1, "other_members_bytes": others}  # fmt: skip

    monkeypatch.setattr(suite.training_memory, "child", child)
    monkeypatch.setattr(suite, "_free", lambda device: None)
    stage = suite.Stage("training_memory", torch.device("cuda"), suite.TINY, float("inf"), None)
    suite.stage_training_memory(stage)
    (goal,) = stage.goals
    assert goal["value"] == pytest.approx(120 / (1.3 * 100 + 6)) and goal["met"] is True
    assert stage.settings["summary"]["frugal_over_summed"]["median"] == pytest.approx(120 / 400)
    text = "\n".join(
        suite._render_stages({"training_memory": {"rows": stage.rows, "settings": stage.settings}})
    )
    assert "| 1 | 400 | 120 | 100 | 0.30 | 0.88 | 3.0 | 3.0 |" in text


def test_the_tests_stage_runs_the_gpu_tests_which_skip_without_cuda(
    tiny_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = tiny_run
    saved = json.loads((out / "tests.json").read_text())
    assert "-m gpu tests -v" in saved["settings"]["command"] and not saved["settings"]["timed_out"]
    names = {row["test"] for row in saved["rows"]}
    assert any("test_fused_cuda" in n for n in names) and any("test_latency_cuda" in n for n in names)
    # gpu-marked tests outside tests/gpu run too
    assert any("callbacks.test_latency" in n for n in names) and any("test_gpu_cifar" in n for n in names)
    if not torch.cuda.is_available():
        assert {row["outcome"] for row in saved["rows"]} == {"skipped"}
        assert saved["goals"][0]["met"] is None  # nothing ran: no verdict


def test_a_tiny_budget_records_the_later_stages_as_skipped(suite: ModuleType, tmp_path: Path) -> None:
    report = suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "1"])
    statuses = {row["stage"]: row["status"] for row in report["rows"]}
    assert statuses["compile"] == "skipped" and statuses["end_to_end"] == "skipped"
    later = [name for name, status in statuses.items() if status == "skipped"]
    assert later == list(suite.STAGE_NAMES)[len(suite.STAGE_NAMES) - len(later) :]  # a tail of the stages
    for name in suite.STAGE_NAMES:  # every file is written, the skipped ones saying why
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        if name in later:
            assert (
                saved["status"] == "skipped" and saved["reason"].startswith("budget") and saved["rows"] == []
            )
    assert {item["stage"] for item in report["skipped"]} >= set(later)
    section = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "### Skipped" in section and "compile" in section


def test_the_section_renders_and_replaces_only_the_marked_part(
    suite: ModuleType, tiny_run: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    out, _, before = tiny_run
    assert _digest(suite.RESULTS_MD) == before  # the tiny run never touches benchmarks/RESULTS.md
    section = (out / "RESULTS-gpu.md").read_text()
    assert section.startswith(suite.START) and section.rstrip().endswith(suite.END)
    for heading in (
        "## GPU",
        "### Goals",
        "### Loop vs fused",
        "### Latency and peak memory",
        "### Parallel vs sequential latency",
        "### Training memory",
        "### torch.compile",
    ):
        assert heading in section
    assert "Tiny smoke run" in section
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nbefore\n\n{suite.START}\nold numbers\n{suite.END}\n\nafter\n")
    suite.main(["--render-only", "--out", str(out), "--write-results-md", "--results-md", str(results)])
    text = results.read_text()
    assert "old numbers" not in text and text.count(suite.START) == text.count(suite.END) == 1
    assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("\nafter\n") and "### Goals" in text
    results.write_text("# Results\n")  # no markers yet: the section is appended
    suite.main(["--render-only", "--out", str(out), "--write-results-md", "--results-md", str(results)])
    assert results.read_text().startswith("# Results\n\n" + suite.START)


def test_tiny_numbers_are_refused_for_the_repository_results(suite: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--write-results-md"])
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_names_the_flag(suite: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        suite.main(["--device", "cuda", "--tiny"])
    assert "`--device`" in capsys.readouterr().err


@pytest.mark.slow
def test_the_suite_imports_without_ptflops() -> None:
    """The lent GPU image has no ptflops: nothing the suite imports may need it."""
    code = "import sys; sys.modules['ptflops'] = None; sys.path.insert(0, 'benchmarks'); import gpu_suite"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


IMAGE_LACKS = ("jsonargparse", "optuna", "ptflops")
"""Packages the lent GPU image does not have (its page in the device tool)."""


@pytest.mark.slow
def test_gpu_tests_collect_where_jsonargparse_optuna_and_ptflops_are_not_installed(tmp_path: Path) -> None:
    """The suite's `tests` stage (`pytest -m gpu tests`) on the GPU image: with the three packages truly absent
    (site-packages without them and without their metadata, as Lightning checks it), every GPU test is collected
    and the modules that need a missing package are skipped, not collection errors."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    hidden = tmp_path / "site-packages"
    hidden.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith((*IMAGE_LACKS, "__editable__")):
            (hidden / entry.name).symlink_to(entry)
    command = [
        sys.executable,
        "-S",
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests",
        "--co",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(hidden)])}
    probe = f"import importlib.util as u; print([u.find_spec(m) for m in {IMAGE_LACKS!r}])"
    absent = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
    assert absent.stdout.strip() == "[None, None, None]", absent.stderr[-2000:]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result.stdout[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert any("tests/gpu/test_parallel_cuda.py::" in line for line in collected)
    assert len(collected) == int(result.stdout.split(" tests collected")[0].rsplit("\n", 1)[-1].split("/")[0])

    # Where the package is installed, a module that fails to import is still an error (no blanket skip).
    broken = tmp_path / "tests_broken"
    broken.mkdir()
    (broken / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (broken / "test_broken.py").write_text("import optuna.no_such_module\n")
    failed = subprocess.run(
        [sys.executable, "-m", "pytest", str(broken), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stdout


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(
    suite: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, vmap under autocast may raise (pytorch/pytorch#192617): that is a result, not the end."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("expected scalar type BFloat16 but found Float")

    for module in (suite, suite.fused_vs_loop, importlib.import_module("lightning_ensembles.module")):
        monkeypatch.setattr(module, "vmap_forward", broken)
    stages = ["fused_vs_loop", "ensemble_vs_single", "data_pipeline"]
    report = suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--stages", *stages])
    assert report["status"] == "errors"
    statuses = {row["stage"]: row["status"] for row in report["rows"]}
    assert statuses["fused_vs_loop"] == "failed" and statuses["data_pipeline"] == "measured"
    assert statuses["tests"] == "skipped"  # not selected
    fused = json.loads((tmp_path / "fused_vs_loop.json").read_text())
    assert fused["errors"] and "BFloat16" in fused["errors"][0]["error"]
    pair = json.loads((tmp_path / "ensemble_vs_single.json").read_text())
    assert pair["status"] == "measured" and all("vmap" in row["failed"] for row in pair["rows"])
    assert all("loop" in row["images_per_s"] and "vmap" not in row["images_per_s"] for row in pair["rows"])
    section = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "### Errors" in section and "BFloat16" in section
