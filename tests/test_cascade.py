"""Cascades (Wisdom of Committees): exact edge semantics, a hand-checked cost, curves and calibration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.cascade import (
    NEVER_EXIT,
    CascadeResult,
    CascadeStages,
    calibrate_threshold,
    cascade_curve,
    cascade_order,
    cascade_stages,
    evaluate_cascade,
)
from lightning_ensembles.metrics import EnsembleMetrics

COSTS = [1.0, 2.0, 4.0]


def noisy_copies(
    num_samples: int, noise: tuple[float, ...] = (2.5, 2.0, 1.5), num_classes: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members whose logits are the one-hot truth plus independent Gaussian noise: ``(M, N, C)``, ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (num_samples,), generator=g)
    truth = 3.0 * F.one_hot(target, num_classes).float()
    logits = torch.stack([truth + s * torch.randn(num_samples, num_classes, generator=g) for s in noise])
    return logits, target


# Hand-checked example: M = 3 members with costs 1, 2, 4 (cheapest first), N = 4 samples, C = 2 classes.
# Member probabilities (logits are their logs), sample by sample:
#            member 0      member 1      member 2      target
#   A        [.95, .05]    [.90, .10]    [.50, .50]    0
#   B        [.85, .15]    [.99, .01]    [.50, .50]    0
#   C        [.50, .50]    [.60, .40]    [.10, .90]    1
#   D        [.30, .70]    [.20, .80]    [.10, .90]    0
# Stage confidences (max of the mean of the first j members' probabilities):
#   stage 1: A .95, B .85, C .50, D .70
#   stage 2: A .925, B .92, C .55, D .75
# Threshold 0.9 everywhere: A leaves at stage 1 (cost 1), B at stage 2 (cost 1 + 2 = 3), C and D run all three
# members (cost 1 + 2 + 4 = 7). Expected cost = (1 + 3 + 7 + 7) / 4 = 4.5; exit fractions 1/4, 1/4, 1/2.
# Predictions: A 0 (right), B 0 (right), C stage 3 = [.4, .6] -> 1 (right), D stage 3 = [.2, .8] -> 1 (wrong):
# accuracy 3/4; NLL = -(log .95 + log .92 + log .6 + log .2) / 4.
# Per-stage thresholds (0.99, 0.8): nobody leaves at stage 1; A (.925) and B (.92) leave at stage 2, C (.55)
# and D (.75) run all three: expected cost = (3 + 3 + 7 + 7) / 4 = 5.0.
HAND_PROBS = torch.tensor(
    [
        [[0.95, 0.05], [0.85, 0.15], [0.50, 0.50], [0.30, 0.70]],
        [[0.90, 0.10], [0.99, 0.01], [0.60, 0.40], [0.20, 0.80]],
        [[0.50, 0.50], [0.50, 0.50], [0.10, 0.90], [0.10, 0.90]],
    ]
)
HAND_TARGET = torch.tensor([0, 0, 1, 0])


def test_hand_checked_expected_cost_accuracy_and_nll() -> None:
    result = evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=0.9)
    assert result.expected_cost == 4.5
    assert result.exit_fractions == (0.25, 0.25, 0.5)
    assert result.exit_stage is not None and result.exit_stage.tolist() == [1, 2, 3, 3]
    assert result.prediction is not None and result.prediction.tolist() == [0, 0, 1, 1]
    assert result.accuracy == 0.75
    expected_nll = -(math.log(0.95) + math.log(0.92) + math.log(0.6) + math.log(0.2)) / 4
    assert result.nll == pytest.approx(expected_nll, rel=1e-6)
    assert result.order == (0, 1, 2) and result.stage_costs == (1.0, 3.0, 7.0)
    assert result.thresholds == (0.9, 0.9) and result.threshold == 0.9


def test_per_stage_thresholds() -> None:
    result = evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=[0.99, 0.8])
    assert result.expected_cost == 5.0
    assert result.exit_fractions == (0.0, 0.5, 0.5)
    assert result.thresholds == (0.99, 0.8) and result.threshold is None
    # A never-exit first stage with a zero second stage: everyone runs exactly two members.
    two = evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=[NEVER_EXIT, 0.0])
    assert two.expected_cost == 3.0 and two.exit_fractions == (0.0, 1.0, 0.0)


def test_order_defaults_to_cheapest_first_whichever_member_that_is() -> None:
    # The hand example with its members stored in reverse: member 2 is now the cheapest and runs first.
    reversed_result = evaluate_cascade(HAND_PROBS.flip(0).log(), HAND_TARGET, COSTS[::-1], thresholds=0.9)
    assert reversed_result.order == (2, 1, 0)
    assert reversed_result.expected_cost == 4.5 and reversed_result.accuracy == 0.75
    assert cascade_order([3.0, 1.0, 1.0]) == (1, 2, 0)  # ties by index
    # An explicit order runs the expensive member first: stage costs 4, 6, 7.
    forced = evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=0.0, order=[2, 1, 0])
    assert forced.order == (2, 1, 0) and forced.stage_costs == (4.0, 6.0, 7.0)
    assert forced.expected_cost == 4.0
    assert forced.prediction is not None and forced.prediction.tolist() == [0, 0, 1, 1]  # member 2 alone


@pytest.mark.parametrize("costs", [[1.0, 2.0, 4.0], [4.0, 1.0, 2.0]])
def test_threshold_zero_is_the_first_member_alone(costs: list[float]) -> None:
    logits, target = noisy_copies(300)
    first = min(range(3), key=lambda i: costs[i])
    result = evaluate_cascade(logits, target, costs, thresholds=0.0)
    assert result.order[0] == first
    assert result.exit_fractions == (1.0, 0.0, 0.0)
    assert result.exit_stage is not None and bool((result.exit_stage == 1).all())
    assert result.expected_cost == costs[first]
    assert result.prediction is not None
    assert torch.equal(result.prediction, logits[first].argmax(dim=-1))
    assert result.accuracy == int((logits[first].argmax(dim=-1) == target).sum()) / 300
    assert result.nll == pytest.approx(F.cross_entropy(logits[first], target).item(), rel=1e-5)


def test_never_exit_is_the_full_ensemble() -> None:
    logits, target = noisy_copies(300)
    metrics = EnsembleMetrics(num_members=3, num_classes=5)
    metrics.update(logits, target)
    expected = metrics.compute()
    for costs in ([1.0, 2.0, 4.0], [4.0, 1.0, 2.0]):  # the second runs the members in another order
        result = evaluate_cascade(logits, target, costs, thresholds=NEVER_EXIT)
        assert result.exit_fractions == (0.0, 0.0, 1.0)
        assert result.expected_cost == math.fsum(costs)
        assert result.accuracy == pytest.approx(expected["top1"].item(), abs=1e-6)  # float32 there
        assert result.nll == pytest.approx(expected["nll"].item(), rel=1e-5)
    # mean_logits and vote as well: the aggregation of all members.
    for aggregation in ("mean_logits", "vote"):
        result = evaluate_cascade(logits, target, COSTS, NEVER_EXIT, aggregation=aggregation)
        probs = cumulative_log_probs(logits, aggregation)[-1].exp()
        assert result.accuracy == int((probs.argmax(dim=-1) == target).sum()) / 300


def test_one_member_cascade_is_that_member() -> None:
    logits, target = noisy_copies(50, noise=(2.0,))
    result = evaluate_cascade(logits, target, [3.0], thresholds=0.5)
    assert result.thresholds == () and result.exit_fractions == (1.0,) and result.expected_cost == 3.0
    curve = cascade_curve(logits, target, [3.0])
    assert all(p.accuracy == result.accuracy for p in curve)


def test_curve_spans_first_member_to_full_ensemble_and_matches_evaluate() -> None:
    logits, target = noisy_copies(200)
    curve = cascade_curve(logits, target, COSTS)
    costs = [p.expected_cost for p in curve]
    assert costs == sorted(costs)
    assert curve[0].threshold == 0.0 and curve[0].expected_cost == 1.0
    assert curve[-1].threshold == NEVER_EXIT and curve[-1].expected_cost == 7.0
    for point in curve[:: max(1, len(curve) // 25)]:
        direct = evaluate_cascade(logits, target, COSTS, point.thresholds)
        assert direct.accuracy == point.accuracy
        assert direct.expected_cost == point.expected_cost
        assert direct.exit_fractions == point.exit_fractions
        assert direct.nll == pytest.approx(point.nll, rel=1e-9)
    subsampled = cascade_curve(logits, target, COSTS, num_thresholds=10)
    assert len(subsampled) == 10
    assert subsampled[0].threshold == 0.0 and subsampled[-1].threshold == NEVER_EXIT
    assert {p.thresholds for p in subsampled} <= {p.thresholds for p in curve}


def test_calibration_to_a_target_accuracy_is_the_cheapest_point_reaching_it() -> None:
    logits, target = noisy_copies(2000, seed=0)
    curve = cascade_curve(logits, target, COSTS)
    first, full = curve[0].accuracy, curve[-1].accuracy
    assert first < full
    for target_accuracy in (first, (first + full) / 2, full - 0.005, full):
        chosen = calibrate_threshold(logits, target, COSTS, target_accuracy=target_accuracy)
        assert chosen.accuracy >= target_accuracy
        cheapest = min(p.expected_cost for p in curve if p.accuracy >= target_accuracy)
        assert chosen.expected_cost == cheapest
        if target_accuracy < full:  # early exits pay off: cheaper than running every member
            assert chosen.expected_cost < curve[-1].expected_cost
        # The returned point is evaluate_cascade at the chosen threshold (with per-sample tensors).
        assert chosen.exit_stage is not None and chosen.threshold is not None
        again = evaluate_cascade(logits, target, COSTS, chosen.threshold)
        assert (again.accuracy, again.expected_cost) == (chosen.accuracy, chosen.expected_cost)
    # Calibrated on validation data, the threshold carries over to held-out data from the same distribution.
    mid = (first + full) / 2
    threshold = calibrate_threshold(logits, target, COSTS, target_accuracy=mid).threshold
    assert threshold is not None
    test_logits, test_target = noisy_copies(2000, seed=1)
    held_out = evaluate_cascade(test_logits, test_target, COSTS, threshold)
    assert held_out.accuracy == pytest.approx(mid, abs=0.03) and held_out.expected_cost < 7.0


def test_calibration_to_a_cost_budget_is_the_most_accurate_point_within_it() -> None:
    logits, target = noisy_copies(2000, seed=0)
    curve = cascade_curve(logits, target, COSTS)
    for budget in (1.0, 1.5, 2.5, 4.0, 7.0, 100.0):
        chosen = calibrate_threshold(logits, target, COSTS, cost_budget=budget)
        within = [p for p in curve if p.expected_cost <= budget]
        best = max(p.accuracy for p in within)
        assert chosen.expected_cost <= budget
        assert chosen.accuracy == best
        assert chosen.expected_cost == min(p.expected_cost for p in within if p.accuracy == best)


def test_as_dict_is_plain_python() -> None:
    result = evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=0.9)
    values = result.as_dict()
    assert values == {
        "accuracy": 0.75,
        "nll": result.nll,
        "expected_cost": 4.5,
        "exit_fractions": [0.25, 0.25, 0.5],
        "thresholds": [0.9, 0.9],
        "order": [0, 1, 2],
        "stage_costs": [1.0, 3.0, 7.0],
        "num_samples": 4,
        "threshold": 0.9,
    }
    assert isinstance(result, CascadeResult) and result.full_cost == 7.0


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        (1.5, r"`thresholds`.*\[0, 1\] or NEVER_EXIT.*but got 1\.5"),
        (-0.1, r"`thresholds`.*but got -0\.1"),
        (math.nan, r"`thresholds`.*but got nan"),
        (-math.inf, r"`thresholds`.*but got -inf"),
        ([0.5, 1.5], r"`thresholds`.*entry 1, the threshold of stage 2, is 1\.5"),
        ([0.5], r"`thresholds`.*M - 1 = 2.*but got 1 values"),
        ([0.5, 0.5, 0.5], r"`thresholds`.*but got 3 values"),
        ("0.5", r"`thresholds`"),
        (True, r"`thresholds`"),
    ],
)
def test_bad_thresholds(thresholds: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=thresholds)  # type: ignore[arg-type]


def test_never_exit_and_the_interval_ends_are_allowed() -> None:
    for thresholds in (NEVER_EXIT, 0, 1, 1.0, [NEVER_EXIT, 0.3], (0.0, 1.0)):
        evaluate_cascade(HAND_PROBS.log(), HAND_TARGET, COSTS, thresholds=thresholds)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(costs=[1.0, 2.0]), r"`costs`.*M = 3 finite costs > 0.*\[1\.0, 2\.0\]"),
        (dict(costs=[1.0, 0.0, 2.0]), r"`costs`.*> 0"),
        (dict(costs=[1.0, -1.0, 2.0]), r"`costs`"),
        (dict(costs=[1.0, math.inf, 2.0]), r"`costs`"),
        (dict(order=[0, 1, 1]), r"`order`.*permutation of range\(3\).*\[0, 1, 1\]"),
        (dict(aggregation="median"), r"`aggregation`.*'median'"),
        (dict(target=torch.tensor([0, 1, 2])), r"`target` of shape \(N,\) = \(4,\)"),
        (dict(target=torch.tensor([0, 1, 2, 0])), r"`target`.*class indices in \[0, 2\)"),
        (dict(logits=torch.zeros(3, 4)), r"`logits`.*\(M, N, C\)"),
    ],
)
def test_bad_inputs(kwargs: dict, message: str) -> None:
    args = dict(logits=HAND_PROBS.log(), target=HAND_TARGET, costs=COSTS, thresholds=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate_cascade(**args)  # type: ignore[arg-type]


def test_calibration_errors() -> None:
    logits, target = noisy_copies(200)
    with pytest.raises(ValueError, match=r"exactly one of `target_accuracy` and `cost_budget`.*neither"):
        calibrate_threshold(logits, target, COSTS)
    with pytest.raises(ValueError, match=r"exactly one of `target_accuracy` and `cost_budget`.*both"):
        calibrate_threshold(logits, target, COSTS, target_accuracy=0.5, cost_budget=3.0)
    with pytest.raises(
        ValueError, match=r"`cost_budget`.*at least 1\.0.*cheapest member \(member 0\) costs 1\.0"
    ):
        calibrate_threshold(logits, target, COSTS, cost_budget=0.5)
    with pytest.raises(ValueError, match=r"cheapest member \(member 1\) costs 0\.5"):
        calibrate_threshold(logits, target, [2.0, 0.5, 1.0], cost_budget=0.25)
    with pytest.raises(ValueError, match=r"`cost_budget` to be a finite float > 0"):
        calibrate_threshold(logits, target, COSTS, cost_budget=-1.0)
    with pytest.raises(ValueError, match=r"`target_accuracy` to be a float in \[0, 1\]"):
        calibrate_threshold(logits, target, COSTS, target_accuracy=1.5)
    best = max(p.accuracy for p in cascade_curve(logits, target, COSTS))
    assert best < 1.0
    with pytest.raises(ValueError, match=rf"`target_accuracy` to be reachable.*best accuracy .* is {best!r}"):
        calibrate_threshold(logits, target, COSTS, target_accuracy=1.0)
    with pytest.raises(ValueError, match=r"`num_thresholds` to be None or an int >= 2, but got 1"):
        cascade_curve(logits, target, COSTS, num_thresholds=1)


def test_runs_on_float16_logits_and_keeps_per_sample_results_on_cpu() -> None:
    logits, target = noisy_copies(100)
    half = evaluate_cascade(logits.half(), target, COSTS, thresholds=0.8)
    assert half.exit_stage is not None and half.exit_stage.device.type == "cpu"
    assert_close(
        half.expected_cost, evaluate_cascade(logits, target, COSTS, 0.8).expected_cost, atol=0.1, rtol=0
    )


def test_stages_built_batch_by_batch_equal_the_whole_and_give_the_ensemble_sizes() -> None:
    logits, target = noisy_copies(300)
    costs = [4.0, 1.0, 2.0]  # runs members 1, 2, 0
    whole = cascade_stages(logits, target, costs)
    parts = [cascade_stages(logits[:, i : i + 64], target[i : i + 64], costs) for i in range(0, 300, 64)]
    joined = CascadeStages.cat(parts)
    for name in ("confidence", "prediction", "correct", "nll"):
        assert torch.equal(getattr(joined, name), getattr(whole, name))
    assert joined.evaluate(0.7) == whole.evaluate(0.7) == evaluate_cascade(logits, target, costs, 0.7)
    assert joined.curve(12) == cascade_curve(logits, target, costs, num_thresholds=12)
    # sizes(): the first k members in running order, which EnsembleMetrics computes on reordered logits.
    metrics = EnsembleMetrics(num_members=3, num_classes=5)
    metrics.update(logits[list(whole.order)], target)
    expected = metrics.compute()
    for k, point in enumerate(whole.sizes(), start=1):
        assert point.expected_cost == whole.stage_costs[k - 1]
        assert point.accuracy == pytest.approx(expected[f"size_{k}/top1"].item(), abs=1e-6)
        assert point.nll == pytest.approx(expected[f"size_{k}/nll"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="same `costs` and `order`"):
        CascadeStages.cat([parts[0], cascade_stages(logits[:, :10], target[:10], COSTS)])
    with pytest.raises(ValueError, match="at least one"):
        CascadeStages.cat([])


@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits", "vote"])
def test_stages_reuse_the_first_k_ensembles_only_in_member_order(aggregation: str) -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 40, 5), torch.randint(0, 5, (40,))
    first_k = cumulative_log_probs(logits, aggregation)
    costs = [1.0, 1.0, 1.0]  # ties run in index order: the stages are the first k members
    reused = cascade_stages(logits, target, costs, aggregation=aggregation, first_k_log_probs=first_k)
    fresh = cascade_stages(logits, target, costs, aggregation=aggregation)
    for name in ("confidence", "prediction", "correct", "nll"):
        assert torch.equal(getattr(reused, name), getattr(fresh, name))
    # another running order: the first-k ensembles are not its stages, so they are ignored
    shuffled = cascade_stages(
        logits, target, [3.0, 1.0, 2.0], aggregation=aggregation, first_k_log_probs=first_k
    )
    expected = cascade_stages(logits, target, [3.0, 1.0, 2.0], aggregation=aggregation)
    assert torch.equal(shuffled.nll, expected.nll) and shuffled.order == (1, 2, 0)
    # negative control: wrong first-k ensembles change the result, so they really are read
    wrong = cascade_stages(logits, target, costs, aggregation=aggregation, first_k_log_probs=first_k.flip(0))
    assert not torch.equal(wrong.nll, fresh.nll)
    with pytest.raises(
        ValueError, match=r"`first_k_log_probs` to have the shape of the logits, \(3, 40, 5\)"
    ):
        cascade_stages(logits, target, costs, first_k_log_probs=first_k[:, :10])
