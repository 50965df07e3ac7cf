"""Ensemble-size ablation: metrics for every ensemble size k = 1..M next to its cost.

Kondratyuk et al. 2020 draw one point per ensemble size, accuracy against multiply-adds (and latency). This
callback computes those points from one run: for every k, the metrics of the first k members, and their
average over random subsets of size k, which removes the luck of which members happen to come first (all
subsets are used when there are at most ``num_subsets`` of them). Each point carries its multiply-adds
(counted on the meta device once per Trainer by :func:`~lightning_ensembles.cost.member_macs`, the counts
``FlopsMonitor`` and ``CascadeMonitor`` read too) and, optionally, its measured latency in every requested
mode (sequential, fused, parallel; :mod:`lightning_ensembles.latency`), measured once per Trainer and shared
with :class:`~lightning_ensembles.callbacks.LatencyMonitor` through the latency layer, so that both log the
same numbers. Results go to the loggers as scalars, to TensorBoard as figures (accuracy vs GMACs, accuracy
vs latency), and to ``ablation_{stage}.csv`` / ``.json`` in the run directory.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassCalibrationError
from typing_extensions import override

from lightning_ensembles._validation import check_int, init_arg
from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.callbacks._shared import (
    EvaluationBatchCallback,
    evaluation_outputs,
    measure_latency,
    measuring_on_trainer,
    resolve_input_shape,
    restore_class_keyed_state,
)
from lightning_ensembles.cost import member_macs
from lightning_ensembles.latency import check_fused_members, check_mode
from lightning_ensembles.metrics import (
    AURC,
    COVERAGE,
    ECE_BINS,
    SIZE_METRIC_HEADERS,
    SIZE_METRICS,
    AdaptiveCalibrationError,
    RiskAtCoverage,
    nll_per_sample,
)
from lightning_ensembles.module import as_ensemble
from lightning_ensembles.ood import ood_scores
from lightning_ensembles.plotting import close, figure_writers, log_figure, pyplot, style_axes
from lightning_ensembles.results import atomic_write_text, run_directory

if TYPE_CHECKING:
    from lightning_ensembles.module import EnsembleLightningModule

METRICS = SIZE_METRICS
"""Accuracy, NLL, calibration (15-bin and equal-mass ECE), selective classification (AURC, the risk at 80%
coverage) and OOD detection (``ood_auroc``, logged at test when the datamodule has an OOD loader): the one list
:data:`lightning_ensembles.metrics.SIZE_METRICS`, which :mod:`lightning_ensembles.compare` reads back."""
OOD_CRITERION = "entropy"  # defined for every k, unlike mutual information (0 for one member)
STAGES = ("val", "test")


def _make_metric(name: str, num_classes: int) -> Metric:
    if name == "top1":
        return MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
    if name == "ece":
        return MulticlassCalibrationError(num_classes=num_classes, n_bins=ECE_BINS, validate_args=False)
    if name == "aece":
        return AdaptiveCalibrationError(ECE_BINS)
    if name == "aurc":
        return AURC()
    if name == "risk80":
        return RiskAtCoverage(COVERAGE)
    if name == "ood_auroc":
        return BinaryAUROC(thresholds=None, validate_args=False)
    return MeanMetric()


def choose_subsets(num_members: int, num_subsets: int, seed: int) -> dict[int, list[tuple[int, ...]]]:
    """The member subsets evaluated for every size ``k``: all of them, or ``num_subsets`` random ones.

    Args:
        num_members: ``M``.
        num_subsets: the most subsets per size.
        seed: seed of the random choice.

    Returns:
        ``{k: [subset, ...]}``; each subset is a sorted tuple of member indices.

    Example:
        >>> choose_subsets(3, 10, seed=0)[2]
        [(0, 1), (0, 2), (1, 2)]
    """
    rng = random.Random(seed)
    chosen: dict[int, list[tuple[int, ...]]] = {}
    for k in range(1, num_members + 1):
        if math.comb(num_members, k) <= num_subsets:
            chosen[k] = list(itertools.combinations(range(num_members), k))
            continue
        picked: set[tuple[int, ...]] = set()
        while len(picked) < num_subsets:
            picked.add(tuple(sorted(rng.sample(range(num_members), k))))
        chosen[k] = sorted(picked)
    return chosen


class EnsembleSizeAblation(EvaluationBatchCallback):
    """Metrics, multiply-adds and latency for every ensemble size, at validation and test end.

    Needs an :class:`~lightning_ensembles.EnsembleLightningModule` (it reads the logits its evaluation steps
    return, so members run once).

    Args:
        metrics: any of :data:`METRICS` (default: all): ``"top1"``, ``"nll"``, ``"ece"``, ``"aece"``
            (equal-mass ECE), ``"aurc"`` and ``"risk80"`` (selective classification).
        num_subsets: the most random subsets averaged per size (all subsets when there are fewer).
        seed: seed of the subset choice.
        stages: ``"val"`` and/or ``"test"``.
        input_shape: one sample's shape for counting multiply-adds; defaults to the datamodule's
            ``input_shape``. With neither, points carry no cost.
        latency_batch_size: batch size of the latency measured once per run for every size (first-k members),
            or ``None`` not to measure.
        latency_modes: the modes to measure latency in, each one of
            :data:`~lightning_ensembles.latency.MODES` (``"parallel"`` with its default workers). The first one
            is the row's ``latency_ms`` (drawn against accuracy); every mode has its ``latency_ms/{mode}`` column.
            Measured with :data:`~lightning_ensembles.latency.DEFAULT_WARMUP` and
            :data:`~lightning_ensembles.latency.DEFAULT_REPEATS` runs, as ``LatencyMonitor``'s defaults, under
            the Trainer's precision, shared within the Trainer: where ``LatencyMonitor`` measures the same
            configuration, one measurement serves both.
        figures: draw the accuracy-vs-cost figures into TensorBoard.
        verbose: log the table of every ensemble size (k, GMACs, metrics) at the end of each evaluation, on
            rank 0, as the recipes' results table does.

    Raises:
        ValueError: for an unknown metric, stage or latency mode, or ``num_subsets < 1``.
        TypeError: when the run starts, if the model is not an ``EnsembleLightningModule``.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRICS,
        num_subsets: int = 10,
        seed: int = 0,
        stages: Sequence[str] = STAGES,
        input_shape: Sequence[int] | None = None,
        latency_batch_size: int | None = 1,
        latency_modes: Sequence[str] = ("sequential",),
        figures: bool = True,
        verbose: bool = True,
    ) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(
                f"Expected `EnsembleSizeAblation(metrics=...)` to be a non-empty subset of {list(METRICS)}, "
                f"but got {list(metrics)}."
            )
        bad_stages = [s for s in stages if s not in STAGES]
        if bad_stages or not stages:
            raise ValueError(
                f"Expected `EnsembleSizeAblation(stages=...)` to be a non-empty subset of {list(STAGES)}, "
                f"but got {list(stages)}."
            )
        self.metric_names = tuple(metrics)
        self.num_subsets = check_int(num_subsets, init_arg("EnsembleSizeAblation", "num_subsets"), 1)
        self.seed = seed
        self.stages = tuple(stages)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.latency_batch_size = (
            None
            if latency_batch_size is None
            else check_int(latency_batch_size, init_arg("EnsembleSizeAblation", "latency_batch_size"), 1)
        )
        if isinstance(latency_modes, str) or not isinstance(latency_modes, Sequence) or not latency_modes:
            raise ValueError(
                f"Expected `EnsembleSizeAblation(latency_modes=...)` to be a non-empty sequence of mode names, but got {latency_modes!r}."
            )
        self.latency_modes = tuple(
            dict.fromkeys(
                check_mode(m, init_arg("EnsembleSizeAblation", "latency_modes")) for m in latency_modes
            )
        )
        self.figures = figures
        self.verbose = verbose
        self.subsets: dict[int, list[tuple[int, ...]]] = {}
        self.macs: list[int] = []
        self.latency_ms: dict[int, float] = {}
        self.latency_ms_by_mode: dict[str, dict[int, float]] = {}
        self.history: list[dict[str, Any]] = []
        self._metrics: nn.ModuleDict | None = None
        self._from_module: dict[str, tuple[str, ...]] = {}  # subset key -> names read from the module
        self._device = torch.device("cpu")
        self._ood_loader = False  # whether this test has an OOD loader (index 1)
        # Host clock of the latency measurement off CUDA; None means `time.perf_counter`. Tests fake it.
        self._clock: Callable[[], float] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            metrics=self.metric_names,
            num_subsets=self.num_subsets,
            seed=self.seed,
            stages=self.stages,
            input_shape=self.input_shape,
            latency_batch_size=self.latency_batch_size,
            latency_modes=self.latency_modes,
        )

    # ------------------------------------------------------------------ setup

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ensemble = as_ensemble(pl_module, "EnsembleSizeAblation")
        members = ensemble.members
        num_members = len(members)
        if "fused" in self.latency_modes and self.latency_batch_size is not None:
            check_fused_members(list(members), init_arg("EnsembleSizeAblation", "latency_modes"))
        if len({m for s in self.subsets.values() for subset in s for m in subset}) != num_members:
            self.subsets = choose_subsets(num_members, self.num_subsets, self.seed)
        # the random subsets, and the first-k members of every size (a random pick may miss those)
        chosen = {subset for subsets in self.subsets.values() for subset in subsets}
        unique = sorted(chosen | {tuple(range(k)) for k in self.subsets}, key=lambda s: (len(s), s))
        # The first k members' metrics the module computes itself (`size_{k}/...`) are read from it, not
        # computed again; the ablation keeps metrics of its own for the other subsets and names.
        computed = ensemble.evaluation_metrics("val")
        self._from_module = {
            _key(subset): tuple(
                name for name in self.metric_names if f"size_{len(subset)}/{name}" in computed
            )
            for subset in unique
            if subset == tuple(range(len(subset)))
        }
        num_classes = cast(int, pl_module.num_classes)
        self._metrics = nn.ModuleDict(
            {
                _key(subset): nn.ModuleDict(
                    {
                        name: _make_metric(name, num_classes)
                        for name in self.metric_names
                        if name not in self._from_module.get(_key(subset), ())
                    }
                )
                for subset in unique
            }
        )
        self._device = torch.device("cpu")
        shape = resolve_input_shape(trainer, self.input_shape, "EnsembleSizeAblation", required=False)
        if shape is not None and len(self.macs) != num_members:
            self.macs = [member_macs(member, shape, scope=trainer) for member in members]  # one count per run

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._prepare(trainer, pl_module)

    def _active(self, trainer: Trainer, stage: str) -> bool:
        return stage in self.stages and not trainer.sanity_checking and self._metrics is not None

    # ------------------------------------------------------------------ accumulate

    def _update(self, outputs: Any, pl_module: LightningModule, ood_loader: bool = False) -> None:
        if ood_loader:  # the OOD test loader: only the OOD metric, with these samples as positives
            self._update_ood(outputs, pl_module)
            return
        logits, target = evaluation_outputs(outputs, "EnsembleSizeAblation")
        logits = logits.float()
        first_k = outputs.get("first_k_log_probs")  # aggregated by the module's metrics already
        assert self._metrics is not None
        if self._device != logits.device:  # setup() runs before Lightning moves the model to its device
            self._metrics.to(logits.device)
            self._device = logits.device
        aggregation = getattr(pl_module, "aggregation", "mean_probs")
        for key, group in self._metrics.items():
            if not len(cast(nn.ModuleDict, group)):  # every metric of this subset is read from the module
                continue
            subset = [int(i) for i in key.split("_")]
            if isinstance(first_k, torch.Tensor) and key in self._from_module:
                log_probs = first_k[len(subset) - 1].float()
            else:
                log_probs = cumulative_log_probs(logits[subset], aggregation)[-1]
            probs = log_probs.exp().clamp(0.0, 1.0)
            for name, metric in _metrics_of(group):
                if name == "nll":
                    metric.update(nll_per_sample(log_probs, target))
                elif name == "ood_auroc":
                    if self._ood_loader:
                        score = ood_scores(logits[subset], [OOD_CRITERION], log_probs=log_probs)[
                            OOD_CRITERION
                        ]
                        metric.update(score, torch.zeros_like(target))
                else:
                    metric.update(probs, target)

    def _update_ood(self, outputs: Any, pl_module: LightningModule) -> None:
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if (
            not isinstance(logits, torch.Tensor)
            or self._metrics is None
            or "ood_auroc" not in self.metric_names
        ):
            return
        logits = logits.float()
        if self._device != logits.device:
            self._metrics.to(logits.device)
            self._device = logits.device
        aggregation = getattr(pl_module, "aggregation", "mean_probs")
        positives = torch.ones(logits.shape[1], dtype=torch.long, device=logits.device)
        for key, group in self._metrics.items():
            if "ood_auroc" not in cast(nn.ModuleDict, group):
                continue
            subset = [int(i) for i in key.split("_")]
            score = ood_scores(logits[subset], [OOD_CRITERION], aggregation)[OOD_CRITERION]
            cast(Metric, cast(nn.ModuleDict, group)["ood_auroc"]).update(score, positives)

    @override
    def on_evaluation_batch(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str, dataloader_idx: int
    ) -> None:
        if not self._active(trainer, stage):
            return
        if stage == "val":
            self._update(outputs, pl_module)
        elif dataloader_idx in (0, 1):  # test loader 1: an OOD set (ood.py)
            self._update(outputs, pl_module, ood_loader=dataloader_idx == 1)

    # ------------------------------------------------------------------ report

    def _compute(self, pl_module: LightningModule, stage: str) -> dict[str, dict[str, float]]:
        assert self._metrics is not None
        # the module's values, computed (and synchronised) once: it logs the same ones after this hook
        computed = as_ensemble(pl_module, "EnsembleSizeAblation").evaluation_metrics(stage).compute()
        values = {}
        for key, group in self._metrics.items():
            values[key] = {
                name: float(metric.compute())
                for name, metric in _metrics_of(group)
                if name != "ood_auroc" or self._ood_loader  # OOD: only where a test OOD loader ran
            }
            for _, metric in _metrics_of(group):
                metric.reset()
            # the first k members: the module's own values (it logs and resets them after this hook)
            k = len(key.split("_"))
            for name in self._from_module.get(key, ()):
                values[key][name] = float(computed[f"size_{k}/{name}"])
        return values

    def _rows(
        self, stage: str, trainer: Trainer, values: dict[str, dict[str, float]]
    ) -> list[dict[str, Any]]:
        rows = []
        for k, subsets in sorted(self.subsets.items()):
            row: dict[str, Any] = {
                "stage": stage,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
            }
            row["k"] = k
            row["num_subsets"] = len(subsets)
            first = values[_key(tuple(range(k)))]
            for name in self.metric_names:
                if name not in first:
                    continue
                row[f"first_{name}"] = first[name]
                row[f"random_{name}"] = sum(values[_key(s)][name] for s in subsets) / len(subsets)
            if self.macs:
                row["first_gmacs"] = sum(self.macs[:k]) / 1e9
                row["random_gmacs"] = sum(sum(self.macs[i] for i in s) for s in subsets) / len(subsets) / 1e9
            if k in self.latency_ms:
                row["latency_ms"] = self.latency_ms[k]
            for mode, latency in self.latency_ms_by_mode.items():
                if k in latency:
                    row[f"latency_ms/{mode}"] = latency[k]
            rows.append(row)
        return rows

    def _measure_latency(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Measure every latency mode once per run; return the ``latency/...`` scalars of a new measurement."""
        if self.latency_batch_size is None or self.latency_ms:
            return {}
        shape = resolve_input_shape(trainer, self.input_shape, "EnsembleSizeAblation", required=False)
        if shape is None:
            return {}
        module = cast("EnsembleLightningModule", pl_module)
        scalars: dict[str, float] = {}
        with measuring_on_trainer(trainer, module):
            for mode in self.latency_modes:
                # DEFAULT_WARMUP and DEFAULT_REPEATS runs, as LatencyMonitor's defaults
                stats, measured = measure_latency(
                    trainer, module, shape, mode, self.latency_batch_size, clock=self._clock
                )
                self.latency_ms_by_mode[mode] = {int(k): float(s.p50_ms) for k, s in stats.items()}
                scalars.update(measured)
        self.latency_ms = dict(self.latency_ms_by_mode[self.latency_modes[0]])
        return scalars

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        values = self._compute(pl_module, stage)  # every rank: torchmetrics synchronises the states
        directory = run_directory(trainer)  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        scalars = self._measure_latency(trainer, pl_module)
        rows = self._rows(stage, trainer, values)
        self.history.extend(rows)
        for row in rows:
            prefix = f"ablation/{stage}"
            for name in self.metric_names:
                if f"first_{name}" not in row:
                    continue
                scalars[f"{prefix}/first/size_{row['k']}/{name}"] = row[f"first_{name}"]
                scalars[f"{prefix}/random/size_{row['k']}/{name}"] = row[f"random_{name}"]
            if "first_gmacs" in row:
                scalars[f"{prefix}/size_{row['k']}/gmacs"] = row["first_gmacs"]
                scalars[f"{prefix}/first/size_{row['k']}/gmacs"] = row["first_gmacs"]
                scalars[f"{prefix}/random/size_{row['k']}/gmacs"] = row["random_gmacs"]
            if "latency_ms" in row:
                scalars[f"{prefix}/size_{row['k']}/latency_ms"] = row["latency_ms"]
            for mode in self.latency_modes:
                if f"latency_ms/{mode}" in row:
                    scalars[f"{prefix}/size_{row['k']}/latency_ms/{mode}"] = row[f"latency_ms/{mode}"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        if self.figures:
            self._draw(trainer, stage, rows)
        if directory is not None:
            self._write(directory, stage)
        if self.verbose:
            shown = [name for name in self.metric_names if rows and f"random_{name}" in rows[0]]
            rank_zero_info(format_ablation(rows, stage, trainer.current_epoch, shown))

    def _draw(self, trainer: Trainer, stage: str, rows: list[dict[str, Any]]) -> None:
        writers = figure_writers(trainer.loggers)
        if not writers or "top1" not in self.metric_names:
            return
        for axis, label in (("gmacs", "GMACs (multiply-adds) per sample"), ("latency_ms", "latency (ms)")):
            if not all(f"first_{axis}" in r or axis in r for r in rows):
                continue
            figure = accuracy_figure(rows, axis, label, title=f"{stage}: one point per ensemble size k")
            log_figure(writers, f"ablation/{stage}/accuracy_vs_{axis}", figure, trainer.global_step)
            close(figure)

    def _write(self, directory: Path, stage: str) -> None:
        rows = [row for row in self.history if row["stage"] == stage]
        buffer = io.StringIO()
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(directory / f"ablation_{stage}.csv", buffer.getvalue())
        atomic_write_text(directory / f"ablation_{stage}.json", json.dumps(rows, indent=2) + "\n")

    @override
    def on_evaluation_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._active(trainer, stage):
            self._report(trainer, pl_module, stage)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.test_dataloaders
        self._ood_loader = isinstance(loaders, (list, tuple)) and len(loaders) > 1

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ood_loader = False

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "subsets": {k: [list(s) for s in v] for k, v in self.subsets.items()},
            "macs": list(self.macs),
            "latency_ms": dict(self.latency_ms),
            "latency_ms_by_mode": {mode: dict(v) for mode, v in self.latency_ms_by_mode.items()},
            "history": list(self.history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.subsets = {int(k): [tuple(s) for s in v] for k, v in state_dict.get("subsets", {}).items()}
        self.macs = list(state_dict.get("macs", []))
        self.latency_ms = {int(k): float(v) for k, v in state_dict.get("latency_ms", {}).items()}
        self.latency_ms_by_mode = {
            str(mode): {int(k): float(v) for k, v in values.items()}
            for mode, values in state_dict.get("latency_ms_by_mode", {}).items()
        }
        self.history = list(state_dict.get("history", []))

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        restore_class_keyed_state(self, checkpoint)


def format_ablation(rows: Sequence[dict[str, Any]], stage: str, epoch: int, metrics: Sequence[str]) -> str:
    """The console table of one evaluation: one row per ensemble size, random-subset means (first k in
    brackets for top-1).

    Example:
        >>> rows = [{"k": 1, "random_gmacs": 0.0016, "first_top1": 0.98, "random_top1": 0.985, "random_nll": 0.05}]
        >>> print(format_ablation(rows, "test", 9, ["top1", "nll"]))
        EnsembleSizeAblation, test after epoch 9 (mean over k-subsets; top-1 of the first k members in brackets)
        | k | GMACs | top-1 (%) | NLL |
        |---:|---:|---:|---:|
        | 1 | 0.0016 | 98.50 (98.00) | 0.0500 |
    """
    names = SIZE_METRIC_HEADERS
    lines = [
        f"EnsembleSizeAblation, {stage} after epoch {epoch} (mean over k-subsets; top-1 of the first k members "
        "in brackets)",
        "| k | GMACs | " + " | ".join(names[m] for m in metrics) + " |",
        "|---:|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        gmacs = f"{row['random_gmacs']:.4g}" if "random_gmacs" in row else ""
        cells = []
        for name in metrics:
            if name == "top1":
                cells.append(f"{100 * row['random_top1']:.2f} ({100 * row['first_top1']:.2f})")
            else:
                cells.append(f"{row[f'random_{name}']:.4f}")
        lines.append(f"| {row['k']} | {gmacs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metrics_of(group: nn.Module) -> list[tuple[str, Metric]]:
    return [(name, cast(Metric, metric)) for name, metric in cast(nn.ModuleDict, group).items()]


def _key(subset: Sequence[int]) -> str:
    return "_".join(str(i) for i in subset)


def accuracy_figure(rows: Sequence[dict[str, Any]], axis: str, label: str, title: str = "") -> Any:
    """Top-1 accuracy against a cost, one point per ensemble size, first-k and random-subset curves.

    Args:
        rows: ablation rows (``k``, ``first_top1``, ``random_top1`` and the cost columns).
        axis: ``"gmacs"`` or ``"latency_ms"``.
        label: the x-axis label.
        title: the figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    figure, ax = pyplot().subplots(figsize=(5.5, 4.0), dpi=100)
    for kind, marker in (("first", "o-"), ("random", "s--")):
        xs = [r[f"{kind}_gmacs"] if axis == "gmacs" else r["latency_ms"] for r in rows]
        ys = [100 * r[f"{kind}_top1"] for r in rows]
        ax.plot(
            xs, ys, marker, label=f"{'first k members' if kind == 'first' else 'random k-subsets (mean)'}"
        )
        if kind == "first":
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"k={r['k']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    style_axes(ax, title)
    figure.tight_layout()
    return figure


__all__ = ["EnsembleSizeAblation", "accuracy_figure", "choose_subsets"]
