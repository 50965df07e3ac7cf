"""Cascade inference that exits early: equal to ``evaluate_cascade``, and each member sees only what is left."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import CascadeEnsemble, EnsembleLightningModule
from lightning_ensembles.aggregation import aggregate, cumulative_probs
from lightning_ensembles.cascade import NEVER_EXIT, CascadeResult, evaluate_cascade
from lightning_ensembles.cascade_inference import CascadeLightningModule, CascadeOutput
from lightning_ensembles.cost import count_macs
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyNet, make_data, make_loader, sgd, trainer_kwargs


class Table(nn.Module):
    """A member that looks its logits up: input ``(B, 1)`` holds sample indices into ``logits`` ``(N, C)``."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[x[:, 0].long()]


def random_logits(
    num_members: int = 4, num_samples: int = 200, num_classes: int = 5, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Members of increasing skill: one-hot truth times 1, 2, ... plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (num_samples,), generator=g)
    truth = F.one_hot(target, num_classes).float()
    noise = torch.randn(num_members, num_samples, num_classes, generator=g)
    scale = torch.arange(1, num_members + 1, dtype=torch.float32).view(-1, 1, 1)
    return scale * truth + 1.5 * noise, target


def table_ensemble(logits: Tensor, aggregation: str = "mean_probs") -> EnsembleLightningModule:
    members: list = [Table(member_logits) for member_logits in logits]
    return EnsembleLightningModule(members=members, num_classes=logits.shape[-1], aggregation=aggregation)


@contextmanager
def recorded_inputs(module: EnsembleLightningModule) -> Iterator[list[list[Tensor]]]:
    """The inputs every member is called with, per member (forward hooks)."""
    calls: list[list[Tensor]] = [[] for _ in module.members]
    handles = [
        member.register_forward_hook(lambda _m, args, _out, i=i: calls[i].append(args[0].detach().clone()))
        for i, member in enumerate(module.members)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def assert_matches(
    output: CascadeOutput, cascade: CascadeEnsemble, result: CascadeResult, target: Tensor
) -> None:
    """Per-sample class and exit stage, exit fractions, accuracy and expected cost all equal."""
    assert result.exit_stage is not None and result.prediction is not None
    prediction = output.probs.max(dim=-1).indices  # ties to the lowest class, as `cascade_stages`
    assert torch.equal(output.exit_stage, result.exit_stage)
    assert torch.equal(prediction, result.prediction)
    counts = torch.bincount(output.exit_stage - 1, minlength=cascade.num_members)
    assert tuple(c / len(target) for c in counts.tolist()) == result.exit_fractions
    assert (prediction == target).double().mean().item() == result.accuracy
    assert cascade.expected_cost(output.exit_stage) == result.expected_cost
    assert cascade.stage_costs == result.stage_costs and cascade.order == result.order


def assert_each_member_saw_what_was_left(
    calls: list[list[Tensor]], exit_stage: Tensor, order: Sequence[int], positions: Tensor
) -> None:
    """Member ``order[k]`` ran once on exactly the samples (in batch order) that had not exited before
    stage ``k + 1``, or not at all when none were left."""
    for k, index in enumerate(order):
        expected = positions[exit_stage > k]
        if expected.numel() == 0:
            assert calls[index] == [], f"member {index} (stage {k + 1}) ran though no sample was left"
        else:
            assert len(calls[index]) == 1
            assert torch.equal(calls[index][0], expected), f"member {index} (stage {k + 1})"


# ---------------------------------------------------------------------- random logits via lookup members

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0, NEVER_EXIT, [0.5, 0.8, 0.95], [NEVER_EXIT, 0.6, 0.0]]


@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits", "vote"])
@pytest.mark.parametrize(("costs", "order"), [([1.0, 1.0, 1.0, 1.0], None), ([4.0, 1.0, 3.0, 2.0], None),
                                              ([4.0, 1.0, 3.0, 2.0], [2, 0, 3, 1])])  # fmt: skip
@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=str)
def test_equals_evaluate_cascade_and_runs_each_member_on_what_is_left(
    aggregation: str, costs: list[float], order: list[int] | None, thresholds: float | list[float]
) -> None:
    logits, target = random_logits()
    module = table_ensemble(logits, aggregation)
    cascade = CascadeEnsemble(module, thresholds, costs=costs, order=order)
    x = torch.arange(len(target), dtype=torch.float32).unsqueeze(1)
    with recorded_inputs(module) as calls:
        output = cascade.forward_with_exits(x)
    result = evaluate_cascade(logits, target, costs, thresholds, order=order, aggregation=aggregation)
    assert_matches(output, cascade, result, target)
    assert_each_member_saw_what_was_left(calls, output.exit_stage, cascade.order, x)
    # The probabilities are those of the stage each sample exited at.
    stages = cumulative_probs(logits[list(cascade.order)], aggregation)
    assert_close(output.probs, stages[output.exit_stage - 1, torch.arange(len(target))])
    assert_close(cascade(x), output.probs, rtol=0, atol=0)


def test_threshold_zero_runs_only_the_first_member_and_never_exit_is_the_full_ensemble() -> None:
    logits, target = random_logits()
    module = table_ensemble(logits)
    x = torch.arange(len(target), dtype=torch.float32).unsqueeze(1)
    costs = [4.0, 1.0, 3.0, 2.0]
    with recorded_inputs(module) as calls:
        first = CascadeEnsemble(module, 0.0, costs=costs).forward_with_exits(x)
    assert [len(c) for c in calls] == [0, 1, 0, 0] and (first.exit_stage == 1).all()
    assert_close(first.probs, logits[1].softmax(dim=-1))
    with recorded_inputs(module) as calls:
        full = CascadeEnsemble(module, NEVER_EXIT, costs=costs).forward_with_exits(x)
    assert [c[0].shape[0] for c in calls] == [len(target)] * 4 and (full.exit_stage == 4).all()
    assert_close(full.probs, aggregate(logits))
    assert_close(full.probs, module.predict_step(x, 0)["probs"])


def test_thresholds_can_be_changed_and_are_checked() -> None:
    logits, target = random_logits(num_members=3)
    cascade = CascadeEnsemble(table_ensemble(logits), 0.5, costs=[1.0, 2.0, 3.0])
    assert cascade.thresholds == (0.5, 0.5)
    cascade.thresholds = [0.7, NEVER_EXIT]
    assert cascade.thresholds == (0.7, NEVER_EXIT)
    x = torch.arange(len(target), dtype=torch.float32).unsqueeze(1)
    result = evaluate_cascade(logits, target, [1.0, 2.0, 3.0], [0.7, NEVER_EXIT])
    assert_matches(cascade.forward_with_exits(x), cascade, result, target)
    with pytest.raises(ValueError, match=r"`thresholds`.*M - 1 = 2.*got 3 values"):
        cascade.thresholds = [0.1, 0.2, 0.3]
    assert cascade.thresholds == (0.7, NEVER_EXIT)


def test_an_empty_batch_and_a_single_member() -> None:
    logits, target = random_logits(num_members=1, num_samples=6)
    cascade = CascadeEnsemble(table_ensemble(logits), [], costs=[2.0])
    empty = cascade.forward_with_exits(torch.zeros(0, 1))
    assert empty.probs.shape == (0, NUM_CLASSES) and empty.exit_stage.shape == (0,)
    output = cascade.forward_with_exits(torch.arange(6, dtype=torch.float32).unsqueeze(1))
    assert (output.exit_stage == 1).all() and cascade.expected_cost(output.exit_stage) == 2.0
    assert_close(output.probs, logits[0].softmax(dim=-1))


# ---------------------------------------------------------------------- a small trained ensemble


@pytest.fixture(scope="module")
def trained() -> EnsembleLightningModule:
    """Three TinyNets of different width (so different cost), trained briefly; BatchNorm has running stats."""
    members: list = [functools.partial(TinyNet, hidden=h) for h in (32, 8, 16)]
    module = EnsembleLightningModule(members=members, num_classes=NUM_CLASSES, optimizer=sgd(lr=0.05))
    Trainer(max_epochs=3, **trainer_kwargs()).fit(module, make_loader(128, batch_size=16, seed=1))
    return module.eval()


@pytest.mark.parametrize(
    "thresholds", [0.0, 0.4, 0.6, 0.8, 0.95, NEVER_EXIT, [0.6, 0.9], [NEVER_EXIT, 0.5]], ids=str
)
def test_trained_ensemble_equals_evaluate_cascade_with_counted_costs(
    trained: EnsembleLightningModule, thresholds: float | list[float]
) -> None:
    x, target = make_data(96, seed=2).tensors
    cascade = CascadeEnsemble(trained, thresholds, input_shape=(IN_FEATURES,))
    costs = [float(count_macs(m, (IN_FEATURES,))) for m in trained.members]
    assert cascade.costs == tuple(costs) and cascade.order == (1, 2, 0)  # cheapest (narrowest) first
    with torch.no_grad():
        logits = trained(x)  # (M, N, C), the whole batch at once, eval mode
    result = evaluate_cascade(logits, target, costs, thresholds)
    with recorded_inputs(trained) as calls:
        output = cascade.forward_with_exits(x)
    assert_matches(output, cascade, result, target)
    assert_each_member_saw_what_was_left(calls, output.exit_stage, cascade.order, x)
    if thresholds == NEVER_EXIT:
        assert_close(output.probs, trained.predict_step((x, target), 0)["probs"])
    if thresholds == 0.8:  # a threshold that really splits the samples: some skip members, some run all
        assert 0 < int((output.exit_stage == 1).sum()) < len(target)


def test_members_run_in_eval_mode_whatever_the_module_mode_and_modes_are_restored(
    trained: EnsembleLightningModule,
) -> None:
    x, _ = make_data(40, seed=3).tensors
    cascade = CascadeEnsemble(trained, 0.6, input_shape=(IN_FEATURES,))
    reference = cascade.forward_with_exits(x)
    trained.train()
    trained.members[0].eval()  # a mixed state, restored as it was
    try:
        output = cascade.forward_with_exits(x)
        assert trained.training and trained.members[1].training and not trained.members[0].training
    finally:
        trained.eval()
    assert torch.equal(output.exit_stage, reference.exit_stage)
    assert_close(output.probs, reference.probs)
    assert not output.probs.requires_grad


def test_trainer_predict_returns_probs_and_exit_stages(trained: EnsembleLightningModule) -> None:
    x, target = make_data(96, seed=2).tensors
    cascade = CascadeEnsemble(trained, [0.6, 0.9], input_shape=(IN_FEATURES,))
    predictor = cascade.as_lightning_module()
    assert isinstance(predictor, CascadeLightningModule)
    loader = DataLoader(TensorDataset(x, target), batch_size=32)
    batches = Trainer(**trainer_kwargs()).predict(predictor, loader)
    assert batches is not None and len(batches) == 3 and set(batches[0]) == {"probs", "exit_stage"}
    probs = torch.cat([b["probs"] for b in batches])  # type: ignore[index]
    exit_stage = torch.cat([b["exit_stage"] for b in batches])  # type: ignore[index]
    with torch.no_grad():
        logits = trained(x)
    result = evaluate_cascade(logits, target, cascade.costs, [0.6, 0.9])
    assert_matches(CascadeOutput(probs, exit_stage), cascade, result, target)
    assert exit_stage.dtype == torch.int64 and probs.shape == (96, NUM_CLASSES)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(thresholds=1.5), r"`thresholds` to be a float in \[0, 1\] or NEVER_EXIT.*got 1.5"),
        (dict(thresholds=-0.1), r"`thresholds`.*got -0.1"),
        (dict(thresholds=math.nan), r"`thresholds`.*got nan"),
        (dict(thresholds=[0.5, 0.5]), r"`thresholds`.*M - 1 = 3.*got 2 values"),
        (dict(thresholds=[0.5, 2.0, 0.5]), r"`thresholds`.*entry 1, the threshold of stage 2, is 2.0"),
        (dict(thresholds="0.5"), r"`thresholds`.*got '0.5'"),
        (dict(order=[0, 1, 2, 2]), r"`order` to be None .* permutation of range\(4\).*got \[0, 1, 2, 2\]"),
        (dict(order=[0, 1, 2]), r"`order`.*permutation of range\(4\).*got \[0, 1, 2\]"),
        (dict(costs=[1.0, 2.0, 3.0]), r"`costs` to be a sequence of M = 4 finite costs > 0.*got \[1.0, 2.0, 3.0\]"),
        (dict(costs=[1.0, 2.0, 0.0, 1.0]), r"`costs`.*M = 4.*got \[1.0, 2.0, 0.0, 1.0\]"),
        (dict(costs=None), r"Expected `costs` .*M = 4.* or `input_shape`.*got neither"),
        (dict(input_shape=(1,)), r"at most one of `costs` and `input_shape`"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(kwargs: dict, match: str) -> None:
    logits, _ = random_logits()
    arguments: dict = {"thresholds": 0.5, "costs": [1.0, 2.0, 3.0, 4.0], **kwargs}
    with pytest.raises(ValueError, match=match):
        CascadeEnsemble(table_ensemble(logits), **arguments)


def test_a_module_that_is_not_an_ensemble_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"CascadeEnsemble\(module=\.\.\.\) needs an EnsembleLightningModule, but got Linear"
    ):
        CascadeEnsemble(nn.Linear(4, 3), 0.5, costs=[1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`cascade` to be a CascadeEnsemble.*got Linear"):
        CascadeLightningModule(nn.Linear(4, 3))  # type: ignore[arg-type]


def test_expected_cost_checks_its_stages() -> None:
    logits, _ = random_logits(num_members=2)
    cascade = CascadeEnsemble(table_ensemble(logits), 0.5, costs=[1.0, 3.0])
    assert cascade.expected_cost(torch.tensor([1, 2, 2, 1])) == 2.5
    with pytest.raises(ValueError, match=r"`exit_stage`.*\[1, 2\].*got \[0, 3\]"):
        cascade.expected_cost(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"`exit_stage`.*got \[\]"):
        cascade.expected_cost(torch.tensor([], dtype=torch.long))


def test_a_fitted_ensemble_temperature_is_not_applied_and_says_so() -> None:
    logits, target = random_logits(num_members=2)
    module = table_ensemble(logits)
    module.ensemble_temperature.fill_(2.0)
    module.member_temperature.copy_(torch.tensor([0.5, 2.0]))
    with pytest.warns(UserWarning, match="ensemble temperature .*2.*not applied"):
        cascade = CascadeEnsemble(module, 0.7, costs=[1.0, 2.0])
    x = torch.arange(len(target), dtype=torch.float32).unsqueeze(1)
    tempered = logits / module.member_temperature.view(-1, 1, 1)  # the member temperatures are applied
    assert_matches(
        cascade.forward_with_exits(x), cascade, evaluate_cascade(tempered, target, [1.0, 2.0], 0.7), target
    )
