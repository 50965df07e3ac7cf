"""Ensemble, member, per-ensemble-size and diversity metrics, built from torchmetrics.

The quantities are those reported for deep ensembles of Wide ResNets (uncertainty-baselines' CIFAR table,
which Kondratyuk et al. 2020 compare against): top-1/top-5 accuracy, negative log-likelihood of the
aggregated prediction, expected calibration error with 15 equal-width bins, the Brier score, and the mean
pairwise disagreement of the members' top-1 predictions. Every metric is a torchmetrics ``Metric``, so its
state is synchronised across processes under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

from lightning_ensembles._validation import check_int
from lightning_ensembles.aggregation import cumulative_log_probs, validate_aggregation
from lightning_ensembles.uncertainty import entropy, mutual_information, variation_ratio

__all__ = [
    "AURC",
    "AdaptiveCalibrationError",
    "COVERAGE",
    "ECE_BINS",
    "EnsembleMetrics",
    "MemberLossMean",
    "RiskAtCoverage",
    "UNCERTAINTY",
    "brier_per_sample",
    "disagreement_per_sample",
    "nll_per_sample",
    "uncertainty_metrics",
    "update_uncertainty",
]

ECE_BINS = 15


def _accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro", validate_args=False)


def _calibration_error(num_classes: int) -> MulticlassCalibrationError:
    return MulticlassCalibrationError(
        num_classes=num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False
    )


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


COVERAGE = 0.8
"""The coverage of ``risk80``: the error rate on the 80% of samples the model is most confident about."""


class _ConfidenceAndCorrectness(Metric):
    """Keeps each sample's confidence (maximum probability) and whether its top-1 prediction is right.

    States are concatenated over batches and gathered over processes by torchmetrics (uneven shards too).
    """

    full_state_update = False
    confidence: list[Tensor]
    correct: list[Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            probs: predicted probabilities ``(B, C)``.
            target: class indices ``(B,)``.
        """
        confidence, prediction = probs.detach().float().max(dim=-1)
        self.confidence.append(confidence)
        self.correct.append((prediction == target).float())

    def _sorted(self, descending: bool = True) -> tuple[Tensor, Tensor]:
        """Confidences and correctness sorted by confidence (stable: ties keep their order)."""
        confidence = dim_zero_cat(self.confidence)
        correct = dim_zero_cat(self.correct)
        order = torch.sort(confidence, descending=descending, stable=True).indices
        return confidence[order], correct[order]


class AdaptiveCalibrationError(_ConfidenceAndCorrectness):
    """Expected calibration error over equal-mass bins (adaptive ECE; Nixon et al. 2019, arXiv 1904.01685).

    The samples, sorted by increasing confidence, are split into ``n_bins`` bins of equal count (sizes differ
    by at most one, the larger bins first, as ``torch.tensor_split`` makes them);
    ``aECE = sum_b (n_b / N) |acc_b - conf_b|``. Equal-width bins (``ece``) leave most bins empty when a model
    is confident; equal-mass bins give every bin the same weight of evidence. The binning is
    torch-uncertainty's (0.13): the two agree to float32 rounding (``tests/test_uncertainty.py``).

    Args:
        n_bins: the number of bins (15, as for ``ece``).

    Example:
        >>> metric = AdaptiveCalibrationError(n_bins=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()  # bins {0.6 right, 0.7 right} and {0.8 wrong, 0.9 right}: (|1 - 0.65| + |0.5 - 0.85|) / 2
        tensor(0.3500)
    """

    def __init__(self, n_bins: int = ECE_BINS) -> None:
        super().__init__()
        self.n_bins = check_int(n_bins, "n_bins", 1)

    def compute(self) -> Tensor:
        """The adaptive ECE, in ``[0, 1]``."""
        confidence, correct = self._sorted(descending=False)
        if confidence.numel() == 0:
            return torch.tensor(float("nan"))
        total = torch.zeros((), dtype=torch.float64, device=confidence.device)
        for conf, acc in zip(
            torch.tensor_split(confidence.double(), self.n_bins),
            torch.tensor_split(correct.double(), self.n_bins),
        ):
            if conf.numel():
                total += conf.numel() * (acc.mean() - conf.mean()).abs()
        return (total / confidence.numel()).float()


class AURC(_ConfidenceAndCorrectness):
    """Area under the risk-coverage curve of selective classification (Geifman & El-Yaniv 2017; Geifman et
    al. 2019, arXiv 1805.08206). Lower is better.

    Sorted by confidence, the ``i`` most confident samples are accepted for ``i = 1..N``: coverage ``i / N``,
    risk ``r_i`` their error rate. The AURC is the trapezoidal area under ``r`` over the coverages
    ``1/N .. 1``, normalised by the width ``1 - 1/N`` (torch-uncertainty's convention, 0.13; it agrees to
    float32 rounding): ``(sum_i r_i - (r_1 + r_N) / 2) / (N - 1)``. One sample: its risk.

    Example:
        >>> metric = AURC()
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]]), torch.tensor([0, 1, 0]))
        >>> metric.compute()  # risks 0/1, 1/2, 1/3: (0 + 1/2 + 1/3 - (0 + 1/3) / 2) / 2
        tensor(0.3333)
    """

    def compute(self) -> Tensor:
        """The AURC, in ``[0, 1]``."""
        _, correct = self._sorted()
        if correct.numel() == 0:
            return torch.tensor(float("nan"))
        errors = (1.0 - correct.double()).cumsum(dim=0)
        accepted = torch.arange(1, correct.numel() + 1, device=correct.device, dtype=torch.float64)
        risks = errors / accepted
        if risks.numel() == 1:
            return risks[0].float()
        return ((risks.sum() - (risks[0] + risks[-1]) / 2) / (risks.numel() - 1)).float()


class RiskAtCoverage(_ConfidenceAndCorrectness):
    """The error rate on the ``ceil(coverage * N)`` samples the model is most confident about.

    Args:
        coverage: the fraction of samples accepted, in ``(0, 1]`` (0.8: ``risk80``).

    Example:
        >>> metric = RiskAtCoverage(0.5)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()  # the two most confident: one right, one wrong
        tensor(0.5000)
    """

    def __init__(self, coverage: float = COVERAGE) -> None:
        super().__init__()
        if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0 < coverage <= 1:
            raise ValueError(f"Expected `coverage` to be in (0, 1], but got {coverage!r}.")
        self.coverage = float(coverage)

    def compute(self) -> Tensor:
        """The risk at :attr:`coverage`, in ``[0, 1]``."""
        _, correct = self._sorted()
        if correct.numel() == 0:
            return torch.tensor(float("nan"))
        accepted = max(1, math.ceil(self.coverage * correct.numel() - 1e-9))
        return (1.0 - correct[:accepted].double().mean()).float()


UNCERTAINTY = ("entropy", "mutual_information", "variation_ratio", "aece", "aurc", "risk80")
"""Uncertainty metrics of :class:`EnsembleMetrics`, for the ensemble and every size ``k``."""


def uncertainty_metrics(num_members: int) -> dict[str, Metric]:
    """The uncertainty metrics of an ensemble of ``num_members``: the members' disagreement ones only when
    there are several (mutual information and variation ratio are 0 for one member)."""
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


def update_uncertainty(
    metrics: dict[str, Metric], logits: Tensor, log_probs: Tensor, target: Tensor, prefix: str = ""
) -> None:
    """Update the metrics of :func:`uncertainty_metrics` (names under ``prefix``) for one batch.

    Args:
        metrics: the metrics by name.
        logits: the logits ``(k, B, C)`` of the ensemble's members.
        log_probs: its aggregated log-probabilities ``(B, C)``.
        target: class indices ``(B,)``.
        prefix: where the names live, e.g. ``"size_2/"``.
    """
    probs = log_probs.exp().clamp(0.0, 1.0)
    metrics[f"{prefix}entropy"].update(entropy(log_probs))
    for name in ("aece", "aurc", "risk80"):
        metrics[f"{prefix}{name}"].update(probs, target)
    if f"{prefix}mutual_information" in metrics:
        metrics[f"{prefix}mutual_information"].update(mutual_information(logits))
        metrics[f"{prefix}variation_ratio"].update(variation_ratio(logits))


class EnsembleMetrics(nn.Module):
    """All evaluation metrics of an M-member ensemble, updated from member logits ``(M, B, C)``.

    Names (relative; the module prefixes them with ``val/`` or ``test/``):

    - ensemble: ``top1``, ``top5`` (when ``C >= 5``), ``nll``, ``ece``, ``brier``, ``disagreement``
      (when ``M >= 2``), and ``loss``: the sum of the member NLLs, i.e. the training objective (computed,
      not a separate metric);
    - uncertainty of the ensemble (:data:`UNCERTAINTY`): ``entropy`` (mean predictive entropy, nats),
      ``mutual_information`` and ``variation_ratio`` (when ``M >= 2``; see
      :mod:`lightning_ensembles.uncertainty`), ``aece`` (equal-mass ECE), ``aurc`` and ``risk80`` (selective
      classification: the area under the risk-coverage curve, and the error at 80% coverage);
    - member ``i``: ``member_{i}/top1``, ``member_{i}/nll``;
    - first ``k`` members, ``k = 1..M``: ``size_{k}/top1``, ``size_{k}/nll``, ``size_{k}/ece`` and the
      uncertainty metrics above (``size_{k}/mutual_information`` from ``k = 2``).

    Args:
        num_members: ``M``.
        num_classes: ``C``.
        aggregation: how member predictions are combined (see :mod:`lightning_ensembles.aggregation`).

    Raises:
        ValueError: for ``num_members < 1``, ``num_classes < 2`` or an unknown aggregation.

    Example:
        >>> metrics = EnsembleMetrics(num_members=2, num_classes=3)
        >>> first_k = metrics.update(torch.tensor([[[3.0, 0, 0]], [[0, 3.0, 0]]]), torch.tensor([0]))
        >>> first_k.shape  # the first k members' log-probabilities, for k = 1, 2
        torch.Size([2, 1, 3])
        >>> metrics.compute()["top1"], metrics.compute()["member_1/top1"]
        (tensor(1.), tensor(0.))
    """

    def __init__(self, num_members: int, num_classes: int, aggregation: str = "mean_probs") -> None:
        super().__init__()
        check_int(num_members, "num_members", 1)
        check_int(num_classes, "num_classes", 2)
        validate_aggregation(aggregation)
        self.num_members = num_members
        self.num_classes = num_classes
        self.aggregation = aggregation
        metrics: dict[str, Metric] = {
            "top1": _accuracy(num_classes),
            "nll": MeanMetric(),
            "ece": _calibration_error(num_classes),
            "brier": MeanMetric(),
        }
        if num_classes >= 5:
            metrics["top5"] = _accuracy(num_classes, top_k=5)
        if num_members >= 2:
            metrics["disagreement"] = MeanMetric()
        for i in range(num_members):
            metrics[f"member_{i}/top1"] = _accuracy(num_classes)
            metrics[f"member_{i}/nll"] = MeanMetric()
        metrics.update(uncertainty_metrics(num_members))
        for k in range(1, num_members + 1):
            metrics[f"size_{k}/top1"] = _accuracy(num_classes)
            metrics[f"size_{k}/nll"] = MeanMetric()
            metrics[f"size_{k}/ece"] = _calibration_error(num_classes)
            metrics.update({f"size_{k}/{name}": metric for name, metric in uncertainty_metrics(k).items()})
        self.metrics = nn.ModuleDict(metrics)

    def __getitem__(self, name: str) -> Metric:
        """The metric called ``name`` (see the class docstring)."""
        return cast(Metric, self.metrics[name])

    def __contains__(self, name: object) -> bool:
        """Whether there is a metric called ``name`` (``"size_1/mutual_information"`` is not one)."""
        return isinstance(name, str) and name in self.metrics

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, temperature: Tensor | float | None = None) -> Tensor:
        """Accumulate one batch, and return the first-``k`` ensembles it aggregated.

        Args:
            logits: member logits, shape ``(M, B, C)``.
            target: class indices, shape ``(B,)``.
            temperature: the ensemble's temperature (:mod:`lightning_ensembles.calibration`), applied to the
                aggregate of all ``M`` members (the ensemble's metrics and ``size_M``); member temperatures are
                applied to ``logits`` by the caller.

        Returns:
            The log-probabilities of the first ``k`` members for every ``k = 1..M``, ``(M, B, C)``
            (:func:`~lightning_ensembles.aggregation.cumulative_log_probs` of ``logits``, before the ensemble's
            temperature): the module hands them to the callbacks, so that the first-``k`` ensembles are
            aggregated once per batch.

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
            update_uncertainty(metrics, logits[: i + 1], size_log_probs[i], target, prefix=f"size_{i + 1}/")
        update_uncertainty(metrics, logits, size_log_probs[-1], target)
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
