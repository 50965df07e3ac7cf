"""OOD detection metrics (lightning_ensembles.ood) and their wiring into EnsembleLightningModule.test."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from lightning_ensembles.callbacks import EnsembleSizeAblation
from lightning_ensembles.callbacks.cascade import CascadeMonitor
from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.ood import OOD_CRITERIA, OODMetrics, fpr_at_tpr, ood_scores, resolve_ood_criteria
from lightning_ensembles.uncertainty import uncertainty_scores
from tests.helpers import (
    IN_FEATURES,
    NUM_CLASSES,
    TinyDataModule,
    TinyNet,
    fast_recipe_args,
    make_data,
    trainer_kwargs,
)

C = 4


def _logits_with_msp(msp: list[float], num_members: int = 2) -> torch.Tensor:
    """Member logits (M, B, C): every member predicts class 0 with probability ``msp[b]``, the rest evenly."""
    probs = torch.tensor([[p] + [(1 - p) / (C - 1)] * (C - 1) for p in msp])
    return probs.log().expand(num_members, -1, -1).clone()


def _metrics_of(in_msp: list[float], ood_msp: list[float], **kwargs: Any) -> dict[str, float]:
    metrics = OODMetrics(num_members=2, num_classes=C, **kwargs)
    metrics.update(_logits_with_msp(in_msp), is_ood=False)
    metrics.update(_logits_with_msp(ood_msp), is_ood=True)
    return {name: float(value) for name, value in metrics.compute().items()}


def test_separable_scores_give_perfect_metrics_and_reversed_ones_auroc_zero() -> None:
    confident, unsure = [0.99, 0.95, 0.9, 0.8], [0.5, 0.4, 0.3]
    perfect = _metrics_of(confident, unsure, criteria=["msp", "entropy"])
    for criterion in ("msp", "entropy"):
        assert perfect[f"{criterion}/auroc"] == pytest.approx(1.0)
        assert perfect[f"{criterion}/aupr"] == pytest.approx(1.0)
        assert perfect[f"{criterion}/fpr95"] == pytest.approx(0.0)
    reversed_ = _metrics_of(unsure, confident, criteria=["msp"])
    assert reversed_["msp/auroc"] == pytest.approx(0.0)
    assert reversed_["msp/fpr95"] == pytest.approx(1.0)  # every in-distribution sample is flagged first


def test_hand_computed_case_matches_scikit_learn() -> None:
    # OOD score 1 - msp: in-distribution 0.1, 0.4, 0.6, 0.3; OOD 0.35, 0.8, 0.6 (a tie with an in-dist one).
    in_msp, ood_msp = [0.9, 0.6, 0.4, 0.7], [0.65, 0.2, 0.4]
    values = _metrics_of(in_msp, ood_msp, criteria=["msp"])
    scores = [1 - p for p in in_msp + ood_msp]
    target = [0] * len(in_msp) + [1] * len(ood_msp)
    assert values["msp/auroc"] == pytest.approx(roc_auc_score(target, scores), abs=1e-6)
    assert values["msp/aupr"] == pytest.approx(average_precision_score(target, scores), abs=1e-6)
    # By hand: pairs (ood, in) ranked correctly: 0.35 > {0.1, 0.3}: 2; 0.8 > all 4: 4; 0.6 > {0.1, 0.4, 0.3}
    # and ties 0.6: 3.5 -> (2 + 4 + 3.5) / 12.
    assert values["msp/auroc"] == pytest.approx(9.5 / 12, abs=1e-6)
    # Detecting >= 95% of the OOD samples needs all 3, i.e. threshold 0.35: in-dist 0.4 and 0.6 are above it.
    assert values["msp/fpr95"] == pytest.approx(2 / 4)


def test_fpr95_reads_the_first_point_at_95_percent_tpr() -> None:
    # 20 OOD samples: 18 above every in-distribution score, the 19th (95%) at 0.7, below the in-dist 0.8.
    metrics = OODMetrics(num_members=2, num_classes=2, criteria=["msp"])
    target = torch.tensor([False] * 10 + [True] * 20)
    in_scores = torch.cat([torch.linspace(0.0, 0.4, 9), torch.tensor([0.8])])
    ood = torch.cat([torch.linspace(0.9, 1.0, 18), torch.tensor([0.7, 0.05])])
    score = torch.cat([in_scores, ood])
    p = 1.0 - score / 2  # 1 - msp = score / 2 with two classes: same ranking
    logits = torch.stack([p, 1 - p], dim=-1).log().expand(2, -1, -1)
    metrics.update(logits, is_ood=target)
    assert float(metrics.compute()["msp/fpr95"]) == pytest.approx(0.1)  # only the 0.8 in-dist sample
    fpr, tpr = torch.tensor([0.0, 0.0, 0.1, 1.0]), torch.tensor([0.0, 0.5, 0.95, 1.0])
    assert float(fpr_at_tpr(fpr, tpr)) == pytest.approx(0.1)


def test_scores_are_normalised_uncertainties() -> None:
    logits = torch.randn(3, 6, C)
    raw = uncertainty_scores(logits)
    scores = ood_scores(logits)
    torch.testing.assert_close(scores["msp"], 1 - raw["msp"])
    torch.testing.assert_close(scores["entropy"], raw["entropy"] / math.log(C))
    torch.testing.assert_close(scores["mutual_information"], raw["mutual_information"] / math.log(C))
    assert all(bool(((s >= 0) & (s <= 1)).all()) for s in scores.values())


def test_states_are_torchmetrics_and_merging_shards_equals_one_pass() -> None:
    """DDP correctness: the state is torchmetrics', so merging two processes' states is one pass's."""
    torch.manual_seed(0)
    batches = [(torch.randn(2, 8, C), bool(i % 2)) for i in range(4)]
    whole, first, second = (OODMetrics(2, C) for _ in range(3))
    for i, (logits, is_ood) in enumerate(batches):
        whole.update(logits, is_ood)
        (first if i < 2 else second).update(logits, is_ood)
    for group in ("auroc", "aupr", "roc"):
        for name in first.criteria:
            getattr(first, group)[name].merge_state(getattr(second, group)[name])
    first.num_ood.merge_state(second.num_ood)
    first.num_in.merge_state(second.num_in)
    expected, merged = whole.compute(), first.compute()
    assert sorted(merged) == sorted(f"{c}/{m}" for c in OOD_CRITERIA for m in ("auroc", "aupr", "fpr95"))
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])


def test_nothing_is_computed_without_both_kinds_of_samples() -> None:
    metrics = OODMetrics(2, C)
    metrics.update(torch.randn(2, 5, C), is_ood=False)
    assert metrics.compute() == {}
    metrics.reset()
    assert OODMetrics(2, C, criteria=[]).compute() == {}


def test_criteria_defaults_and_errors() -> None:
    assert resolve_ood_criteria(None, 1) == ("msp", "entropy")
    assert resolve_ood_criteria(None, 2) == OOD_CRITERIA
    assert resolve_ood_criteria(["entropy"], 1) == ("entropy",)
    with pytest.raises(ValueError, match=r"`--model.ood_criteria`.*'max_logit' is not one"):
        resolve_ood_criteria(["msp", "max_logit"], 2)
    with pytest.raises(ValueError, match=r"`--model.ood_criteria`.*distinct"):
        resolve_ood_criteria(["msp", "msp"], 2)
    with pytest.raises(ValueError, match=r"`--model.ood_criteria`"):
        resolve_ood_criteria("msp", 2)  # type: ignore[arg-type]


def test_module_rejects_mutual_information_for_one_member_and_unknown_criteria() -> None:
    message = r"`--model.ood_criteria`.*'mutual_information'.*needs `--model.num_members` >= 2.*\['msp', 'entropy'\]"
    with pytest.raises(ValueError, match=message):
        EnsembleLightningModule(
            member=TinyNet, num_members=1, num_classes=NUM_CLASSES, ood_criteria=["mutual_information"]
        )
    with pytest.raises(ValueError, match=r"`--model.ood_criteria`.*'energy' is not one"):
        EnsembleLightningModule(
            member=TinyNet, num_members=2, num_classes=NUM_CLASSES, ood_criteria=["energy"]
        )
    module = EnsembleLightningModule(member=TinyNet, num_members=1, num_classes=NUM_CLASSES)
    assert module.test_ood_metrics.criteria == ("msp", "entropy")
    module.grow(1)
    assert module.test_ood_metrics.criteria == OOD_CRITERIA  # re-resolved for M = 2


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def trained_on_digits() -> tuple[EnsembleLightningModule, DigitsDataModule, list[dict[str, float]]]:
    dm = DigitsDataModule(batch_size=64, ood_classes=[8, 9], seed=0)
    module = EnsembleLightningModule(
        member=functools.partial(DigitsNet, num_classes=dm.num_classes),
        num_members=2,
        num_classes=dm.num_classes,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    trainer = pl.Trainer(max_epochs=2, **trainer_kwargs())
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm, verbose=False)
    return module, dm, results


def test_module_logs_ood_metrics_next_to_unchanged_test_metrics(
    trained_on_digits: tuple[EnsembleLightningModule, DigitsDataModule, list[dict[str, float]]],
) -> None:
    module, dm, results = trained_on_digits
    assert len(results) == 2  # one dict per test loader
    merged = {key: value for per_loader in results for key, value in per_loader.items()}
    for criterion in OOD_CRITERIA:
        for metric in ("auroc", "aupr", "fpr95"):
            assert 0.0 <= merged[f"test/ood/{criterion}/{metric}"] <= 1.0
    assert merged["test/ood/msp/auroc"] > 0.6  # digits 8 and 9 look unfamiliar to an 8-digit model
    assert not any("dataloader_idx" in key for key in merged)
    # In-distribution metrics are those of the in-distribution test split alone (8 classes).
    assert dm.num_classes == 8 and module.num_classes == 8
    assert dm.test_set is not None
    x, y = dm.test_set.tensors
    module.eval()
    with torch.no_grad():
        probs = module(x).softmax(dim=-1).mean(dim=0)
    top1 = float((probs.argmax(dim=-1) == y).float().mean())
    assert merged["test/top1"] == pytest.approx(top1, abs=1e-6)
    # The OOD metrics equal a direct computation on both sets.
    assert dm.ood_set is not None
    with torch.no_grad():
        in_scores = ood_scores(module(x))["msp"]
        ood = ood_scores(module(dm.ood_set.tensors[0]))["msp"]
    target = [0] * len(in_scores) + [1] * len(ood)
    expected = roc_auc_score(target, torch.cat([in_scores, ood]).numpy())
    assert merged["test/ood/msp/auroc"] == pytest.approx(expected, abs=1e-5)


def _Data(ood_features: int = IN_FEATURES) -> TinyDataModule:
    """Tiny in-distribution data (40 test samples), plus an OOD test loader of ``ood_features`` features."""
    return TinyDataModule(n_test=40, batch_size=16, ood_shape=(ood_features,))


def _module(num_members: int = 2) -> EnsembleLightningModule:
    return EnsembleLightningModule(member=TinyNet, num_members=num_members, num_classes=NUM_CLASSES)


def test_ood_batch_of_another_shape_is_a_clear_error() -> None:
    trainer = pl.Trainer(**trainer_kwargs())
    with pytest.raises(
        ValueError, match=r"OOD test loader.*in-distribution per-sample shape \(12,\).*\(7,\)"
    ):
        trainer.test(_module(), datamodule=_Data(ood_features=7), verbose=False)


def _callbacks() -> tuple[EnsembleSizeAblation, CascadeMonitor]:
    return (
        EnsembleSizeAblation(latency_batch_size=None, figures=False, verbose=False),
        CascadeMonitor(input_shape=(IN_FEATURES,)),
    )


def test_callbacks_ignore_the_ood_loader(tmp_path: Path) -> None:
    module = _module()
    ablation, cascade = _callbacks()
    with_ood = pl.Trainer(
        **trainer_kwargs(default_root_dir=tmp_path / "a", callbacks=[ablation, cascade])
    ).test(module, datamodule=_Data(), verbose=False)
    assert "test/ood/msp/auroc" in with_ood[0]
    alone_ablation, alone_cascade = _callbacks()
    pl.Trainer(
        **trainer_kwargs(default_root_dir=tmp_path / "b", callbacks=[alone_ablation, alone_cascade])
    ).test(module, dataloaders=DataLoader(make_data(40, seed=2), batch_size=16), verbose=False)
    assert ablation.history and len(ablation.history) == len(alone_ablation.history)
    for with_row, alone_row in zip(ablation.history, alone_ablation.history):
        # the in-distribution metrics are untouched by the OOD loader, which adds the OOD AUROC per size
        assert {k: v for k, v in with_row.items() if "ood" not in k} == alone_row
        assert 0.0 <= with_row["random_ood_auroc"] <= 1.0 and "first_ood_auroc" not in alone_row
    full = ablation.history[-1]
    assert full["first_ood_auroc"] == pytest.approx(with_ood[0]["test/ood/entropy/auroc"], abs=1e-6)
    assert cascade.results["test"] == alone_cascade.results["test"]


def test_recipe_merges_the_two_test_loaders_results(tmp_path: Path) -> None:
    """``fit_test_report`` gets one dict per test loader from Lightning and merges them."""
    configs = Path(__file__).resolve().parents[1] / "reproductions" / "configs"
    cli = EnsembleCLI(
        args=[
            "--config", str(configs / "cifar_wrn.yaml"),
            "--config", str(configs / "digits/quickstart.yaml"),
            "--config", str(configs / "cifar/wrn-16-1.yaml"),
            "--data.ood_classes=[8, 9]",
            *fast_recipe_args(tmp_path / "logs"),
            "--trainer.limit_train_batches=2",
        ],
        run=False,
    )  # fmt: skip
    assert (
        cli.model.num_classes == 8 == cli.model.members[0].num_classes
    )  # linked from the data, to the members
    results = cli.fit_test_report()
    assert results["num_members"] == cli.model.num_members and 0.0 <= results["ensemble"]["top1"] <= 1.0
    assert "test/ood/msp/auroc" in cli.trainer.callback_metrics
    assert 0.0 <= results["ensemble"]["ood/msp/auroc"] <= 1.0  # kept in results.json
