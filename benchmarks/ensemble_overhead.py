"""An ensemble of one member vs the same model in a plain LightningModule: per-step training time.

    python benchmarks/ensemble_overhead.py [--device cuda] [--out benchmarks/results] [--tiny]

Both run real `Trainer.fit` steps on the same batches; a callback times each training batch (forward,
backward, optimizer step, logging). Goal: the ensemble of one is at most 3% slower (ratio <= 1.03).
Runs alternate (plain, ensemble, plain, ...) so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import functools
import time

import lightning.pytorch as pl
import torch
from _timing import save, summary
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule


class Plain(pl.LightningModule):
    """The textbook LightningModule: one model, cross-entropy, SGD."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class StepTimer(pl.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._start = device, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.samples.append(time.perf_counter() - self._start)


def _fit(module: pl.LightningModule, loader: DataLoader, device: torch.device, steps: int) -> list[float]:
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, loader)
    return timer.samples[2:]  # warm-up steps excluded


def run(
    device: str,
    depth: int,
    width: int,
    batch: int,
    size: int,
    steps: int,
    rounds: int,
    out: str | None,
    deadline: float | None = None,
) -> dict:
    """Alternate plain and ensemble fits for ``rounds`` rounds; with ``deadline`` (a ``time.perf_counter()``
    value) no new round starts once it has passed, after the first."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batch * 4, 3, size, size, generator=g), torch.randint(0, 10, (batch * 4,), generator=g)
    )
    loader = DataLoader(data, batch_size=batch)
    factory = functools.partial(WideResNet, depth, width)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    plain, ensemble, done = [], [], 0
    for _ in range(rounds):
        if deadline is not None and done > 0 and time.perf_counter() >= deadline:
            break
        done += 1
        torch.manual_seed(0)
        plain += _fit(Plain(factory()), loader, dev, steps)
        ensemble += _fit(
            EnsembleLightningModule(member=factory, num_classes=10, optimizer=optimizer), loader, dev, steps
        )
    row = {
        "model": f"WRN-{depth}-{width}", "batch": batch, "image": size, "steps": len(plain), "rounds": done,
        "plain": summary(plain), "ensemble_of_1": summary(ensemble),
        "ensemble_over_plain_median": summary(ensemble)["median_ms"] / summary(plain)["median_ms"],
    }  # fmt: skip
    return save("ensemble_overhead", [row], out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.tiny:
        return run(args.device, 10, 1, 4, 8, 4, 1, args.out)
    return run(args.device, 16, 4, 64, 32, args.steps, args.rounds, args.out)


if __name__ == "__main__":
    main()
