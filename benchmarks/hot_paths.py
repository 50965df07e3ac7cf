"""The hot-path fixes of issue 16, new / old time in one run: ``aggregate``, ``vmap_forward`` and the
first-k ensembles of an evaluation batch.

    python benchmarks/hot_paths.py [--threads 1] [--repeats 15] [--out benchmarks/results] [--tiny]

- ``aggregate``: the full ensemble only, against the old ``cumulative_probs(logits, a)[-1]`` that computed
  every first-k ensemble and kept the last (inside the timed latency run), for M = 4, 8; B = 1, 256;
  C = 10, 1000 and each aggregation. One sample is ``calls`` back-to-back calls, so it lasts a few ms.
- ``vmap_forward``: the stacked parameter and buffer dicts built once per member, against the old dict
  comprehension that rebuilt every member's ``dict(named_parameters())`` once per parameter name (the
  vmapped call after the stacking did not change, so both use the library's); 4 x
  WRN-16-1 on 3x32x32, batch 1 and 64, forward under ``inference_mode`` and forward + backward (training
  mode), plus the stacking alone.
- ``first_k``: the work of one evaluation batch after the members ran, with ``EnsembleSizeAblation`` (every
  subset of 4 members) and ``CascadeMonitor``: the module's metrics, then the two callbacks. Old: the
  callbacks aggregated the first-k ensembles again and the ablation kept first-k metrics of its own (the
  same callbacks with nothing to reuse: ``first_k_log_probs`` left out of the outputs and no metrics read
  from the module); new: the library's path. One sample is an evaluation epoch of 10 batches of 256 and
  its end (the ablation's and the module's compute), C = 10 and 1000, mean of probabilities.

The old implementations are kept below, verbatim, as the reference. Rows give each path's median time with
its 10th-90th percentile spread and ``new_over_old``, the median of the per-repeat ratios (< 1: the new path
is faster). Old and new are timed interleaved in the same process; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from _timing import ratio, save, summary, time_interleaved
from torch import Tensor, nn

from lightning_ensembles.aggregation import AGGREGATIONS, aggregate, cumulative_probs
from lightning_ensembles.callbacks import CascadeMonitor, EnsembleSizeAblation
from lightning_ensembles.callbacks.ablation import METRICS, _make_metric
from lightning_ensembles.fused import _run_stacked, _stack_by_name, vmap_forward
from lightning_ensembles.members import build_members
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule

# --------------------------------------------------------------------------------------------------------
# REFERENCE: the implementations before issue 16, kept verbatim (only renamed) for the comparison; the
# vmapped call after the stacking did not change and is the library's `_run_stacked` for both.


def old_aggregate(logits: Tensor, aggregation: str = "mean_probs") -> Tensor:
    """``aggregate`` before issue 16: every cumulative ensemble, the last one kept."""
    return cumulative_probs(logits, aggregation)[-1]


def old_stacked(members: Sequence[nn.Module]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The stacking of ``vmap_forward`` before issue 16: every member's dict rebuilt once per name."""
    base = members[0]
    params = {
        n: torch.stack([dict(m.named_parameters())[n] for m in members]) for n, _ in base.named_parameters()
    }
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in members]) for n, _ in base.named_buffers()}
    return params, buffers


def old_vmap_forward(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``vmap_forward`` before issue 16: the old stacking, then the vmapped call, which is unchanged."""
    params, buffers = old_stacked(members)
    return _run_stacked(members, params, buffers, x)


# END OF REFERENCE
# --------------------------------------------------------------------------------------------------------


def new_stacked(members: Sequence[nn.Module]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The stacking ``vmap_forward`` does now (see ``lightning_ensembles.fused``)."""
    return (
        _stack_by_name([dict(m.named_parameters()) for m in members]),
        _stack_by_name([dict(m.named_buffers()) for m in members]),
    )


def _repeated(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def _calls_for(fn: Callable[[], Any], target_s: float) -> int:
    """How many back-to-back calls of ``fn`` last about ``target_s`` (at least 1)."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, round(target_s / max(time.perf_counter() - start, 1e-7)))


def _row(kind: str, config: dict[str, Any], samples: dict[str, list[float]], calls: int) -> dict[str, Any]:
    per_call = {name: [s / calls for s in values] for name, values in samples.items()}
    return {
        "function": kind, **config, "calls_per_sample": calls,
        "old": summary(per_call["old"]), "new": summary(per_call["new"]),
        "new_over_old": ratio(per_call["new"], per_call["old"]),
    }  # fmt: skip


def bench_aggregate(
    shapes: list[tuple[int, int, int]], aggregations: Sequence[str], repeats: int, target_s: float
) -> list[dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    for m, b, c in shapes:
        logits = torch.randn(m, b, c, generator=torch.Generator().manual_seed(0))
        for aggregation in aggregations:
            old = functools.partial(old_aggregate, logits, aggregation)
            new = functools.partial(aggregate, logits, aggregation)
            torch.testing.assert_close(new(), old(), atol=1e-6, rtol=1e-5)  # same result, to rounding
            calls = _calls_for(old, target_s)
            candidates = {"old": _repeated(old, calls), "new": _repeated(new, calls)}
            samples = time_interleaved(candidates, repeats=repeats, warmup=1, device=cpu)
            config = {"members": m, "batch": b, "classes": c, "aggregation": aggregation}
            rows.append(_row("aggregate", config, samples, calls))
    return rows


Forward = Callable[[Sequence[nn.Module], Tensor], Tensor]


def bench_vmap_forward(
    depth: int, width: int, image: int, batches: list[int], repeats: int, target_s: float
) -> list[dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    members = build_members([functools.partial(WideResNet, depth, width)] * 4, seed=0)
    arch = f"WRN-{depth}-{width}"

    stack_old = functools.partial(old_stacked, members)
    stack_new = functools.partial(new_stacked, members)
    calls = _calls_for(stack_old, target_s)
    samples = time_interleaved(
        {"old": _repeated(stack_old, calls), "new": _repeated(stack_new, calls)}, repeats, 1, cpu
    )
    rows.append(_row("vmap_forward", {"arch": arch, "members": 4, "phase": "stacking only"}, samples, calls))

    for batch in batches:
        x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
        for m in members:
            m.eval()
        with torch.inference_mode():
            torch.testing.assert_close(vmap_forward(members, x), old_vmap_forward(members, x), rtol=0, atol=0)

        def infer(forward: Forward, x: Tensor = x) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    forward(members, x)

            return run

        def train(forward: Forward, x: Tensor = x, y: Tensor = y) -> Callable[[], None]:
            def run() -> None:
                out = forward(members, x)
                sum(nn.functional.cross_entropy(o, y) for o in out).backward()  # type: ignore[union-attr]
                for m in members:
                    m.zero_grad(set_to_none=True)

            return run

        for phase, make, mode in (
            ("inference_mode forward", infer, False),
            ("forward+backward", train, True),
        ):
            for m in members:
                m.train(mode)
            old, new = make(old_vmap_forward), make(vmap_forward)
            calls = _calls_for(old, target_s)
            samples = time_interleaved(
                {"old": _repeated(old, calls), "new": _repeated(new, calls)}, repeats, 1, cpu
            )
            config = {"arch": arch, "members": 4, "phase": phase, "batch": batch, "image": image}
            rows.append(_row("vmap_forward", config, samples, calls))
    return rows


def _evaluation_epoch(
    module: EnsembleLightningModule, logits: Tensor, target: Tensor, reuse: bool, batches: int
) -> Callable[[], None]:
    """``batches`` evaluation batches' metrics and callbacks, then every state reset; ``reuse``: the
    library's path, else the old one."""
    trainer = SimpleNamespace(datamodule=None, world_size=1)  # no shape: no multiply-adds to count
    ablation = EnsembleSizeAblation(latency_batch_size=None, metrics=[m for m in METRICS if m != "ood_auroc"])
    ablation._prepare(trainer, module)  # type: ignore[arg-type]
    assert ablation._metrics is not None
    if not reuse:  # the old ablation: metrics of its own for the first-k subsets too
        for key in ablation._from_module:
            ablation._metrics[key] = nn.ModuleDict(
                {name: _make_metric(name, module.num_classes) for name in ablation.metric_names}
            )
        ablation._from_module = {}
    cascade = CascadeMonitor(input_shape=(1,))
    cascade.member_gmacs, cascade.order = [1.0] * logits.shape[0], list(range(logits.shape[0]))
    metrics = module.evaluation_metrics("test")

    def run() -> None:
        for _ in range(batches):
            first_k = metrics.update(logits, target)
            outputs = {"logits": logits, "target": target}
            if reuse:
                outputs["first_k_log_probs"] = first_k
            ablation._update(outputs, module)
            cascade._collect(trainer, module, outputs)  # type: ignore[arg-type]
        ablation._compute(module, "test")  # the epoch's end: the ablation's hook runs first, and resets
        metrics.compute()  # the module logs its metrics (the values the ablation read are cached)
        metrics.reset()
        cascade._reset()

    return run


def bench_first_k(
    members: int, batch: int, classes_list: Sequence[int], repeats: int, calls: int
) -> list[dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    for classes in classes_list:
        module = EnsembleLightningModule(
            member=functools.partial(nn.Linear, 4, classes), num_members=members, num_classes=classes
        )
        logits = torch.randn(members, batch, classes, generator=torch.Generator().manual_seed(0))
        target = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(1))
        candidates = {
            "old": _evaluation_epoch(module, logits, target, reuse=False, batches=calls),
            "new": _evaluation_epoch(module, logits, target, reuse=True, batches=calls),
        }
        samples = time_interleaved(candidates, repeats=repeats, warmup=1, device=cpu)
        config = {"members": members, "batch": batch, "classes": classes, "phase": "metrics + callbacks"}
        rows.append(_row("first_k", config, samples, calls))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: both fixes are host-side")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="folder for hot_paths.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        rows = bench_aggregate([(2, 1, 3)], ["mean_probs"], repeats=2, target_s=1e-4)
        rows += bench_vmap_forward(10, 1, 8, [2], repeats=2, target_s=1e-4)
        rows += bench_first_k(3, 4, [3], repeats=2, calls=2)
    else:
        shapes = [(m, b, c) for m in (4, 8) for b in (1, 256) for c in (10, 1000)]
        rows = bench_aggregate(shapes, AGGREGATIONS, args.repeats, target_s=5e-3)
        rows += bench_vmap_forward(16, 1, 32, [1, 64], args.repeats, target_s=5e-3)
        rows += bench_first_k(4, 256, [10, 1000], args.repeats, calls=10)
    for row in rows:
        row["threads"] = torch.get_num_threads()
    return save("hot_paths", rows, args.out)


if __name__ == "__main__":
    main()
