"""Checkpoint keys of the stateful callbacks: two instances share a Trainer and each restores its own state;
checkpoints written before the keys existed still restore; ``MemberEMA`` runs no collective in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ensembles.callbacks import (
    CascadeMonitor,
    EnsembleSizeAblation,
    FlopsMonitor,
    LatencyMonitor,
    MemberEMA,
    ReliabilityDiagram,
)
from lightning_ensembles.distributed import MemberParallelStrategy
from tests.fixtures import write_callback_states as fixture
from tests.helpers import assert_identical, make_loader, trainer_kwargs

OLD_CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "callback_states_c2755a2.pt"
SHAPE = fixture.SHAPE

# Two configurations of each stateful callback whose states differ after a short fit and test.
PAIRS: dict[str, Callable[[], tuple[Callback, Callback]]] = {
    "FlopsMonitor": lambda: (
        FlopsMonitor(input_shape=SHAPE),
        FlopsMonitor(input_shape=SHAPE, count_training=False),
    ),
    "EnsembleSizeAblation": lambda: (
        EnsembleSizeAblation(metrics=("top1",), input_shape=SHAPE, latency_batch_size=None, verbose=False),
        EnsembleSizeAblation(metrics=("nll",), stages=("test",), latency_batch_size=None, verbose=False),
    ),
    "MemberEMA": lambda: (MemberEMA(decay=0.5), MemberEMA(decay=0.9)),
    "CascadeMonitor": lambda: (
        CascadeMonitor(target_accuracy=0.5, input_shape=SHAPE, num_thresholds=5),
        CascadeMonitor(input_shape=SHAPE, num_thresholds=5),
    ),
    "LatencyMonitor": lambda: (
        LatencyMonitor(when="test_start", batch_sizes=(1,), warmup=0, repeats=2, input_shape=SHAPE),
        LatencyMonitor(when="test_start", batch_sizes=(2,), warmup=0, repeats=2, input_shape=SHAPE),
    ),
    "ReliabilityDiagram": lambda: (
        ReliabilityDiagram(stages=("val",), n_bins=5, figures=False),
        ReliabilityDiagram(stages=("test",), n_bins=10, figures=False),
    ),
}


class StateProbe(Callback):
    """Records every other callback's ``state_dict`` when validation starts: right after a ``ckpt_path``
    restored them, before any of them runs a hook of the stage (the probe comes first in the list)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb is not self}


def _restore(callbacks: list[Callback], ckpt_path: Path, root: Path) -> dict[str, dict[str, Any]]:
    probe = StateProbe()
    trainer = pl.Trainer(default_root_dir=root, **trainer_kwargs(callbacks=[probe, *callbacks]))
    trainer.validate(fixture.module(), make_loader(n=32, batch_size=16), ckpt_path=ckpt_path, verbose=False)
    return probe.states


def _differ(a: Any, b: Any) -> bool:
    try:
        assert_identical(a, b)
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_two_instances_round_trip_a_checkpoint(name: str, tmp_path: Path, one_torch_thread: None) -> None:
    torch.manual_seed(0)
    first, second = PAIRS[name]()
    assert first.state_key != second.state_key
    loader = make_loader(n=32, batch_size=16)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **trainer_kwargs(callbacks=[first, second]))
    module = fixture.module()
    trainer.fit(module, loader, loader)
    trainer.test(module, loader, verbose=False)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert saved[first.state_key] and saved[second.state_key]
    assert _differ(saved[first.state_key], saved[second.state_key]), "the pair must end with different states"

    # Restored into fresh instances, listed the other way round: each gets its own state back.
    again_second, again_first = PAIRS[name]()[::-1]
    states = _restore([again_second, again_first], path, tmp_path / "restored")
    for original, again in ((first, again_first), (second, again_second)):
        assert again.state_key == original.state_key
        assert_identical(states[again.state_key], saved[original.state_key], f"{name}.state_dict()")


def test_checkpoint_written_before_the_state_keys_restores_every_callback(
    tmp_path: Path, one_torch_thread: None
) -> None:
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)["callbacks"]
    # The fixture is old: three callbacks' states sit under their class name.
    assert {"FlopsMonitor", "EnsembleSizeAblation", "MemberEMA"} <= set(saved)
    callbacks = fixture.callbacks()
    states = _restore(callbacks, OLD_CHECKPOINT, tmp_path)
    for callback in callbacks:
        name = type(callback).__name__
        expected = saved.get(callback.state_key, saved.get(name))
        assert expected, name
        restored = dict(states[callback.state_key])
        if name == "MemberEMA":  # the fixture predates the once-per-optimizer-step guard: no update recorded
            assert restored.pop("latest_update_step") == 0
        assert_identical(restored, expected, f"{name}.state_dict()")


def test_member_ema_shares_when_the_checkpoint_is_written_not_in_state_dict() -> None:
    module = fixture.module()
    ema = MemberEMA(decay=0.5)
    ema._ensure(module)
    strategy = MemberParallelStrategy()
    calls: list[list[int]] = []

    def broadcast_from_owners(modules: dict[int, torch.nn.Module]) -> None:  # what the owners would send
        calls.append(sorted(modules))
        for member in modules.values():
            for p in member.parameters():
                p.data.fill_(7.0)

    strategy.broadcast_from_owners = broadcast_from_owners  # type: ignore[method-assign]
    trainer = cast(pl.Trainer, SimpleNamespace(strategy=strategy))  # the hooks read only its strategy
    ema.setup(trainer, module, "fit")

    local = ema.state_dict()
    assert calls == []  # no collective in state_dict
    checkpoint: dict[str, Any] = {"state_dict": {}, "callbacks": {ema.state_key: local}}
    ema.on_save_checkpoint(trainer, module, checkpoint)
    assert calls == [[0, 1, 2]]  # every process shares, in a hook they all run
    shared = checkpoint["callbacks"][ema.state_key]["members"]
    assert all(
        bool((value == 7.0).all()) for i in shared for key, value in shared[i].items() if "weight" in key
    )
    assert not all(
        bool((value == 7.0).all()) for key, value in local["members"][0].items() if "weight" in key
    )
