"""Ensemble, member, per-ensemble-size and diversity metrics, built from torchmetrics.

The quantities are those reported for deep ensembles of Wide ResNets (uncertainty-baselines' CIFAR table,
which Kondratyuk et al. 2020 compare against): top-1/top-5 accuracy, negative log-likelihood of the
aggregated prediction, expected calibration error with 15 equal-width bins, the Brier score, and the mean
pairwise disagreement of the members' top-1 predictions. Every metric is a torchmetrics ``Metric``, so its
state is synchronised across processes under DDP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_ensembles.aggregation import cumulative_log_probs, validate_aggregation

ECE_BINS = 15


def _accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro", validate_args=False)


def nll_per_sample(log_probs: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the target class for each sample.

    Args:
        log_probs: log-probabilities, shape ``(..., B, C)``.
        target: class indices, shape ``(B,)``.

    Returns:
        Shape ``(..., B)``. Infinite where the target has probability zero (possible under ``"vote"``).
    """
    index = target.expand(*log_probs.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1)


def brier_per_sample(probs: Tensor, target: Tensor) -> Tensor:
    """Multiclass Brier score of each sample: ``sum_c (p_c - 1[c = y])^2``.

    Args:
        probs: probabilities, shape ``(B, C)``.
        target: class indices, shape ``(B,)``.

    Returns:
        Shape ``(B,)``, values in ``[0, 2]``.
    """
    one_hot = torch.nn.functional.one_hot(target, probs.shape[-1]).to(probs.dtype)
    return (probs - one_hot).pow(2).sum(dim=-1)


def disagreement_per_sample(logits: Tensor) -> Tensor:
    """Fraction of member pairs whose top-1 predictions differ, for each sample.

    Args:
        logits: member logits, shape ``(M, B, C)`` with ``M >= 2``.

    Returns:
        Shape ``(B,)``, values in ``[0, 1]``.
    """
    num_members = logits.shape[0]
    preds = logits.argmax(dim=-1)  # (M, B)
    counts = torch.nn.functional.one_hot(preds, logits.shape[-1]).sum(dim=0)  # (B, C)
    agreeing_pairs = (counts * (counts - 1) // 2).sum(dim=-1)
    total_pairs = num_members * (num_members - 1) // 2
    return 1.0 - agreeing_pairs.float() / total_pairs


class EnsembleMetrics(nn.Module):
    """All evaluation metrics of an M-member ensemble, updated from member logits ``(M, B, C)``.

    Names (relative; the module prefixes them with ``val/`` or ``test/``):

    - ensemble: ``top1``, ``top5`` (when ``C >= 5``), ``nll``, ``ece``, ``brier``, ``disagreement``
      (when ``M >= 2``), and ``loss``: the sum of the member NLLs, i.e. the training objective (computed,
      not a separate metric);
    - member ``i``: ``member_{i}/top1``, ``member_{i}/nll``;
    - first ``k`` members, ``k = 1..M``: ``size_{k}/top1``, ``size_{k}/nll``.

    Args:
        num_members: ``M``.
        num_classes: ``C``.
        aggregation: how member predictions are combined (see :mod:`lightning_ensembles.aggregation`).

    Raises:
        ValueError: for ``num_members < 1``, ``num_classes < 2`` or an unknown aggregation.

    Example:
        >>> metrics = EnsembleMetrics(num_members=2, num_classes=3)
        >>> metrics.update(torch.tensor([[[3.0, 0, 0]], [[0, 3.0, 0]]]), torch.tensor([0]))
        >>> metrics.compute()["top1"], metrics.compute()["member_1/top1"]
        (tensor(1.), tensor(0.))
    """

    def __init__(self, num_members: int, num_classes: int, aggregation: str = "mean_probs") -> None:
        super().__init__()
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"Expected `num_members` to be an int >= 1, but got {num_members!r}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an int >= 2, but got {num_classes!r}.")
        validate_aggregation(aggregation)
        self.num_members = num_members
        self.num_classes = num_classes
        self.aggregation = aggregation
        metrics: dict[str, Metric] = {
            "top1": _accuracy(num_classes),
            "nll": MeanMetric(),
            "ece": MulticlassCalibrationError(
                num_classes=num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False
            ),
            "brier": MeanMetric(),
        }
        if num_classes >= 5:
            metrics["top5"] = _accuracy(num_classes, top_k=5)
        if num_members >= 2:
            metrics["disagreement"] = MeanMetric()
        for i in range(num_members):
            metrics[f"member_{i}/top1"] = _accuracy(num_classes)
            metrics[f"member_{i}/nll"] = MeanMetric()
        for k in range(1, num_members + 1):
            metrics[f"size_{k}/top1"] = _accuracy(num_classes)
            metrics[f"size_{k}/nll"] = MeanMetric()
        self.metrics = nn.ModuleDict(metrics)

    def __getitem__(self, name: str) -> Metric:
        """The metric called ``name`` (see the class docstring)."""
        return cast(Metric, self.metrics[name])

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate one batch.

        Args:
            logits: member logits, shape ``(M, B, C)``.
            target: class indices, shape ``(B,)``.

        Raises:
            ValueError: if the shapes do not match ``(M, B, C)`` and ``(B,)`` for this ensemble.
        """
        expected = (self.num_members, target.shape[0], self.num_classes)
        if logits.ndim != 3 or tuple(logits.shape) != expected:
            raise ValueError(
                f"Expected member logits of shape (M, B, C) = {expected}, but got {tuple(logits.shape)}."
            )
        logits = logits.detach().float()
        member_log_probs = logits.log_softmax(dim=-1)
        size_log_probs = cumulative_log_probs(logits, self.aggregation)  # (M, B, C)
        size_probs = size_log_probs.exp().clamp(0.0, 1.0)
        member_nll = nll_per_sample(member_log_probs, target)  # (M, B)
        size_nll = nll_per_sample(size_log_probs, target)  # (M, B)
        for i in range(self.num_members):
            self[f"member_{i}/top1"].update(member_log_probs[i], target)
            self[f"member_{i}/nll"].update(member_nll[i])
            self[f"size_{i + 1}/top1"].update(size_probs[i], target)
            self[f"size_{i + 1}/nll"].update(size_nll[i])
        probs = size_probs[-1]
        self["top1"].update(probs, target)
        self["nll"].update(size_nll[-1])
        self["ece"].update(probs, target)
        self["brier"].update(brier_per_sample(probs, target))
        if "top5" in self.metrics:
            self["top5"].update(probs, target)
        if "disagreement" in self.metrics:
            self["disagreement"].update(disagreement_per_sample(logits))

    def items(self) -> Iterator[tuple[str, Metric]]:
        """Yield ``(name, metric)`` pairs, in the naming scheme of the class docstring.

        Yields:
            The metric objects themselves (ensemble, then members, then sizes).
        """
        for name in self.metrics:
            yield name, self[name]

    def compute(self) -> dict[str, Tensor]:
        """Compute every metric.

        Returns:
            A dict from the names of :meth:`items` to scalar tensors.
        """
        values = {name: metric.compute() for name, metric in self.items()}
        values["loss"] = torch.stack([values[f"member_{i}/nll"] for i in range(self.num_members)]).sum()
        return values

    def reset(self) -> None:
        """Reset every metric's state."""
        for _, metric in self.items():
            metric.reset()


class MemberLossMean(Metric):
    """Mean training loss of every member over an epoch, correct whichever process trained which member.

    Each process adds the losses of the members it trains; :meth:`compute` sums the per-member totals and
    counts over all processes (torchmetrics' ``dist_reduce_fx="sum"``), so under data-parallel DDP and under
    member-parallel training alike member ``i``'s mean covers exactly the steps that trained it.

    Args:
        num_members: ``M``.

    Example:
        >>> metric = MemberLossMean(3)
        >>> metric.update(torch.tensor([2.0, 4.0]), [0, 2])
        >>> metric.update(torch.tensor([1.0]), [2])
        >>> metric.compute()
        tensor([2.0000,    nan, 2.5000])
    """

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, num_members: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(num_members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_members, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: Tensor, members: list[int]) -> None:
        """Add one step's losses.

        Args:
            losses: shape ``(len(members),)``.
            members: the member index of each loss.
        """
        index = torch.as_tensor(members, device=self.total.device)
        self.total.index_add_(0, index, losses.detach().to(self.total.dtype))
        self.count.index_add_(0, index, torch.ones_like(index, dtype=self.count.dtype))

    def compute(self) -> Tensor:
        """Return the mean loss per member, shape ``(M,)`` (NaN for a member without steps; torchmetrics
        squeezes ``M = 1`` to a scalar)."""
        return (self.total / self.count).float()
