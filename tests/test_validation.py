"""The shared argument checks of ``lightning_ensembles._validation`` and the one ensemble check."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lightning_ensembles import EnsembleLightningModule, latency
from lightning_ensembles._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_shape,
    expected,
    init_arg,
    is_int,
)
from lightning_ensembles.callbacks import (
    CascadeMonitor,
    EnsembleSizeAblation,
    FlopsMonitor,
    LatencyMonitor,
    MemberEMA,
    ReliabilityDiagram,
)
from lightning_ensembles.cascade_inference import CascadeEnsemble
from lightning_ensembles.export import ExportableEnsemble
from lightning_ensembles.module import as_ensemble
from tests.helpers import trainer_kwargs


def _ensemble() -> EnsembleLightningModule:
    return EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)


# ---------------------------------------------------------------------------------------------- helpers


def test_expected_is_the_one_wording() -> None:
    err = expected("--model.num_members", "an int >= 1", 0)
    assert isinstance(err, ValueError)
    assert str(err) == "Expected `--model.num_members` to be an int >= 1, but got 0."


def test_is_int_excludes_bools() -> None:
    assert is_int(3) and is_int(-1)
    assert not is_int(True) and not is_int(1.0) and not is_int("1")


@pytest.mark.parametrize(
    ("value", "minimum", "maximum", "allowed"),
    [
        (0, 1, None, "an int >= 1"),
        (True, 0, None, "an int >= 0"),
        (1.0, 1, None, "an int >= 1"),
        ("2", 1, None, "an int >= 1"),
        (3, 0, 3, "an int in [0, 3)"),
    ],
)
def test_check_int_names_flag_value_and_range(
    value: Any, minimum: int, maximum: int | None, allowed: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_int(value, "--data.batch_size", minimum, maximum)
    assert str(info.value) == f"Expected `--data.batch_size` to be {allowed}, but got {value!r}."


def test_check_int_returns_the_value() -> None:
    assert check_int(0, "seed", 0) == 0
    assert check_int(2, "rank", 0, 3) == 2


def test_check_bool() -> None:
    assert check_bool(False, "augment") is False
    for value in (0, 1, "true", None):
        with pytest.raises(
            ValueError, match=re.escape(f"Expected `augment` to be a bool, but got {value!r}.")
        ):
            check_bool(value, "augment")


@pytest.mark.parametrize(
    ("kwargs", "value", "allowed"),
    [
        (dict(minimum=0.0, maximum=1.0, include_maximum=False), 1.0, "a float in [0, 1)"),
        (dict(minimum=0.0, maximum=1.0), 1.5, "a float in [0, 1]"),
        (dict(minimum=0.0), -0.5, "a float >= 0"),
        (dict(maximum=2.0, include_maximum=False), 2.0, "a float < 2"),
        (dict(), True, "a float"),
        (dict(), math.nan, "a float"),
        (dict(minimum=0.0), "x", "a float >= 0"),
    ],
)
def test_check_float_names_flag_value_and_range(kwargs: dict, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        check_float(value, "decay", **kwargs)
    assert str(info.value) == f"Expected `decay` to be {allowed}, but got {value!r}."


def test_check_float_converts_ints() -> None:
    assert check_float(0, "decay", 0.0, 1.0, include_maximum=False) == 0.0
    assert isinstance(check_float(1, "lr"), float)


def test_check_choice() -> None:
    assert check_choice("fused", "mode", ("sequential", "fused")) == "fused"
    with pytest.raises(ValueError, match=re.escape("Expected `mode` to be one of ['a', 'b'], but got 'c'.")):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=re.escape("to be one of [1, 2], but got True.")):
        check_choice(True, "stride", (1, 2))  # True == 1, but a bool is not a stride
    assert check_choice(True, "flag", (True, False)) is True


@pytest.mark.parametrize("value", [(), (3, 0), (-1, 4), (3, 2.0), (True, 4), "3x32", None, 3])
def test_check_shape_rejects_what_is_not_one_sample_shape(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        check_shape(value, "input_shape")
    message = str(info.value)
    assert message.startswith("Expected `input_shape` to be one sample's shape without the batch axis")
    assert message.endswith(f"but got {value!r}.")


def test_check_shape_returns_a_tuple_and_allows_none_when_optional() -> None:
    assert check_shape([3, 32, 32], "input_shape") == (3, 32, 32)
    assert check_shape(torch.Size([1, 8]), "input_shape") == (1, 8)
    assert check_shape(None, "input_shape", optional=True) is None
    with pytest.raises(
        ValueError, match=r"`FlopsMonitor\(input_shape=\.\.\.\)` to be None or one sample's shape"
    ):
        check_shape((0,), init_arg("FlopsMonitor", "input_shape"), optional=True)


def test_latency_check_shape_is_the_shared_one() -> None:
    assert latency.check_shape is check_shape
    with pytest.raises(ValueError, match=r"^Expected `input_shape` to be one sample's shape"):
        latency.check_shape(())


def test_check_int_sequence() -> None:
    assert check_int_sequence([1, 2, 2], "sizes", 1) == (1, 2, 2)
    with pytest.raises(
        ValueError, match=re.escape("Expected `sizes` to be a non-empty sequence of ints >= 1")
    ):
        check_int_sequence([], "sizes", 1)
    with pytest.raises(
        ValueError, match=re.escape("Expected `sizes` to be a non-empty sequence of ints >= 1")
    ):
        check_int_sequence("12", "sizes", 1)
    with pytest.raises(
        ValueError, match=re.escape("Expected every entry of `sizes` to be an int >= 1, but got 0.")
    ):
        check_int_sequence([1, 0], "sizes", 1)
    with pytest.raises(
        ValueError, match=re.escape("Expected every entry of `sizes` to be an int >= 1, but got True.")
    ):
        check_int_sequence([True], "sizes", 1)


def test_init_arg_names_a_callback_argument() -> None:
    assert init_arg("EnsembleSizeAblation", "num_subsets") == "EnsembleSizeAblation(num_subsets=...)"


# ---------------------------------------------------------------------------------------------- as_ensemble


def test_as_ensemble_returns_an_ensemble_and_refuses_anything_else() -> None:
    module = _ensemble()
    assert as_ensemble(module, "X") is module
    with pytest.raises(TypeError, match=r"^X needs an EnsembleLightningModule, but got BoringModel\.$"):
        as_ensemble(BoringModel(), "X")
    with pytest.raises(TypeError, match=r"but got Linear\. Use ddp\.$"):
        as_ensemble(nn.Linear(2, 2), "X", hint="Use ddp.")


def test_a_module_with_a_members_list_is_not_an_ensemble() -> None:
    class Lookalike(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(TypeError, match="needs an EnsembleLightningModule, but got Lookalike"):
        as_ensemble(Lookalike(), "X")


@pytest.mark.parametrize(
    ("make", "who"),
    [
        (lambda: CascadeEnsemble(nn.Linear(4, 3), 0.5, costs=[1.0]), "CascadeEnsemble(module=...)"),  # type: ignore[arg-type]
        (lambda: ExportableEnsemble(nn.Linear(4, 3)), "ExportableEnsemble(module=...)"),  # type: ignore[arg-type]
    ],
)
def test_entry_points_refuse_what_is_not_an_ensemble(make: Any, who: str) -> None:
    with pytest.raises(
        TypeError, match=rf"^{re.escape(who)} needs an EnsembleLightningModule, but got Linear\.$"
    ):
        make()


@pytest.mark.parametrize(
    "callback",
    [
        FlopsMonitor(input_shape=(32,)),
        LatencyMonitor(when="test_start", input_shape=(32,), batch_sizes=(1,), warmup=0, repeats=1),
        EnsembleSizeAblation(latency_batch_size=None),
        CascadeMonitor(input_shape=(32,)),
        ReliabilityDiagram(figures=False),
        MemberEMA(),
    ],
    ids=lambda callback: type(callback).__name__,
)
def test_callbacks_refuse_what_is_not_an_ensemble(callback: pl.Callback, tmp_path: Any) -> None:
    trainer = pl.Trainer(
        **trainer_kwargs(default_root_dir=str(tmp_path), callbacks=[callback], limit_test_batches=1)
    )
    name = type(callback).__name__
    with pytest.raises(TypeError, match=rf"^{name} needs an EnsembleLightningModule, but got BoringModel\.$"):
        trainer.test(BoringModel(), verbose=False)
