"""Loop vs fused (vmap) execution of M = 4 identical Wide ResNet members, training and inference.

    python benchmarks/fused_vs_loop.py [--device cuda] [--out benchmarks/results] [--tiny]

Reports, per architecture and phase, the median step time of each path and the ratio loop / vmap
(> 1 means vmap is faster), with 10th-90th percentile spreads, and what `execution="auto"` picks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools

import torch
from _timing import peak_memory_mb, ratio, save, summary, time_interleaved

from lightning_ensembles.fused import choose_execution, vmap_forward
from lightning_ensembles.members import build_members
from lightning_ensembles.models import WideResNet

ARCHS = {"WRN-16-1": (16, 1), "WRN-16-2": (16, 2), "WRN-16-4": (16, 4), "WRN-28-10": (28, 10)}


def depth_width(arch: str) -> tuple[int, int]:
    """``(depth, width)`` of a name in ``ARCHS`` or of any ``"WRN-<depth>-<width>"`` (e.g. toy ``WRN-10-1``)."""
    if arch in ARCHS:
        return ARCHS[arch]
    parts = arch.split("-")
    if len(parts) != 3 or parts[0] != "WRN" or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"Expected an architecture such as 'WRN-16-2', but got {arch!r}.")
    return int(parts[1]), int(parts[2])


def measure(
    arch: str,
    dev: torch.device,
    batch_size: int,
    size: int,
    repeats: int,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_members: int = 4,
    warmup: int = 2,
    deadline: float | None = None,
) -> list[dict]:
    """Both phases of one architecture: loop vs vmap, interleaved.

    ``dtype`` runs the forward passes under ``torch.autocast`` to that dtype (backward outside it, as AMP
    does); ``channels_last`` puts weights and input in that memory format; ``deadline`` (a
    ``time.perf_counter()`` value) cuts the repeats short (see ``time_interleaved``). On CUDA each row also
    holds each path's peak memory of one call.
    """
    depth, width = depth_width(arch)
    factories = [functools.partial(WideResNet, depth, width)] * num_members
    loop = [m.to(dev) for m in build_members(factories, seed=0)]
    x = torch.randn(batch_size, 3, size, size, device=dev)
    if channels_last:
        loop = [m.to(memory_format=torch.channels_last) for m in loop]
        x = x.contiguous(memory_format=torch.channels_last)
    fused = copy.deepcopy(loop)
    y = torch.randint(0, 10, (batch_size,), device=dev)

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_loop() -> None:
        with amp():
            loss = sum(torch.nn.functional.cross_entropy(m(x), y) for m in loop)
        loss.backward()

    def train_vmap() -> None:
        with amp():
            loss = sum(torch.nn.functional.cross_entropy(o, y) for o in vmap_forward(fused, x))
        loss.backward()

    def infer_loop() -> None:
        with torch.no_grad(), amp():
            torch.stack([m(x) for m in loop])

    def infer_vmap() -> None:
        with torch.no_grad(), amp():
            vmap_forward(fused, x)

    rows = []
    phases = (("train", train_loop, train_vmap, True), ("inference", infer_loop, infer_vmap, False))
    for phase, a, b, mode in phases:
        for m in loop + fused:
            m.train(mode)
        samples = time_interleaved(
            {"loop": a, "vmap": b}, repeats=repeats, warmup=warmup, device=dev, deadline=deadline
        )
        rows.append(
            {
                "arch": arch, "members": num_members, "phase": phase, "batch": batch_size, "image": size,
                "dtype": str(dtype or torch.float32).removeprefix("torch."), "channels_last": channels_last,
                "loop": summary(samples["loop"]), "vmap": summary(samples["vmap"]),
                "loop_over_vmap": ratio(samples["loop"], samples["vmap"]),
            }
        )  # fmt: skip
        memory = {name: peak_memory_mb(fn, dev) for name, fn in (("loop", a), ("vmap", b))}
        if dev.type == "cuda":
            rows[-1]["peak_memory"] = memory
        for m in loop + fused:
            m.zero_grad(set_to_none=True)
    with amp():
        rows[-1]["auto_picks"] = choose_execution(loop, x)
    return rows


def run(device: str, batch_size: int, size: int, repeats: int, archs: list[str], out: str | None) -> dict:
    dev = torch.device(device)
    rows = [row for arch in archs for row in measure(arch, dev, batch_size, size, repeats)]
    return save("fused_vs_loop", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--out", default=None, help="folder for fused_vs_loop.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.tiny:
        return run(args.device, 2, 8, 2, ["WRN-16-1"], args.out)
    return run(args.device, args.batch_size, 32, args.repeats, args.archs, args.out)


if __name__ == "__main__":
    main()
