"""Per-sample uncertainty of an ensemble's prediction: what deep ensembles are trained for beyond accuracy.

From member logits ``(M, B, C)``:

- ``msp``: the maximum softmax probability of the aggregated prediction, ``max_c p̄_c`` (a confidence:
  high means certain; Hendrycks & Gimpel 2017, arXiv 1610.02136);
- ``entropy``: the predictive entropy ``H[p̄] = -Σ_c p̄_c log p̄_c`` of the aggregated prediction (total
  uncertainty, in nats);
- ``mutual_information``: ``H[mean_m p_m] - mean_m H[p_m]``, the entropy of the mean minus the mean entropy
  of the members (the epistemic part, the members' disagreement; BALD, Houlsby et al. 2011, arXiv
  1112.5745; Depeweg et al. 2018). It uses the mean of the members' probabilities whatever the ensemble's
  aggregation, as its definition does, and is 0 for one member;
- ``variation_ratio``: ``1 - (members voting for the modal class) / M`` (Freeman 1965; 0 when all agree).

Everything is computed in log space from ``log_softmax``, so a member that gives a class probability 0
(``exp`` underflow) contributes ``0 log 0 = 0`` and no NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_ensembles.aggregation import cumulative_log_probs

__all__ = [
    "SCORES",
    "concat_predictions",
    "entropy",
    "mutual_information",
    "uncertainty_scores",
    "variation_ratio",
]

SCORES = ("msp", "entropy", "mutual_information", "variation_ratio")
"""The per-sample scores of :func:`uncertainty_scores`."""


def _check(logits: Tensor) -> None:
    if logits.ndim != 3 or logits.shape[0] < 1:
        raise ValueError(
            f"Expected member logits of shape (M, B, C) with M >= 1, but got shape {tuple(logits.shape)}."
        )


def entropy(log_probs: Tensor) -> Tensor:
    """Entropy in nats of each distribution, from its log-probabilities (``-inf`` allowed: ``0 log 0 = 0``).

    Args:
        log_probs: shape ``(..., C)``.

    Returns:
        Shape ``(...)``, in ``[0, log C]``.

    Example:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]).log())
        tensor([0.6931, 0.0000])
    """
    probs = log_probs.exp()
    terms = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return (-terms.sum(dim=-1)).clamp_min(0.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def mutual_information(logits: Tensor) -> Tensor:
    """The members' mutual information with the prediction: ``H[mean_m p_m] - mean_m H[p_m]``, per sample.

    Args:
        logits: member logits ``(M, B, C)``.

    Returns:
        Shape ``(B,)``, in ``[0, log min(M, C)]`` (clamped at 0 against rounding); 0 for ``M = 1``.

    Example:
        >>> agree = torch.tensor([[[5.0, 0.0]], [[5.0, 0.0]]])
        >>> disagree = torch.tensor([[[50.0, 0.0]], [[0.0, 50.0]]])
        >>> mutual_information(agree).round(decimals=4), mutual_information(disagree)
        (tensor([0.]), tensor([0.6931]))
    """
    _check(logits)
    member_log_probs = logits.float().log_softmax(dim=-1)
    mean_log_probs = torch.logsumexp(member_log_probs, dim=0) - math.log(logits.shape[0])
    return (entropy(mean_log_probs) - entropy(member_log_probs).mean(dim=0)).clamp_min(0.0)


def variation_ratio(logits: Tensor) -> Tensor:
    """``1 - (votes of the modal class) / M``: the fraction of members that do not vote with the majority.

    Args:
        logits: member logits ``(M, B, C)``.

    Returns:
        Shape ``(B,)``, in ``[0, 1 - 1/M]``.

    Example:
        >>> votes = torch.tensor([[[1.0, 0, 0]], [[1.0, 0, 0]], [[0, 1.0, 0]]])
        >>> variation_ratio(votes)
        tensor([0.3333])
    """
    _check(logits)
    counts = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).sum(dim=0)  # (B, C)
    return 1.0 - counts.max(dim=-1).values.float() / logits.shape[0]


def uncertainty_scores(
    logits: Tensor, aggregation: str = "mean_probs", log_probs: Tensor | None = None
) -> dict[str, Tensor]:
    """Every score of :data:`SCORES` for each sample.

    Args:
        logits: member logits ``(M, B, C)``.
        aggregation: how the ensemble combines its members (``msp`` and ``entropy`` are of that prediction).
        log_probs: the aggregated log-probabilities ``(B, C)`` if already computed.

    Returns:
        ``{"msp", "entropy", "mutual_information", "variation_ratio"}``, each of shape ``(B,)``.

    Example:
        >>> scores = uncertainty_scores(torch.tensor([[[50.0, 0.0]], [[0.0, 50.0]]]))
        >>> {name: round(float(v), 4) for name, v in scores.items()}
        {'msp': 0.5, 'entropy': 0.6931, 'mutual_information': 0.6931, 'variation_ratio': 0.5}
    """
    _check(logits)
    logits = logits.float()
    if log_probs is None:
        log_probs = cumulative_log_probs(logits, aggregation)[-1]
    return {
        "msp": log_probs.exp().max(dim=-1).values.clamp(0.0, 1.0),
        "entropy": entropy(log_probs),
        "mutual_information": mutual_information(logits),
        "variation_ratio": variation_ratio(logits),
    }


def concat_predictions(batches: list[dict[str, Tensor]] | None) -> dict[str, Tensor]:
    """Join the per-batch dicts of ``trainer.predict(ensemble, loader)`` into one dict of tensors.

    Args:
        batches: what ``trainer.predict`` returned (one dict per batch).

    Returns:
        Each key's tensors concatenated along the samples (``member_probs`` along its batch axis, 1).

    Raises:
        ValueError: if ``batches`` is empty or ``None``.

    Example:
        >>> concat_predictions([{"entropy": torch.zeros(2)}, {"entropy": torch.ones(1)}])["entropy"]
        tensor([0., 0., 1.])
    """
    if not batches:
        raise ValueError(
            f"Expected `batches` to be the non-empty list trainer.predict returns, but got {batches!r}."
        )
    return {
        key: torch.cat([batch[key] for batch in batches], dim=1 if key == "member_probs" else 0)
        for key in batches[0]
    }
