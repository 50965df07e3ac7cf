"""Ensemble, member, per-ensemble-size and diversity metrics, built from torchmetrics.

The quantities are those reported for deep ensembles of Wide ResNets (uncertainty-baselines' CIFAR table,
which Kondratyuk et al. 2020 compare against): top-1/top-5 accuracy, negative log-likelihood of the
aggregated prediction, expected calibration error with 15 equal-width bins, the Brier score, and the mean
pairwise disagreement of the members' top-1 predictions. Every metric is a torchmetrics ``Metric``, so its
state is synchronised across processes under DDP; :class:`EnsembleMetrics` keeps each one once, in
``MetricCollection`` objects whose compute groups share a state, and synchronises each state once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal, cast, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
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
    "SIZE_METRICS",
    "SIZE_METRIC_HEADERS",
    "SIZE_METRIC_LABELS",
    "SizeMetric",
    "UNCERTAINTY",
    "brier_per_sample",
    "disagreement_per_sample",
    "nll_per_sample",
]

ECE_BINS = 15


def _accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro", validate_args=False)


def _calibration_error(num_classes: int, **kwargs: Any) -> MulticlassCalibrationError:
    return MulticlassCalibrationError(
        num_classes=num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False, **kwargs
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

    The states are those of torchmetrics' ``MulticlassCalibrationError`` (``confidences``, ``accuracies``, the
    same values), so that the metrics can share one state in a compute group (:class:`EnsembleMetrics`). They
    are concatenated over batches and gathered over processes by torchmetrics (uneven shards too).

    Args:
        kwargs: torchmetrics' ``Metric`` options (``sync_on_compute``, ``distributed_available_fn``, ...).
    """

    full_state_update = False
    confidences: list[Tensor]
    accuracies: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("confidences", default=[], dist_reduce_fx="cat")
        self.add_state("accuracies", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            probs: predicted probabilities ``(B, C)``.
            target: class indices ``(B,)``.
        """
        confidence, prediction = probs.detach().float().max(dim=-1)
        self.confidences.append(confidence)
        self.accuracies.append((prediction == target).float())

    def _sorted(self, descending: bool = True) -> tuple[Tensor, Tensor]:
        """Confidences and correctness sorted by confidence (stable: ties keep their order)."""
        confidence = dim_zero_cat(self.confidences)
        correct = dim_zero_cat(self.accuracies)
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
        kwargs: torchmetrics' ``Metric`` options.

    Example:
        >>> metric = AdaptiveCalibrationError(n_bins=2)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()  # bins {0.6 right, 0.7 right} and {0.8 wrong, 0.9 right}: (|1 - 0.65| + |0.5 - 0.85|) / 2
        tensor(0.3500)
    """

    def __init__(self, n_bins: int = ECE_BINS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
        kwargs: torchmetrics' ``Metric`` options.

    Example:
        >>> metric = RiskAtCoverage(0.5)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()  # the two most confident: one right, one wrong
        tensor(0.5000)
    """

    def __init__(self, coverage: float = COVERAGE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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

SizeMetric = Literal["top1", "nll", "ece", "aece", "aurc", "risk80", "ood_auroc"]
"""The name of a metric of the ensemble-size ablation (one of :data:`SIZE_METRICS`)."""

SIZE_METRICS: tuple[SizeMetric, ...] = get_args(SizeMetric)
"""The metrics of every ensemble size k, in order: the one list that
:class:`~lightning_ensembles.callbacks.EnsembleSizeAblation` computes and writes and
:mod:`lightning_ensembles.compare` reads back. Accuracy, NLL, calibration (15-bin and equal-mass ECE), selective
classification (AURC, the risk at 80% coverage) and OOD detection: ``ood_auroc``, the AUROC of the predictive
entropy separating the OOD test loader from the test set (:mod:`lightning_ensembles.ood`; at test, when the
datamodule has an OOD loader). Which direction is better is
:data:`lightning_ensembles.stats.LOWER_IS_BETTER`."""

SIZE_METRIC_HEADERS: dict[str, str] = {
    "top1": "top-1 (%)",
    "nll": "NLL",
    "ece": "ECE",
    "aece": "aECE",
    "aurc": "AURC",
    "risk80": "risk@80%",
    "ood_auroc": "OOD AUROC",
}
"""Each of :data:`SIZE_METRICS` as a short table header (top-1 is shown in percent)."""

SIZE_METRIC_LABELS: dict[str, str] = {
    "top1": "top-1 accuracy (%)",
    "nll": "negative log-likelihood",
    "ece": "expected calibration error",
    "aece": "adaptive (equal-mass) ECE",
    "aurc": "AURC (area under risk-coverage)",
    "risk80": "error at 80% coverage",
    "ood_auroc": "OOD detection AUROC (entropy)",
}
"""Each of :data:`SIZE_METRICS` as a figure's axis label."""


_PER_SAMPLE = ("ece", "aece", "aurc", "risk80")
"""The metrics of one ensemble size computed from each sample's confidence and correctness: one compute group of
:class:`EnsembleMetrics`, which keeps one per-sample state for the four (the first one's, torchmetrics' ECE)."""


class _GroupSync:
    """The ``distributed_available_fn`` of the metrics in a compute group of :class:`EnsembleMetrics`:
    torchmetrics' own test, except while :meth:`EnsembleMetrics.compute` computes the group from the state it
    synchronised once for all of it. Alone (``metrics["aurc"].compute()``), each metric synchronises itself."""

    def __init__(self) -> None:
        self.group_synchronised = False

    def __call__(self) -> bool:
        return not self.group_synchronised and dist.is_available() and dist.is_initialized()


def _size_metrics(num_classes: int, top5: bool, group_sync: _GroupSync) -> MetricCollection:
    """The metrics of one ensemble size fed its probabilities and the targets: top-1 (and top-5), and
    :data:`_PER_SAMPLE` as one compute group."""
    metrics: dict[str, Metric | MetricCollection] = {
        "top1": _accuracy(num_classes),
        "ece": _calibration_error(num_classes, distributed_available_fn=group_sync),
        "aece": AdaptiveCalibrationError(ECE_BINS, distributed_available_fn=group_sync),
        "aurc": AURC(distributed_available_fn=group_sync),
        "risk80": RiskAtCoverage(COVERAGE, distributed_available_fn=group_sync),
    }
    if top5:
        metrics["top5"] = _accuracy(num_classes, top_k=5)
    return MetricCollection(metrics, compute_groups=[list(_PER_SAMPLE)])


def _metric(collection: MetricCollection, key: str) -> Metric:
    """``collection[key]``, without the copy of its compute group's state that ``MetricCollection[key]`` makes."""
    return cast(Metric, getattr(collection, key))


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

    Every metric is kept once, in torchmetrics ``MetricCollection`` objects: ``size_{M}/...`` names the ensemble's
    own metrics (the first ``M`` members are the ensemble), and ``ece``, ``aece``, ``aurc`` and ``risk80`` of
    each ensemble size are one compute group, which keeps one per-sample state (each sample's confidence and
    correctness) for the four. :meth:`compute` synchronises every state across processes once and keeps the
    values until the next :meth:`update` or :meth:`reset`.

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
        >>> metrics["size_2/top1"] is metrics["top1"]  # the full size is the ensemble: one metric
        True
    """

    def __init__(self, num_members: int, num_classes: int, aggregation: str = "mean_probs") -> None:
        super().__init__()
        check_int(num_members, "num_members", 1)
        check_int(num_classes, "num_classes", 2)
        validate_aggregation(aggregation)
        self.num_members = num_members
        self.num_classes = num_classes
        self.aggregation = aggregation
        self._group_sync = _GroupSync()
        # The metrics fed the probabilities of the first k members (one collection per k; the last is the
        # ensemble), and the metrics with a state of their own, fed one value per sample (and the members'
        # accuracy), updated one by one.
        collections: dict[str, MetricCollection] = {
            f"size_{k}": _size_metrics(num_classes, k == num_members and num_classes >= 5, self._group_sync)
            for k in range(1, num_members + 1)
        }
        separate: dict[str, Metric | MetricCollection] = {
            "nll": MeanMetric(),
            "brier": MeanMetric(),
            "entropy": MeanMetric(),
        }
        if num_members >= 2:
            separate.update(
                disagreement=MeanMetric(), mutual_information=MeanMetric(), variation_ratio=MeanMetric()
            )
        for i in range(num_members):
            separate[f"member_{i}/top1"] = _accuracy(num_classes)
            separate[f"member_{i}/nll"] = MeanMetric()
        for k in range(1, num_members):
            separate[f"size_{k}/nll"] = MeanMetric()
            separate[f"size_{k}/entropy"] = MeanMetric()
            if k >= 2:
                separate[f"size_{k}/mutual_information"] = MeanMetric()
                separate[f"size_{k}/variation_ratio"] = MeanMetric()
        collections["separate"] = MetricCollection(separate, compute_groups=False)
        self.collections = nn.ModuleDict(collections)
        # Each name's (collection, key), in the order of the class docstring; `size_{M}/...` are the ensemble's.
        ensemble = f"size_{num_members}"
        self._where: dict[str, tuple[str, str]] = {}
        for name in ("top1", "top5", "nll", "ece", "brier", "disagreement", *UNCERTAINTY):
            self._where.update(self._place(name, (ensemble, name), ("separate", name)))
        for i in range(num_members):
            for name in ("top1", "nll"):
                self._where[f"member_{i}/{name}"] = ("separate", f"member_{i}/{name}")
        for k in range(1, num_members + 1):
            for name in ("top1", "nll", "ece", *UNCERTAINTY):
                if k == num_members:
                    if name in self._where:
                        self._where[f"size_{k}/{name}"] = self._where[name]
                else:
                    self._where.update(
                        self._place(f"size_{k}/{name}", (f"size_{k}", name), ("separate", f"size_{k}/{name}"))
                    )
        self._values: dict[str, Tensor] | None = None

    def _place(self, name: str, *places: tuple[str, str]) -> dict[str, tuple[str, str]]:
        """``{name: place}`` for the first of ``places`` that holds a metric, or ``{}`` if none does."""
        for collection, key in places:
            if key in cast(MetricCollection, self.collections[collection]):
                return {name: (collection, key)}
        return {}

    def _collection(self, key: str) -> MetricCollection:
        return cast(MetricCollection, self.collections[key])

    def __getitem__(self, name: str) -> Metric:
        """The metric called ``name`` (see the class docstring); ``size_{M}/...`` is the ensemble's own."""
        collection, key = self._where[name]
        return _metric(self._collection(collection), key)

    def __contains__(self, name: object) -> bool:
        """Whether there is a metric called ``name`` (``"size_1/mutual_information"`` is not one)."""
        return isinstance(name, str) and name in self._where

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, temperature: Tensor | float | None = None) -> Tensor:
        """Accumulate one batch, and return the first-``k`` ensembles it aggregated.

        Args:
            logits: member logits, shape ``(M, B, C)``.
            target: class indices, shape ``(B,)``.
            temperature: the ensemble's temperature (:mod:`lightning_ensembles.calibration`), applied to the
                aggregate of all ``M`` members (the ensemble's metrics, which are ``size_M``'s); member
                temperatures are applied to ``logits`` by the caller.

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
        self._values = None
        logits = logits.detach().float()
        member_log_probs = logits.log_softmax(dim=-1)
        size_log_probs = first_k = cumulative_log_probs(logits, self.aggregation)  # (M, B, C)
        if temperature is not None:
            last = torch.log_softmax(size_log_probs[-1] / temperature, dim=-1)
            size_log_probs = torch.cat([size_log_probs[:-1], last.unsqueeze(0)])
        size_probs = size_log_probs.exp().clamp(0.0, 1.0)
        member_nll = nll_per_sample(member_log_probs, target)  # (M, B)
        size_nll = nll_per_sample(size_log_probs, target)  # (M, B)
        separate = self._collection("separate")
        for i in range(self.num_members):
            k = i + 1
            # top-1 (and top-5) and the one per-sample state of ece, aece, aurc and risk80
            self._collection(f"size_{k}").update(size_probs[i], target)
            prefix = "" if k == self.num_members else f"size_{k}/"
            _metric(separate, f"{prefix}nll").update(size_nll[i])
            _metric(separate, f"{prefix}entropy").update(entropy(size_log_probs[i]))
            if k >= 2:
                _metric(separate, f"{prefix}mutual_information").update(mutual_information(logits[:k]))
                _metric(separate, f"{prefix}variation_ratio").update(variation_ratio(logits[:k]))
            _metric(separate, f"member_{i}/top1").update(member_log_probs[i], target)
            _metric(separate, f"member_{i}/nll").update(member_nll[i])
        _metric(separate, "brier").update(brier_per_sample(size_probs[-1], target))
        if self.num_members >= 2:
            _metric(separate, "disagreement").update(disagreement_per_sample(logits))
        return first_k

    def items(self) -> Iterator[tuple[str, Metric]]:
        """Yield ``(name, metric)`` pairs, in the naming scheme of the class docstring.

        Yields:
            The metric objects themselves (ensemble, then members, then sizes); the ``size_{M}/...`` names
            yield the ensemble's metrics again.
        """
        for name in self._where:
            yield name, self[name]

    def compute(self) -> dict[str, Tensor]:
        """Compute every metric, each once, with every state synchronised across processes once.

        A compute group's state is synchronised once for the whole group. The values are kept until the next
        :meth:`update` or :meth:`reset`, so callbacks that read them before the module logs them (in their own
        ``on_*_epoch_end``) cost nothing more.

        Returns:
            A dict from the names of :meth:`items` to scalar tensors, and ``loss``.
        """
        if self._values is None:
            by_place = {
                (name, key): value
                for name, collection in self.collections.items()
                for key, value in self._compute_collection(cast(MetricCollection, collection)).items()
            }
            values = {name: by_place[place] for name, place in self._where.items()}
            values["loss"] = torch.stack([values[f"member_{i}/nll"] for i in range(self.num_members)]).sum()
            self._values = values
        return dict(self._values)

    def _compute_collection(self, collection: MetricCollection) -> dict[str, Tensor]:
        groups = list(collection.compute_groups.values()) or [
            [str(key)] for key in collection.keys(keep_base=True)
        ]
        values: dict[str, Tensor] = {}
        for group in groups:
            if len(group) == 1:
                values[group[0]] = _metric(collection, group[0]).compute()
                continue
            # One synchronisation for the group (torchmetrics' own, on its first metric; nothing on one process),
            # then every metric of the group computed from that state without synchronising again.
            metrics = [_metric(collection, key) for key in group]
            with metrics[0].sync_context(dist_sync_fn=metrics[0].dist_sync_fn):
                synchronised = metrics[0].metric_state
            local = metrics[0].metric_state
            self._group_sync.group_synchronised = True
            try:
                for key, metric in zip(group, metrics):
                    for state, value in synchronised.items():
                        setattr(metric, state, value)
                    values[key] = metric.compute()
            finally:
                self._group_sync.group_synchronised = False
                for metric in metrics:  # back on the first metric's own (local) state, shared again
                    for state, value in local.items():
                        setattr(metric, state, value)
        return values

    def reset(self) -> None:
        """Reset every metric's state."""
        for collection in self.collections.values():
            cast(MetricCollection, collection).reset()
        self._values = None


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
