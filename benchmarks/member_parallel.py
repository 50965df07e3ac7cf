"""Member-parallel vs data-parallel training of one ensemble at equal total work: step time per member.

    python benchmarks/member_parallel.py [--devices 2] [--device cuda] [--out benchmarks/results] [--tiny]

Both strategies train the same M = W members on the same global batch (``--batch`` samples) with W
processes:

- ``ddp`` (data-parallel): every process holds every member, runs all M on ``batch / W`` samples and
  all-reduces every member's gradients across all W processes;
- ``member_parallel``: every process trains M / W members on the whole batch and communicates no gradient.

Each step is the same work (M members × ``batch`` samples, forward and backward). Rank 0 times every
training step with a callback (warm-up steps excluded); runs alternate (ddp, member_parallel, ddp, ...) so
drift on a shared machine hits both alike. Reported: median step time divided by M (time per member-step),
and the ratio member_parallel / ddp (below 1: member-parallel is faster).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from _timing import save, summary
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule


class StepTimer(pl.Callback):
    """Times each training batch on rank 0 and writes the seconds to ``path`` at the end of fit."""

    def __init__(self, path: str) -> None:
        self.path, self.samples, self._start = path, [], 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.samples.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.samples))


def _fit(strategy: str, devices: int, accelerator: str, members: int, depth: int, width: int,
         batch: int, size: int, steps: int) -> list[float]:  # fmt: skip
    per_process = batch // devices if strategy.startswith("ddp") else batch
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(batch * 2, 3, size, size, generator=g), torch.randint(0, 10, (batch * 2,), generator=g)
    )
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, depth, width),
        num_members=members,
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )
    with tempfile.TemporaryDirectory() as tmp:
        timer = StepTimer(str(Path(tmp) / "steps.json"))
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timer], use_distributed_sampler=True,
        )  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=per_process, shuffle=True))
        return json.loads(Path(timer.path).read_text())[2:]  # warm-up steps excluded


def run(device: str, devices: int, models: list[tuple[int, int]], batch: int, size: int, steps: int,
        rounds: int, out: str | None) -> dict:  # fmt: skip
    members = devices  # one member per process under member_parallel
    accelerator = "gpu" if device == "cuda" else "cpu"
    rows = []
    for depth, width in models:
        samples: dict[str, list[float]] = {"ddp_spawn": [], "member_parallel_spawn": []}
        for _ in range(rounds):
            for strategy in samples:
                samples[strategy] += _fit(
                    strategy, devices, accelerator, members, depth, width, batch, size, steps
                )
        ddp, mp = summary(samples["ddp_spawn"]), summary(samples["member_parallel_spawn"])
        rows.append({
            "model": f"WRN-{depth}-{width}", "members": members, "processes": devices, "global_batch": batch,
            "image": size, "steps": len(samples["ddp_spawn"]), "device": device,
            "data_parallel_ms_per_member_step": ddp["median_ms"] / members,
            "member_parallel_ms_per_member_step": mp["median_ms"] / members,
            "data_parallel_step": ddp, "member_parallel_step": mp,
            "member_parallel_over_data_parallel": mp["median_ms"] / ddp["median_ms"],
        })  # fmt: skip
    return save("member_parallel", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes W (= members M)")
    parser.add_argument("--models", default="16-1,16-4", help="WRN depth-width pairs, comma-separated")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.tiny:
        return run(args.device, 2, [(10, 1)], 8, 8, 3, 1, args.out)
    models = [(int(d), int(w)) for d, w in (m.split("-") for m in args.models.split(","))]
    return run(args.device, args.devices, models, 64, 32, args.steps, args.rounds, args.out)


if __name__ == "__main__":
    main()
