"""The hot-path fixes of issue 16, new / old time in one run: ``aggregate``, ``vmap_forward`` and the
first-k ensembles of an evaluation batch.

    python benchmarks/hot_paths.py [--threads 1] [--repeats 15] [--out benchmarks/results] [--only NAME] [--tiny]

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
- ``evaluation_metrics``: the per-epoch cost of the module's ``EnsembleMetrics`` alone: ``batches`` updates
  of ``(M, 64, C)`` logits, then ``compute`` and ``reset``. Old: the metrics before the "metrics once"
  issue (a ``ModuleDict`` of separate metrics: ``size_M`` kept copies of the ensemble's metrics, and
  ``aece``, ``aurc``, ``risk80`` and ``ece`` one per-sample state each); new: the library's (a
  ``MetricCollection`` whose compute groups share one per-sample state per ensemble size, ``size_M`` read
  from the ensemble's metrics). One sample is one epoch; both give the same values (checked here).

``--only NAME`` runs one of ``aggregate``, ``vmap_forward``, ``first_k`` and ``evaluation_metrics`` and saves
``hot_paths_{NAME}.json`` (the full run saves ``hot_paths.json``).

The old implementations are kept below, verbatim, as the reference. Rows give each path's median time with
its 10th-90th percentile spread and ``new_over_old``, the median of the per-repeat ratios (< 1: the new path
is faster). Old and new are timed interleaved in the same process; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any, cast

import torch
from _timing import ratio, save, summary, time_interleaved
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_ensembles._validation import check_int
from lightning_ensembles.aggregation import (
    AGGREGATIONS,
    aggregate,
    cumulative_log_probs,
    cumulative_probs,
    validate_aggregation,
)
from lightning_ensembles.callbacks import CascadeMonitor, EnsembleSizeAblation
from lightning_ensembles.callbacks.ablation import METRICS, _make_metric
from lightning_ensembles.fused import _run_stacked, _stack_by_name, vmap_forward
from lightning_ensembles.members import build_members
from lightning_ensembles.metrics import (
    AURC,
    COVERAGE,
    ECE_BINS,
    AdaptiveCalibrationError,
    RiskAtCoverage,
    brier_per_sample,
    disagreement_per_sample,
    nll_per_sample,
)
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.uncertainty import entropy, mutual_information, variation_ratio

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


def _old_accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro", validate_args=False)


def _old_calibration_error(num_classes: int) -> MulticlassCalibrationError:
    return MulticlassCalibrationError(
        num_classes=num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False
    )


def old_uncertainty_metrics(num_members: int) -> dict[str, Metric]:
    """``uncertainty_metrics`` before the "metrics once" issue."""
    metrics: dict[str, Metric] = {
        "entropy": MeanMetric(),
        "aece": AdaptiveCalibrationError(),
        "aurc": AURC(),
        "risk80": RiskAtCoverage(COVERAGE),
    }
    if num_members >= 2:
        metrics["mutual_information"] = MeanMetric()
        metrics["variation_ratio"] = MeanMetric()
    return metrics


def old_update_uncertainty(
    metrics: dict[str, Metric], logits: Tensor, log_probs: Tensor, target: Tensor, prefix: str = ""
) -> None:
    """``update_uncertainty`` before the "metrics once" issue."""
    probs = log_probs.exp().clamp(0.0, 1.0)
    metrics[f"{prefix}entropy"].update(entropy(log_probs))
    for name in ("aece", "aurc", "risk80"):
        metrics[f"{prefix}{name}"].update(probs, target)
    if f"{prefix}mutual_information" in metrics:
        metrics[f"{prefix}mutual_information"].update(mutual_information(logits))
        metrics[f"{prefix}variation_ratio"].update(variation_ratio(logits))


class OldEnsembleMetrics(nn.Module):
    """``EnsembleMetrics`` before the "metrics once" issue (docstrings shortened): a ``ModuleDict`` of separate
    metrics, ``size_M`` a second copy of the ensemble's."""

    def __init__(self, num_members: int, num_classes: int, aggregation: str = "mean_probs") -> None:
        super().__init__()
        check_int(num_members, "num_members", 1)
        check_int(num_classes, "num_classes", 2)
        validate_aggregation(aggregation)
        self.num_members = num_members
        self.num_classes = num_classes
        self.aggregation = aggregation
        metrics: dict[str, Metric] = {
            "top1": _old_accuracy(num_classes),
            "nll": MeanMetric(),
            "ece": _old_calibration_error(num_classes),
            "brier": MeanMetric(),
        }
        if num_classes >= 5:
            metrics["top5"] = _old_accuracy(num_classes, top_k=5)
        if num_members >= 2:
            metrics["disagreement"] = MeanMetric()
        for i in range(num_members):
            metrics[f"member_{i}/top1"] = _old_accuracy(num_classes)
            metrics[f"member_{i}/nll"] = MeanMetric()
        metrics.update(old_uncertainty_metrics(num_members))
        for k in range(1, num_members + 1):
            metrics[f"size_{k}/top1"] = _old_accuracy(num_classes)
            metrics[f"size_{k}/nll"] = MeanMetric()
            metrics[f"size_{k}/ece"] = _old_calibration_error(num_classes)
            metrics.update(
                {f"size_{k}/{name}": metric for name, metric in old_uncertainty_metrics(k).items()}
            )
        self.metrics = nn.ModuleDict(metrics)

    def __getitem__(self, name: str) -> Metric:
        return cast(Metric, self.metrics[name])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.metrics

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, temperature: Tensor | float | None = None) -> Tensor:
        expected = (self.num_members, target.shape[0], self.num_classes)
        if logits.ndim != 3 or tuple(logits.shape) != expected:
            raise ValueError(
                f"Expected member logits of shape (M, B, C) = {expected}, but got {tuple(logits.shape)}."
            )
        logits = logits.detach().float()
        member_log_probs = logits.log_softmax(dim=-1)
        size_log_probs = first_k = cumulative_log_probs(logits, self.aggregation)  # (M, B, C)
        if temperature is not None:
            last = torch.log_softmax(size_log_probs[-1] / temperature, dim=-1)
            size_log_probs = torch.cat([size_log_probs[:-1], last.unsqueeze(0)])
        size_probs = size_log_probs.exp().clamp(0.0, 1.0)
        member_nll = nll_per_sample(member_log_probs, target)  # (M, B)
        size_nll = nll_per_sample(size_log_probs, target)  # (M, B)
        metrics = cast(dict[str, Metric], self.metrics)
        for i in range(self.num_members):
            self[f"member_{i}/top1"].update(member_log_probs[i], target)
            self[f"member_{i}/nll"].update(member_nll[i])
            self[f"size_{i + 1}/top1"].update(size_probs[i], target)
            self[f"size_{i + 1}/nll"].update(size_nll[i])
            self[f"size_{i + 1}/ece"].update(size_probs[i], target)
            old_update_uncertainty(
                metrics, logits[: i + 1], size_log_probs[i], target, prefix=f"size_{i + 1}/"
            )
        old_update_uncertainty(metrics, logits, size_log_probs[-1], target)
        probs = size_probs[-1]
        self["top1"].update(probs, target)
        self["nll"].update(size_nll[-1])
        self["ece"].update(probs, target)
        self["brier"].update(brier_per_sample(probs, target))
        if "top5" in self.metrics:
            self["top5"].update(probs, target)
        if "disagreement" in self.metrics:
            self["disagreement"].update(disagreement_per_sample(logits))
        return first_k

    def items(self) -> Iterator[tuple[str, Metric]]:
        for name in self.metrics:
            yield name, self[name]

    def compute(self) -> dict[str, Tensor]:
        values = {name: metric.compute() for name, metric in self.items()}
        values["loss"] = torch.stack([values[f"member_{i}/nll"] for i in range(self.num_members)]).sum()
        return values

    def reset(self) -> None:
        for _, metric in self.items():
            metric.reset()


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


def _metrics_epoch(metrics: Any, batches: Sequence[tuple[Tensor, Tensor]]) -> Callable[[], dict[str, Tensor]]:
    """One evaluation epoch of ``metrics``: every batch's update, then the epoch end's compute and reset."""

    def run() -> dict[str, Tensor]:
        for logits, target in batches:
            metrics.update(logits, target)
        values = metrics.compute()
        metrics.reset()
        return cast(dict[str, Tensor], values)

    return run


def bench_evaluation_metrics(
    configs: Sequence[tuple[int, int]], batch: int, batches: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    cpu = torch.device("cpu")
    for members, classes in configs:
        module = EnsembleLightningModule(
            member=functools.partial(nn.Linear, 4, classes), num_members=members, num_classes=classes
        )
        g = torch.Generator().manual_seed(0)
        data = [
            (
                2.0 * torch.randn(members, batch, classes, generator=g),
                torch.randint(0, classes, (batch,), generator=g),
            )
            for _ in range(batches)
        ]
        old = _metrics_epoch(OldEnsembleMetrics(members, classes), data)
        new = _metrics_epoch(module.evaluation_metrics("test"), data)
        expected, got = old(), new()
        assert set(got) == set(expected), set(got) ^ set(expected)
        for name, value in expected.items():  # the same values, bit for bit
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
        samples = time_interleaved({"old": old, "new": new}, repeats=repeats, warmup=1, device=cpu)
        config = {
            "members": members, "batch": batch, "classes": classes, "batches": batches,
            "phase": "update per batch + compute + reset",
        }  # fmt: skip
        rows.append(_row("evaluation_metrics", config, samples, 1))
    return rows


CASES = ("aggregate", "vmap_forward", "first_k", "evaluation_metrics")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: both fixes are host-side")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="folder for hot_paths.json")
    parser.add_argument(
        "--only", default=None, choices=CASES, help="run one case; saves hot_paths_{NAME}.json"
    )
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = CASES if args.only is None else (args.only,)
    rows: list[dict[str, Any]] = []
    if args.tiny:
        run: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "aggregate": lambda: bench_aggregate([(2, 1, 3)], ["mean_probs"], repeats=2, target_s=1e-4),
            "vmap_forward": lambda: bench_vmap_forward(10, 1, 8, [2], repeats=2, target_s=1e-4),
            "first_k": lambda: bench_first_k(3, 4, [3], repeats=2, calls=2),
            "evaluation_metrics": lambda: bench_evaluation_metrics([(3, 6)], 4, 2, repeats=2),
        }
    else:
        shapes = [(m, b, c) for m in (4, 8) for b in (1, 256) for c in (10, 1000)]
        run = {
            "aggregate": lambda: bench_aggregate(shapes, AGGREGATIONS, args.repeats, target_s=5e-3),
            "vmap_forward": lambda: bench_vmap_forward(16, 1, 32, [1, 64], args.repeats, target_s=5e-3),
            "first_k": lambda: bench_first_k(4, 256, [10, 1000], args.repeats, calls=10),
            "evaluation_metrics": lambda: bench_evaluation_metrics(
                [(4, 10), (8, 100)], batch=64, batches=200, repeats=args.repeats
            ),
        }
    for case in cases:
        rows += run[case]()
    for row in rows:
        row["threads"] = torch.get_num_threads()
    return save("hot_paths" if args.only is None else f"hot_paths_{args.only}", rows, args.out)


if __name__ == "__main__":
    main()
