"""Post-hoc temperature scaling (Guo et al. 2017, *On Calibration of Modern Neural Networks*, arXiv
1706.04599), for an ensemble or for each of its members.

A temperature ``T > 0`` rescales a prediction's log-probabilities, ``p_T ∝ p^(1/T)`` (``softmax(z / T)``
for logits ``z``): it leaves the top-1 class unchanged and trades confidence for calibration. ``T`` is fitted
by minimising the negative log-likelihood on a validation split, in ``log T`` (so ``T`` stays positive) with
L-BFGS. Two modes:

- ``"ensemble"``: one temperature for the ensemble's aggregated prediction,
  ``log_softmax(log p̄ / T)`` (Ashukha et al. 2020, arXiv 2002.06470, recommend calibrating the ensemble,
  not its members);
- ``"members"``: one temperature per member, applied to its logits before they are aggregated.

:class:`~lightning_ensembles.EnsembleLightningModule` (``temperature_scaling="ensemble"|"members"``) fits them
at the end of every validation epoch, keeps them as buffers (so checkpoints hold them and a loaded module
predicts calibrated probabilities), and applies them at test and predict.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_ensembles.aggregation import Aggregation, cumulative_log_probs

__all__ = [
    "MODES",
    "EvaluationLogits",
    "TemperatureScaling",
    "check_validation_split",
    "fit_temperature",
    "load_old_temperature_keys",
    "scale",
]

MODES = ("none", "ensemble", "members")
"""``temperature_scaling`` values: off, one temperature for the ensemble, one per member."""

_BOUNDS = (1e-2, 1e2)  # temperatures outside are clamped: a degenerate split (all right, say) runs off


def scale(log_probs: Tensor, temperature: Tensor | float) -> Tensor:
    """``log_softmax(log_probs / T)``: a prediction's log-probabilities at temperature ``T``.

    Args:
        log_probs: log-probabilities (or logits) ``(..., C)``; ``-inf`` entries stay ``-inf``.
        temperature: ``T > 0`` (a scalar), or one per leading entry broadcast against ``log_probs``.

    Returns:
        Log-probabilities of the same shape.

    Example:
        >>> scale(torch.tensor([0.9, 0.1]).log(), 2.0).exp()  # sqrt(0.9) : sqrt(0.1), normalised
        tensor([0.7500, 0.2500])
    """
    return F.log_softmax(log_probs / temperature, dim=-1)


def fit_temperature(log_probs: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``log_softmax(log_probs / T)`` on ``target``.

    Args:
        log_probs: log-probabilities or logits ``(N, C)`` of a validation split.
        target: class indices ``(N,)``.
        max_iter: L-BFGS iterations.

    Returns:
        ``T`` in ``[0.01, 100]``.

    Raises:
        ValueError: for empty or mismatched inputs.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> logits = 2.0 * torch.randn(20000, 3, generator=generator)
        >>> target = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)  # calibrated
        >>> 3.8 < fit_temperature(4.0 * logits, target) < 4.2  # four times overconfident: T = 4
        True
    """
    if log_probs.ndim != 2 or target.shape != log_probs.shape[:1] or len(target) == 0:
        raise ValueError(
            "Expected validation log-probabilities (N, C) and targets (N,) with N >= 1 to fit a temperature, "
            f"but got {tuple(log_probs.shape)} and {tuple(target.shape)}."
        )
    values = log_probs.detach().double()
    finite = torch.isfinite(values)
    values = torch.where(finite, values, torch.full_like(values, -1e4))  # vote's -inf: a huge negative
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(values / log_t.exp(), target)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]
    temperature = float(log_t.detach().exp())
    if temperature != temperature:  # NaN: keep the prediction as it is
        return 1.0
    return min(max(temperature, _BOUNDS[0]), _BOUNDS[1])


class EvaluationLogits(Metric):
    """Collects the member logits and targets of one evaluation, gathered over processes (uneven shards too).

    Example:
        >>> collected = EvaluationLogits()
        >>> collected.update(torch.zeros(2, 3, 4), torch.tensor([0, 1, 2]))
        >>> [tuple(t.shape) for t in collected.compute()]
        [(2, 3, 4), (3,)]
    """

    full_state_update = False
    logits: list[Tensor]
    target: list[Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one batch: member logits ``(M, B, C)`` and targets ``(B,)``."""
        # (B, M, C), so that torchmetrics' cat over processes joins the samples
        self.logits.append(logits.detach().float().transpose(0, 1))
        self.target.append(target.detach())

    def compute(self) -> tuple[Tensor, Tensor]:
        """Member logits ``(M, N, C)`` and targets ``(N,)`` of every sample seen."""
        return dim_zero_cat(self.logits).transpose(0, 1), dim_zero_cat(self.target)


class TemperatureScaling(nn.Module):
    """The fitted temperatures of an ensemble, as buffers, and how they apply.

    Identity (every temperature 1) until :meth:`fit`. Buffers, so checkpoints keep them and a loaded
    ensemble predicts calibrated probabilities: ``member`` ``(M,)`` divides each member's logits before
    aggregation, ``ensemble`` ``()`` rescales the aggregated log-probabilities.

    Args:
        num_members: ``M``.

    Example:
        >>> temperatures = TemperatureScaling(2)
        >>> logits = torch.randn(2, 5, 3)
        >>> identity = temperatures.log_probs(logits, "mean_probs")  # every temperature 1 until fitted
        >>> torch.allclose(identity, cumulative_log_probs(logits, "mean_probs")[-1], atol=1e-6)
        True
    """

    member: Tensor
    ensemble: Tensor

    def __init__(self, num_members: int) -> None:
        super().__init__()
        self.register_buffer("member", torch.ones(num_members))
        self.register_buffer("ensemble", torch.ones(()))

    def reset(self, num_members: int) -> None:
        """Back to the identity, for ``num_members`` members (after the ensemble grew)."""
        self.member = torch.ones(num_members, device=self.member.device)
        self.ensemble.fill_(1.0)

    def member_logits(self, logits: Tensor) -> Tensor:
        """Member logits ``(M, B, C)`` divided by the member temperatures."""
        return logits / self.member.view(-1, 1, 1)

    def log_probs(self, logits: Tensor, aggregation: Aggregation) -> Tensor:
        """The ensemble's calibrated log-probabilities ``(B, C)`` from member logits ``(M, B, C)``."""
        aggregated = cumulative_log_probs(self.member_logits(logits.float()), aggregation)[-1]
        return scale(aggregated, self.ensemble)

    def fit(
        self, logits: Tensor, target: Tensor, mode: str, aggregation: Aggregation, num_classes: int
    ) -> dict[str, Any]:
        """Fit the temperatures of ``mode`` (``"ensemble"`` or ``"members"``) on validation logits.

        Args:
            logits: member logits ``(M, N, C)`` of the whole validation split.
            target: the labels ``(N,)``.
            mode: one temperature for the aggregate, or one per member (the other is reset to 1).
            aggregation: how the members are combined.
            num_classes: ``C``, for the ECE.

        Returns:
            The validation NLL and ECE before (``uncalibrated/…``) and after (``calibrated/…``), and the
            fitted temperature(s) (``temperature``, or ``member_{i}/temperature``), to be logged under ``val/``.
        """
        from torchmetrics.functional.classification import multiclass_calibration_error

        from lightning_ensembles.metrics import ECE_BINS

        before = cumulative_log_probs(logits, aggregation)[-1]
        if mode == "members":
            fitted = [fit_temperature(member_logits, target) for member_logits in logits]
            self.member.copy_(torch.tensor(fitted, device=logits.device))
            self.ensemble.fill_(1.0)
        else:
            self.member.fill_(1.0)
            self.ensemble.fill_(fit_temperature(before, target))
        after = self.log_probs(logits, aggregation)
        values: dict[str, Any] = {}
        for name, log_probs in (("uncalibrated", before), ("calibrated", after)):
            values[f"{name}/nll"] = F.nll_loss(log_probs.clamp_min(-1e4), target)
            values[f"{name}/ece"] = multiclass_calibration_error(
                log_probs.exp(), target, num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False
            )
        if mode == "members":
            values.update({f"member_{i}/temperature": t for i, t in enumerate(self.member)})
        else:
            values["temperature"] = self.ensemble
        return values


def load_old_temperature_keys(
    ensemble: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """A load-state-dict pre-hook for an ensemble holding a :class:`TemperatureScaling` as ``temperature``.

    State dicts written before the temperatures were that submodule's hold them as ``member_temperature`` and
    ``ensemble_temperature``: renamed to ``temperature.member`` and ``temperature.ensemble``. Those written
    before temperature scaling existed hold none: the identity.
    """
    for old, new in (("member_temperature", "member"), ("ensemble_temperature", "ensemble")):
        if prefix + old in state_dict:
            state_dict.setdefault(f"{prefix}temperature.{new}", state_dict.pop(prefix + old))
    if any(k.startswith(prefix + "members.") for k in state_dict):
        temperature = cast(TemperatureScaling, ensemble.get_submodule("temperature"))
        state_dict.setdefault(f"{prefix}temperature.member", torch.ones_like(temperature.member))
        state_dict.setdefault(f"{prefix}temperature.ensemble", torch.ones_like(temperature.ensemble))


def check_validation_split(trainer: Any, mode: str) -> None:
    """Refuse, at setup, a fit whose temperatures (``mode`` ``"ensemble"`` or ``"members"``) would have no
    validation split of their own to be fitted on.

    Raises:
        ValueError: naming ``--model.temperature_scaling`` and the setting that leaves no validation split.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    flag = f"`--model.temperature_scaling {mode}`"
    datamodule = getattr(trainer, "datamodule", None)
    if getattr(datamodule, "val_size", None) == 0:
        raise ValueError(
            f"{flag} fits its temperatures on a validation split of its own, but `--data.val_size` is 0 "
            "(validation runs on the test split, so fitting there would tune on the test set). Set "
            "`--data.val_size` > 0, or `--model.temperature_scaling none`."
        )
    no_loader = datamodule is not None and not is_overridden("val_dataloader", datamodule)
    if no_loader or trainer.limit_val_batches == 0:
        raise ValueError(
            f"{flag} fits its temperatures on the validation split, but this run has none (no "
            "`val_dataloader`, or `--trainer.limit_val_batches 0`). Give it a validation split, or set "
            "`--model.temperature_scaling none`."
        )
