"""Exported ensembles vs eager: file size, export time and latency of torch.export (.pt2) and ONNX files.

    python benchmarks/export_latency.py [--threads 1] [--repeats 15] [--out benchmarks/results] [--tiny]

Builds M = 4 WRN-16-1 members for digits-shaped input (1x8x8, 10 classes; weights as initialised, with
BatchNorm running statistics moved off their defaults: latency does not depend on training), writes both files
with :func:`~lightning_ensembles.export.export_ensemble` (timed; each file checked against eager at batch sizes
1 and 7), then times three ways of running the same ensemble, interleaved, per batch size:

- ``eager``: :class:`~lightning_ensembles.export.ExportableEnsemble` in eager PyTorch under ``no_grad``;
- ``pt2``: ``torch.export.load(file).module()`` under ``no_grad``;
- ``onnxruntime``: an ``InferenceSession`` on the CPU (``intra_op_num_threads`` = the torch threads).

Reported per batch size: milliseconds per call (median and 10th-90th percentiles over repeats; each repeat
times ``calls`` calls) and each file's time over eager's (median of the per-repeat ratios).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import ratio, save, summary, time_interleaved

from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.export import ExportableEnsemble, export_ensemble
from lightning_ensembles.models import WideResNet
from lightning_ensembles.results import cpu_model

INPUT_SHAPE = (1, 8, 8)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build(depth: int, num_members: int, dev: torch.device, seed: int) -> EnsembleLightningModule:
    """The ensemble in eval mode, BatchNorm statistics moved by a few training-mode passes on random inputs."""
    torch.manual_seed(seed)
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, depth, 1, in_channels=1),
        num_members=num_members,
        num_classes=10,
        seed=seed,
    ).to(dev)
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(32, *INPUT_SHAPE, device=dev))
    return module.eval()


def _repeat(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def many() -> None:
        for _ in range(calls):
            fn()

    return many


def run(
    device: str,
    depth: int,
    num_members: int,
    batch_sizes: list[int],
    repeats: int,
    calls: dict[int, int],
    seed: int,
    out: str | None,
) -> dict:
    dev = torch.device(device)
    module = build(depth, num_members, dev, seed)
    eager = ExportableEnsemble(module)
    formats = ["pt2"]
    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime"):
        formats.append("onnx")
    exported: dict[str, dict] = {}
    runners: dict[str, Callable[[torch.Tensor], object]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for fmt in formats:
            start = time.perf_counter()
            result = export_ensemble(module, Path(folder) / f"ensemble.{fmt}", INPUT_SHAPE, format=fmt)
            exported[fmt] = {
                "export_s": time.perf_counter() - start,  # trace, translate, check at 2 batch sizes, write
                "size_mb": result.size_bytes / 1e6,
                "max_abs_diff": result.max_abs_diff,
            }
            if fmt == "pt2":
                runners["pt2"] = torch.export.load(result.path).module()
            else:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                options.inter_op_num_threads = 1
                providers = ["CPUExecutionProvider"]
                if dev.type == "cuda":
                    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                        continue  # no GPU onnxruntime here: that row is left out
                    providers = ["CUDAExecutionProvider"]
                session = onnxruntime.InferenceSession(str(result.path), options, providers=providers)
                runners["onnxruntime"] = lambda x, s=session: s.run(None, {"x": x.cpu().numpy()})
    params = sum(p.numel() for p in module.parameters())
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        x = torch.randn(batch, *INPUT_SHAPE, generator=generator).to(dev)

        def timed(
            fn: Callable[[torch.Tensor], object], x: torch.Tensor = x, n: int = calls[batch]
        ) -> Callable[[], None]:
            def one() -> None:
                with torch.no_grad():
                    fn(x)

            return _repeat(one, n)

        candidates = {"eager": timed(eager), **{name: timed(fn) for name, fn in runners.items()}}
        samples = time_interleaved(candidates, repeats=repeats, warmup=2, device=dev)
        per_call = {name: [s / calls[batch] for s in values] for name, values in samples.items()}
        rows.append(
            {
                "members": f"{num_members} x WRN-{depth}-1", "input": "1x8x8 (digits)", "batch": batch,
                "device": device, "threads": torch.get_num_threads(), "calls_per_repeat": calls[batch],
                "repeats": len(samples["eager"]), "parameters": params, "exported": exported,
                "per_call": {name: summary(values) for name, values in per_call.items()},
                "over_eager": {name: ratio(samples[name], samples["eager"]) for name in runners},
                "versions": {name: _version(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime")},
                "cpu_model": cpu_model(),
            }
        )  # fmt: skip
    return save("export_latency", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime intra-op threads (default: torch's)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for export_latency.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tiny:
        return run(args.device, 10, 2, [4], 1, {4: 1}, args.seed, args.out)
    calls = {b: max(2, 256 // b) for b in args.batch_sizes}  # about 256 samples per repeat
    return run(args.device, 16, 4, args.batch_sizes, args.repeats, calls, args.seed, args.out)


if __name__ == "__main__":
    main()
