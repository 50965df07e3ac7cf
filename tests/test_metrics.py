"""Aggregation and every metric against a straightforward reference computation on fixed inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close
from torchmetrics.classification import MulticlassCalibrationError

from lightning_ensembles.aggregation import aggregate, cumulative_log_probs, cumulative_probs
from lightning_ensembles.metrics import AURC, UNCERTAINTY, AdaptiveCalibrationError, EnsembleMetrics

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


def _batch(members: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2.5 * torch.randn(members, B, classes, generator=g), torch.randint(0, classes, (B,), generator=g)


def _distinct_states(metrics: EnsembleMetrics) -> set[int]:
    """The state objects (tensors and lists) behind every name: what torchmetrics updates and synchronises."""
    return {id(state) for _, metric in metrics.items() for state in metric.metric_state.values()}


def test_every_metric_and_state_is_kept_once() -> None:
    metrics = EnsembleMetrics(3, 5)
    metrics.update(*_batch(3, 5))
    # Distinct states for M = 3, C = 5 (an accuracy keeps 4, a mean 2, a per-sample group 2):
    # sizes 1 and 2: top-1 + one per-sample group (ece, aece, aurc, risk80) = 6 each; the ensemble (size 3):
    # top-1, top-5 and its group = 10; the means nll, brier, entropy, disagreement, mutual information and
    # variation ratio = 12; 3 members' top-1 and NLL = 18; NLL and entropy of sizes 1 and 2, mutual
    # information and variation ratio of size 2 = 12. Before, size_3 kept copies of the ensemble's 9
    # metrics and ece, aece, aurc and risk80 one state each: 102.
    assert len(_distinct_states(metrics)) == 6 + 6 + 10 + 12 + 18 + 12 == 64
    assert len({id(metric) for _, metric in metrics.items()}) == 34  # 43 names, 9 of them size_3's
    names = {name for name, _ in metrics.items()}
    assert len(names) == 43 and {f"size_3/{n}" for n in ("top1", "nll", "ece", *UNCERTAINTY)} <= names


def test_the_full_size_is_the_ensemble_itself() -> None:
    metrics = EnsembleMetrics(3, 5)
    for name in ("top1", "nll", "ece", *UNCERTAINTY):
        assert metrics[f"size_3/{name}"] is metrics[name], name
    assert metrics["size_2/top1"] is not metrics["top1"]
    metrics.update(*_batch(3, 5))
    values = metrics.compute()
    assert values["size_3/top1"] is values["top1"] and values["size_3/aurc"] is values["aurc"]


def test_calibration_and_selective_metrics_share_one_per_sample_state() -> None:
    metrics = EnsembleMetrics(3, 5)
    metrics.update(*_batch(3, 5))
    metrics.update(*_batch(3, 5, seed=1))
    per_size = []
    for prefix in ("size_1/", "size_2/", ""):
        states = [metrics[f"{prefix}{name}"].metric_state for name in ("ece", "aece", "aurc", "risk80")]
        assert all(s.keys() == {"confidences", "accuracies"} for s in states)
        for key in ("confidences", "accuracies"):
            assert all(s[key] is states[0][key] for s in states), (prefix, key)
        assert len(states[0]["confidences"]) == 2  # one entry per batch, appended once
        per_size.append(id(states[0]["confidences"]))
    assert len(set(per_size)) == 3  # one per-sample state per ensemble size
    # and the values are those of each metric on its own
    logits, target = _batch(3, 5)
    alone = {
        "ece": MulticlassCalibrationError(5, n_bins=15),
        "aece": AdaptiveCalibrationError(),
        "aurc": AURC(),
    }
    probs = cumulative_log_probs(logits)[1].exp().clamp(0.0, 1.0)
    fresh = EnsembleMetrics(3, 5)
    fresh.update(logits, target)
    for name, metric in alone.items():
        metric.update(probs, target)
        assert float(fresh.compute()[f"size_2/{name}"]) == float(metric.compute()), name


def test_compute_synchronises_each_state_once_and_keeps_its_values(
    in_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import torchmetrics.metric
    from torchmetrics.utilities.distributed import gather_all_tensors

    batches = [_batch(3, 5, seed) for seed in range(3)]
    alone = EnsembleMetrics(3, 5)  # no process group: nothing is synchronised
    for batch in batches:
        alone.update(*batch)
    expected = alone.compute()

    gathered: list[tuple[int, ...]] = []

    def counting_gather(tensor: torch.Tensor, *args: object, **kwargs: object) -> list[torch.Tensor]:
        gathered.append(tuple(tensor.shape))
        return gather_all_tensors(tensor, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", counting_gather)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29547")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    metrics = EnsembleMetrics(3, 5)
    for batch in batches:
        metrics.update(*batch)
    got = metrics.compute()
    # one gather per distinct state (64, see above), each per-sample group's once: 3 x 97 samples
    assert len(gathered) == len(_distinct_states(metrics)) == 64
    assert gathered.count((3 * 97,)) == 3 * 2  # confidences and accuracies of 3 ensemble sizes
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    metrics.compute()  # kept: what a callback read is what the module logs, with no second synchronisation
    assert len(gathered) == 64
    metrics.update(*batches[0])  # an update, or a reset, starts over
    metrics.compute()
    assert len(gathered) == 128
    # alone, a metric of a group still synchronises itself
    metrics.update(*batches[1])
    assert float(metrics["aurc"].compute()) == float(metrics.compute()["aurc"])
