"""Uncertainty scores and metrics: hand computations, and values recorded once from torch-uncertainty 0.13."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ensembles.metrics import AURC, AdaptiveCalibrationError, EnsembleMetrics, RiskAtCoverage
from lightning_ensembles.uncertainty import entropy, mutual_information, uncertainty_scores, variation_ratio


def _seeded() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(3, 200, 5) * 2, torch.randint(0, 5, (200,))


# torch_uncertainty.metrics 0.13 on `_seeded()` (mean of the members' softmax), run once by hand: AURC(),
# RiskAt80Cov(), AdaptiveCalibrationError(task="multiclass", num_classes=5, num_bins=15), Entropy() and
# MutualInformation() (their inputs: probabilities (B, M, C)). The tests do not import torch-uncertainty.
TORCH_UNCERTAINTY = {
    "aurc": 0.7917014360427856,
    "risk80": 0.7437499761581421,
    "aece": 0.21252816915512085,
    "entropy": 1.3199838399887085,
    "mutual_information": 0.4321300983428955,
}


def test_scores_by_hand() -> None:
    # member 0 certain of class 0, member 1 split evenly between classes 0 and 1
    logits = torch.tensor([[[100.0, 0.0, 0.0]], [[50.0, 50.0, -100.0]]])
    mean = torch.tensor([0.75, 0.25, 0.0])
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    scores = uncertainty_scores(logits)
    assert scores["msp"].item() == pytest.approx(0.75)
    assert scores["entropy"].item() == pytest.approx(h_mean, abs=1e-6)
    # H[mean] - mean(H[p_0] = 0, H[p_1] = log 2)
    assert scores["mutual_information"].item() == pytest.approx(h_mean - math.log(2) / 2, abs=1e-6)
    assert scores["variation_ratio"].item() == 0.0  # both vote class 0 (member 1's tie goes to class 0)
    assert entropy(mean.log()).item() == pytest.approx(h_mean, abs=1e-6)  # 0 log 0 = 0, no NaN
    assert mutual_information(logits[:1]).item() == 0.0  # one member has no disagreement
    three = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])
    assert variation_ratio(three).item() == pytest.approx(1 / 3)


def test_selective_and_adaptive_metrics_by_hand() -> None:
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong), 0.55 (right)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]])
    target = torch.tensor([0, 1, 1, 1, 1])
    risks = [0 / 1, 1 / 2, 1 / 3, 2 / 4, 2 / 5]
    aurc, risk, aece = AURC(), RiskAtCoverage(0.8), AdaptiveCalibrationError(n_bins=2)
    for metric in (aurc, risk, aece):
        metric.update(probs[:2], target[:2])  # two batches: states are concatenated
        metric.update(probs[2:], target[2:])
    assert aurc.compute().item() == pytest.approx((sum(risks) - (risks[0] + risks[-1]) / 2) / 4)
    assert risk.compute().item() == pytest.approx(2 / 4)  # the 4 most confident: 2 wrong
    # ascending: bins {0.55 right, 0.6 wrong, 0.7 right} and {0.8 wrong, 0.9 right}
    expected = (3 * abs(2 / 3 - (0.55 + 0.6 + 0.7) / 3) + 2 * abs(1 / 2 - 0.85)) / 5
    assert aece.compute().item() == pytest.approx(expected, abs=1e-6)


def test_agree_with_torch_uncertainty() -> None:
    logits, target = _seeded()
    metrics = EnsembleMetrics(3, 5)
    metrics.update(logits, target)
    values = metrics.compute()
    for name, expected in TORCH_UNCERTAINTY.items():
        assert values[name].item() == pytest.approx(expected, abs=2e-6), name


def test_every_ensemble_size_has_them_and_the_last_is_the_ensemble() -> None:
    logits, target = _seeded()
    metrics = EnsembleMetrics(3, 5)
    metrics.update(logits, target)
    values = metrics.compute()
    for name in ("entropy", "mutual_information", "variation_ratio", "aece", "aurc", "risk80", "ece"):
        assert values[f"size_3/{name}"].item() == pytest.approx(values[name].item(), abs=1e-6), name
    single = EnsembleMetrics(1, 5)
    single.update(logits[:1], target)
    for name in ("entropy", "aece", "aurc", "risk80", "ece"):
        assert values[f"size_1/{name}"].item() == pytest.approx(single.compute()[name].item(), abs=1e-6)
    # an ensemble is more uncertain than its first member about these random predictions
    assert values["size_3/entropy"] > values["size_1/entropy"] and values["size_2/mutual_information"] > 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RiskAtCoverage(0.0), r"`coverage` to be in \(0, 1\], but got 0.0"),
        (lambda: AdaptiveCalibrationError(n_bins=0), r"`n_bins` to be an int >= 1, but got 0"),
    ],
)
def test_bad_arguments(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]
