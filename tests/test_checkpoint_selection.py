"""The checkpoint-selection study: final weights against the best checkpoints of a sweep's runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_ensembles.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "reproductions"))

import checkpoint_selection  # noqa: E402


@pytest.mark.timeout(300)
def test_final_and_best_checkpoints_are_tested_seed_by_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep(
        str(ROOT / "reproductions" / "cifar_wrn.py"),
        {"WRN-10-1": ["cifar/wrn-10-1.yaml"]},
        seeds=2,
        out=str(tmp_path),
        base=["digits/quickstart.yaml", "digits/sweep.yaml"],
        args=["--trainer.max_epochs=3", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"],
        workers=0,
    )
    monkeypatch.chdir(tmp_path)
    report = checkpoint_selection.main([str(tmp_path)])
    assert not (tmp_path / "config.yaml").exists()  # testing writes nothing into the working directory
    arm = report["WRN-10-1"]
    assert set(arm) == {"final", "best val top-1", "best val NLL"}
    for seed in (0, 1):
        saved = json.loads((tmp_path / "WRN-10-1" / f"seed_{seed}" / "results.json").read_text())
        assert saved["tested"] == "final weights"
        final = arm["final"]["per_seed"][seed]
        # The recipe tested the final weights; testing last.ckpt again gives the same numbers.
        assert final["top1"] == pytest.approx(saved["ensemble"]["top1"], abs=1e-6)
        assert final["nll"] == pytest.approx(saved["ensemble"]["nll"], rel=1e-5)
        assert final["epoch"] == 2 and 0 <= arm["best val NLL"]["per_seed"][seed]["epoch"] <= 2
    assert arm["best val NLL"]["vs_final"]["top1"]["n"] == 2
    printed = capsys.readouterr().out
    assert "| WRN-10-1 | best val NLL | 2 |" in printed
    assert (tmp_path / "checkpoint_selection.json").is_file()
    with pytest.raises(SystemExit, match="Found no sweep runs"):
        checkpoint_selection.main([str(tmp_path / "empty")])
