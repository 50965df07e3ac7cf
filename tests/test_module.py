"""EnsembleLightningModule: independence, seeding, steps, optimisation and bad input."""

from __future__ import annotations

import functools
import random

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ensembles.members import build_member, build_members
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.uncertainty import concat_predictions, uncertainty_scores
from tests.helpers import NUM_CLASSES, TinyConvNet, TinyNet, make_loader, sgd, trainer_kwargs


def _plain_run(model: nn.Module, loader, epochs: int, clip: float | None, milestones: list[int]) -> None:
    """One member trained alone in plain PyTorch: the reference the ensemble must match."""
    optimizer = sgd()(model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_ensemble_equals_separate_plain_pytorch_runs(clip: float | None) -> None:
    num_members, epochs, seed = 3, 3, 11
    loader = make_loader(n=64, batch_size=16)
    module = EnsembleLightningModule(
        member=TinyNet,
        num_members=num_members,
        num_classes=NUM_CLASSES,
        seed=seed,
        optimizer=sgd(),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2], gamma=0.2),
    )
    trainer = pl.Trainer(max_epochs=epochs, gradient_clip_val=clip, **trainer_kwargs())
    trainer.fit(module, train_dataloaders=loader)

    for i in range(num_members):
        reference = build_member(TinyNet, seed + i)
        _plain_run(reference, loader, epochs, clip, milestones=[2])
        assert_close(module.members[i].state_dict(), reference.state_dict())

    # The test can fail: an unclipped run differs from a clipped one, so clipping really was per member.
    if clip is not None:
        unclipped = build_member(TinyNet, seed)
        _plain_run(unclipped, loader, epochs, None, milestones=[2])
        assert not torch.allclose(unclipped.head.weight, module.members[0].head.weight)


def test_members_are_seeded_in_isolation() -> None:
    torch.manual_seed(123)
    random.seed(5)
    before_torch, before_py = torch.get_rng_state(), random.getstate()
    members = build_members([TinyNet] * 4, seed=3)
    assert torch.equal(torch.get_rng_state(), before_torch)
    assert random.getstate() == before_py
    alone = build_member(TinyNet, seed=3 + 3)
    assert_close(members[3].state_dict(), alone.state_dict())
    assert not torch.equal(members[0].head.weight, members[1].head.weight)


def test_forward_shape_and_mixed_architectures_train_and_evaluate() -> None:
    module = EnsembleLightningModule(members=[TinyNet, TinyConvNet, TinyNet], num_classes=NUM_CLASSES)
    assert module.num_members == 3
    assert module(torch.randn(7, 12)).shape == (3, 7, NUM_CLASSES)
    trainer = pl.Trainer(max_epochs=2, **trainer_kwargs())
    loader = make_loader()
    trainer.fit(module, loader, loader)
    (results,) = trainer.test(module, loader, verbose=False)
    assert {"test/top1", "test/member_1/top1", "test/size_3/nll", "test/disagreement"} <= set(results)
    assert isinstance(module.members[1], TinyConvNet)


def test_predict_step_returns_probabilities_uncertainty_and_member_probabilities() -> None:
    loader = make_loader(n=20, batch_size=10)
    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    trainer = pl.Trainer(**trainer_kwargs())
    predictions = concat_predictions(trainer.predict(module, loader))
    probs = predictions["probs"]
    assert probs.shape == (20, NUM_CLASSES)
    assert_close(probs.sum(dim=1), torch.ones(20))
    module.eval()
    x = torch.cat([x for x, _ in loader])
    expected = uncertainty_scores(module(x))
    assert set(predictions) == {"probs", *expected}
    for name, value in expected.items():
        assert_close(predictions[name], value, msg=name)
    assert_close(predictions["msp"], probs.max(dim=1).values)
    module.predict_members = True
    predictions = concat_predictions(trainer.predict(module, loader))
    assert predictions["member_probs"].shape == (2, 20, NUM_CLASSES)
    assert_close(predictions["member_probs"].mean(dim=0), predictions["probs"])


def test_nonfinite_loss_names_member_and_step() -> None:
    module = EnsembleLightningModule(member=TinyNet, num_members=3, num_classes=NUM_CLASSES)
    with torch.no_grad():
        module.members[1].head.bias.fill_(float("nan"))
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs())
    with pytest.raises(FloatingPointError, match=r"Member 1 .*global step 0"):
        trainer.fit(module, make_loader())


def test_optimizer_gets_one_group_per_member() -> None:
    module = EnsembleLightningModule(member=TinyNet, num_members=3, num_classes=NUM_CLASSES, optimizer=sgd())
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["member_0", "member_1", "member_2"]
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(list(TinyNet().parameters()))] * 3


def test_optimizer_that_merges_members_is_rejected() -> None:
    def merged(groups):
        return torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)

    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=merged)
    with pytest.raises(ValueError, match="one per member"):
        module.configure_optimizers()


def test_global_norm_optimizer_is_rejected_and_accepted_without_it() -> None:
    from timm.optim import Lamb

    coupled = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=functools.partial(Lamb, lr=1e-3)
    )
    with pytest.raises(ValueError, match="max_grad_norm=1.0.*couples"):
        coupled.configure_optimizers()
    fine = EnsembleLightningModule(
        member=TinyNet,
        num_members=2,
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(Lamb, lr=1e-3, max_grad_norm=None),
    )
    assert len(fine.configure_optimizers().param_groups) == 2


def test_plateau_scheduler_is_rejected_for_several_members() -> None:
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5)
    module = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, lr_scheduler=plateau
    )
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*coupling"):
        module.configure_optimizers()
    single = EnsembleLightningModule(member=TinyNet, num_classes=NUM_CLASSES, lr_scheduler=plateau)
    assert single.configure_optimizers()["lr_scheduler"]["monitor"] == "val/loss"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(member=TinyNet, num_members=0), r"`--model.num_members` to be an int >= 1, but got 0"),
        (dict(member=TinyNet, num_members=2, aggregation="median"), r"`--model.aggregation`.*'median'"),
        (dict(), r"exactly one of `--model.member`.*neither"),
        (dict(member=TinyNet, members=[TinyNet]), r"exactly one of.*both"),
        (dict(members=[TinyNet, TinyNet], num_members=3), r"`--model.num_members` to equal the 2"),
        (dict(member=TinyNet, label_smoothing=1.5), r"`--model.label_smoothing`.*1.5"),
        (dict(member=TinyNet, num_members=2, frozen_members=[0, 1]), r"`--model.frozen_members`"),
        (dict(member=TinyNet, frozen_members=[4]), r"`--model.frozen_members`.*\[4\]"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    kwargs.setdefault("num_classes", NUM_CLASSES)
    with pytest.raises(ValueError, match=message):
        EnsembleLightningModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seed=True), r"Expected `--model.seed` to be an int >= 0, but got True"),
        (dict(seed=-1), r"Expected `--model.seed` to be an int >= 0, but got -1"),
        (
            dict(label_smoothing="x"),
            r"Expected `--model.label_smoothing` to be a float in \[0, 1\), but got 'x'",
        ),
        (
            dict(lr_scheduler_interval="batch"),
            r"`--model.lr_scheduler_interval` to be one of \['epoch', 'step'\]",
        ),
        (dict(execution="fused"), r"`--model.execution` to be one of .*'fused'"),
        (dict(temperature_scaling="member"), r"`--model.temperature_scaling` to be one of .*'member'"),
        (dict(memory_frugal=1), r"`--model.memory_frugal` to be true, false or 'auto', but got 1"),
        (dict(channels_last="yes"), r"`--model.channels_last` to be"),
        (dict(execution="vmap", compile=True), r"`--model.compile true`.*needs `--model.execution loop`"),
        (
            dict(execution="vmap", memory_frugal=True),
            r"`--model.memory_frugal true`.*`--model.execution vmap`",
        ),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "",
)
def test_every_argument_is_checked_before_any_member_is_built(kwargs: dict, message: str) -> None:
    built: list[int] = []

    def factory() -> nn.Module:
        built.append(1)
        return TinyNet()

    with pytest.raises(ValueError, match=message):
        EnsembleLightningModule(member=factory, num_members=2, num_classes=NUM_CLASSES, **kwargs)
    assert built == []


def test_num_classes_is_required() -> None:
    with pytest.raises(ValueError, match=r"`--model.num_classes` to be an int >= 2.*None"):
        EnsembleLightningModule(member=TinyNet)


def test_factory_returning_non_module_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"factory of member 0 .* returned str"):
        EnsembleLightningModule(member=lambda: "not a module", num_classes=NUM_CLASSES)


def test_members_disagreeing_in_output_shape_are_reported() -> None:
    module = EnsembleLightningModule(
        members=[TinyNet, functools.partial(TinyNet, num_classes=7)], num_classes=NUM_CLASSES
    )
    with pytest.raises(ValueError, match=r"member 1 gave \(4, 7\).*member 0': \(4, 5\)"):
        module(torch.randn(4, 12))


def test_hparams_summary_for_the_dashboard_and_a_shape_that_does_not_fit() -> None:
    class Data(pl.LightningDataModule):
        input_shape = (12,)

        def train_dataloader(self):
            return make_loader(n=16)

    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    pl.Trainer(max_steps=1, **trainer_kwargs()).fit(module, datamodule=Data())
    logged = module.hparams_initial
    assert logged["ensemble/architecture"] == "TinyNet" and logged["ensemble/num_members"] == 2
    assert logged["ensemble/ensemble_gmacs"] == pytest.approx(2 * logged["ensemble/member_gmacs"])
    assert "ensemble/architecture" not in module.hparams  # not saved into checkpoints

    Data.input_shape = (7,)
    module = EnsembleLightningModule(member=TinyNet, num_classes=NUM_CLASSES)
    with pytest.warns(UserWarning, match="Could not count multiply-adds"):
        pl.Trainer(max_steps=1, **trainer_kwargs()).fit(module, datamodule=Data())


def test_channels_last_gives_the_same_outputs_and_gradients() -> None:
    from lightning_ensembles.models import WideResNet

    factory = functools.partial(WideResNet, depth=10, width=1)
    plain = EnsembleLightningModule(member=factory, num_members=2, num_classes=10)
    fast = EnsembleLightningModule(member=factory, num_members=2, num_classes=10, channels_last=True)
    assert fast.members[0].stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 16, 16)
    assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-4)
    fast.grow(1)
    assert fast.members[2].stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_module_and_datamodule_may_share_hparam_names_with_different_values() -> None:
    class Data(pl.LightningDataModule):
        def __init__(self, seed: int = 7, label_smoothing: float = 0.0) -> None:
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self):
            return make_loader(n=16)

    module = EnsembleLightningModule(member=TinyNet, num_classes=NUM_CLASSES, seed=3, label_smoothing=0.1)
    trainer = pl.Trainer(max_steps=1, **trainer_kwargs())
    trainer.fit(module, datamodule=Data())  # Lightning refuses conflicting keys; ours are namespaced
    trainer.fit(module, datamodule=Data())  # and again (setup runs once per stage)
    assert (
        module.hparams_initial["model/seed"] == 3 and module.hparams_initial["model/label_smoothing"] == 0.1
    )
    assert module.hparams["seed"] == 3  # what checkpoints hold is unchanged


def test_member_logits_validates_the_indices() -> None:
    model = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    x = torch.randn(4, 12)
    assert model.member_logits(x, [1]).shape == (1, 4, NUM_CLASSES)
    for bad in ([0, 5], [-1], [], [True]):
        with pytest.raises(
            ValueError, match=r"`indices` of member_logits .* in \[0, 1\] .* 2 members\), but got"
        ):
            model.member_logits(x, bad)


def test_evaluation_metrics_by_stage() -> None:
    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES, optimizer=sgd())
    assert module.evaluation_metrics("val") is module.val_metrics
    assert module.evaluation_metrics("test") is module.test_metrics
    with pytest.raises(ValueError, match="Expected `stage` to be 'val' or 'test', but got 'fit'"):
        module.evaluation_metrics("fit")


def test_evaluation_values_are_logged_as_synchronised_with_no_second_reduction(
    in_process_group: None, recwarn: pytest.WarningsRecorder
) -> None:
    """torchmetrics synchronises the metrics' states once; the values, equal on every process, are logged as
    they are: no all-reduce per name, and no advice from Lightning to add one."""
    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    trainer = pl.Trainer(**trainer_kwargs(strategy="ddp"))  # a process group of one, in this process
    reduced: list[torch.Tensor] = []
    reduce = trainer.strategy.reduce

    def recording_reduce(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if tensor.is_floating_point():  # Lightning reduces the number of batches too
            reduced.append(tensor)
        return reduce(tensor, *args, **kwargs)  # type: ignore[arg-type]

    trainer.strategy.reduce = recording_reduce  # type: ignore[method-assign]
    (logged,) = trainer.validate(module, make_loader(n=40), verbose=False)
    assert torch.distributed.is_initialized() and reduced == []
    assert not [w for w in recwarn if "It is recommended to use `self.log('val/" in str(w.message)]
    (plain,) = pl.Trainer(**trainer_kwargs()).validate(module, make_loader(n=40), verbose=False)
    assert logged == plain and {"val/top1", "val/size_2/top1", "val/aurc", "val/loss"} <= set(logged)


def test_input_shape_is_recorded_and_lightnings_summary_counts_the_flops() -> None:
    """The shape the module sees becomes Lightning's example_input_array: the model summary's FLOPs are the
    members' multiply-adds x 2 (it printed "Total FLOPs: 0" before), and checkpoints keep the shape."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from lightning_ensembles.cost import count_macs
    from lightning_ensembles.data import DigitsDataModule
    from lightning_ensembles.models import WideResNet

    wrn = functools.partial(WideResNet, depth=10, width=1, in_channels=1)
    module = EnsembleLightningModule(member=wrn, num_members=2, num_classes=10)
    assert module.input_shape is None and module.example_input_array is None
    data = DigitsDataModule(batch_size=64)
    pl.Trainer(**trainer_kwargs(max_steps=1, limit_val_batches=1)).fit(module, datamodule=data)
    assert module.input_shape == (1, 8, 8)  # from the datamodule, at setup
    macs = sum(count_macs(member, (1, 8, 8)) for member in module.members)
    assert ModelSummary(module).total_flops == 2 * macs > 0

    # Without a datamodule, the first batch tells the shape.
    plain = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    pl.Trainer(**trainer_kwargs(max_steps=1)).fit(plain, make_loader(n=16))
    assert plain.input_shape == (12,) and tuple(plain.example_input_array.shape) == (1, 12)
    with pytest.raises(ValueError, match=r"`input_shape` to be one sample's shape"):
        plain.record_input_shape((0, 3))
