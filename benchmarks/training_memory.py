"""Memory-frugal vs summed training of an ensemble: peak memory and step time, each candidate in a fresh process.

    python benchmarks/training_memory.py [--preset cifar|fashion|digits|recipes] [--device cuda]
        [--allocator mmap|glibc] [--out benchmarks/results] [--repeats 3] [--steps 3] [--tiny]

Candidates, each ``Trainer.fit`` for ``--steps`` steps of SGD with momentum on random images, in a fresh Python
process, interleaved over ``--repeats`` rounds (summed, frugal, one, summed, frugal, one, ...). The presets are
the recipes' own shapes (``--preset recipes`` runs all three, one row each):

- ``cifar`` (the default): 4 x WRN-16-2 on 3x32x32 images, batch 128 (``configs/cifar``);
- ``fashion``: 4 x WRN-10-2 on 1x28x28 images, batch 128 (``configs/fashion``, ``sweeps/fashion-cpu.yaml``);
- ``digits``: 4 x WRN-16-2 on 1x8x8 images, batch 64 (the quickstart, ``configs/digits``).

- ``summed``: ``M`` x WRN-``depth``-``width`` with ``memory_frugal=False``: one backward of the summed loss
  (every member's activations alive until the backward);
- ``frugal``: the same ensemble with ``memory_frugal=True`` (each member's forward and backward before the
  next member's forward; what the default ``"auto"`` does on one device);
- ``one``: one member alone (``M = 1``), the reference of the goal.

Peak memory above the imports, per process:

- on a CPU: the process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's
  high-water mark, read after fit) minus the resident set size after the imports and the data were made
  (``/proc/self/statm``), before the model is built: weights, gradients, optimizer state, activations,
  Lightning's own allocations and the allocator's slack. With ``--allocator mmap`` (the default) each process
  runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc serves every block of 128 KiB or more (every activation
  of these sizes) with its own mapping and returns it to the OS when the tensor is freed, so the resident set
  follows the live tensors, like ``max_memory_allocated`` on a GPU. ``--allocator glibc`` keeps glibc's
  default, whose adaptive threshold moves freed large blocks to the heap and keeps them resident: what a
  default CPU process shows, allocator retention included (written to ``training_memory_glibc.json``);
- on a GPU: ``torch.cuda.max_memory_allocated`` during fit minus ``torch.cuda.memory_allocated`` before the
  model is built (the data stay on the host).

The frugal process also counts, exactly from their tensors after fit, the bytes of the other ``M - 1``
members' weights, optimizer state and gradients. Reported: medians and min-max over the rounds; the ratios
frugal / summed, summed / one and frugal / one per round (median, 10th-90th percentiles); the goal
ratio ``frugal / (1.3 x one + other members' weights and optimizer state)`` (goal <= 1); and the step time:
each process's median wall time of a training step (``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward and optimizer step) after its first, with the per-round ratio frugal / summed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("summed", "frugal", "one")


def _rss_bytes() -> int:
    """The current resident set size (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One candidate in this (fresh) process: the peak memory of ``Trainer.fit`` above the imports."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ensembles.models import WideResNet
    from lightning_ensembles.module import EnsembleLightningModule

    torch.set_num_threads(config["threads"])
    cuda = config["device"] == "cuda"
    size, batch, steps = config["image"], config["batch"], config["steps"]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batch * steps, config.get("channels", 3), size, size, generator=g),
        torch.randint(0, 10, (batch * steps,), generator=g),
    )
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    members = 1 if config["candidate"] == "one" else config["members"]
    module = EnsembleLightningModule(
        member=functools.partial(
            WideResNet, config["depth"], config["width"], in_channels=config.get("channels", 3)
        ),
        num_members=members,
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        detect_nonfinite=False,
        memory_frugal=config["candidate"] == "frugal",
    )
    step_s: list[float] = []

    class StepTimer(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - self.start)

    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StepTimer()],
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=batch, shuffle=False))
    fit_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    optimizer = trainer.optimizers[0]
    others = [p for i in range(1, members) for p in module.members[i].parameters()]
    weights = sum(p.numel() * p.element_size() for p in others)
    state = sum(
        t.numel() * t.element_size()
        for p in others
        for t in optimizer.state.get(p, {}).values()
        if isinstance(t, torch.Tensor)
    )
    grads = sum(p.grad.numel() * p.grad.element_size() for p in others if p.grad is not None)
    return {
        "candidate": config["candidate"], "peak_above_imports_bytes": peak - base, "fit_s": fit_s,
        "step_s": statistics.median(step_s[1:] or step_s),  # the first step warms up
        "other_members_bytes": {"weights": weights, "optimizer_state": state, "gradients": grads},
    }  # fmt: skip


def _spawn(config: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and read its JSON line."""
    import lightning_ensembles

    # the child imports the same lightning_ensembles as this process (a checkout, not an installed copy)
    root = str(Path(lightning_ensembles.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(config["threads"])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if config["allocator"] == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"candidate {config['candidate']} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


PRESETS: dict[str, dict[str, int]] = {
    "cifar": dict(members=4, depth=16, width=2, channels=3, image=32, batch=128),
    "fashion": dict(members=4, depth=10, width=2, channels=1, image=28, batch=128),
    "digits": dict(members=4, depth=16, width=2, channels=1, image=8, batch=64),
}


def measure(device: str, members: int, depth: int, width: int, batch: int, image: int, steps: int,
            repeats: int, threads: int, allocator: str, channels: int = 3) -> dict[str, Any]:  # fmt: skip
    """One row: every candidate ``repeats`` times, interleaved, each in a fresh process."""
    from _timing import ratio

    config = dict(device=device, members=members, depth=depth, width=width, batch=batch, image=image,
                  steps=steps, threads=threads, allocator=allocator, channels=channels)  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CANDIDATES}
    for _ in range(repeats):
        for name in CANDIDATES:
            results[name].append(_spawn({**config, "candidate": name}))
    peak = {name: [r["peak_above_imports_bytes"] / 2**20 for r in rows] for name, rows in results.items()}
    step = {name: [r["step_s"] for r in rows] for name, rows in results.items()}
    others = results["frugal"][0]["other_members_bytes"]
    allowance_mb = (others["weights"] + others["optimizer_state"]) / 2**20
    goal = [f / (1.3 * o + allowance_mb) for f, o in zip(peak["frugal"], peak["one"], strict=True)]
    return {
        "members": f"{members} x WRN-{depth}-{width}", "channels": channels, "batch": batch, "image": image,
        "steps": steps, "device": device, "threads": threads, "repeats": repeats,
        "measure": "cuda max_memory_allocated" if device == "cuda" else "peak RSS (ru_maxrss) - RSS after imports",
        "allocator": "cuda caching allocator" if device == "cuda" else allocator,
        "peak_above_imports_mb": {name: _spread(values) for name, values in peak.items()},
        "other_members_mb": {k: v / 2**20 for k, v in others.items()},
        "frugal_over_summed": ratio(peak["frugal"], peak["summed"]),
        "summed_over_one": ratio(peak["summed"], peak["one"]),
        "frugal_over_one": ratio(peak["frugal"], peak["one"]),
        "goal_ratio": _spread(goal),  # frugal / (1.3 x one + other members' weights and optimizer state)
        "goal_met": statistics.median(goal) <= 1.0,
        "fit_s": {name: _spread([r["fit_s"] for r in rows]) for name, rows in results.items()},
        "step_s": {name: _spread(values) for name, values in step.items()},
        "step_frugal_over_summed": ratio(step["frugal"], step["summed"]),
    }  # fmt: skip


def run(device: str, presets: list[dict[str, int]], steps: int, repeats: int, threads: int, allocator: str,
        out: str | None) -> dict[str, Any]:  # fmt: skip
    from _timing import save

    rows = [
        measure(device, steps=steps, repeats=repeats, threads=threads, allocator=allocator, **p)
        for p in presets
    ]
    glibc = device != "cuda" and allocator == "glibc"
    return save("training_memory_glibc" if glibc else "training_memory", rows, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--preset",
        choices=[*PRESETS, "recipes"],
        default="cifar",
        help="the recipe whose shapes are measured (recipes: all three, one row each)",
    )
    parser.add_argument("--members", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--depth", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--width", type=int, default=None, help="overrides the preset's")
    parser.add_argument("--batch", type=int, default=None, help="overrides the preset's")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="training steps per process (>= 2: optimizer state and a timed step)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds, a fresh process each")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each process")
    parser.add_argument(
        "--allocator",
        choices=["mmap", "glibc"],
        default="mmap",
        help="CPU: mmap = MALLOC_MMAP_THRESHOLD_=131072 (RSS follows live tensors); glibc = default",
    )
    parser.add_argument("--out", default=None, help="folder for training_memory.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = child(json.loads(args.child))
        print(json.dumps(result))
        return result
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        tiny = dict(members=2, depth=10, width=1, channels=3, image=8, batch=8)
        return run(args.device, [tiny], 2, 1, 1, args.allocator, args.out)
    names = list(PRESETS) if args.preset == "recipes" else [args.preset]
    overrides = {
        k: getattr(args, k) for k in ("members", "depth", "width", "batch") if getattr(args, k) is not None
    }
    presets = [{**PRESETS[name], **overrides} for name in names]
    return run(args.device, presets, args.steps, args.repeats, args.threads, args.allocator, args.out)


if __name__ == "__main__":
    main()
