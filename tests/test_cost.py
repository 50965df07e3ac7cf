import pytest
import torch
from torch import nn

from lightning_ensembles.cost import count_macs, count_params
from lightning_ensembles.models import WideResNet

ptflops = pytest.importorskip("ptflops")


def test_wrn_28_10_matches_the_published_multiply_adds():
    macs = count_macs(WideResNet(depth=28, width=10), (3, 32, 32))
    assert macs == pytest.approx(5.243e9, rel=0.01)


def test_exact_count_of_a_hand_computed_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*3*3*3 MACs per output pixel, 8x8 pixels
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 3*3 per output element
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    expected = 8 * 27 * 64 + 8 * 9 * 64 + 512 * 10
    assert count_macs(model, (3, 8, 8)) == expected
    assert count_macs(model, (3, 8, 8), batch_size=5) == expected


@pytest.mark.parametrize(("depth", "width"), [(10, 1), (16, 2)])
def test_agrees_with_ptflops_aten_backend(depth, width):
    model = WideResNet(depth=depth, width=width)
    ours = count_macs(model, (3, 32, 32))
    theirs, params = ptflops.get_model_complexity_info(
        model, (3, 32, 32), backend="aten", as_strings=False, print_per_layer_stat=False
    )
    # ptflops' aten backend counts the same conv and mm/addmm ops, plus one op per output of the linear
    # layer's bias (num_classes per sample); our convention leaves bias additions out.
    assert theirs == ours + model.num_classes
    assert params == count_params(model)


def test_scales_with_resolution_and_width():
    small = count_macs(WideResNet(depth=16, width=4), (3, 16, 16))
    large = count_macs(WideResNet(depth=16, width=4), (3, 32, 32))
    assert large == pytest.approx(4 * small, rel=0.01)
    assert count_macs(WideResNet(depth=16, width=1, in_channels=1), (1, 8, 8)) > 0


def test_does_not_touch_the_callers_model():
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    assert model.training
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].device.type == "cpu"
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in model.parameters())

    model.eval()
    count_macs(model, (3, 32, 32))
    assert not model.training


class _DeviceRecorder(nn.Module):
    seen: list[torch.device] = []

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _DeviceRecorder.seen.append(x.device)
        return self.linear(x)


def test_counts_on_the_meta_device():
    _DeviceRecorder.seen.clear()
    assert count_macs(_DeviceRecorder(), (4,), batch_size=3) == 8
    assert [d.type for d in _DeviceRecorder.seen] == ["meta"]


def test_keeps_the_model_dtype():
    model = nn.Linear(4, 2).double()
    assert count_macs(model, (4,)) == 8


def test_count_params():
    assert count_params(nn.Linear(4, 2)) == 10
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12
    assert count_params(WideResNet(depth=28, width=10)) == 36_479_194


@pytest.mark.parametrize("shape", [(), (3, 0, 32), (-1, 32, 32), (3, 32.0, 32)])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError, match="`input_shape`") as excinfo:
        count_macs(nn.Linear(4, 2), shape)
    assert repr(shape) in str(excinfo.value)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_raises(batch_size):
    with pytest.raises(ValueError, match=f"`batch_size`.*but got {batch_size!r}"):
        count_macs(nn.Linear(4, 2), (4,), batch_size=batch_size)


@pytest.mark.parametrize("shape", [(4, 32, 32), (3, 31)])
def test_input_shape_that_does_not_fit_raises(shape):
    with pytest.raises(ValueError, match="`input_shape` to fit the model") as excinfo:
        count_macs(WideResNet(depth=10, width=1), shape)
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert str(excinfo.value.__cause__) in str(excinfo.value)


def test_linear_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not fit|to fit the model"):
        count_macs(nn.Linear(4, 2), (5,))
