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

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["MODES", "EvaluationLogits", "fit_temperature", "scale"]

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
