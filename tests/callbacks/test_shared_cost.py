"""One cost source per run: FlopsMonitor, EnsembleSizeAblation, CascadeMonitor and the module's summary count
each member once between them (``cost.member_macs`` with ``scope=trainer``) and log the same numbers."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from typing_extensions import override

import lightning_ensembles.cost as cost
from lightning_ensembles.callbacks import CascadeMonitor, EnsembleSizeAblation, FlopsMonitor
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyConvNet, TinyNet, make_loader, trainer_kwargs

SHAPE = (IN_FEATURES,)


class MemoryLogger(Logger):
    """Keeps every logged scalar (the last value per key)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.metrics: dict[str, float] = {}

    @property
    @override
    def name(self) -> str:
        return "memory"

    @property
    @override
    def version(self) -> int:
        return 0

    @property
    @override
    def save_dir(self) -> str:
        return str(self.root)

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def test_three_cost_callbacks_count_each_member_once_and_log_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None
) -> None:
    counted: Counter[tuple[str, int]] = Counter()
    for name in ("count_macs", "count_training_macs"):
        original = getattr(cost, name)

        def spy(
            model: torch.nn.Module, *args: Any, _original: Any = original, _name: str = name, **kw: Any
        ) -> int:
            counted[(_name, id(model))] += 1
            return _original(model, *args, **kw)

        monkeypatch.setattr(cost, name, spy)

    module = EnsembleLightningModule(
        members=[TinyNet, TinyConvNet, functools.partial(TinyNet, hidden=32)],
        num_classes=NUM_CLASSES,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    flops = FlopsMonitor(input_shape=SHAPE)
    ablation = EnsembleSizeAblation(input_shape=SHAPE, latency_batch_size=None, verbose=False, figures=False)
    cascade = CascadeMonitor(input_shape=SHAPE, num_thresholds=5)
    logger = MemoryLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(callbacks=[flops, ablation, cascade], logger=logger))
    loader = make_loader(n=32, batch_size=16)
    trainer.fit(module, loader, loader)
    trainer.test(module, loader, verbose=False)

    members = [id(m) for m in module.members]
    assert counted == Counter(
        {**{("count_macs", i): 1 for i in members}, **{("count_training_macs", i): 1 for i in members}}
    )
    macs = [row["macs"] for row in flops.results["members"]]
    assert len(set(macs)) == 3  # three different costs, so a mix-up would show
    assert ablation.macs == macs
    assert cascade.member_gmacs == [m / 1e9 for m in macs]
    logged = logger.metrics
    for i, m in enumerate(macs):
        assert logged[f"flops/member_{i}_gmacs"] == m / 1e9 == cascade.results["val"]["member_gmacs"][i]
    for k in (1, 2, 3):
        assert logged[f"ablation/test/first/size_{k}/gmacs"] == sum(macs[:k]) / 1e9
    assert logged["flops/ensemble_gmacs"] == sum(macs) / 1e9
