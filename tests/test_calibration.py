"""Temperature scaling: the fit, the module fitting on validation and applying at test and predict, and the
temperatures kept by checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lightning_ensembles.aggregation import cumulative_log_probs
from lightning_ensembles.calibration import fit_temperature, scale
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.uncertainty import concat_predictions
from tests.helpers import trainer_kwargs


class DigitsMLP(nn.Module):
    """A small member for the 8x8 digits, with sharpened logits so that its calibration is off."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * self.net(x)


def test_fit_recovers_a_known_temperature_and_is_bounded() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 1.5 * torch.randn(20000, 4, generator=generator)
    target = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    for true in (0.5, 3.0):
        assert fit_temperature(logits * true, target) == pytest.approx(true, rel=0.05)
    right = torch.tensor([[10.0, 0.0]] * 5)
    assert 0.01 <= fit_temperature(right, torch.zeros(5, dtype=torch.long)) <= 100  # degenerate: clamped
    assert_close(scale(torch.tensor([[2.0, 0.0]]), 2.0), torch.tensor([[1.0, 0.0]]).log_softmax(dim=-1))
    with pytest.raises(ValueError, match=r"\(N, C\) and targets \(N,\)"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def _module(mode: str) -> EnsembleLightningModule:
    return EnsembleLightningModule(
        member=DigitsMLP,
        num_members=2,
        num_classes=10,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        temperature_scaling=mode,
    )


def _data(**kwargs: object) -> DigitsDataModule:
    return DigitsDataModule(batch_size=128, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["ensemble", "members"])
def test_fitted_on_validation_applied_at_test_and_kept_by_checkpoints(mode: str, tmp_path: Path) -> None:
    module = _module(mode)
    data = _data()
    trainer = pl.Trainer(max_epochs=3, **trainer_kwargs(default_root_dir=tmp_path))
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    assert logged["val/calibrated/nll"] <= logged["val/uncalibrated/nll"] + 1e-6
    assert logged["val/calibrated/ece"] < logged["val/uncalibrated/ece"]
    if mode == "ensemble":
        assert abs(module.ensemble_temperature.item() - 1.0) > 0.05 and logged["val/temperature"] > 0
        assert torch.equal(module.member_temperature, torch.ones(2))
    else:
        first, second = module.member_temperature.tolist()
        assert first != second and max(abs(first - 1), abs(second - 1)) > 0.05  # one each, fitted
        assert module.ensemble_temperature.item() == 1.0 and "val/member_1/temperature" in logged

    # The test metrics are those of the calibrated prediction, computed here by hand.
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    module.eval()
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader()))
    with torch.no_grad():
        logits = module(x) / module.member_temperature.view(-1, 1, 1)
        expected = scale(cumulative_log_probs(logits, "mean_probs")[-1], module.ensemble_temperature)
        raw = cumulative_log_probs(module(x), "mean_probs")[-1]
    assert results["test/nll"] == pytest.approx(F.nll_loss(expected, y).item(), abs=1e-5)
    assert results["test/nll"] != pytest.approx(F.nll_loss(raw, y).item(), abs=1e-4)  # it did change
    assert results["test/top1"] == pytest.approx((raw.argmax(1) == y).float().mean().item())  # top-1 kept

    # Saved in the checkpoint: a loaded module predicts the calibrated probabilities.
    trainer.save_checkpoint(tmp_path / "calibrated.ckpt")
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "calibrated.ckpt")
    assert_close(loaded.ensemble_temperature, module.ensemble_temperature)
    assert_close(loaded.member_temperature, module.member_temperature)
    predicted = concat_predictions(pl.Trainer(**trainer_kwargs()).predict(loaded, data.test_dataloader()))
    assert_close(predicted["probs"], expected.exp(), atol=1e-6, rtol=1e-5)


def test_checkpoints_from_before_temperature_scaling_load(tmp_path: Path) -> None:
    module = _module("none")
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(default_root_dir=tmp_path, limit_val_batches=0))
    trainer.fit(module, datamodule=_data())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    del checkpoint["state_dict"]["temperature.member"], checkpoint["state_dict"]["temperature.ensemble"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert torch.equal(loaded.member_temperature, torch.ones(2)) and loaded.ensemble_temperature.item() == 1.0


def test_temperatures_at_their_keys_before_the_submodule_load(tmp_path: Path) -> None:
    # Until the temperatures moved into `TemperatureScaling` (`temperature.member`, `temperature.ensemble`),
    # checkpoints held them as the ensemble's own buffers `member_temperature` and `ensemble_temperature`.
    module = _module("members")
    module.temperature.member.copy_(torch.tensor([0.5, 2.0]))
    module.temperature.ensemble.fill_(1.5)
    state = module.state_dict()
    assert {"temperature.member", "temperature.ensemble"} <= set(state)
    old = {k: v for k, v in state.items() if not k.startswith("temperature.")}
    old["member_temperature"], old["ensemble_temperature"] = (
        state["temperature.member"],
        state["temperature.ensemble"],
    )
    plain = _module("members")
    plain.load_state_dict(old)  # strict: no unexpected or missing key
    assert (
        torch.equal(plain.member_temperature, torch.tensor([0.5, 2.0]))
        and plain.ensemble_temperature.item() == 1.5
    )
    assert "member_temperature" in old  # the caller's dict is left alone
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(default_root_dir=tmp_path, limit_val_batches=0))
    trainer.fit(_module("none"), datamodule=_data())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    checkpoint["state_dict"] = {
        k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("temperature.")
    }
    checkpoint["state_dict"].update(
        member_temperature=torch.tensor([0.25, 4.0]), ensemble_temperature=torch.tensor(3.0)
    )
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = EnsembleLightningModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert (
        torch.equal(loaded.member_temperature, torch.tensor([0.25, 4.0]))
        and loaded.ensemble_temperature.item() == 3.0
    )


def test_needs_a_validation_split_and_a_known_mode(tmp_path: Path) -> None:
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(default_root_dir=tmp_path))
    with pytest.raises(ValueError, match=r"`--model.temperature_scaling ensemble` .*`--data.val_size` is 0"):
        trainer.fit(_module("ensemble"), datamodule=_data(val_size=0))
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(default_root_dir=tmp_path, limit_val_batches=0))
    with pytest.raises(ValueError, match=r"`--model.temperature_scaling members` .*has none"):
        trainer.fit(_module("members"), datamodule=_data())
    with pytest.raises(ValueError, match=r"`--model.temperature_scaling` to be one of .*'platt'"):
        _module("platt")
