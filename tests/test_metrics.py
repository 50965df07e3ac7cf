"""Aggregation and every metric against a straightforward reference computation on fixed inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from lightning_ensembles.aggregation import aggregate, cumulative_log_probs, cumulative_probs
from lightning_ensembles.metrics import EnsembleMetrics

M, B, C = 4, 97, 6


@pytest.fixture()
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    logits = 2.5 * torch.randn(M, B, C, generator=g)
    target = torch.randint(0, C, (B,), generator=g)
    return logits, target


def ref_probs(logits: torch.Tensor, aggregation: str) -> list[list[float]]:
    """Aggregated probabilities with plain Python loops over members and classes."""
    out = []
    for b in range(logits.shape[1]):
        rows = [logits[m, b].tolist() for m in range(logits.shape[0])]
        if aggregation == "mean_probs":
            member_probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in rows]
            out.append([sum(p[c] for p in member_probs) / len(rows) for c in range(len(rows[0]))])
        elif aggregation == "mean_logits":
            mean = [sum(row[c] for row in rows) / len(rows) for c in range(len(rows[0]))]
            out.append([math.exp(v) / sum(math.exp(u) for u in mean) for v in mean])
        else:
            votes = [max(range(len(row)), key=lambda c: (row[c], -c)) for row in rows]
            out.append([votes.count(c) / len(rows) for c in range(len(rows[0]))])
    return out


def ref_ece(probs: list[list[float]], target: list[int], bins: int = 15) -> float:
    total = 0.0
    for lo, hi in ((i / bins, (i + 1) / bins) for i in range(bins)):
        members = [
            (max(p), int(max(range(len(p)), key=lambda c: (p[c], -c)) == t))
            for p, t in zip(probs, target)
            if lo < max(p) <= hi
        ]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(a for _, a in members) / len(members)
            total += abs(conf - acc) * len(members) / len(probs)
    return total


def ref_metrics(probs: list[list[float]], target: list[int]) -> dict[str, float]:
    n = len(target)
    top1 = sum(int(max(range(C), key=lambda c: (p[c], -c)) == t) for p, t in zip(probs, target)) / n
    top5 = sum(int(t in sorted(range(C), key=lambda c: -p[c])[:5]) for p, t in zip(probs, target)) / n
    nll = sum(-math.log(p[t]) if p[t] > 0 else math.inf for p, t in zip(probs, target)) / n
    brier = sum(sum((p[c] - (c == t)) ** 2 for c in range(C)) for p, t in zip(probs, target)) / n
    return {"top1": top1, "top5": top5, "nll": nll, "brier": brier, "ece": ref_ece(probs, target)}


@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits", "vote"])
def test_aggregation_matches_reference(inputs, aggregation: str) -> None:
    logits, _ = inputs
    expected = torch.tensor(ref_probs(logits, aggregation))
    assert_close(aggregate(logits, aggregation), expected, atol=1e-6, rtol=1e-5)
    cumulative = cumulative_probs(logits, aggregation)
    for k in range(1, M + 1):
        assert_close(
            cumulative[k - 1], torch.tensor(ref_probs(logits[:k], aggregation)), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits"])
def test_every_metric_matches_reference(inputs, aggregation: str) -> None:
    logits, target = inputs
    metrics = EnsembleMetrics(M, C, aggregation)
    for chunk in torch.arange(B).split(25):  # several batches accumulate to the whole-set value
        metrics.update(logits[:, chunk], target[chunk])
    got = {k: float(v) for k, v in metrics.compute().items()}
    t = target.tolist()

    expected = ref_metrics(ref_probs(logits, aggregation), t)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-5), name
    for i in range(M):
        member = ref_metrics(ref_probs(logits[i : i + 1], "mean_probs"), t)
        assert got[f"member_{i}/top1"] == pytest.approx(member["top1"])
        assert got[f"member_{i}/nll"] == pytest.approx(member["nll"], abs=1e-5)
    for k in range(1, M + 1):
        size = ref_metrics(ref_probs(logits[:k], aggregation), t)
        assert got[f"size_{k}/top1"] == pytest.approx(size["top1"])
        assert got[f"size_{k}/nll"] == pytest.approx(size["nll"], abs=1e-5)
    assert got["loss"] == pytest.approx(sum(got[f"member_{i}/nll"] for i in range(M)), abs=1e-5)

    preds = logits.argmax(-1).tolist()
    pairs = list(itertools.combinations(range(M), 2))
    disagreement = sum(sum(preds[i][b] != preds[j][b] for i, j in pairs) / len(pairs) for b in range(B)) / B
    assert got["disagreement"] == pytest.approx(disagreement)
    # The full-size entry of the per-size metrics is the ensemble itself.
    assert got[f"size_{M}/top1"] == got["top1"] and got[f"size_{M}/nll"] == got["nll"]


def test_vote_metrics_match_reference(inputs) -> None:
    logits, target = inputs
    metrics = EnsembleMetrics(M, C, "vote")
    metrics.update(logits, target)
    got = metrics.compute()
    expected = ref_metrics(ref_probs(logits, "vote"), target.tolist())
    assert float(got["top1"]) == pytest.approx(expected["top1"])
    assert float(got["brier"]) == pytest.approx(expected["brier"], abs=1e-6)
    assert float(got["nll"]) == expected["nll"] == math.inf  # some targets get no vote: honest infinity


def test_ensemble_nll_stays_finite_when_member_softmax_underflows() -> None:
    logits = torch.tensor([[[200.0, 0.0]], [[0.0, 200.0]]])  # member 0 gives class 1 probability e^-200
    metrics = EnsembleMetrics(2, 2)
    metrics.update(logits, torch.tensor([1]))
    assert float(metrics.compute()["nll"]) == pytest.approx(math.log(2))


def test_small_ensembles_have_fewer_metrics() -> None:
    names = {name for name, _ in EnsembleMetrics(1, 3).items()}
    # no top-5 for C < 5, no disagreement for M = 1
    assert names == {
        "top1",
        "nll",
        "ece",
        "brier",
        "member_0/top1",
        "member_0/nll",
        "size_1/top1",
        "size_1/nll",
        "size_1/ece",
        # uncertainty, without the members' disagreement ones (mutual information, variation ratio)
        *(f"{prefix}{name}" for prefix in ("", "size_1/") for name in ("entropy", "aece", "aurc", "risk80")),
    }
    two = {name for name, _ in EnsembleMetrics(2, 3).items()}
    assert {"mutual_information", "variation_ratio", "size_2/mutual_information"} <= two
    assert "size_1/mutual_information" not in two


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_members=0, num_classes=3), "`num_members` to be an int >= 1, but got 0"),
        (dict(num_members=2, num_classes=1), "`num_classes` to be an int >= 2, but got 1"),
        (dict(num_members=2, num_classes=3, aggregation="max"), "one of .*'max'"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnsembleMetrics(**kwargs)


def test_wrong_logit_shape_is_reported() -> None:
    metrics = EnsembleMetrics(2, 3)
    with pytest.raises(ValueError, match=r"\(M, B, C\) = \(2, 4, 3\), but got \(3, 4, 3\)"):
        metrics.update(torch.zeros(3, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected `--model.aggregation`"):
        aggregate(torch.zeros(2, 4, 3), "median")


def test_update_returns_the_first_k_ensembles_before_the_temperature() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 8, 4), torch.randint(0, 4, (8,))
    metrics = EnsembleMetrics(3, 4)
    first_k = metrics.update(logits, target, temperature=2.0)
    assert torch.equal(first_k, cumulative_log_probs(logits))
    assert "size_2/top1" in metrics and "size_1/mutual_information" not in metrics


def test_ece_uses_15_bins_on_a_case_that_depends_on_the_bins() -> None:
    """Two samples whose confidences 0.62 (right) and 0.68 (wrong) share a bin of 10 but not of 15: the ECE is
    0.15 with 10 bins and 0.53 with 15, for the ensemble and for every ensemble size."""
    probs = torch.tensor([[0.62, 0.38], [0.32, 0.68]])
    target = torch.tensor([0, 0])
    assert ref_ece(probs.tolist(), target.tolist(), bins=10) == pytest.approx(0.15)
    assert ref_ece(probs.tolist(), target.tolist(), bins=15) == pytest.approx(0.53)
    metrics = EnsembleMetrics(2, 2)
    metrics.update(probs.log().expand(2, 2, 2), target)  # two identical members: the ensemble is `probs`
    values = metrics.compute()
    for name in ("ece", "size_1/ece", "size_2/ece"):
        assert float(values[name]) == pytest.approx(0.53, abs=1e-5), name
