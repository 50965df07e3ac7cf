"""``CascadeMonitor``: the accuracy-vs-expected-multiply-adds curve of running the members as a cascade.

Wang, Kondratyuk, et al., *Wisdom of Committees* (ICLR 2022, arXiv 2012.01988) run an ensemble's members one
at a time, cheapest first, and let a sample leave once the maximum probability of the averaged prediction
clears a threshold (see :mod:`lightning_ensembles.cascade` for the exact semantics). This callback measures
that on a real run, from the member logits the evaluation steps already return (no extra forward pass):

- at validation end: the cascade curve (one threshold shared by every stage) and, with ``target_accuracy``
  or ``cost_budget_gmacs``, the threshold calibrated on the validation data;
- at test end: the test curve and the calibrated threshold applied to the test data.

Each member's cost is counted once per Trainer by :func:`~lightning_ensembles.cost.member_macs`
(multiply-adds per sample, reported in GMACs; the counts ``FlopsMonitor`` and ``EnsembleSizeAblation`` read
too); members run cheapest first. Keys logged through ``trainer.loggers`` (global rank zero), ``{stage}``
being ``val`` or ``test``:

- ``cascade/{stage}/full/top1``, ``cascade/{stage}/full/nll``, ``cascade/{stage}/full/gmacs``: the full
  ensemble;
- ``cascade/{stage}/calibrated/top1``, ``.../nll``, ``.../expected_gmacs`` (mean multiply-adds per sample),
  ``.../threshold`` (``inf`` when only the full ensemble reaches the target) and ``.../speedup`` (full-ensemble
  GMACs / expected GMACs), when a threshold has been calibrated;
- the TensorBoard figure ``cascade/{stage}/accuracy_vs_expected_gmacs``: the curve, each ensemble size's
  point (the first ``k`` members in running order), the full ensemble and the calibrated point, log-x.

``cascade_{stage}.json`` (the curve, ensemble sizes, full and calibrated points; ``"inf"`` stands for an
infinite value) is written atomically into ``trainer.log_dir`` (or ``default_root_dir``).

Each batch's member logits ``(M, B, C)`` are reduced at once, in their own precision, to the stage outcomes
the cascade needs (:class:`~lightning_ensembles.cascade.CascadeStages`: per stage and sample the confidence,
prediction, correctness and NLL; 25 bytes per member and sample whatever ``C``), kept on the CPU for at most
``max_samples`` samples per evaluation. Unless samples are left out, the full ensemble's accuracy and NLL equal the module's own
``{stage}/top1`` and ``{stage}/nll``. Under DDP every process keeps at most ``ceil(max_samples / world_size)``
samples and the shards are gathered with ``all_gather`` (padded to the longest) at epoch end, so the curve
covers the whole evaluation set (samples the distributed sampler repeats to even out the shards count twice,
as in every DDP metric).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ensembles._validation import check_int, check_shape, init_arg
from lightning_ensembles.callbacks._shared import (
    EvaluationBatchCallback,
    evaluation_outputs,
    resolve_input_shape,
)
from lightning_ensembles.cascade import (
    NEVER_EXIT,
    CascadeResult,
    CascadeStages,
    cascade_order,
    cascade_stages,
)
from lightning_ensembles.cost import member_macs
from lightning_ensembles.module import as_ensemble
from lightning_ensembles.plotting import close, figure_writers, log_figure, pyplot, style_axes
from lightning_ensembles.results import atomic_write_text, run_directory

__all__ = ["CascadeMonitor", "cascade_figure"]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class CascadeMonitor(EvaluationBatchCallback):
    """Cascade curve, calibrated threshold and its test accuracy and expected multiply-adds.

    Needs an :class:`~lightning_ensembles.EnsembleLightningModule` (it reads the ``{"logits": (M, B, C),
    "target": (B,)}`` its evaluation steps return, and, when members run in index order, the first-k
    ensembles they aggregated, ``first_k_log_probs``). Does nothing during the sanity check. The calibrated
    threshold and the last results are kept in :meth:`state_dict`, so a resumed run, or a ``trainer.test``
    after ``trainer.fit``, uses the threshold calibrated on validation data.

    Args:
        target_accuracy: calibrate the cheapest threshold whose validation top-1 accuracy is at least this,
            in ``(0, 1]``.
        cost_budget_gmacs: calibrate the most accurate threshold whose expected cost on the validation data
            is at most this many GMACs (billions of multiply-adds) per sample. At most one of the two; with
            neither, only the curves are reported.
        num_thresholds: points of the reported curves (thresholds evenly spaced over the candidates, see
            :func:`~lightning_ensembles.cascade.cascade_curve`); the calibration always considers them all.
        input_shape: one sample's shape for counting multiply-adds; defaults to the datamodule's
            ``input_shape``.
        max_samples: the most samples kept per evaluation (the rest are left out, with a warning).

    Attributes:
        member_gmacs: GMACs per sample of each member, in member order.
        order: member indices in running order (cheapest first).
        threshold: the calibrated threshold, or ``None``.
        results: ``{stage: report}`` of the last validation and test, as written to ``cascade_{stage}.json``.

    Raises:
        ValueError: for both a target and a budget, a target outside ``(0, 1]``, a budget that is not a finite
            number > 0, ``num_thresholds < 2``, ``max_samples < 1`` or a malformed ``input_shape``; at setup,
            for no input shape, or a budget below the cheapest member's GMACs.
        TypeError: at setup, if the model is not an ``EnsembleLightningModule``.

    Example:
        >>> monitor = CascadeMonitor(target_accuracy=0.9, input_shape=(3, 32, 32))
        >>> monitor.threshold is None, monitor.num_thresholds
        (True, 50)
    """

    def __init__(
        self,
        target_accuracy: float | None = None,
        cost_budget_gmacs: float | None = None,
        num_thresholds: int = 50,
        input_shape: Sequence[int] | None = None,
        max_samples: int = 100_000,
    ) -> None:
        super().__init__()
        if target_accuracy is not None and cost_budget_gmacs is not None:
            raise ValueError(
                f"Expected at most one of `CascadeMonitor(target_accuracy=...)` and `CascadeMonitor(cost_budget_gmacs=...)` (the "
                f"cascade is calibrated for one of them), but got both: {target_accuracy!r} and "
                f"{cost_budget_gmacs!r}."
            )
        if target_accuracy is not None and not (_is_real(target_accuracy) and 0.0 < target_accuracy <= 1.0):
            raise ValueError(
                f"Expected `CascadeMonitor(target_accuracy=...)` to be None or a float in (0, 1], but got "
                f"{target_accuracy!r}."
            )
        if cost_budget_gmacs is not None and not (
            _is_real(cost_budget_gmacs) and math.isfinite(cost_budget_gmacs) and cost_budget_gmacs > 0
        ):
            raise ValueError(
                f"Expected `CascadeMonitor(cost_budget_gmacs=...)` to be None or a finite float > 0 (GMACs per sample), "
                f"but got {cost_budget_gmacs!r}."
            )
        shape = check_shape(input_shape, init_arg("CascadeMonitor", "input_shape"), optional=True)
        self.target_accuracy = None if target_accuracy is None else float(target_accuracy)
        self.cost_budget_gmacs = None if cost_budget_gmacs is None else float(cost_budget_gmacs)
        self.num_thresholds = check_int(num_thresholds, init_arg("CascadeMonitor", "num_thresholds"), 2)
        self.input_shape = shape
        self.max_samples = check_int(max_samples, init_arg("CascadeMonitor", "max_samples"), 1)
        self.member_gmacs: list[float] = []
        self.order: list[int] = []
        self.threshold: float | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self._parts: list[CascadeStages] = []
        self._num_collected = 0
        self._warned_truncation = False
        self._warned_unreachable = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            target_accuracy=self.target_accuracy, cost_budget_gmacs=self.cost_budget_gmacs
        )

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        members = as_ensemble(pl_module, "CascadeMonitor").members
        if len(self.member_gmacs) != len(members):
            shape = self._input_shape(trainer)
            self.member_gmacs = [member_macs(member, shape, scope=trainer) / 1e9 for member in members]
            self.order = list(cascade_order(self.member_gmacs))
        if self.cost_budget_gmacs is not None:
            cheapest = self.order[0]
            if self.cost_budget_gmacs < self.member_gmacs[cheapest]:
                raise ValueError(
                    f"Expected `CascadeMonitor(cost_budget_gmacs=...)` to be at least the cost of the cheapest member, "
                    f"which every sample runs, but the cheapest member (member {cheapest}) costs "
                    f"{self.member_gmacs[cheapest]!r} GMACs and the budget is {self.cost_budget_gmacs!r}."
                )

    def _input_shape(self, trainer: Trainer) -> tuple[int, ...]:
        shape = resolve_input_shape(trainer, self.input_shape, "CascadeMonitor")
        assert shape is not None  # required=True raises instead
        return shape

    def _reset(self) -> None:
        self._parts, self._num_collected = [], 0

    def _collect(self, trainer: Trainer, pl_module: LightningModule, outputs: Any) -> None:
        logits, target = evaluation_outputs(outputs, "CascadeMonitor")
        # the first-k ensembles the module's metrics aggregated: the stages, when members run in index order
        first_k = outputs.get("first_k_log_probs")
        first_k = first_k.detach() if isinstance(first_k, torch.Tensor) else None
        limit = math.ceil(self.max_samples / max(trainer.world_size, 1))
        room = limit - self._num_collected
        if logits.shape[1] > room:
            if not self._warned_truncation:
                rank_zero_warn(
                    f"CascadeMonitor keeps at most {self.max_samples} samples per evaluation "
                    f"(`CascadeMonitor(max_samples=...)`, {limit} per process); the cascade curves leave the rest out."
                )
                self._warned_truncation = True
            logits, target = logits[:, :room], target[:room]
            first_k = None if first_k is None else first_k[:, :room]
        if target.numel() == 0:
            return
        aggregation = str(getattr(pl_module, "aggregation", "mean_probs"))
        self._parts.append(
            cascade_stages(
                logits, target, self.member_gmacs, self.order, aggregation, first_k_log_probs=first_k
            )
        )
        self._num_collected += target.shape[0]

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._reset()

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    @override
    def on_evaluation_batch(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str, dataloader_idx: int
    ) -> None:
        if stage == "val" or dataloader_idx == 0:  # test loader 1 is an OOD set (lightning_ensembles.ood)
            self._collect(trainer, pl_module, outputs)

    def _gathered(self, trainer: Trainer, pl_module: LightningModule) -> CascadeStages | None:
        parts, self._parts, self._num_collected = self._parts, [], 0
        if trainer.world_size <= 1:
            return CascadeStages.cat(parts) if parts else None
        # One float64 tensor (M, n, 4) per process: confidence, prediction, correct, NLL. Pad every shard to
        # the longest, gather (a collective: every rank takes part), cut the padding off.
        num_members = len(self.member_gmacs)
        if parts:
            local = CascadeStages.cat(parts)
            packed = torch.stack(
                [local.confidence, local.prediction.double(), local.correct.double(), local.nll], dim=-1
            )
        else:
            packed = torch.zeros(num_members, 0, 4, dtype=torch.float64)
        device = pl_module.device
        counts = _all_gather(pl_module, torch.tensor(packed.shape[1], device=device)).view(-1).tolist()
        padded = torch.zeros(num_members, max(counts), 4, dtype=torch.float64, device=device)
        padded[:, : packed.shape[1]] = packed.to(device)
        gathered = _all_gather(pl_module, padded).cpu()  # (W, M, max(counts), 4)
        joined = torch.cat([gathered[w, :, :n] for w, n in enumerate(counts)], dim=1)
        if joined.shape[1] == 0:
            return None
        return CascadeStages(
            confidence=joined[..., 0].contiguous(),
            prediction=joined[..., 1].long(),
            correct=joined[..., 2].bool(),
            nll=joined[..., 3].contiguous(),
            costs=tuple(self.member_gmacs),
            order=tuple(self.order),
        )

    # ------------------------------------------------------------------ report

    @override
    def on_evaluation_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stages = self._gathered(trainer, pl_module)  # every rank computes the same numbers
        directory = run_directory(trainer)  # every rank: a collective under DDP
        if stages is None:
            return
        curve = stages.curve(self.num_thresholds)
        sizes = stages.sizes()
        calibrated: CascadeResult | None = None
        if stage == "val" and (self.target_accuracy is not None or self.cost_budget_gmacs is not None):
            self.threshold = None
            try:
                calibrated = stages.calibrate(
                    target_accuracy=self.target_accuracy, cost_budget=self.cost_budget_gmacs
                )
            except ValueError as err:
                if self.target_accuracy is None:  # a budget below the cheapest member is refused at setup
                    raise
                if not self._warned_unreachable:
                    rank_zero_warn(f"CascadeMonitor calibrates no threshold this time: {err}")
                    self._warned_unreachable = True
            else:
                self.threshold = calibrated.threshold if stages.num_members > 1 else NEVER_EXIT
        elif stage == "test" and self.threshold is not None:
            calibrated = stages.evaluate(self.threshold)
        report = self._build(trainer, stage, curve, sizes, calibrated)
        self.results[stage] = report
        if trainer.is_global_zero:
            self._log(trainer, stage, report)
            self._draw(trainer, stage, report)
            if directory is not None:
                text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
                atomic_write_text(directory / f"cascade_{stage}.json", text)

    def _build(
        self,
        trainer: Trainer,
        stage: str,
        curve: list[CascadeResult],
        sizes: list[CascadeResult],
        calibrated: CascadeResult | None,
    ) -> dict[str, Any]:
        full = sizes[-1]
        return {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "num_samples": full.num_samples,
            "order": list(self.order),
            "member_gmacs": list(self.member_gmacs),
            "target_accuracy": self.target_accuracy,
            "cost_budget_gmacs": self.cost_budget_gmacs,
            "full": _in_gmacs(full),
            "sizes": [dict(_in_gmacs(point), k=k) for k, point in enumerate(sizes, start=1)],
            "curve": [_in_gmacs(point) for point in curve],
            "calibrated": None if calibrated is None else _in_gmacs(calibrated),
        }

    def _log(self, trainer: Trainer, stage: str, report: dict[str, Any]) -> None:
        prefix = f"cascade/{stage}"
        full = report["full"]
        scalars = {
            f"{prefix}/full/top1": full["accuracy"],
            f"{prefix}/full/nll": full["nll"],
            f"{prefix}/full/gmacs": full["expected_gmacs"],
        }
        calibrated = report["calibrated"]
        if calibrated is not None:
            scalars[f"{prefix}/calibrated/top1"] = calibrated["accuracy"]
            scalars[f"{prefix}/calibrated/nll"] = calibrated["nll"]
            scalars[f"{prefix}/calibrated/expected_gmacs"] = calibrated["expected_gmacs"]
            scalars[f"{prefix}/calibrated/threshold"] = (
                self.threshold if self.threshold is not None else math.nan
            )
            scalars[f"{prefix}/calibrated/speedup"] = full["expected_gmacs"] / calibrated["expected_gmacs"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    def _draw(self, trainer: Trainer, stage: str, report: dict[str, Any]) -> None:
        writers = figure_writers(trainer.loggers)
        if not writers:
            return
        figure = cascade_figure(report, title=f"{stage}: cascade, cheapest member first")
        log_figure(writers, f"cascade/{stage}/accuracy_vs_expected_gmacs", figure, trainer.global_step)
        close(figure)

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "member_gmacs": list(self.member_gmacs),
            "order": list(self.order),
            "threshold": self.threshold,
            "results": json.loads(json.dumps(_json_safe(self.results))),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.member_gmacs = [float(g) for g in state_dict.get("member_gmacs", [])]
        self.order = [int(i) for i in state_dict.get("order", [])]
        threshold = state_dict.get("threshold")
        self.threshold = None if threshold is None else _from_json(threshold)
        self.results = _from_json(state_dict.get("results", {}))


def _all_gather(pl_module: LightningModule, tensor: Tensor) -> Tensor:
    """``tensor`` from every process, stacked on a new leading axis of size ``world_size``."""
    return cast(Tensor, pl_module.all_gather(tensor))


def _in_gmacs(point: CascadeResult) -> dict[str, Any]:
    values = point.as_dict()
    values["expected_gmacs"] = values.pop("expected_cost")
    values["stage_gmacs"] = values.pop("stage_costs")
    return values


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _minor_tick_label(value: float, _position: int) -> str:
    """Label the minor ticks 2, 3 and 5 of each decade of a log axis, so a narrow range still has labels."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0.0
    return f"{value:g}" if mantissa in (2.0, 3.0, 5.0) else ""


def cascade_figure(report: dict[str, Any], title: str = "") -> Any:
    """Top-1 accuracy against expected GMACs per sample: the cascade curve, sizes, full and calibrated points.

    Args:
        report: a :class:`CascadeMonitor` report (``curve``, ``sizes``, ``full``, ``calibrated``).
        title: the figure title.

    Returns:
        A matplotlib ``Figure`` with a logarithmic x-axis.
    """
    figure, ax = pyplot().subplots(figsize=(5.5, 4.0), dpi=100)
    import matplotlib.ticker

    curve = report["curve"]
    ax.plot(
        [p["expected_gmacs"] for p in curve],
        [100 * p["accuracy"] for p in curve],
        ".-",
        label="cascade (one shared threshold)",
    )
    sizes = report["sizes"]
    xs = [p["expected_gmacs"] for p in sizes]
    ys = [100 * p["accuracy"] for p in sizes]
    ax.plot(xs, ys, "o", label="first k members (no early exit)")
    for point, x, y in zip(sizes, xs, ys):
        ax.annotate(f"k={point['k']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    full = report["full"]
    ax.plot([full["expected_gmacs"]], [100 * full["accuracy"]], "*", markersize=12, label="full ensemble")
    calibrated = report.get("calibrated")
    if calibrated is not None:
        ax.plot(
            [calibrated["expected_gmacs"]],
            [100 * calibrated["accuracy"]],
            "D",
            label=f"calibrated (threshold {calibrated.get('threshold', math.nan):.3g})",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_tick_label))
    ax.set_xlabel("expected GMACs (multiply-adds) per sample")
    ax.set_ylabel("top-1 accuracy (%)")
    style_axes(ax, title, grid="both")
    figure.tight_layout()
    return figure
