from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_ensembles.cost import count_macs, count_params, count_training_macs
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


# ---------------------------------------------------------------------------------------- training counts

timm = pytest.importorskip("timm")


def _efficientnet_b0() -> nn.Module:
    return timm.create_model("efficientnet_b0", pretrained=False)


@pytest.mark.parametrize(
    ("make", "shape", "gmacs", "mparams"),
    [
        (lambda: WideResNet(depth=28, width=10), (3, 32, 32), 5.243, 36.48),  # Zagoruyko & Komodakis 2016
        (_efficientnet_b0, (3, 224, 224), 0.386, 5.29),  # Tan & Le 2019 (0.39 B), exact conv + linear count
    ],
)
def test_published_multiply_adds_and_parameters(make, shape, gmacs, mparams):
    model = make()
    assert count_macs(model, shape) / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert count_params(model) / 1e6 == pytest.approx(mparams, rel=0.01)


def _grouped_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(8, 6, 1, groups=2),  # grouped 1x1
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise 3x3
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 4),
    )


def test_agrees_with_ptflops_on_grouped_convolutions():
    model = _grouped_model()
    ours = count_macs(model, (8, 6, 6))
    assert ours == 6 * 36 * 4 + 6 * 36 * 9 + 216 * 4
    theirs, params = ptflops.get_model_complexity_info(
        model, (8, 6, 6), backend="aten", as_strings=False, print_per_layer_stat=False
    )
    # ptflops' aten backend adds one op per output element of every bias: 6 x 6 x 6 for each convolution
    # (WideResNet's convolutions have none) and 4 for the linear layer. Without biases the counts are equal.
    assert theirs == ours + 2 * 216 + 4
    assert params == count_params(model)


def _conv_macs(c_in: int, c_out: int, k: int, groups: int, h: int, w: int) -> int:
    """Forward multiply-adds of a convolution with output ``h x w``: each output element sums
    ``(c_in / groups) * k * k`` products."""
    return c_out * h * w * (c_in // groups) * k * k


def test_training_count_of_grouped_convolutions_is_exact():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),  # A: dense, 6x6 out
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # B: depthwise, 6x6 out
        nn.Conv2d(8, 6, 1, groups=2),  # C: grouped, 6x6 out
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2),  # D: grouped transposed, 6x6 in -> 12x12 out
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, 3),  # E
    )
    a = _conv_macs(4, 8, 3, 1, 6, 6)
    b = _conv_macs(8, 8, 3, 8, 6, 6)
    c = _conv_macs(8, 6, 1, 2, 6, 6)
    d = 6 * 6 * 6 * (4 // 2) * 2 * 2  # transposed: every input element meets (C_out / groups) * k * k weights
    e = 4 * 12 * 12 * 3
    forward = a + b + c + d + e
    assert count_macs(model, (4, 6, 6)) == forward
    # Backward: every weight gets a gradient costing its layer's forward; every layer but the first also
    # passes a gradient to its input (same cost again). The input itself needs no gradient, so autograd
    # skips A's input gradient (output_mask[0] is False there).
    weight_grads = a + b + c + d + e
    input_grads = b + c + d + e
    expected = forward + weight_grads + input_grads
    assert count_training_macs(model, (4, 6, 6), num_classes=3) == expected
    assert count_training_macs(model, (4, 6, 6), batch_size=3) == expected


def _stock_training_macs(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> int:
    """Forward + backward with stock FlopCounterMode (no custom formula), conv and matmul ops only."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make()
        x = torch.empty(1, *shape)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() // 2


def test_stock_flop_counter_overcounts_depthwise_weight_gradients():
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=8))

    depthwise = _conv_macs(8, 8, 3, 8, 6, 6)
    ours = count_training_macs(make(), (8, 6, 6))
    assert ours == 2 * depthwise + 2 * depthwise + depthwise  # forward, weight gradients, one input gradient
    stock = _stock_training_macs(make, (8, 6, 6))
    assert stock > ours
    assert stock == ours + 2 * (8 - 1) * depthwise  # stock counts each weight gradient `groups` times


def test_efficientnet_b0_trains_at_about_three_times_its_forward():
    model = _efficientnet_b0()
    forward = count_macs(model, (3, 224, 224))
    train = count_training_macs(model, (3, 224, 224))
    assert 2.5 < train / forward < 3.1
    assert _stock_training_macs(_efficientnet_b0, (3, 224, 224)) / forward > 30  # the bug this fixes (~41.7)


def test_training_count_of_dense_layers_is_three_times_the_forward():
    assert count_training_macs(nn.Linear(4, 2), (4,)) == 8 + 8  # no input gradient for the input itself
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_training_macs(model, (4,)) == 3 * (12 + 6) - 12


def test_training_count_respects_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # no weight gradient for the first layer, no input gradient into it
    assert count_training_macs(model, (4,)) == 12 + 6 + 6
    model.requires_grad_(False)
    assert count_training_macs(model, (4,)) == count_macs(model, (4,))


def test_training_count_does_not_touch_the_callers_model():
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_training_macs(model, (3, 32, 32))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_training_count_works_under_no_grad_and_inference_mode():
    model = WideResNet(depth=10, width=1)
    expected = count_training_macs(model, (3, 32, 32))
    with torch.no_grad():
        assert count_training_macs(model, (3, 32, 32)) == expected
    with torch.inference_mode():
        assert count_training_macs(model, (3, 32, 32)) == expected


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_training_count_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"`input_shape`.*\(3, 0\)"):
        count_training_macs(nn.Linear(4, 2), (3, 0))
    with pytest.raises(ValueError, match="`batch_size`.*but got 0"):
        count_training_macs(nn.Linear(4, 2), (4,), batch_size=0)
    with pytest.raises(ValueError, match="`num_classes`.*but got 0"):
        count_training_macs(nn.Linear(4, 2), (4,), num_classes=0)
    with pytest.raises(ValueError, match=r"`num_classes` = 3.*\(1, 2\)"):
        count_training_macs(nn.Linear(4, 2), (4,), num_classes=3)
    with pytest.raises(ValueError, match=r"_TwoHeads to return logits of shape \(B, C, \.\.\.\).*tuple"):
        count_training_macs(_TwoHeads(), (4,))
    with pytest.raises(ValueError, match=r"logits of shape \(B, C, \.\.\.\).*returned \(4,\)"):
        count_training_macs(nn.Flatten(0), (4,))
    with pytest.raises(ValueError, match="`input_shape` to fit the model.*forward") as excinfo:
        count_training_macs(WideResNet(depth=10, width=1), (4, 32, 32))
    assert isinstance(excinfo.value.__cause__, RuntimeError)


def test_training_count_of_batch_norm_on_one_value_needs_two_samples():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="`input_shape` to fit the model.*more than 1 value per channel"):
        count_training_macs(model, (4,))
    assert count_training_macs(model, (4,), batch_size=2) == 3 * (12 + 6) - 12
