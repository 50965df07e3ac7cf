"""CIFAR-10 input pipelines: the torchvision DataLoader vs the device-resident loader, and their share of
a WRN-16-4 training step.

    python benchmarks/data_pipeline.py [--device cuda] [--root data] [--out benchmarks/results] [--tiny]

For each pipeline: seconds per training batch of data alone (augmentation included, batches moved to the
device), the WRN-16-4 step time on that device, and the data's share of the step if data and compute ran
one after the other. Goal on a GPU: the device-resident loader's share <= 5%. Without CIFAR-10 under
`--root` the benchmark generates a CIFAR-10-sized set in the real on-disk format (the timing does not
depend on the pixel values).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from _timing import save, summary, time_interleaved

from lightning_ensembles.data import CIFAR10DataModule, GPUCIFAR10DataModule
from lightning_ensembles.models import WideResNet
from lightning_ensembles.testing import write_fake_cifar10


def _has_cifar(root: str) -> bool:
    return (Path(root) / "cifar-10-batches-py" / "data_batch_1").is_file()


def run(
    device: str,
    root: str,
    batch: int,
    batches: int,
    workers: int,
    repeats: int,
    num_train: int,
    out: str | None,
    deadline: float | None = None,
) -> dict:
    """Time both pipelines and the step, interleaved; ``deadline`` (a ``time.perf_counter()`` value) cuts the
    repeats short."""
    dev = torch.device(device)
    generated = not _has_cifar(root)
    with tempfile.TemporaryDirectory() as tmp:
        if generated:
            root = tmp
            write_fake_cifar10(root, num_train=num_train, num_test=max(batch, 64))
        verify = not generated
        cpu = CIFAR10DataModule(
            root=root, batch_size=batch, num_workers=workers, download=False, verify_checksums=verify
        )
        cpu.setup("fit")
        gpu = GPUCIFAR10DataModule(
            root=root, batch_size=batch, download=False, verify_checksums=verify, device=device
        )
        gpu.setup("fit")
        cpu_loader, gpu_loader = cpu.train_dataloader(), gpu.train_dataloader()

        def torchvision_batches() -> None:
            for x, y in itertools.islice(cpu_loader, batches):
                x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

        def device_batches() -> None:
            for _ in itertools.islice(gpu_loader, batches):
                pass

        model = WideResNet(16, 4).to(dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)

        def step() -> None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        samples = time_interleaved(
            {"torchvision": torchvision_batches, "device": device_batches, "step": step},
            repeats=repeats, warmup=1, device=dev, deadline=deadline,
        )  # fmt: skip
    step_s = sorted(samples["step"])[len(samples["step"]) // 2]
    rows = []
    for name in ("torchvision", "device"):
        per_batch = [s / batches for s in samples[name]]
        median = sorted(per_batch)[len(per_batch) // 2]
        rows.append(
            {
                "pipeline": name, "batch": batch, "workers": workers if name == "torchvision" else 0,
                "generated_data": generated, "data_per_batch": summary(per_batch),
                "wrn16_4_step": summary(samples["step"]), "data_share_of_step": median / (median + step_s),
            }
        )  # fmt: skip
    rows[0]["torchvision_over_device"] = (
        rows[0]["data_per_batch"]["median_ms"] / rows[1]["data_per_batch"]["median_ms"]
    )
    return save("data_pipeline", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.tiny:
        return run(args.device, "/nonexistent", 8, 2, 0, 1, 64, args.out)
    return run(
        args.device, args.root, args.batch_size, args.batches, args.workers, args.repeats, 50_000, args.out
    )


if __name__ == "__main__":
    main()
