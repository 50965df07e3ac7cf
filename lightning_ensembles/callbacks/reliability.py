"""``ReliabilityDiagram``: accuracy against confidence in equal-width bins, for the ensemble and its members.

The reliability diagram of Guo et al., *On Calibration of Modern Neural Networks* (ICML 2017, arXiv
1706.04599), drawn for the aggregated prediction of a deep ensemble (Lakshminarayanan et al. 2017; the
ensembles of Kondratyuk et al. 2020) and, next to it, for single members: the top-1 confidence of each sample
is put in one of ``n_bins`` equal-width bins, and each bin's accuracy is drawn against the diagonal of perfect
calibration, the gap to its mean confidence shaded, the bin counts as a histogram below. The title carries
the expected calibration error of the same bins,

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|``,

which equals torchmetrics' ``MulticlassCalibrationError(n_bins=n_bins, norm="l1")`` (the library's ``ece``
with :data:`~lightning_ensembles.metrics.ECE_BINS` bins). As there, bins are ``[lo, hi)`` and a confidence of
exactly 1 (a saturated softmax, or a unanimous vote) has a bin of its own, ``[1, 1]``.

The callback reads the member logits ``(M, B, C)`` the evaluation steps of an
:class:`~lightning_ensembles.EnsembleLightningModule` return (no extra forward pass) and keeps only per-bin
sums (:class:`CalibrationBins`, sum-reduced torchmetrics states, correct under DDP). At the end of each chosen
evaluation, on global rank zero, it logs the figure ``reliability/{stage}`` to every logger with
``add_figure`` (TensorBoard), and writes ``reliability_{stage}.png`` and ``reliability_{stage}.json`` (per
curve: bins, counts, accuracy, confidence, ECE) atomically into the run directory (none for a
``fast_dev_run``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_ensembles._validation import check_int, init_arg
from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.callbacks._shared import EvaluationBatchCallback, evaluation_outputs
from lightning_ensembles.metrics import ECE_BINS
from lightning_ensembles.module import as_ensemble
from lightning_ensembles.plotting import (
    GRID_ALPHA,
    close,
    figure_writers,
    log_figure,
    pyplot,
    save_png,
    style_axes,
)
from lightning_ensembles.results import atomic_write_text, run_directory

STAGES = ("val", "test")
ENSEMBLE = "ensemble"


class CalibrationBins(Metric):
    """Per-bin sample counts, sums of top-1 confidence and numbers of correct top-1 predictions.

    Bins follow torchmetrics' ``MulticlassCalibrationError``: ``n_bins`` equal-width bins ``[lo, hi)`` over
    ``[0, 1]``, and one more, ``[1, 1]``, for a confidence of exactly 1. The states are ``(n_bins + 1,)``
    float64 sums reduced with ``"sum"`` across processes; nothing is kept per sample.

    Args:
        n_bins: the number of equal-width bins.

    Raises:
        ValueError: if ``n_bins < 1``.

    Example:
        >>> bins = CalibrationBins(n_bins=2)
        >>> bins.update(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), torch.tensor([0, 0, 0]))
        >>> bins.compute()["count"]
        tensor([0., 3., 0.], dtype=torch.float64)
        >>> round(calibration_error(bins.compute()), 4)  # |2 correct - 2.2 confidence| / 3
        0.0667
    """

    full_state_update = False
    count: Tensor
    confidence: Tensor
    correct: Tensor

    def __init__(self, n_bins: int = ECE_BINS) -> None:
        super().__init__()
        self.n_bins = check_int(n_bins, "n_bins", 1)
        for name in ("count", "confidence", "correct"):
            self.add_state(name, torch.zeros(n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    @override
    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            probs: predicted probabilities, ``(B, C)``.
            target: class indices, ``(B,)``.
        """
        confidence, prediction = probs.detach().max(dim=-1)
        # torchmetrics' own binning (`_binning_bucketize`), in the confidences' precision, so that every
        # sample lands in the same bin as in MulticlassCalibrationError.
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=confidence.dtype, device=confidence.device)
        index = torch.bucketize(confidence, edges, right=True) - 1
        ones = torch.ones_like(confidence, dtype=torch.float64)
        self.count.scatter_add_(0, index, ones)
        self.confidence.scatter_add_(0, index, confidence.double())
        self.correct.scatter_add_(0, index, prediction.eq(target).double())

    @override
    def compute(self) -> dict[str, Tensor]:
        """The summed states.

        Returns:
            ``{"count", "confidence", "correct"}``, each ``(n_bins + 1,)`` float64.
        """
        return {"count": self.count, "confidence": self.confidence, "correct": self.correct}


def bin_edges(n_bins: int) -> list[list[float]]:
    """The ``[lo, hi]`` of each of :class:`CalibrationBins`' ``n_bins + 1`` bins (the last is ``[1, 1]``).

    Example:
        >>> bin_edges(2)
        [[0.0, 0.5], [0.5, 1.0], [1.0, 1.0]]
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist()
    return [[lo, hi] for lo, hi in zip(edges[:-1], edges[1:])] + [[1.0, 1.0]]


def calibration_error(sums: dict[str, Tensor]) -> float:
    """The L1 expected calibration error of the bins, ``sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        sums: :meth:`CalibrationBins.compute`'s ``count``, ``confidence`` and ``correct``.

    Returns:
        The ECE, ``nan`` when no sample was seen.
    """
    total = float(sums["count"].sum())
    if total == 0:
        return math.nan
    return float((sums["correct"] - sums["confidence"]).abs().sum()) / total


def reliability_curve(sums: dict[str, Tensor]) -> dict[str, Any]:
    """One curve of the diagram, as plain numbers.

    Args:
        sums: :meth:`CalibrationBins.compute`'s ``count``, ``confidence`` and ``correct``.

    Returns:
        ``{"bins": [[lo, hi], ...], "count", "accuracy", "confidence", "samples", "ece"}``; accuracy and
        mean confidence are ``None`` for an empty bin.
    """
    count = sums["count"].double().cpu()
    mean = [
        (None, None) if n == 0 else (float(c) / float(n), float(s) / float(n))
        for n, c, s in zip(count.tolist(), sums["correct"].double().cpu(), sums["confidence"].double().cpu())
    ]
    return {
        "bins": bin_edges(count.numel() - 1),
        "count": [int(n) for n in count.tolist()],
        "accuracy": [a for a, _ in mean],
        "confidence": [c for _, c in mean],
        "samples": int(count.sum()),
        "ece": calibration_error(sums),
    }


class ReliabilityDiagram(EvaluationBatchCallback):
    """Reliability diagrams of the ensemble and chosen members, at validation and/or test end.

    Needs an :class:`~lightning_ensembles.EnsembleLightningModule` (it reads the logits its evaluation steps
    return). The ensemble's prediction is the module's ``aggregation`` of all members (its ``ece`` is this
    diagram's ECE); a member's is its own softmax. At test, only loader 0 (in-distribution) counts: loader 1
    may be an OOD set (:mod:`~lightning_ensembles.ood`). Nothing happens during the sanity check.

    Each evaluation's curves are kept in ``results[stage]`` (the layout of ``reliability_{stage}.json``:
    ``stage``, ``epoch``, ``step``, ``n_bins``, ``aggregation`` and ``curves``, ``{"ensemble": ...,
    "member_{i}": ...}`` as :func:`reliability_curve` returns), and in ``state_dict``.

    Args:
        stages: ``"val"`` and/or ``"test"``.
        n_bins: the number of equal-width confidence bins (15, as the library's ``ece``).
        members: the single members drawn next to the ensemble (indices in ``[0, M)``; may be empty).
        figures: draw the figure, to the loggers and to ``reliability_{stage}.png``; the JSON is written
            either way.

    Raises:
        ValueError: for an unknown stage, ``n_bins < 1`` or a negative member index; at setup, for a member
            index ``>= M``.
        TypeError: at setup, if the model is not an ``EnsembleLightningModule``.
    """

    def __init__(
        self,
        stages: Sequence[str] = ("test",),
        n_bins: int = ECE_BINS,
        members: Sequence[int] = (0,),
        figures: bool = True,
    ) -> None:
        bad_stages = [s for s in stages if s not in STAGES]
        if bad_stages or not stages or isinstance(stages, str):
            raise ValueError(
                f"Expected `ReliabilityDiagram(stages=...)` to be a non-empty subset of {list(STAGES)}, "
                f"but got {stages!r}."
            )
        if isinstance(members, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in members
        ):
            raise ValueError(
                "Expected `ReliabilityDiagram(members=...)` to be member indices (ints >= 0), "
                f"but got {members!r}."
            )
        self.stages = tuple(dict.fromkeys(stages))
        self.n_bins = check_int(n_bins, init_arg("ReliabilityDiagram", "n_bins"), 1)
        self.members = tuple(dict.fromkeys(members))
        self.figures = figures
        self.results: dict[str, dict[str, Any]] = {}
        self._bins: nn.ModuleDict | None = None
        self._device = torch.device("cpu")

    @property
    @override
    def state_key(self) -> str:
        # Unique per configuration, so that several diagrams (e.g. val and test) can share a Trainer.
        return self._generate_state_key(stages=self.stages, n_bins=self.n_bins, members=self.members)

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        members = as_ensemble(pl_module, "ReliabilityDiagram").members
        outside = [i for i in self.members if i >= len(members)]
        if outside:
            raise ValueError(
                f"Expected `ReliabilityDiagram(members=...)` to be member indices in [0, {len(members)}) "
                f"(the module has {len(members)} members), but got {list(self.members)}: {outside} "
                "out of range."
            )
        curves = [ENSEMBLE, *(f"member_{i}" for i in self.members)]
        self._bins = nn.ModuleDict({name: CalibrationBins(self.n_bins) for name in curves})
        self._device = torch.device("cpu")

    def _active(self, trainer: Trainer, stage: str) -> bool:
        return stage in self.stages and not trainer.sanity_checking and self._bins is not None

    def _to(self, device: torch.device) -> dict[str, CalibrationBins]:
        assert self._bins is not None  # _active
        if self._device != device:  # setup() runs before Lightning moves the model to its device
            self._bins.to(device)
            self._device = device
        return {name: cast(CalibrationBins, metric) for name, metric in self._bins.items()}

    # ------------------------------------------------------------------ accumulate

    def _update(self, outputs: Any, pl_module: LightningModule) -> None:
        logits, target = evaluation_outputs(outputs, "ReliabilityDiagram")
        logits = logits.float()
        bins = self._to(logits.device)
        aggregation = getattr(pl_module, "aggregation", "mean_probs")
        probs = cumulative_log_probs(logits, aggregation)[-1].exp().clamp(0.0, 1.0)  # (B, C)
        bins[ENSEMBLE].update(probs, target)
        for i in self.members:
            bins[f"member_{i}"].update(logits[i].log_softmax(dim=-1).exp(), target)

    @override
    def on_evaluation_batch(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str, dataloader_idx: int
    ) -> None:
        if self._active(trainer, stage) and (stage == "val" or dataloader_idx == 0):  # test loader 1: OOD
            self._update(outputs, pl_module)

    # ------------------------------------------------------------------ report

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        bins = self._to(pl_module.device)  # every rank, on one device: the sum is a collective under DDP
        curves = {}
        for name, metric in bins.items():
            curves[name] = reliability_curve(metric.compute())
            metric.reset()
        directory = run_directory(trainer)  # every rank: a collective under DDP
        if not trainer.is_global_zero or curves[ENSEMBLE]["samples"] == 0:
            return
        result = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "n_bins": self.n_bins,
            "aggregation": getattr(pl_module, "aggregation", "mean_probs"),
            "curves": curves,
        }
        self.results[stage] = result
        if directory is not None:
            atomic_write_text(directory / f"reliability_{stage}.json", json.dumps(result, indent=2) + "\n")
        if self.figures:
            self._draw(trainer, directory, result)

    def _draw(self, trainer: Trainer, directory: Path | None, result: dict[str, Any]) -> None:
        stage = result["stage"]
        writers = figure_writers(trainer.loggers)
        if not writers and directory is None:
            return
        figure = reliability_figure(
            result["curves"],
            title=f"{stage} after epoch {result['epoch']}: {result['n_bins']} equal-width confidence bins",
        )
        log_figure(writers, f"reliability/{stage}", figure, trainer.global_step)
        if directory is not None:
            save_png(figure, directory / f"reliability_{stage}.png")
        close(figure)

    @override
    def on_evaluation_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._active(trainer, stage):
            self._report(trainer, pl_module, stage)

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))


def reliability_figure(curves: dict[str, dict[str, Any]], title: str = "") -> Any:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal, the gap to the
    bin's mean confidence shaded, the ECE in each title, and the bin counts as a histogram below.

    Args:
        curves: ``{name: curve}``, each as :func:`reliability_curve` returns.
        title: the figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    figure, axes = pyplot().subplots(
        2,
        len(curves),
        figsize=(4.0 * len(curves), 5.0),
        dpi=100,
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": (3, 1)},
    )
    for column, (name, curve) in enumerate(curves.items()):
        top, bottom = axes[0][column], axes[1][column]
        n_bins = len(curve["bins"]) - 1  # the last is [1, 1]
        width = 1.0 / n_bins
        full = [i for i in range(n_bins) if curve["count"][i] > 0]
        lefts = [curve["bins"][i][0] for i in full]
        accuracy = [curve["accuracy"][i] for i in full]
        gap = [curve["confidence"][i] - curve["accuracy"][i] for i in full]
        top.bar(lefts, accuracy, width=width, align="edge", color="C0", edgecolor="black", label="accuracy")
        top.bar(
            lefts,
            gap,
            bottom=accuracy,
            width=width,
            align="edge",
            color="C3",
            alpha=0.3,
            edgecolor="C3",
            hatch="//",
            label="gap to mean confidence",
        )
        saturated = curve["count"][n_bins]
        if saturated:
            top.plot(
                [1.0], [curve["accuracy"][n_bins]], "D", color="C1", label=f"confidence = 1 ({saturated})"
            )
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1.02), ylim=(0, 1), ylabel="accuracy")
        style_axes(
            top, f"{name}: ECE {100 * curve['ece']:.2f}%", title_size=10, legend_size=7, loc="upper left"
        )
        bottom.bar(
            [curve["bins"][i][0] for i in range(n_bins)],
            curve["count"][:n_bins],
            width=width,
            align="edge",
            color="0.6",
            edgecolor="black",
        )
        if saturated:
            bottom.bar([1.0], [saturated], width=width / 4, color="C1")
        bottom.set(xlabel="confidence (top-1 probability)", ylabel="samples")
        bottom.grid(alpha=GRID_ALPHA)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


__all__ = [
    "CalibrationBins",
    "ReliabilityDiagram",
    "bin_edges",
    "calibration_error",
    "reliability_curve",
    "reliability_figure",
]
