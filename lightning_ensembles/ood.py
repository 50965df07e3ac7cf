"""Out-of-distribution (OOD) detection by an ensemble's uncertainty: AUROC, AUPR and FPR95 per criterion.

Deep ensembles (Lakshminarayanan et al. 2017, arXiv 1612.01474) are trained as much for their uncertainty as
for their accuracy: an input unlike the training data should get a less confident, more disputed
prediction. This module scores every test sample with the per-sample uncertainties of
:mod:`lightning_ensembles.uncertainty` and measures how well each score separates an out-of-distribution
test set from the in-distribution one, as in Hendrycks & Gimpel 2017 (arXiv 1610.02136) and Hendrycks,
Mazeika & Dietterich 2019 (*Outlier Exposure*, arXiv 1812.04606).

Conventions (those of Outlier Exposure and torch-uncertainty):

- **OOD is the positive class** (target 1), in-distribution samples are negatives (target 0);
- the **OOD score is higher for "more OOD"**. The criteria of :data:`OOD_CRITERIA` give, from member logits
  ``(M, B, C)`` and the ensemble's aggregated prediction ``p̄``:

  - ``msp``: ``1 - max_c p̄_c`` (one minus the maximum softmax probability; Hendrycks & Gimpel 2017);
  - ``entropy``: ``H[p̄] / log C`` (the predictive entropy, total uncertainty);
  - ``mutual_information``: ``(H[p̄] - mean_m H[p_m]) / log C`` with ``p̄ = mean_m p_m`` (the members'
    disagreement, epistemic uncertainty; needs ``M >= 2``).

  Dividing by ``log C`` keeps every score in ``[0, 1]`` (torchmetrics would otherwise read scores outside
  ``[0, 1]`` as logits and apply a sigmoid per batch); a monotone rescaling changes none of the metrics.
- ``auroc``: the area under the ROC curve (0.5 is chance, 1 a perfect separation, 0 a perfectly reversed one);
- ``aupr``: the average precision with OOD positive (sometimes called "AUPR-Out"); its chance level is the
  fraction of OOD samples;
- ``fpr95``: the false-positive rate at 95% true-positive rate: the fraction of **in-distribution** samples
  flagged as OOD at the highest threshold that still detects at least 95% of the OOD samples. Lower is
  better; 0 for a perfect separation.

AUROC, AP and the ROC curve are torchmetrics' exact (``thresholds=None``) metrics, so their state is every
score seen and is gathered across processes under DDP; the curve and its FPR95 are computed on the whole
gathered test set.

Where the OOD samples come from: a datamodule that has an OOD test set returns
``[in_distribution_loader, ood_loader]`` from ``test_dataloader()`` (Lightning's multiple test dataloaders),
so ``dataloader_idx == 1`` is the OOD set. :class:`~lightning_ensembles.module.EnsembleLightningModule`
evaluates its usual metrics on loader 0 only, feeds both loaders to :class:`OODMetrics`, and logs
``test/ood/{criterion}/{auroc,aupr,fpr95}``. The OOD loader's labels are ignored. The library's
datamodules offer ``DigitsDataModule(ood_classes=[8, 9])``, ``CIFAR10DataModule(ood="svhn")`` and
``ImageNetDataModule(ood_root=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryROC

from lightning_ensembles.aggregation import cumulative_log_probs, validate_aggregation
from lightning_ensembles.calibration import scale
from lightning_ensembles.uncertainty import entropy, mutual_information

__all__ = ["OOD_CRITERIA", "OODMetrics", "fpr_at_tpr", "ood_scores", "resolve_ood_criteria"]

OOD_CRITERIA = ("msp", "entropy", "mutual_information")
"""The OOD scores :class:`OODMetrics` can rank samples by (``mutual_information`` needs ``M >= 2``)."""

FLAG = "--model.ood_criteria"
TPR_LEVEL = 0.95
"""The true-positive rate (fraction of OOD samples detected) at which ``fpr95`` is read."""


def resolve_ood_criteria(criteria: Sequence[str] | None, num_members: int) -> tuple[str, ...]:
    """The criteria to evaluate: those given, checked, or every one that applies to ``num_members``.

    Args:
        criteria: names from :data:`OOD_CRITERIA`, distinct; ``None`` means ``msp`` and ``entropy``, plus
            ``mutual_information`` when ``num_members >= 2``; ``[]`` turns OOD evaluation off.
        num_members: ``M``.

    Returns:
        The criteria, in the order given.

    Raises:
        ValueError: for something other than a list of names, an unknown or repeated name, or
            ``mutual_information`` with one member; the message names ``--model.ood_criteria``.

    Example:
        >>> resolve_ood_criteria(None, 1), resolve_ood_criteria(None, 3)
        (('msp', 'entropy'), ('msp', 'entropy', 'mutual_information'))
        >>> resolve_ood_criteria(["mutual_information"], 1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `--model.ood_criteria` to leave out 'mutual_information' for a one-member ensemble (it measures the members' disagreement and needs `--model.num_members` >= 2), but got ['mutual_information']; allowed with one member: ['msp', 'entropy'].
    """
    applicable = [c for c in OOD_CRITERIA if num_members >= 2 or c != "mutual_information"]
    if criteria is None:
        return tuple(applicable)
    given = list(criteria) if isinstance(criteria, (list, tuple)) else None
    if (
        given is None
        or not all(isinstance(c, str) for c in given)
        or any(c not in OOD_CRITERIA for c in given)
        or len(set(given)) != len(given)
    ):
        unknown = [c for c in given or [] if c not in OOD_CRITERIA]
        detail = (
            f": {', '.join(repr(c) for c in unknown)} {'is' if len(unknown) == 1 else 'are'} not one"
            if unknown
            else ""
        )
        raise ValueError(
            f"Expected `{FLAG}` to be a list of distinct criteria from {list(OOD_CRITERIA)} (or null: every "
            f"criterion that applies), but got {criteria!r}{detail}."
        )
    if "mutual_information" in given and num_members < 2:
        raise ValueError(
            f"Expected `{FLAG}` to leave out 'mutual_information' for a one-member ensemble (it measures the "
            f"members' disagreement and needs `--model.num_members` >= 2), but got {given!r}; allowed with one "
            f"member: {applicable}."
        )
    return tuple(given)


def ood_scores(
    logits: Tensor,
    criteria: Sequence[str] = OOD_CRITERIA,
    aggregation: str = "mean_probs",
    temperature: Tensor | float | None = None,
    log_probs: Tensor | None = None,
) -> dict[str, Tensor]:
    """The OOD score of each sample under each criterion: in ``[0, 1]``, higher means more OOD.

    Args:
        logits: member logits ``(M, B, C)``.
        criteria: names from :data:`OOD_CRITERIA`.
        aggregation: how the ensemble combines its members (``msp`` and ``entropy`` are of that prediction).
        temperature: the ensemble's temperature (:mod:`lightning_ensembles.calibration`), applied to the
            aggregated prediction (``msp``, ``entropy``); ``None``: none.
        log_probs: the aggregated log-probabilities ``(B, C)``, if already computed (then ``temperature`` is
            not applied again).

    Returns:
        ``{criterion: (B,)}``: ``1 - msp``, ``entropy / log C``, ``mutual_information / log C``.

    Example:
        >>> confident = torch.tensor([[[50.0, 0.0]], [[50.0, 0.0]]])
        >>> disputed = torch.tensor([[[50.0, 0.0]], [[0.0, 50.0]]])
        >>> [round(float(ood_scores(x)["mutual_information"]), 4) for x in (confident, disputed)]
        [0.0, 1.0]
    """
    if log_probs is None and any(name in criteria for name in ("msp", "entropy")):
        log_probs = cumulative_log_probs(logits.float(), aggregation)[-1]
        if temperature is not None:
            log_probs = scale(log_probs, temperature)
    log_c = math.log(logits.shape[-1]) if logits.shape[-1] > 1 else 1.0
    scores: dict[str, Tensor] = {}
    for name in criteria:  # only what is asked: mutual information costs a pass over the members
        if name == "msp":
            scores[name] = 1.0 - cast(Tensor, log_probs).exp().max(dim=-1).values
        elif name == "entropy":
            scores[name] = entropy(cast(Tensor, log_probs)) / log_c
        else:
            scores[name] = mutual_information(logits) / log_c
    return {name: score.clamp(0.0, 1.0) for name, score in scores.items()}


def fpr_at_tpr(fpr: Tensor, tpr: Tensor, level: float = TPR_LEVEL) -> Tensor:
    """The false-positive rate at the first ROC point whose true-positive rate reaches ``level``.

    Args:
        fpr: false-positive rates of a ROC curve, in order of decreasing threshold (torchmetrics' order).
        tpr: the matching true-positive rates (non-decreasing).
        level: the true-positive rate to reach, in ``(0, 1]``.

    Returns:
        A scalar: the smallest false-positive rate among the points with ``tpr >= level``.

    Example:
        >>> fpr_at_tpr(torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0]), torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0]))
        tensor(0.5000)
    """
    reached = tpr >= level - 1e-6  # float32 rounding of k/n
    return fpr[reached].min() if bool(reached.any()) else fpr.new_tensor(1.0)


class OODMetrics(nn.Module):
    """AUROC, AUPR and FPR95 of each OOD criterion, updated with member logits and whether the samples are OOD.

    Names (relative; the module logs them as ``test/ood/{name}``): ``{criterion}/auroc``,
    ``{criterion}/aupr`` and ``{criterion}/fpr95`` for each criterion (see the module docstring for the
    scores and conventions). :meth:`compute` returns nothing until both an OOD and an in-distribution sample
    were seen (over all processes), since none of the metrics is defined otherwise.

    Args:
        num_members: ``M``.
        num_classes: ``C``.
        aggregation: the ensemble's aggregation (``msp`` and ``entropy`` are of its prediction).
        criteria: see :func:`resolve_ood_criteria` (``None``: every criterion that applies).

    Raises:
        ValueError: for an invalid criterion (naming ``--model.ood_criteria``) or aggregation.

    Example:
        >>> metrics = OODMetrics(num_members=2, num_classes=3, criteria=["msp"])
        >>> confident = torch.tensor([[[9.0, 0.0, 0.0]] * 4] * 2)  # (M, B, C) = (2, 4, 3)
        >>> metrics.update(confident, is_ood=False)
        >>> metrics.update(torch.zeros(2, 4, 3), is_ood=True)  # uniform predictions
        >>> {name: round(float(value), 4) for name, value in metrics.compute().items()}
        {'msp/auroc': 1.0, 'msp/aupr': 1.0, 'msp/fpr95': 0.0}
    """

    def __init__(
        self,
        num_members: int,
        num_classes: int,
        aggregation: str = "mean_probs",
        criteria: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        validate_aggregation(aggregation)
        self.criteria = resolve_ood_criteria(criteria, num_members)
        self.num_members = num_members
        self.num_classes = num_classes
        self.aggregation = aggregation
        self.auroc = nn.ModuleDict({c: BinaryAUROC(validate_args=False) for c in self.criteria})
        self.aupr = nn.ModuleDict({c: BinaryAveragePrecision(validate_args=False) for c in self.criteria})
        self.roc = nn.ModuleDict({c: BinaryROC(validate_args=False) for c in self.criteria})
        self.num_ood = SumMetric()
        self.num_in = SumMetric()
        self.input_shape: tuple[int, ...] | None = None
        """The per-sample shape of the in-distribution inputs seen since the last :meth:`reset`."""

    def check_inputs(self, x: Tensor, is_ood: bool) -> None:
        """Record the in-distribution per-sample input shape, or check an OOD batch against it.

        Call it before the forward pass: a model with global pooling would accept OOD images of another size
        and silently score them.

        Args:
            x: a batch of inputs ``(B, ...)``.
            is_ood: whether the batch comes from the OOD loader.

        Raises:
            ValueError: if an OOD batch's per-sample shape differs from the in-distribution one.
        """
        shape = tuple(int(s) for s in x.shape[1:])
        if not is_ood:
            self.input_shape = shape
        elif self.input_shape is not None and shape != self.input_shape:
            raise ValueError(
                f"Expected the OOD test loader (dataloader_idx 1) to give inputs of the in-distribution "
                f"per-sample shape {self.input_shape}, but got {shape} (batch shape {tuple(x.shape)}). Give the "
                "OOD set the same transforms (size, crop, channels) as the in-distribution test set."
            )

    def update(
        self, logits: Tensor, is_ood: bool | Tensor, temperature: Tensor | float | None = None
    ) -> None:
        """Add a batch.

        Args:
            logits: member logits ``(M, B, C)`` (with the member temperatures applied, if any).
            is_ood: one bool for the whole batch, or a bool tensor ``(B,)``.
            temperature: the ensemble's temperature, if fitted (see :func:`ood_scores`).

        Raises:
            ValueError: if ``logits`` is not ``(M, B, C)`` for this ensemble or ``is_ood`` has the wrong shape.
        """
        if logits.ndim != 3 or logits.shape[0] != self.num_members or logits.shape[2] != self.num_classes:
            raise ValueError(
                f"Expected member logits of shape (M, B, C) with M = {self.num_members} and C = "
                f"{self.num_classes}, but got {tuple(logits.shape)}."
            )
        batch = logits.shape[1]
        if isinstance(is_ood, Tensor):
            if is_ood.shape != (batch,):
                raise ValueError(f"Expected `is_ood` of shape ({batch},), but got {tuple(is_ood.shape)}.")
            target = is_ood.to(device=logits.device, dtype=torch.long)
        else:
            target = torch.full((batch,), int(bool(is_ood)), dtype=torch.long, device=logits.device)
        if not self.criteria:
            return
        positives = target.sum()
        self.num_ood.update(positives)
        self.num_in.update(batch - positives)
        for name, score in ood_scores(logits, self.criteria, self.aggregation, temperature).items():
            for metric in self._metrics(name):
                metric.update(score, target)

    def compute(self) -> dict[str, Tensor]:
        """The metrics over everything seen (synchronised across processes: call it on every process).

        Returns:
            ``{criterion}/auroc``, ``{criterion}/aupr``, ``{criterion}/fpr95`` for each criterion; empty when
            no OOD sample or no in-distribution sample was seen.
        """
        if not self.criteria:
            return {}
        if float(self.num_ood.compute()) == 0 or float(self.num_in.compute()) == 0:
            return {}
        values: dict[str, Tensor] = {}
        for name in self.criteria:
            auroc, aupr, roc = self._metrics(name)
            fpr, tpr, _ = roc.compute()
            values[f"{name}/auroc"] = auroc.compute()
            values[f"{name}/aupr"] = aupr.compute()
            values[f"{name}/fpr95"] = fpr_at_tpr(fpr, tpr)
        return values

    def _metrics(self, name: str) -> tuple[BinaryAUROC, BinaryAveragePrecision, BinaryROC]:
        return (
            cast(BinaryAUROC, self.auroc[name]),
            cast(BinaryAveragePrecision, self.aupr[name]),
            cast(BinaryROC, self.roc[name]),
        )

    def reset(self) -> None:
        """Forget every sample (and the recorded input shape)."""
        for name in self.criteria:
            for metric in self._metrics(name):
                metric.reset()
        self.num_ood.reset()
        self.num_in.reset()
        self.input_shape = None
