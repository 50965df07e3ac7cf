"""Combining member predictions into one ensemble prediction.

Kondratyuk et al. 2020 (arXiv 2005.00570) average the members' outputs; deep-ensemble baselines
(uncertainty-baselines) average the members' softmax probabilities, so that is the default here. Mean of
logits and majority vote are offered for comparison.

Every function takes member logits with the ensemble axis first, ``(M, B, C)``, and returns probabilities.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "aggregate",
    "cumulative_log_probs",
    "cumulative_probs",
    "validate_aggregation",
]

Aggregation = Literal["mean_probs", "mean_logits", "vote"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def validate_aggregation(aggregation: str, flag: str = "--model.aggregation") -> None:
    """Raise a clear error unless ``aggregation`` is one of :data:`AGGREGATIONS`.

    Args:
        aggregation: the name to check.
        flag: the CLI flag to name in the message.

    Raises:
        ValueError: for an unknown name.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Expected `{flag}` to be one of {list(AGGREGATIONS)}, but got {aggregation!r}.")


def _check_logits(logits: Tensor) -> None:
    if logits.ndim != 3 or logits.shape[0] < 1:
        raise ValueError(
            f"Expected member logits of shape (M, B, C) with M >= 1, but got shape {tuple(logits.shape)}."
        )


def cumulative_log_probs(logits: Tensor, aggregation: str = "mean_probs") -> Tensor:
    """Log-probabilities of the ensemble of the first ``k`` members, for every ``k = 1..M`` at once.

    Computed in log space (``logcumsumexp`` of member log-softmax for ``"mean_probs"``), so the ensemble NLL
    stays finite and exact where a member's softmax underflows.

    Args:
        logits: member logits, shape ``(M, B, C)``.
        aggregation: ``"mean_probs"`` (average of softmax probabilities), ``"mean_logits"`` (softmax of the
            average logits) or ``"vote"`` (fraction of members whose top-1 class is each class; ties go to
            the lowest class index under ``argmax``; classes without votes get ``-inf``).

    Returns:
        Log-probabilities of shape ``(M, B, C)``: entry ``k - 1`` is the ensemble of the first ``k`` members.

    Raises:
        ValueError: for an unknown aggregation or logits that are not ``(M, B, C)``.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, 50.0]]])  # M=2, B=1, C=2
        >>> cumulative_log_probs(logits)[-1].exp()
        tensor([[0.2500, 0.7500]])
    """
    validate_aggregation(aggregation)
    _check_logits(logits)
    logits = logits.float()
    sizes = torch.arange(1, logits.shape[0] + 1, device=logits.device, dtype=logits.dtype).view(-1, 1, 1)
    if aggregation == "mean_probs":
        return torch.logcumsumexp(logits.log_softmax(dim=-1), dim=0) - sizes.log()
    if aggregation == "mean_logits":
        return (logits.cumsum(dim=0) / sizes).log_softmax(dim=-1)
    votes = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return (votes.cumsum(dim=0) / sizes).log()


def cumulative_probs(logits: Tensor, aggregation: str = "mean_probs") -> Tensor:
    """Probabilities of the ensemble of the first ``k`` members, for every ``k = 1..M`` at once.

    Args:
        logits: member logits, shape ``(M, B, C)``.
        aggregation: see :func:`cumulative_log_probs`.

    Returns:
        Probabilities in ``[0, 1]`` of shape ``(M, B, C)``: entry ``k - 1`` is the ensemble of the first ``k``
        members.

    Raises:
        ValueError: for an unknown aggregation or logits that are not ``(M, B, C)``.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # M=2, B=1, C=2
        >>> cumulative_probs(logits, "vote")
        tensor([[[1.0000, 0.0000]],
        <BLANKLINE>
                [[0.5000, 0.5000]]])
    """
    return cumulative_log_probs(logits, aggregation).exp().clamp(0.0, 1.0)


def aggregate(logits: Tensor, aggregation: str = "mean_probs") -> Tensor:
    """Ensemble probabilities of all ``M`` members.

    Only the full ensemble is computed, in probability space (the mean of the members' softmax, the softmax
    of the mean logits, or the vote fractions), without the ``M`` cumulative ensembles of
    :func:`cumulative_probs`. It equals ``cumulative_probs(logits, aggregation)[-1]`` up to float rounding
    (a few units in the last place), not bit for bit; the metrics, the ablation and the cascades all use
    :func:`cumulative_log_probs`, so they agree with each other exactly.

    Args:
        logits: member logits, shape ``(M, B, C)``.
        aggregation: see :func:`cumulative_probs`.

    Returns:
        Probabilities of shape ``(B, C)``.

    Raises:
        ValueError: for an unknown aggregation or logits that are not ``(M, B, C)``.

    Example:
        >>> logits = torch.zeros(3, 4, 5)
        >>> aggregate(logits).shape
        torch.Size([4, 5])
    """
    validate_aggregation(aggregation)
    _check_logits(logits)
    logits = logits.float()
    if aggregation == "mean_probs":
        return logits.softmax(dim=-1).mean(dim=0)
    if aggregation == "mean_logits":
        return logits.mean(dim=0).softmax(dim=-1)
    votes = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return votes.mean(dim=0)
