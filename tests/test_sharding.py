"""The training-shard contract between strategies and self-sharding datamodules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lightning_ensembles.distributed import MemberParallelStrategy
from lightning_ensembles.sharding import TrainingShard, training_shard


def test_one_process_without_a_trainer_reads_everything() -> None:
    assert training_shard(None) == TrainingShard(rank=0, num_replicas=1, seed_offset=0)


def test_a_plain_strategy_shards_by_global_rank_over_the_world() -> None:
    trainer = SimpleNamespace(strategy=object(), global_rank=2, world_size=3)
    assert training_shard(trainer) == TrainingShard(2, 3, 0)


def test_a_strategy_that_knows_its_shard_is_asked() -> None:
    shard = TrainingShard(rank=1, num_replicas=2, seed_offset=7)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(training_shard=lambda: shard), global_rank=5, world_size=8
    )
    assert training_shard(trainer) is shard


def test_a_strategy_returning_something_else_is_named() -> None:
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(training_shard=lambda: (0, 1)), global_rank=0, world_size=1
    )
    with pytest.raises(
        TypeError, match=r"SimpleNamespace.training_shard\(\)` to return .*TrainingShard, but got tuple"
    ):
        training_shard(trainer)


def test_the_member_parallel_strategy_answers_the_question() -> None:
    # the duck-typed method the datamodules look for (no import of the strategy in data/)
    assert callable(getattr(MemberParallelStrategy, "training_shard", None))
