"""Tests for the (seed, epoch)-determined sampler, alone, under Lightning's fit loop and its DDP wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles.data import EpochSeededRandomSampler
from lightning_ensembles.data.sampling import SplitDataModule
from tests.helpers import trainer_kwargs


def test_is_a_permutation_of_the_dataset() -> None:
    sampler = EpochSeededRandomSampler(range(37), seed=5)
    order = list(sampler)
    assert len(sampler) == 37
    assert sorted(order) == list(range(37))
    assert order != list(range(37))


def test_order_depends_only_on_seed_and_epoch() -> None:
    first = EpochSeededRandomSampler(range(50), seed=7)
    first.set_epoch(3)
    torch.manual_seed(123)  # the global RNG must not matter
    expected = list(first)
    torch.manual_seed(999)
    torch.rand(100)
    second = EpochSeededRandomSampler(list(range(50)), seed=7)
    second.set_epoch(3)
    assert list(second) == expected
    assert list(first) == expected  # iterating again in the same epoch repeats the order
    assert expected == torch.randperm(50, generator=torch.Generator().manual_seed(10)).tolist()


def test_order_differs_across_epochs_and_seeds() -> None:
    sampler = EpochSeededRandomSampler(range(50), seed=0)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert len({tuple(order) for order in orders}) == 4
    other_seed = EpochSeededRandomSampler(range(50), seed=1000)
    assert list(other_seed) not in orders


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "Expected `seed` to be an int >= 0, but got -1."),
        ({"seed": 1.5}, "Expected `seed` to be an int >= 0, but got 1.5."),
        ({"seed": True}, "Expected `seed` to be an int >= 0, but got True."),
    ],
)
def test_invalid_seed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        EpochSeededRandomSampler(range(3), **kwargs)  # type: ignore[arg-type]


def test_invalid_epoch_and_data_source() -> None:
    sampler = EpochSeededRandomSampler(range(3))
    with pytest.raises(ValueError, match=r"Expected `epoch` to be an int >= 0, but got -2\."):
        sampler.set_epoch(-2)
    with pytest.raises(TypeError, match="`data_source` to be a sized dataset"):
        EpochSeededRandomSampler(iter(range(3)))  # type: ignore[arg-type]


def test_distributed_wrapper_forwards_epoch_and_shards_the_permutation() -> None:
    """Under DDP Lightning wraps a custom sampler in DistributedSamplerWrapper (with shuffle=False)."""
    expected = EpochSeededRandomSampler(range(20), seed=3)
    expected.set_epoch(2)
    shards = []
    for rank in range(2):
        wrapper = DistributedSamplerWrapper(
            EpochSeededRandomSampler(range(20), seed=3), num_replicas=2, rank=rank, shuffle=False
        )
        wrapper.set_epoch(2)
        shards.append(list(wrapper))
    assert sorted(shards[0] + shards[1]) == list(range(20))
    assert shards[0] == list(expected)[0::2]
    assert shards[1] == list(expected)[1::2]


class _RecordingModule(LightningModule):
    """Records the dataset indices of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (index,) = batch
        self.seen.setdefault(self.current_epoch, []).extend(index.long().tolist())
        return self.layer(index.float().unsqueeze(1)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    dataset = TensorDataset(torch.arange(12))
    return DataLoader(dataset, batch_size=4, sampler=EpochSeededRandomSampler(dataset, seed=11))


def _trainer(max_epochs: int) -> Trainer:
    return Trainer(max_epochs=max_epochs, **trainer_kwargs())


def test_lightning_sets_the_epoch_and_a_resumed_run_sees_the_same_order(tmp_path: Path) -> None:
    uninterrupted = _RecordingModule()
    _trainer(max_epochs=3).fit(uninterrupted, train_dataloaders=_loader())
    for epoch in range(3):
        sampler = EpochSeededRandomSampler(range(12), seed=11)
        sampler.set_epoch(epoch)
        assert uninterrupted.seen[epoch] == list(sampler)

    first_part = _RecordingModule()
    trainer = _trainer(max_epochs=1)
    trainer.fit(first_part, train_dataloaders=_loader())
    checkpoint = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = _RecordingModule()
    _trainer(max_epochs=3).fit(resumed, train_dataloaders=_loader(), ckpt_path=checkpoint)
    assert first_part.seen[0] == uninterrupted.seen[0]
    assert resumed.seen[1] == uninterrupted.seen[1]
    assert resumed.seen[2] == uninterrupted.seen[2]


class _Splits(SplitDataModule):
    def __init__(self, built: bool) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = 4, 0, 3
        self.train_set = TensorDataset(torch.arange(10)) if built else None
        self.val_set = TensorDataset(torch.arange(10, 16)) if built else None


def test_split_datamodule_loads_training_shuffled_by_seed_and_validation_in_order() -> None:
    datamodule = _Splits(built=True)
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    assert isinstance(train.sampler, EpochSeededRandomSampler) and train.sampler.seed == 3
    assert train.batch_size == val.batch_size == 4
    assert sorted(torch.cat([x for (x,) in train]).tolist()) == list(range(10))
    assert torch.cat([x for (x,) in val]).tolist() == list(range(10, 16))


def test_split_datamodule_names_the_stage_whose_setup_builds_the_split() -> None:
    datamodule = _Splits(built=False)
    with pytest.raises(RuntimeError, match=r"The training set is not built yet: call `setup\('fit'\)` first"):
        datamodule.train_dataloader()
    with pytest.raises(RuntimeError, match=r"The validation set .* call `setup\('validate'\)` first"):
        datamodule.val_dataloader()
