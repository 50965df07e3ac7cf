"""Every GPU goal of lightning-ensembles, measured in one short prepared run on one lent GPU.

    python benchmarks/gpu_suite.py [--device cuda] [--budget-s 420] [--out benchmarks/results/gpu] [--tiny]
        [--write-results-md] [--results-md benchmarks/RESULTS.md] [--render-only] [--stages NAME ...]

Kondratyuk et al. (arXiv 2005.00570) ensemble small networks to save cost, so what the library adds on a GPU
must cost nothing measurable. The stages, in order:

1. ``tests``: ``pytest -m gpu tests`` (every ``gpu``-marked test) in a subprocess with a deadline; pass,
   fail and skip counts.
2. ``fused_vs_loop``: loop vs vmap for WRN-16-1/2/4 at M = 4 (batch 128 and 512; bf16 autocast with
   channels_last, fp32, bf16) and WRN-28-10; what ``execution="auto"`` picks, and its cost against the
   faster path (goals: fused >= 1.5x the loop for small members; auto never slower).
3. ``ensemble_vs_single``: 4 x WRN-16-2 (loop, vmap, auto) vs one WRN-16-4 of equal multiply-adds, training
   and inference images per second (goal: the ensemble no slower).
4. ``ensemble_overhead``: an ensemble of one vs a plain LightningModule through ``Trainer.fit`` (goal <= 1.03).
5. ``data_pipeline``: the device-resident loader vs a DataLoader, as a share of a WRN-16-4 step (goal <= 5%).
6. ``latency_memory``: latency per ensemble size with CUDA events (``measure_ensemble_latency``) and peak
   memory (``torch.cuda.max_memory_allocated``) of 4 x WRN-16-2 (loop, vmap) and one WRN-16-4.
7. ``parallel_latency``: 2 x WRN-16-2 at batch 1 and 64, sequential (``member_logits`` then ``aggregate``)
   vs :class:`~lightning_ensembles.parallel.ParallelEnsemble` (one CUDA stream per worker), eager and with
   traced members (``trace=True``), with ``measure_ensemble_latency`` in alternating rounds, and the largest
   difference of their outputs (goal: parallel / sequential <= 0.6; 0.5 is the floor for two members).
8. ``training_memory``: peak ``torch.cuda.max_memory_allocated`` of a few ``Trainer.fit`` steps of 4 x WRN-16-2
   at batch 128, summed (``memory_frugal=False``) vs ``memory_frugal=True`` vs one member alone (``training_memory.child`` in this
   process; ``reset_peak_memory_stats`` isolates the candidates) (goal: frugal / (1.3 x one + the other
   members' weights and optimizer state) <= 1). Off CUDA the steps run but no peak is recorded.
9. ``end_to_end``: ``Trainer.fit`` of 4 x WRN-16-2 on a CIFAR-10-sized set held on the device, bf16-mixed.
10. ``compile``: ``EnsembleLightningModule(compile=True)`` vs eager, and what the first step costs.

Every result is a ratio or a median measured within this run, candidates interleaved, with 10th-90th
percentile spreads; no goal is an absolute time. The wall-clock budget (``--budget-s``) is shared out among
the stages still to run; a stage that cannot start in time, and any configuration past its stage's
deadline, is recorded as skipped, and the stages after it still run if they fit. Each stage writes
``<out>/<stage>.json`` (atomically) when it ends, with the GPU, driver, CUDA, torch and lightning versions,
the device, the budget and what was skipped; ``<out>/gpu_suite.json`` holds the goals, and
``<out>/RESULTS-gpu.md`` the Markdown section rendered from the files. ``--write-results-md`` also puts that
section between ``<!-- gpu-suite:start -->`` and ``<!-- gpu-suite:end -->`` in ``benchmarks/RESULTS.md``;
``--render-only`` renders from the JSON files of an earlier run (e.g. fetched from a lent machine).
``--tiny`` runs every stage at toy sizes (seconds, on a CPU): the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "benchmarks", ROOT):  # a bare GPU image runs the checkout without installing it
    if importlib.util.find_spec("lightning_ensembles" if _path == ROOT else "_timing") is None:
        sys.path.insert(0, str(_path))

import data_pipeline  # noqa: E402
import ensemble_overhead  # noqa: E402
import fused_vs_loop  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import training_memory  # noqa: E402
from _timing import peak_memory_mb, ratio, summary, time_interleaved  # noqa: E402

from lightning_ensembles.aggregation import aggregate  # noqa: E402
from lightning_ensembles.cost import count_macs  # noqa: E402
from lightning_ensembles.data.gpu_cifar import DeviceBatches  # noqa: E402
from lightning_ensembles.fused import vmap_forward  # noqa: E402
from lightning_ensembles.latency import measure_ensemble_latency  # noqa: E402
from lightning_ensembles.members import build_members  # noqa: E402
from lightning_ensembles.models import WideResNet  # noqa: E402
from lightning_ensembles.module import EnsembleLightningModule  # noqa: E402
from lightning_ensembles.parallel import ParallelEnsemble  # noqa: E402
from lightning_ensembles.results import atomic_write_text, environment  # noqa: E402

NAME = "gpu_suite"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"
# name -> (autocast dtype or None, channels_last), the most telling first: they run in this order.
VARIANTS: dict[str, tuple[torch.dtype | None, bool]] = {
    "bf16+channels_last": (torch.bfloat16, True),
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
}
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every stage: :data:`FULL` on a GPU, :data:`TINY` to exercise the code on a CPU."""

    members: int = 4
    image: int = 32
    archs: tuple[str, ...] = ("WRN-16-1", "WRN-16-2", "WRN-16-4")
    goal_archs: tuple[str, ...] = ("WRN-16-1", "WRN-16-2")  # "small members" of the fused >= 1.5x goal
    batches: tuple[int, ...] = (128, 512)
    big_arch: str = "WRN-28-10"
    big_batch: int = 128
    big_variants: tuple[str, ...] = ("bf16+channels_last", "fp32")
    repeats: int = 10
    warmup: int = 3
    pair: tuple[str, str] = ("WRN-16-2", "WRN-16-4")  # M x small vs one large of equal multiply-adds
    pair_batches: tuple[int, ...] = (128, 512)
    pair_variants: tuple[str, ...] = ("bf16+channels_last", "fp32")
    overhead: tuple[int, int, int, int, int] = (16, 4, 128, 25, 3)  # depth, width, batch, steps, rounds
    data: tuple[int, int, int, int, int] = (128, 20, 4, 5, 50_000)  # batch, batches, workers, repeats, N
    latency_batches: tuple[int, ...] = (1, 128)
    latency_repeats: int = 20
    latency_rounds: int = 3
    parallel_members: int = 2  # M of the parallel-latency goal, with members plan.pair[0]
    parallel_batches: tuple[int, ...] = (1, 64)
    memory: tuple[int, int, int] = (128, 3, 2)  # training_memory: batch, steps per fit, rounds
    e2e: tuple[int, int, int, int] = (50_000, 10_000, 512, 2)  # train, test, batch, epochs
    compile_batch: int = 256
    compile_backend: str = "inductor"


FULL = Plan()
TINY = Plan(
    members=2, image=8, archs=("WRN-10-1",), goal_archs=("WRN-10-1",), batches=(2,), big_arch="WRN-10-2",
    big_batch=2, big_variants=("bf16+channels_last",), repeats=2, warmup=1, pair=("WRN-10-1", "WRN-10-2"),
    pair_batches=(2,), pair_variants=("bf16+channels_last",), overhead=(10, 1, 4, 4, 1),
    data=(8, 2, 0, 1, 64), latency_batches=(1, 2), latency_repeats=2, latency_rounds=2, parallel_batches=(1, 2),
    memory=(4, 2, 1), e2e=(48, 16, 16, 2),
    compile_batch=2, compile_backend="eager",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A stage: its function, its share of the remaining budget, and the least time worth starting it with."""

    name: str
    run: Callable[[Stage], None]
    weight: float
    min_s: float


class Stage:
    """One stage's record: rows, skipped configurations, errors and goals, plus its deadline."""

    def __init__(
        self, name: str, device: torch.device, plan: Plan, deadline: float, args: argparse.Namespace
    ) -> None:
        self.name, self.device, self.plan, self.deadline, self.args = name, device, plan, deadline, args
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []
        self.goals: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    def cell(self, label: str, fn: Callable[[], list[dict[str, Any]]]) -> bool:
        """Measure one configuration unless the deadline has passed; a failure is recorded, not fatal.

        A configuration that fails (out of memory, a missing kernel) is a result of this run: its error goes
        into the JSON and on stdout, and the next configuration runs.
        """
        if (self.rows or self.errors) and self.expired():
            self.skipped.append({"what": label, "reason": "stage deadline"})
            print(f"[{self.name}] skipped {label}: stage deadline", flush=True)
            return False
        try:
            self.rows += fn()
        except Exception as err:  # recorded below: one configuration must not end the run
            message = f"{type(err).__name__}: {err}"
            self.errors.append(
                {"what": label, "error": message[:2000], "traceback": traceback.format_exc()[-4000:]}
            )
            print(f"[{self.name}] FAILED {label}: {message[:500]}", flush=True)
            _free(self.device)
            return False
        return True

    def goal(self, goal: str, value: float | None, target: str, met: bool | None, detail: str = "") -> None:
        self.goals.append({"stage": self.name, "goal": goal, "value": value, "target": target, "met": met,
                           "detail": detail})  # fmt: skip


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _amp(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _peak(fn: Callable[[], Any], device: torch.device) -> dict[str, float] | None:
    """``peak_memory_mb`` on CUDA; elsewhere one plain call, so toy runs still exercise the code."""
    if device.type != "cuda":
        fn()
        return None
    return peak_memory_mb(fn, device)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _batch(
    device: torch.device, batch: int, size: int, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def _wrn(arch: str) -> functools.partial:
    return functools.partial(WideResNet, *fused_vs_loop.depth_width(arch))


# ------------------------------------------------------------------------------------------------- stages


def stage_tests(stage: Stage) -> None:
    """``pytest -m gpu tests`` in a subprocess killed at the stage deadline; one row per test.

    Every test marked ``gpu`` runs, in ``tests/gpu`` and next to the CPU tests of its module.
    """
    if importlib.util.find_spec("pytest") is None:
        stage.skipped.append({"what": "tests", "reason": "pytest is not installed"})
        return
    junit = Path(stage.args.out) / "tests-junit.xml"
    junit.unlink(missing_ok=True)
    # -v rather than -q: one line per test, so a run killed at the deadline still says which tests passed.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rfEs", f"--junitxml={junit}"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(1.0, stage.deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and any compile workers it started
        output, _ = proc.communicate()
    stage.settings.update(command=" ".join(command[1:]), returncode=proc.returncode, timed_out=timed_out,
                          seconds=time.perf_counter() - start, output_tail=output[-6000:])  # fmt: skip
    print(output[-3000:], flush=True)
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    message = (child.get("message") or child.text or "")[:500]
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            stage.rows.append({"test": test, "outcome": outcome, "seconds": float(case.get("time") or 0.0),
                               "message": message})  # fmt: skip
    else:  # killed before pytest wrote its report: read the verbose lines instead
        for test, word in re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M):
            stage.rows.append({"test": test, "outcome": word.lower(), "seconds": 0.0,
                               "message": ""})  # fmt: skip
    if timed_out:
        stage.skipped.append(
            {"what": "tests (remaining gpu tests)", "reason": "stage deadline: pytest killed"}
        )
        stage.rows.append({"test": "tests", "outcome": "timeout", "seconds": stage.settings["seconds"],
                           "message": "killed at the stage deadline"})  # fmt: skip
    counts = {k: sum(r["outcome"] == k for r in stage.rows) for k in ("passed", "failed", "error", "skipped")}
    stage.settings["counts"] = counts
    ran = counts["passed"] + counts["failed"] + counts["error"]
    stage.goal(
        "GPU tests pass", float(counts["passed"]), "no failure or error",
        None if ran == 0 or timed_out else counts["failed"] + counts["error"] == 0,
        ", ".join(f"{v} {k}" for k, v in counts.items()) + (" (timed out)" if timed_out else ""),
    )  # fmt: skip


def _autocast_probe(device: torch.device) -> dict[str, str]:
    """Output dtype of the loop and of vmap under bf16 autocast: vmap may bypass autocast (then it runs fp32)."""
    members = [m.to(device) for m in build_members([_wrn("WRN-10-1")] * 2, seed=0)]
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad(), _amp(device, torch.bfloat16):
        loop = members[0](x).dtype
        fused = vmap_forward(members, x).dtype
    return {"loop": str(loop).removeprefix("torch."), "vmap": str(fused).removeprefix("torch.")}


def _fused_cell(stage: Stage, arch: str, batch: int, variant: str) -> list[dict[str, Any]]:
    plan, dev = stage.plan, stage.device
    dtype, channels_last = VARIANTS[variant]
    rows = fused_vs_loop.measure(
        arch, dev, batch, plan.image, plan.repeats, dtype=dtype, channels_last=channels_last,
        num_members=plan.members, warmup=plan.warmup, deadline=stage.deadline,
    )  # fmt: skip
    pick = rows[-1]["auto_picks"]
    for row in rows:
        row["variant"], row["auto_picks"] = variant, pick
        times = {path: row[path]["median_ms"] for path in ("loop", "vmap")}
        row["auto_over_faster"] = times[pick] / min(times.values())
    _free(dev)
    return rows


def stage_fused_vs_loop(stage: Stage) -> None:
    """``fused_vs_loop.measure`` over architectures, batch sizes and precisions; auto's pick against both."""
    plan, dev = stage.plan, stage.device
    stage.cell("autocast probe", lambda: [{"probe": "bf16 autocast output dtype", **_autocast_probe(dev)}])
    cells = [(arch, batch, variant) for batch in plan.batches for arch in plan.archs
             for variant in list(VARIANTS)[:1]]  # fmt: skip
    cells += [(plan.big_arch, plan.big_batch, v) for v in plan.big_variants[:1]]
    cells += [(arch, batch, v) for v in list(VARIANTS)[1:] for batch in plan.batches for arch in plan.archs]
    cells += [(plan.big_arch, plan.big_batch, v) for v in plan.big_variants[1:]]
    stage.settings.update(members=plan.members, image=plan.image, repeats=plan.repeats, warmup=plan.warmup)
    for arch, batch, variant in cells:
        stage.cell(
            f"{arch} batch {batch} {variant}", functools.partial(_fused_cell, stage, arch, batch, variant)
        )
    measured = [r for r in stage.rows if "phase" in r]
    canonical = (list(VARIANTS)[0], min(plan.batches))
    for arch in plan.goal_archs:
        for phase in ("train", "inference"):
            rows = [r for r in measured if r["arch"] == arch and r["phase"] == phase]
            best = [r for r in rows if (r["variant"], r["batch"]) == canonical]
            if best:
                value = best[0]["loop_over_vmap"]["median"]
                spread = ", ".join(
                    f"{r['variant']} b{r['batch']}: {r['loop_over_vmap']['median']:.2f}" for r in rows
                )
                stage.goal(f"fused >= 1.5x loop, {arch} x{plan.members} {phase}", value, ">= 1.5",
                           value >= 1.5, f"at {canonical[0]} batch {canonical[1]}; all: {spread}")  # fmt: skip
    if measured:
        worst = max(measured, key=lambda r: r["auto_over_faster"])
        stage.goal(
            "execution='auto' never slower than the faster path", worst["auto_over_faster"], "<= 1.05",
            worst["auto_over_faster"] <= 1.05,
            f"worst: {worst['arch']} b{worst['batch']} {worst['variant']} {worst['phase']} picked {worst['auto_picks']}",
        )  # fmt: skip


def _ensemble(
    plan: Plan, arch: str, dev: torch.device, members: int, **kwargs: Any
) -> EnsembleLightningModule:
    module = EnsembleLightningModule(
        member=_wrn(arch), num_members=members, num_classes=10, optimizer=SGD, **kwargs
    )
    return module.to(dev)


def _steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Callable,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step (forward, summed member losses, backward, SGD) and an inference step (+ aggregation)."""
    optimizer = SGD(params)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp():
            logits = forward(x)
            logits = logits if logits.ndim == 3 else logits.unsqueeze(0)  # (M, B, C)
            loss = torch.stack([F.cross_entropy(member, y) for member in logits]).sum()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad(), amp():
            logits = forward(x)
            aggregate(logits if logits.ndim == 3 else logits.unsqueeze(0), "mean_probs")

    return train, infer


def _working(
    candidates: dict[str, Callable[[], None]],
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The candidates whose first call succeeds, and the error of each one that fails (e.g. vmap under AMP)."""
    working, failed = {}, {}
    for name, fn in candidates.items():
        try:
            fn()
        except Exception as err:  # recorded in the row: the other candidates are still measured
            failed[name] = f"{type(err).__name__}: {err}"[:1000]
            print(f"candidate {name} FAILED: {failed[name][:300]}", flush=True)
        else:
            working[name] = fn
    return working, failed


def _pair_cell(stage: Stage, batch: int, variant: str) -> list[dict[str, Any]]:
    plan, dev = stage.plan, stage.device
    small, large = plan.pair
    dtype, channels_last = VARIANTS[variant]
    x, y = _batch(dev, batch, plan.image, channels_last)
    amp = functools.partial(_amp, dev, dtype)
    modules = {
        e: _ensemble(plan, small, dev, plan.members, execution=e, channels_last=channels_last)
        for e in ("loop", "vmap", "auto")
    }
    single = _wrn(large)().to(dev)
    if channels_last:
        single = single.to(memory_format=torch.channels_last)
    steps = {e: _steps(m.member_logits, m.parameters(), x, y, amp) for e, m in modules.items()}
    steps["single"] = _steps(single, single.parameters(), x, y, amp)
    rows = []
    for phase, index, mode in (("train", 0, True), ("inference", 1, False)):
        for m in [*modules.values(), single]:
            m.train(mode)
        candidates, failed = _working({k: s[index] for k, s in steps.items()})
        samples = time_interleaved(candidates, plan.repeats, plan.warmup, dev, deadline=stage.deadline)
        row: dict[str, Any] = {
            "variant": variant, "batch": batch, "phase": phase, "auto_picks": modules["auto"]._auto_choice,
            "failed": failed, "times": {k: summary(v) for k, v in samples.items()},
            "images_per_s": {k: batch / _median(v) for k, v in samples.items()},
            "single_over_ensemble": {
                k: ratio(samples["single"], v) for k, v in samples.items() if k != "single" and "single" in samples
            },
        }  # fmt: skip
        memory = {k: _peak(fn, dev) for k, fn in candidates.items()}
        if dev.type == "cuda":
            row["peak_memory"] = memory
        rows.append(row)
    _free(dev)
    return rows


def stage_ensemble_vs_single(stage: Stage) -> None:
    """M x small (loop, vmap, auto) vs one large network of equal multiply-adds, images per second."""
    plan = stage.plan
    small, large = plan.pair
    macs_small = count_macs(_wrn(small)(), (3, plan.image, plan.image))
    macs_large = count_macs(_wrn(large)(), (3, plan.image, plan.image))
    stage.settings.update(small=small, large=large, members=plan.members, ensemble_macs=plan.members * macs_small,
                          single_macs=macs_large, repeats=plan.repeats)  # fmt: skip
    for variant in plan.pair_variants:
        for batch in plan.pair_batches:
            label = f"{plan.members}x{small} vs {large} batch {batch} {variant}"
            stage.cell(label, functools.partial(_pair_cell, stage, batch, variant))
    canonical = (plan.pair_variants[0], max(plan.pair_batches))
    for row in stage.rows:
        if (row["variant"], row["batch"]) == canonical and "auto" in row["single_over_ensemble"]:
            value = row["single_over_ensemble"]["auto"]["median"]
            others = ", ".join(f"{k} {v['median']:.2f}" for k, v in row["single_over_ensemble"].items())
            stage.goal(
                f"{plan.members}x{small} no slower than {large} ({row['phase']})", value, ">= 1.0 (single / ensemble time)",
                value >= 1.0, f"auto picked {row['auto_picks']}; {others}; {canonical[0]} batch {canonical[1]}",
            )  # fmt: skip


def stage_ensemble_overhead(stage: Stage) -> None:
    """``ensemble_overhead.run``: an ensemble of one vs a plain LightningModule, rounds alternating."""
    depth, width, batch, steps, rounds = stage.plan.overhead

    def one() -> list[dict[str, Any]]:
        report = ensemble_overhead.run(str(stage.device), depth, width, batch, stage.plan.image, steps, rounds,
                                       None, deadline=stage.deadline)  # fmt: skip
        return report["rows"]

    if stage.cell(f"WRN-{depth}-{width} batch {batch}", one):
        value = stage.rows[-1]["ensemble_over_plain_median"]
        stage.goal("ensemble of one vs plain LightningModule", value, "<= 1.03", value <= 1.03,
                   f"{stage.rows[-1]['steps']} steps per side, {stage.rows[-1]['rounds']} rounds")  # fmt: skip


def stage_data_pipeline(stage: Stage) -> None:
    """``data_pipeline.run``: DataLoader vs the device-resident loader, and their share of a WRN-16-4 step."""
    batch, batches, workers, repeats, num_train = stage.plan.data
    root = "/nonexistent" if stage.args.tiny else stage.args.root

    def one() -> list[dict[str, Any]]:
        report = data_pipeline.run(str(stage.device), root, batch, batches, workers, repeats, num_train, None,
                                   deadline=stage.deadline)  # fmt: skip
        return report["rows"]

    if stage.cell(f"batch {batch}, {workers} workers", one):
        device_row = next(r for r in stage.rows if r["pipeline"] == "device")
        value = device_row["data_share_of_step"]
        stage.goal("device-resident data share of a WRN-16-4 step", value, "<= 0.05", value <= 0.05,
                   f"DataLoader ({workers} workers): {stage.rows[0]['data_share_of_step']:.3f}")  # fmt: skip


def _latency_cell(stage: Stage, dtype: torch.dtype, batch: int) -> list[dict[str, Any]]:
    plan, dev = stage.plan, stage.device
    small, large = plan.pair
    single_name = f"1x{large}"
    modules = {
        f"{plan.members}x{small} loop": _ensemble(plan, small, dev, plan.members, execution="loop"),
        f"{plan.members}x{small} vmap": _ensemble(plan, small, dev, plan.members, execution="vmap"),
        single_name: _ensemble(plan, large, dev, 1),
    }
    modules = {k: m.to(dtype=dtype) for k, m in modules.items()}
    p50: dict[str, dict[int, list[float]]] = {k: {} for k in modules}
    for index in range(plan.latency_rounds):  # rounds alternate the candidates, so drift hits all alike
        if index > 0 and stage.expired():
            break
        for name, module in modules.items():
            stats = measure_ensemble_latency(
                module, (3, plan.image, plan.image), batch_size=batch, warmup=plan.warmup,
                repeats=plan.latency_repeats,
            )  # fmt: skip
            for k, st in stats.items():
                p50[name].setdefault(k, []).append(st.p50_ms)
    single = p50[single_name][1]
    row: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."), "batch": batch, "rounds": len(single),
        "p50_ms": {n: {k: _median(v) for k, v in sizes.items()} for n, sizes in p50.items()},
        "p50_ms_range": {n: {k: [min(v), max(v)] for k, v in sizes.items()} for n, sizes in p50.items()},
        "full_over_single": {
            n: ratio(sizes[plan.members], single) for n, sizes in p50.items() if n != single_name
        },
    }  # fmt: skip
    x, y = _batch(dev, batch, plan.image, False)
    memory = {}
    for name, module in modules.items():
        train, infer = _steps(
            module.member_logits, module.parameters(), x.to(dtype), y, contextlib.nullcontext
        )
        module.eval()
        memory[name] = {"inference": _peak(infer, dev)}
        module.train()
        memory[name]["train"] = _peak(train, dev)
    if dev.type == "cuda":
        row["peak_memory"] = memory
    _free(dev)
    return [row]


def stage_latency_memory(stage: Stage) -> None:
    """Latency per ensemble size (CUDA events on CUDA) in alternating rounds, and peak memory per step."""
    plan, dev = stage.plan, stage.device
    small, large = plan.pair
    stage.settings.update(clock="cuda events" if dev.type == "cuda" else "time.perf_counter",
                          repeats=plan.latency_repeats, rounds=plan.latency_rounds)  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        for batch in plan.latency_batches:
            label = f"{str(dtype).removeprefix('torch.')} batch {batch}"
            stage.cell(label, functools.partial(_latency_cell, stage, dtype, batch))


def _parallel_cell(stage: Stage, batch: int) -> list[dict[str, Any]]:
    """Sequential vs :class:`ParallelEnsemble` p50 latency of M members in alternating rounds, and their outputs."""
    plan, dev = stage.plan, stage.device
    members, small = plan.parallel_members, plan.pair[0]
    module = _ensemble(
        plan, small, dev, members, execution="loop"
    )  # sequential means one member after another
    shape = (3, plan.image, plan.image)
    candidates: dict[str, dict[str, Any]] = {
        "sequential": {"mode": "sequential"},
        "parallel": {"mode": "parallel", "workers": members},
        "parallel_traced": {"mode": "parallel", "workers": members, "trace": True},
    }
    p50: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(plan.latency_rounds):  # rounds alternate the candidates, so drift hits all alike
        if index > 0 and stage.expired():
            break
        for name, options in candidates.items():
            stats = measure_ensemble_latency(
                module, shape, sizes=[members], batch_size=batch, warmup=plan.warmup, repeats=plan.latency_repeats,
                **options,
            )  # fmt: skip
            p50[name].append(stats[members].p50_ms)
    x, _ = _batch(dev, batch, plan.image, False)
    module.eval()
    with torch.inference_mode():
        sequential = module.member_logits(x)
        outputs = {}
        for name, trace in (("parallel", False), ("parallel_traced", True)):
            with ParallelEnsemble(list(module.members), workers=members, trace=trace) as parallel:
                outputs[name] = parallel(x).to(sequential.device)
                workers, worker_devices = parallel.workers, [str(d) for d in parallel.devices]
        probs = aggregate(sequential, module.aggregation)
    module.train()
    row = {
        "members": f"{members}x{small}", "batch": batch, "rounds": len(p50["sequential"]), "workers": workers,
        "worker_devices": worker_devices,
        "p50_ms": {k: _median(v) for k, v in p50.items()}, "p50_ms_range": {k: [min(v), max(v)] for k, v in p50.items()},
        "parallel_over_sequential": ratio(p50["parallel"], p50["sequential"]),
        "parallel_traced_over_sequential": ratio(p50["parallel_traced"], p50["sequential"]),
        "max_abs_diff_logits": max(float((sequential.float() - o.float()).abs().max()) for o in outputs.values()),
        "max_abs_diff_probs": max(float((probs.float() - aggregate(o, module.aggregation).float()).abs().max())
                                  for o in outputs.values()),
    }  # fmt: skip
    _free(dev)
    return [row]


def stage_parallel_latency(stage: Stage) -> None:
    """M members run one after another vs concurrently (:class:`ParallelEnsemble`, a CUDA stream per worker)."""
    plan, dev = stage.plan, stage.device
    stage.settings.update(clock="cuda events" if dev.type == "cuda" else "time.perf_counter",
                          members=f"{plan.parallel_members}x{plan.pair[0]}", sequential="member_logits (execution='loop') + aggregate",
                          repeats=plan.latency_repeats, rounds=plan.latency_rounds, warmup=plan.warmup)  # fmt: skip
    for batch in plan.parallel_batches:
        stage.cell(
            f"{plan.parallel_members}x{plan.pair[0]} batch {batch}",
            functools.partial(_parallel_cell, stage, batch),
        )
    for row in stage.rows:
        for name in ("parallel", "parallel_traced"):
            value = row[f"{name}_over_sequential"]["median"]
            stage.goal(
                f"{name} / sequential latency, {row['members']} batch {row['batch']}", value, "<= 0.6 (floor 0.5)",
                value <= 0.6,
                f"p50 sequential {row['p50_ms']['sequential']:.2f} ms, {name} {row['p50_ms'][name]:.2f} ms; "
                f"{row['workers']} workers on {', '.join(row['worker_devices'])}",
            )  # fmt: skip
    if stage.rows:
        worst = max(stage.rows, key=lambda r: r["max_abs_diff_probs"])
        stage.goal(
            "parallel outputs equal sequential (max abs diff of probabilities)", worst["max_abs_diff_probs"],
            "<= 1e-5", worst["max_abs_diff_probs"] <= 1e-5,
            f"worst at batch {worst['batch']}; logits max abs diff {max(r['max_abs_diff_logits'] for r in stage.rows):.2e}",
        )  # fmt: skip


def _memory_round(stage: Stage, index: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One round of ``training_memory.child`` per candidate (summed, frugal, one), in this process."""
    dev = stage.device
    cuda = dev.type == "cuda"
    results = {}
    for name in training_memory.CANDIDATES:
        _free(dev)
        results[name] = training_memory.child({**config, "candidate": name})
    others = {k: v / 2**20 for k, v in results["frugal"]["other_members_bytes"].items()}
    row: dict[str, Any] = {
        "round": index, "fit_s": {k: r["fit_s"] for k, r in results.items()}, "other_members_mb": others,
        "peak_mb": None, "goal_ratio": None,
        "reason": None if cuda else "peak memory is measured with CUDA's allocator only: in one process a "
        "CPU's resident set is not isolated per candidate (benchmarks/training_memory.py measures a CPU)",
    }  # fmt: skip
    if cuda:
        peak = {k: r["peak_above_imports_bytes"] / 2**20 for k, r in results.items()}
        allowance = others["weights"] + others["optimizer_state"]
        row.update(peak_mb=peak, goal_ratio=peak["frugal"] / (1.3 * peak["one"] + allowance))
    _free(dev)
    return [row]


def stage_training_memory(stage: Stage) -> None:
    """Peak memory of ``Trainer.fit`` steps: summed vs ``memory_frugal=True`` vs one member, in rounds."""
    plan, dev = stage.plan, stage.device
    batch, steps, rounds = plan.memory
    depth, width = fused_vs_loop.depth_width(plan.pair[0])
    config = dict(device=dev.type, members=plan.members, depth=depth, width=width, batch=batch, image=plan.image,
                  steps=steps, threads=torch.get_num_threads())  # fmt: skip
    stage.settings.update(
        members=f"{plan.members}x{plan.pair[0]}", batch=batch, steps=steps, rounds=rounds, image=plan.image,
        measure="cuda max_memory_allocated during fit - memory_allocated before the model" if dev.type == "cuda" else None,
    )  # fmt: skip
    for index in range(rounds):
        stage.cell(f"round {index + 1}", functools.partial(_memory_round, stage, index, config))
    measured = [r for r in stage.rows if r["peak_mb"] is not None]
    if not measured:
        if stage.rows:
            stage.goal("memory_frugal peak within 1.3x one member + others' state", None, "<= 1.0", None,
                       stage.rows[0]["reason"])  # fmt: skip
        return
    peak = {k: [r["peak_mb"][k] for r in measured] for k in training_memory.CANDIDATES}
    goal = [r["goal_ratio"] for r in measured]
    stage.settings["summary"] = {
        "peak_mb": {k: _median(v) for k, v in peak.items()},
        "frugal_over_summed": ratio(peak["frugal"], peak["summed"]),
        "summed_over_one": ratio(peak["summed"], peak["one"]),
        "goal_ratio": _median(goal),
    }  # fmt: skip
    value = _median(goal)
    others = measured[0]["other_members_mb"]
    stage.goal(
        "memory_frugal peak within 1.3x one member + others' state", value,
        "<= 1.0 (frugal / (1.3 x one + weights and optimizer state of the others))", value <= 1.0,
        f"frugal / summed {stage.settings['summary']['frugal_over_summed']['median']:.2f}; others' weights "
        f"{others['weights']:.1f} MiB, optimizer state {others['optimizer_state']:.1f} MiB",
    )  # fmt: skip


class _EpochTimer(pl.Callback):
    """Seconds of every training epoch, and a stop once the stage deadline passes."""

    def __init__(self, device: torch.device, deadline: float) -> None:
        self.device, self.deadline = device, deadline
        self.epochs: list[float] = []
        self._start, self.stopped_early = 0.0, False

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._now()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(self._now() - self._start)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if time.perf_counter() >= self.deadline:
            trainer.should_stop, self.stopped_early = True, True


def _e2e_cell(stage: Stage, execution: str) -> list[dict[str, Any]]:
    plan, dev = stage.plan, stage.device
    num_train, num_test, batch, epochs = plan.e2e
    small = plan.pair[0]
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (num_train + num_test, 3, plan.image, plan.image)  # CIFAR-10's 32 x 32; toy runs are smaller
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev, generator=g)
    labels = torch.randint(0, 10, (num_train + num_test,), device=dev, generator=g)
    train = DeviceBatches(images[:num_train], labels[:num_train], batch, shuffle=True, augment=True,
                          channels_last=True)  # fmt: skip
    val = DeviceBatches(images[num_train:], labels[num_train:], batch, shuffle=False, augment=False,
                        channels_last=True)  # fmt: skip
    module = EnsembleLightningModule(member=_wrn(small), num_members=plan.members, num_classes=10,
                                     optimizer=SGD, channels_last=True, execution=execution)  # fmt: skip
    steps = ensemble_overhead.StepTimer(dev)
    epochs_timer = _EpochTimer(dev, stage.deadline)
    trainer = pl.Trainer(
        accelerator=dev.type, devices=1, precision="bf16-mixed", max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[steps, epochs_timer],
    )  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    trainer.fit(module, train, val)
    wall = time.perf_counter() - start
    timed = steps.samples[min(5, len(steps.samples) - 1) :]  # the first steps tune cuDNN and choose `auto`
    last_epoch = epochs_timer.epochs[-1] if epochs_timer.epochs and not epochs_timer.stopped_early else None
    row = {
        "members": f"{plan.members}x{small}", "execution": execution, "precision": "bf16-mixed", "batch": batch,
        "num_train": num_train, "epochs_run": len(epochs_timer.epochs), "steps": trainer.global_step,
        "fit_wall_s": wall, "stopped_at_deadline": epochs_timer.stopped_early, "auto_picks": module._auto_choice,
        "step": summary(timed), "train_images_per_s_median_step": batch / _median(timed),
        "epoch_s_with_val": epochs_timer.epochs,
        "images_per_s_last_epoch_with_val": num_train / last_epoch if last_epoch else None,
        "val_top1": float(trainer.callback_metrics.get("val/top1", float("nan"))),
    }  # fmt: skip
    if dev.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    _free(dev)
    return [row]


def stage_end_to_end(stage: Stage) -> None:
    """``Trainer.fit`` of M x small members, bf16-mixed, from a CIFAR-10-sized set held on the device.

    It runs with ``execution="auto"``, as a user would; if that fails, the error is recorded and the loop runs.
    """
    label = f"{stage.plan.members}x{stage.plan.pair[0]} bf16-mixed batch {stage.plan.e2e[2]}"
    if not stage.cell(f"{label} auto", functools.partial(_e2e_cell, stage, "auto")):
        stage.cell(f"{label} loop", functools.partial(_e2e_cell, stage, "loop"))


def stage_compile(stage: Stage) -> None:
    """``EnsembleLightningModule(compile=True)`` vs eager: the first steps (compilation) and steady steps."""
    plan, dev = stage.plan, stage.device
    small = plan.pair[0]
    dtype, channels_last = VARIANTS["bf16+channels_last"]
    stage.settings.update(backend=plan.compile_backend, members=f"{plan.members}x{small}", batch=plan.compile_batch,
                          variant="bf16+channels_last")  # fmt: skip

    def one() -> list[dict[str, Any]]:
        x, y = _batch(dev, plan.compile_batch, plan.image, channels_last)
        amp = functools.partial(_amp, dev, dtype)
        modules = {
            "eager": _ensemble(plan, small, dev, plan.members, channels_last=channels_last),
            "compiled": _ensemble(plan, small, dev, plan.members, channels_last=channels_last, compile=True,
                                  compile_backend=plan.compile_backend),
        }  # fmt: skip
        steps = {k: _steps(m.member_logits, m.parameters(), x, y, amp) for k, m in modules.items()}
        first: dict[str, dict[str, float]] = {k: {} for k in modules}
        rows = []
        for phase, index, mode in (("train", 0, True), ("inference", 1, False)):
            for name, module in modules.items():
                module.train(mode)
                start = time.perf_counter()
                steps[name][index]()  # the first call compiles
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                first[name][phase] = time.perf_counter() - start
            samples = time_interleaved({k: s[index] for k, s in steps.items()}, plan.repeats, plan.warmup, dev,
                                       deadline=stage.deadline)  # fmt: skip
            rows.append({
                "phase": phase, "eager": summary(samples["eager"]), "compiled": summary(samples["compiled"]),
                "eager_over_compiled": ratio(samples["eager"], samples["compiled"]),
                "first_call_s": {k: v[phase] for k, v in first.items()},
            })  # fmt: skip
        with contextlib.suppress(Exception):  # dynamo's counters are internal: informative only
            from torch._dynamo.utils import counters

            stage.settings["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
        _free(dev)
        return rows

    stage.cell(f"{plan.members}x{small} compile={plan.compile_backend}", one)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("tests", stage_tests, 0.25, 30.0),
    StageSpec("fused_vs_loop", stage_fused_vs_loop, 0.24, 30.0),
    StageSpec("ensemble_vs_single", stage_ensemble_vs_single, 0.09, 15.0),
    StageSpec("ensemble_overhead", stage_ensemble_overhead, 0.08, 20.0),
    StageSpec("data_pipeline", stage_data_pipeline, 0.07, 20.0),
    StageSpec("latency_memory", stage_latency_memory, 0.07, 15.0),
    StageSpec("parallel_latency", stage_parallel_latency, 0.05, 15.0),
    StageSpec("training_memory", stage_training_memory, 0.05, 20.0),
    StageSpec("end_to_end", stage_end_to_end, 0.08, 25.0),
    StageSpec("compile", stage_compile, 0.13, 60.0),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# --------------------------------------------------------------------------------------------- environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or ``None`` without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def suite_environment(device: torch.device) -> dict[str, Any]:
    """:func:`~lightning_ensembles.results.environment` plus the GPU, driver, CUDA and numerics settings."""
    env = environment()
    env.update(
        device=str(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        torchvision=_version("torchvision"), timm=_version("timm"), torch_threads=torch.get_num_threads(),
        cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, driver=None, gpu_capability=None,
        gpu_memory_gb=None,
    )  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), driver=_driver())  # fmt: skip
    return env


# ---------------------------------------------------------------------------------------------- the run


def _write(out: Path, name: str, report: dict[str, Any]) -> None:
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2, default=str) + "\n")


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected stages within the budget, writing each stage's JSON as it ends."""
    start = time.perf_counter()
    end = start + args.budget_s
    device = torch.device(args.device)
    plan = TINY if args.tiny else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":  # as a tuned training run would; the warm-up calls absorb the tuning
        torch.backends.cudnn.benchmark = True
    threads = torch.get_num_threads()
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and spinning ones stall a busy CPU
    try:
        return _run_stages(args, device, plan, out, start, end)
    finally:
        torch.set_num_threads(threads)


def _run_stages(
    args: argparse.Namespace, device: torch.device, plan: Plan, out: Path, start: float, end: float
) -> dict[str, Any]:
    env = suite_environment(device)
    selected = [s for s in STAGES if s.name in args.stages]
    scale = 0.0 if args.tiny else 1.0  # toy stages take seconds: no minimum worth waiting for
    summary_rows, goals, skipped = [], [], []
    print(
        f"{NAME}: device {device} ({env['gpu'] or env['processor']}), budget {args.budget_s:.0f} s, "
        f"stages {', '.join(s.name for s in selected)}{' (tiny: toy sizes)' if args.tiny else ''}",
        flush=True,
    )
    for spec in STAGES:
        now = time.perf_counter()
        remaining = end - now
        weights = sum(s.weight for s in selected[selected.index(spec) :]) if spec in selected else 1.0
        stage = Stage(spec.name, device, plan, now + remaining * spec.weight / weights, args)
        status, reason = "measured", None
        if spec not in selected:
            status, reason = "skipped", "not selected (--stages)"
        elif remaining <= 0 or remaining < spec.min_s * scale:
            status, reason = "skipped", f"budget: {max(remaining, 0):.0f} s left of {args.budget_s:.0f} s"
        else:
            print(f"[{spec.name}] start: {remaining:.0f} s left, stage deadline in {stage.deadline - now:.0f} s",
                  flush=True)  # fmt: skip
            try:
                spec.run(stage)
            except Exception as err:  # the stage fails; its record and the later stages remain
                stage.errors.append({"what": spec.name, "error": f"{type(err).__name__}: {err}"[:2000],
                                     "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
                print(f"[{spec.name}] FAILED: {type(err).__name__}: {err}", flush=True)
                _free(device)
            if stage.errors:
                status = "failed" if not stage.rows else "partial"
            elif stage.skipped:
                status = "partial"
        wall = time.perf_counter() - now
        if status == "skipped":
            print(f"[{spec.name}] skipped: {reason}", flush=True)
            skipped.append({"stage": spec.name, "reason": reason})
        report = {
            "benchmark": spec.name, "suite": NAME, "status": status, "reason": reason, "device": str(device),
            "tiny": args.tiny,
            "budget": {"budget_s": args.budget_s, "stage_started_s": now - start, "stage_budget_s": stage.deadline - now,
                       "wall_s": wall},
            "environment": env, "settings": stage.settings, "rows": stage.rows, "skipped": stage.skipped,
            "errors": stage.errors, "goals": stage.goals,
        }  # fmt: skip
        _write(out, spec.name, report)
        goals += stage.goals
        skipped += [{"stage": spec.name, **s} for s in stage.skipped]
        summary_rows.append({"stage": spec.name, "status": status, "reason": reason, "wall_s": wall,
                             "rows": len(stage.rows), "skipped": len(stage.skipped), "errors": len(stage.errors),
                             "file": f"{spec.name}.json"})  # fmt: skip
        if status != "skipped":
            print(f"[{spec.name}] {status} in {wall:.1f} s: {len(stage.rows)} rows, {len(stage.skipped)} skipped, "
                  f"{len(stage.errors)} errors", flush=True)  # fmt: skip
    tests_failed = any(g["stage"] == "tests" and g["met"] is False for g in goals)
    failed = tests_failed or any(r["errors"] for r in summary_rows)
    report = {
        "benchmark": NAME, "status": "errors" if failed else "ok", "gpu_tests_failed": tests_failed,
        "device": str(device), "tiny": args.tiny,
        "budget": {"budget_s": args.budget_s, "wall_s": time.perf_counter() - start},
        "environment": env, "rows": summary_rows, "goals": goals, "skipped": skipped,
    }  # fmt: skip
    _write(out, NAME, report)
    for goal in goals:
        print(f"goal: {goal['goal']}: {_fmt(goal['value'])} (target {goal['target']}) -> {_met(goal['met'])}")
    for item in skipped:
        print(f"skipped: {' '.join(filter(None, (item['stage'], item.get('what'))))}: {item['reason']}")
    print(
        f"{NAME}: {report['budget']['wall_s']:.1f} s of {args.budget_s:.0f} s; results in {out}", flush=True
    )
    return report


# ------------------------------------------------------------------------------------------------ render


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "–"}[met]


def _ms(s: dict[str, float] | None) -> str:
    if not s:
        return "–"
    return f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}–{s['p90_ms']:.2f})"


def _ratio(r: dict[str, float] | None) -> str:
    if not r:
        return "–"
    return f"{r['median']:.2f} ({r['p10']:.2f}–{r['p90']:.2f})"


def _load(out: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for name in (NAME, *STAGE_NAMES):
        path = out / f"{name}.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text(encoding="utf-8"))
    return reports


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; columns of numbers are right-aligned."""

    def numeric(column: int) -> bool:
        return bool(rows) and all(re.match(r"^(–|-?[\d.]+(%|\s|$))", row[column]) for row in rows)

    aligns = ["---:" if numeric(i) else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |",
            *("| " + " | ".join(row) + " |" for row in rows), ""]  # fmt: skip


def render(out: Path) -> str:
    """The Markdown "GPU" section, between the markers, from the JSON files under ``out``."""
    reports = _load(out)
    suite = reports.get(NAME)
    lines = [START, "## GPU (`gpu_suite.py`)", ""]
    if suite is None:
        return "\n".join([*lines, "**GPU: not measured.** No `gpu_suite.json` was found.", "", END, ""])
    env = suite["environment"]
    if suite.get("tiny"):
        lines += ["**Tiny smoke run: toy sizes, the numbers mean nothing.**", ""]
    lines += [
        f"**Hardware:** {env.get('gpu') or env.get('processor')} (driver {_fmt(env.get('driver'))}, CUDA "
        f"{_fmt(env.get('cuda'))}, cuDNN {_fmt(env.get('cudnn'))}), device `{suite['device']}`; torch {env['torch']}, "
        f"lightning {env['lightning']}, torchvision {_fmt(env.get('torchvision'))}, timm {_fmt(env.get('timm'))}; "
        f"cudnn.benchmark {env.get('cudnn_benchmark')}, TF32 convolutions {env.get('cudnn_allow_tf32')}. "
        f"Budget {suite['budget']['budget_s']:.0f} s, used {suite['budget']['wall_s']:.0f} s. Every number is a "
        "ratio or a median measured within this run, candidates interleaved; spreads are 10th–90th percentiles.",
        "",
    ]  # fmt: skip
    lines += ["### Stages", ""]
    lines += _table(["stage", "status", "wall s", "rows", "skipped", "errors"],
                    [[r["stage"], r["status"] + (f" ({r['reason']})" if r.get("reason") else ""), f"{r['wall_s']:.1f}",
                      str(r["rows"]), str(r["skipped"]), str(r["errors"])] for r in suite["rows"]])  # fmt: skip
    if suite["goals"]:
        lines += ["### Goals", ""]
        lines += _table(["goal", "measured", "target", "verdict", "detail"],
                        [[g["goal"], _fmt(g["value"]), g["target"], _met(g["met"]), g.get("detail", "")]
                         for g in suite["goals"]])  # fmt: skip
    lines += _render_stages(reports)
    errors = [(name, e) for name, r in reports.items() if name != NAME for e in r.get("errors", [])]
    if errors:
        lines += (
            ["### Errors", ""]
            + [f"- `{name}` {e['what']}: `{e['error'][:300]}`" for name, e in errors]
            + [""]
        )
    if suite.get("skipped"):
        lines += ["### Skipped", ""]
        lines += [
            f"- `{s['stage']}`{' ' + s['what'] if s.get('what') else ''}: {s['reason']}"
            for s in suite["skipped"]
        ]
        lines += [""]
    return "\n".join([*lines, END, ""])


def _render_stages(reports: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    tests = reports.get("tests")
    if tests and tests["rows"]:
        counts = tests["settings"].get("counts", {})
        lines += [
            "### GPU tests (`pytest -m gpu tests`)",
            "",
            ", ".join(f"{v} {k}" for k, v in counts.items()),
            "",
        ]
        bad = [r for r in tests["rows"] if r["outcome"] in ("failed", "error", "timeout")]
        lines += [f"- {r['outcome']}: `{r['test']}`: {r['message'][:200]}" for r in bad] + (
            [""] if bad else []
        )
    fused = reports.get("fused_vs_loop")
    if fused and fused["rows"]:
        probe = next((r for r in fused["rows"] if "probe" in r), None)
        lines += ["### Loop vs fused (vmap)", "", "Times per step; loop / vmap > 1 means vmap is faster.", ""]
        if probe:
            lines += [
                f"Under bf16 autocast the loop's outputs are {probe['loop']} and vmap's {probe['vmap']}.",
                "",
            ]
        lines += _table(
            ["members", "batch", "precision", "phase", "loop ms", "vmap ms", "loop / vmap", "auto picks", "auto / faster"],
            [[f"{r['members']}x{r['arch']}", str(r["batch"]), r["variant"], r["phase"], _ms(r["loop"]), _ms(r["vmap"]),
              _ratio(r["loop_over_vmap"]), r["auto_picks"], _fmt(r["auto_over_faster"])]
             for r in fused["rows"] if "phase" in r],
        )  # fmt: skip
    pair = reports.get("ensemble_vs_single")
    if pair and pair["rows"]:
        s = pair["settings"]
        lines += [f"### {s['members']}x{s['small']} vs one {s['large']}", "",
                  f"Multiply-adds per image: ensemble {s['ensemble_macs'] / 1e6:.0f} M, single {s['single_macs'] / 1e6:.0f} M. "
                  "Images per second at the median step; single / ensemble time > 1 means the ensemble is faster.", ""]  # fmt: skip
        names = ["loop", "vmap", "auto", "single"]
        lines += _table(
            ["precision", "batch", "phase", *(f"{k} img/s" for k in names), "single / loop", "single / vmap",
             "single / auto", "auto picks"],
            [[r["variant"], str(r["batch"]), r["phase"], *(_fmt(r["images_per_s"].get(k), 0) for k in names),
              *(_ratio(r["single_over_ensemble"].get(k)) for k in names[:3]), str(r["auto_picks"])]
             for r in pair["rows"]],
        )  # fmt: skip
    overhead = reports.get("ensemble_overhead")
    if overhead and overhead["rows"]:
        r = overhead["rows"][0]
        lines += ["### Ensemble of one vs a plain LightningModule", ""]
        lines += _table(["model", "plain", "ensemble of 1", "ensemble / plain"],
                        [[f"{r['model']} batch {r['batch']}", _ms(r["plain"]), _ms(r["ensemble_of_1"]),
                          _fmt(r["ensemble_over_plain_median"], 3)]])  # fmt: skip
    data = reports.get("data_pipeline")
    if data and data["rows"]:
        lines += ["### Input pipeline", ""]
        lines += _table(["pipeline", "data per batch ms", "WRN-16-4 step ms", "data share"],
                        [[f"{r['pipeline']} ({r['workers']} workers)", _ms(r["data_per_batch"]), _ms(r["wrn16_4_step"]),
                          f"{100 * r['data_share_of_step']:.1f}%"] for r in data["rows"]])  # fmt: skip
    latency = reports.get("latency_memory")
    if latency and latency["rows"]:
        lines += ["### Latency and peak memory", "",
                  f"p50 latency per ensemble size ({latency['settings'].get('clock')}), median over rounds; "
                  "peak memory of one step in MiB (`torch.cuda.max_memory_allocated`).", ""]  # fmt: skip
        body = []
        for r in latency["rows"]:
            for name, sizes in r["p50_ms"].items():
                mem = r.get("peak_memory", {}).get(name, {})
                ratio_ = r["full_over_single"].get(name)
                body.append([name, r["dtype"], str(r["batch"]), ", ".join(f"{k}: {v:.2f}" for k, v in sizes.items()),
                             _ratio(ratio_) if ratio_ else "–",
                             _fmt((mem.get("inference") or {}).get("peak_mb"), 0), _fmt((mem.get("train") or {}).get("peak_mb"), 0)])  # fmt: skip
        lines += _table(
            ["members", "dtype", "batch", "p50 ms by size", "full / single", "inference MiB", "train MiB"],
            body,
        )
    par = reports.get("parallel_latency")
    if par and par["rows"]:
        s = par["settings"]
        lines += ["### Parallel vs sequential latency (`ParallelEnsemble`)", "",
                  f"{s['members']}: p50 latency ({s['clock']}), median over rounds; sequential is {s['sequential']}, "
                  "parallel one worker per member (a CUDA stream each on a GPU), eager and traced (`trace=True`). "
                  "Largest abs diff of either parallel output from the sequential one.", ""]  # fmt: skip
        lines += _table(["members", "batch", "sequential ms", "parallel ms", "traced ms", "parallel / sequential",
                         "traced / sequential", "workers", "logits diff", "probs diff"],
                        [[r["members"], str(r["batch"]), _fmt(r["p50_ms"]["sequential"]), _fmt(r["p50_ms"]["parallel"]),
                          _fmt(r["p50_ms"]["parallel_traced"]), _ratio(r["parallel_over_sequential"]),
                          _ratio(r["parallel_traced_over_sequential"]), str(r["workers"]),
                          f"{r['max_abs_diff_logits']:.1e}", f"{r['max_abs_diff_probs']:.1e}"] for r in par["rows"]])  # fmt: skip
    mem = reports.get("training_memory")
    if mem and mem["rows"]:
        s = mem["settings"]
        lines += [
            f"### Training memory ({s['members']}, batch {s['batch']}, {s['steps']} steps of `Trainer.fit`)",
            "",
        ]
        if s.get("measure"):
            lines += [f"Peak MiB per round ({s['measure']}); goal ratio = frugal / (1.3 x one + the other "
                      "members' weights and optimizer state).", ""]  # fmt: skip
        else:
            lines += [f"Not measured: {mem['rows'][0]['reason']}.", ""]
        names = training_memory.CANDIDATES
        lines += _table(["round", *(f"{k} MiB" for k in names), "frugal / summed", "goal ratio", "others' weights MiB",
                         "others' optimizer state MiB"],
                        [[str(r["round"] + 1), *(_fmt((r["peak_mb"] or {}).get(k), 0) for k in names),
                          _fmt(r["peak_mb"]["frugal"] / r["peak_mb"]["summed"] if r["peak_mb"] else None),
                          _fmt(r["goal_ratio"]), _fmt(r["other_members_mb"]["weights"], 1),
                          _fmt(r["other_members_mb"]["optimizer_state"], 1)] for r in mem["rows"]])  # fmt: skip
    e2e = reports.get("end_to_end")
    if e2e and e2e["rows"]:
        r = e2e["rows"][0]
        lines += ["### End to end (`Trainer.fit`)", ""]
        lines += _table(["members", "precision", "batch", "epochs", "median step", "img/s (median step)",
                         "img/s (last epoch, with validation)", "auto picks", "peak MiB"],
                        [[r["members"], r["precision"], str(r["batch"]), str(r["epochs_run"]), _ms(r["step"]),
                          f"{r['train_images_per_s_median_step']:.0f}", _fmt(r["images_per_s_last_epoch_with_val"], 0),
                          str(r["auto_picks"]), _fmt(r.get("peak_memory_mb"), 0)]])  # fmt: skip
    comp = reports.get("compile")
    if comp and comp["rows"]:
        s = comp["settings"]
        lines += [
            f"### torch.compile ({s['members']}, backend `{s['backend']}`, batch {s['batch']}, {s['variant']})",
            "",
        ]
        lines += _table(["phase", "eager ms", "compiled ms", "eager / compiled", "first call eager s", "first call compiled s"],
                        [[r["phase"], _ms(r["eager"]), _ms(r["compiled"]), _ratio(r["eager_over_compiled"]),
                          _fmt(r["first_call_s"]["eager"]), _fmt(r["first_call_s"]["compiled"])] for r in comp["rows"]])  # fmt: skip
    return lines


def write_section(section: str, path: Path) -> None:
    """Replace the marked section of ``path`` with ``section`` (appended if the markers are missing)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    atomic_write_text(path, text)


# -------------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    parser.add_argument("--tiny", action="store_true", help="every stage at toy sizes (CI): no real numbers")
    parser.add_argument("--root", default="data", help="CIFAR-10 root for data_pipeline (else generated)")
    parser.add_argument("--stages", nargs="+", default=list(STAGE_NAMES), choices=STAGE_NAMES)
    parser.add_argument(
        "--write-results-md", action="store_true", help="replace the GPU section of RESULTS.md"
    )
    parser.add_argument("--results-md", default=str(RESULTS_MD), help="the file --write-results-md edits")
    parser.add_argument("--render-only", action="store_true", help="render from the JSON under --out; no run")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"Expected `--budget-s` to be > 0 seconds, but got {args.budget_s}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(
            f"Expected `--device` to be a torch device such as 'cuda' or 'cpu', but got {args.device!r}."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"Expected `--device` to name an available device, but got {args.device!r}: CUDA is not available."
        )
    results_md = Path(args.results_md)
    if args.write_results_md and args.tiny and results_md.resolve() == RESULTS_MD.resolve():
        parser.error("`--tiny` numbers mean nothing: give `--results-md` another file to write them to.")
    out = Path(args.out)
    if args.render_only:
        report = json.loads((out / f"{NAME}.json").read_text(encoding="utf-8"))
    else:
        report = run_suite(args)
    section = render(out)
    atomic_write_text(out / "RESULTS-gpu.md", section)
    if args.write_results_md:
        write_section(section, results_md)
        print(f"wrote the GPU section of {results_md}")
    return report


if __name__ == "__main__":
    # A run exits 1 if a stage failed or a GPU test failed; its files are written either way.
    sys.exit(0 if main()["status"] == "ok" or "--render-only" in sys.argv else 1)
