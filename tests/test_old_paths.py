"""What was written before the package's structure changed still loads and computes the same.

``tests/fixtures/pre_split_22e51ad/`` holds a recipe run's ``config.yaml`` and ``last.ckpt`` written at commit
22e51ad, before ``EnsembleLightningModule`` was split along its seams (checkpoint format, temperature
scaling and memory-frugal training in modules of their own; the temperatures in a submodule), and what that
commit's module computed on a fixed batch (``expected.pt``, by ``tests/fixtures/write_pre_split_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.module import EnsembleLightningModule

FIXTURE = Path(__file__).parent / "fixtures" / "pre_split_22e51ad"


def _expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def test_a_checkpoint_from_before_the_split_loads_and_gives_the_same_outputs() -> None:
    expected = _expected()
    checkpoint = torch.load(FIXTURE / "last.ckpt", weights_only=True)
    assert "member_temperature" in checkpoint["state_dict"]  # the old keys, really
    module = EnsembleLightningModule.load_from_checkpoint(FIXTURE / "last.ckpt", map_location="cpu").eval()
    assert not torch.equal(module.member_temperature, torch.ones(2))  # fitted temperatures came through
    assert module.input_shape == (1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(expected["x"]), expected["logits"], rtol=0, atol=0)
        torch.testing.assert_close(
            module.predict_step(expected["x"], 0)["probs"], expected["probs"], rtol=0, atol=0
        )


def test_a_cli_config_from_before_the_split_builds_the_same_run(tmp_path: Path) -> None:
    expected = _expected()
    cli = EnsembleCLI(
        args=["--config", str(FIXTURE / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    )
    module = cli.model
    assert isinstance(module, EnsembleLightningModule) and module.num_members == 2
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    state = torch.load(FIXTURE / "last.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(state)  # strict: the old temperature keys are mapped, none is left over
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(expected["x"]), expected["logits"], rtol=0, atol=0)
        torch.testing.assert_close(
            module.predict_step(expected["x"], 0)["probs"], expected["probs"], rtol=0, atol=0
        )
