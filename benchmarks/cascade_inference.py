"""Cascade inference that exits early vs the full ensemble: time per sample and expected multiply-adds.

    python benchmarks/cascade_inference.py [--device cuda] [--out benchmarks/results] [--tiny]

Trains M = 4 WRN-16-1 members on scikit-learn's digits (``DigitsDataModule``: 1,197 train / 300 validation /
300 test images, 8x8), calibrates one shared threshold on the validation split with
``calibrate_threshold(..., target_accuracy=full - 0.002)`` (top-1 within 0.2 points of the full ensemble),
then on the test split times ``CascadeEnsemble`` (each member runs only on the samples still below the
threshold) against the plain ensemble (every member on every sample, then the aggregation), interleaved,
per batch size. Also timed: the cascade at ``NEVER_EXIT`` (every member on every sample through the cascade
code), the overhead of the cascade's bookkeeping. Reported per batch size: time per sample (median and
10th-90th percentiles over repeats), the ratio cascade / full ensemble (goal <= 0.5), the expected GMACs per
sample of both and their ratio, test top-1 of both, the exit fractions, and whether the cascade's per-sample
predictions and exit stages equal ``evaluate_cascade`` on the same test logits.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from _timing import ratio, save, summary, time_interleaved
from torch import Tensor

from lightning_ensembles import CascadeEnsemble, EnsembleLightningModule
from lightning_ensembles.aggregation import aggregate
from lightning_ensembles.cascade import NEVER_EXIT, calibrate_threshold, evaluate_cascade
from lightning_ensembles.cost import count_macs
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.models import WideResNet

NUM_MEMBERS = 4
TOLERANCE = 0.002  # 0.2 points of top-1 below the full ensemble, on the validation split


def train(dev: torch.device, epochs: int, limit_batches: int | float, seed: int) -> tuple:
    """The trained ensemble (eval mode) and the data module."""
    data = DigitsDataModule(batch_size=64, seed=seed)
    data.setup("fit")
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, 16, 1, in_channels=1),
        num_members=NUM_MEMBERS,
        num_classes=data.num_classes,
        seed=seed,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    trainer = pl.Trainer(
        accelerator=dev.type, devices=1, max_epochs=epochs, limit_train_batches=limit_batches,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return module.to(dev).eval(), data


def split(data: DigitsDataModule, name: str, dev: torch.device) -> tuple[Tensor, Tensor]:
    x, y = getattr(data, f"{name}_set").tensors
    return x.to(dev), y.to(dev)


def over(chunks: list[Tensor], fn: Callable[[Tensor], object]) -> Callable[[], None]:
    """One pass of ``fn`` over the test split, batch by batch, without gradients."""

    def one_pass() -> None:
        with torch.no_grad():
            for chunk in chunks:
                fn(chunk)

    return one_pass


def run(
    device: str,
    epochs: int,
    limit_batches: int | float,
    batch_sizes: list[int],
    repeats: int,
    seed: int,
    out: str | None,
) -> dict:
    dev = torch.device(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    module, data = train(dev, epochs, limit_batches, seed)
    train_s = time.perf_counter() - start
    costs = [count_macs(m, data.input_shape) / 1e9 for m in module.members]  # GMACs per sample
    (val_x, val_y), (test_x, test_y) = split(data, "val", dev), split(data, "test", dev)
    with torch.no_grad():
        val_logits, test_logits = module(val_x), module(test_x)  # (M, N, C), members in eval mode
    val_full = evaluate_cascade(val_logits, val_y, costs, NEVER_EXIT)
    target = max(0.0, val_full.accuracy - TOLERANCE)
    val_point = calibrate_threshold(val_logits, val_y, costs, target_accuracy=target)
    test_point = evaluate_cascade(test_logits, test_y, costs, val_point.thresholds)
    test_full = evaluate_cascade(test_logits, test_y, costs, NEVER_EXIT)
    cascade = CascadeEnsemble(module, val_point.thresholds, costs=costs)
    never = CascadeEnsemble(module, NEVER_EXIT, costs=costs)
    rows = []
    for batch in batch_sizes:
        chunks = list(test_x.split(batch))
        outputs = [cascade.forward_with_exits(chunk) for chunk in chunks]
        exit_stage = torch.cat([o.exit_stage for o in outputs]).cpu()
        prediction = torch.cat([o.probs.max(dim=-1).indices for o in outputs]).cpu()
        assert test_point.exit_stage is not None and test_point.prediction is not None
        same_exits = float((exit_stage == test_point.exit_stage).double().mean())
        same_prediction = float((prediction == test_point.prediction).double().mean())

        candidates = {
            "full": over(chunks, lambda chunk: aggregate(module(chunk), module.aggregation)),
            "cascade": over(chunks, cascade),
            "cascade_never_exit": over(chunks, never),
        }
        samples = time_interleaved(candidates, repeats=repeats, warmup=1, device=dev)
        per_sample = {name: [s / len(test_y) for s in values] for name, values in samples.items()}
        rows.append(
            {
                "members": f"{NUM_MEMBERS} x WRN-16-1", "dataset": "digits 8x8", "batch": batch,
                "num_test": len(test_y), "epochs": epochs, "threads": torch.get_num_threads(),
                "threshold": val_point.threshold, "target_val_top1": target,
                "val": {"full_top1": val_full.accuracy, "cascade_top1": val_point.accuracy,
                        "gmacs_ratio": val_point.expected_cost / val_point.full_cost},
                "test": {"full_top1": test_full.accuracy, "cascade_top1": test_point.accuracy,
                         "exit_fractions": list(test_point.exit_fractions),
                         "full_gmacs": test_point.full_cost, "cascade_expected_gmacs": test_point.expected_cost,
                         "gmacs_ratio": test_point.expected_cost / test_point.full_cost},
                "matches_evaluate_cascade": {"exit_stage": same_exits, "prediction": same_prediction},
                "per_sample": {name: summary(values) for name, values in per_sample.items()},
                "cascade_over_full": ratio(samples["cascade"], samples["full"]),
                "never_exit_over_full": ratio(samples["cascade_never_exit"], samples["full"]),
                "train_s": train_s,
            }
        )  # fmt: skip
    return save("cascade_inference", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="folder for cascade_inference.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tiny:
        return run(args.device, 1, 2, [64], 1, args.seed, args.out)
    return run(args.device, args.epochs, 1.0, args.batch_sizes, args.repeats, args.seed, args.out)


if __name__ == "__main__":
    main()
