import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles.models import WideResNet
from lightning_ensembles.models.wide_resnet import _BasicBlock


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wrn_28_10_has_the_standard_parameter_count():
    assert _num_params(WideResNet(depth=28, width=10)) == 36_479_194


@pytest.mark.parametrize(
    ("depth", "width", "millions"),
    [(16, 8, 11.0), (40, 4, 8.9), (16, 4, 2.7)],
)
def test_parameter_counts_match_the_paper(depth, width, millions):
    # The paper prints counts rounded to 0.1 M; an exact count must round to the printed value. (A 1%
    # tolerance would be too tight for WRN-16-4: its exact 2,748,890 is 1.8% above the printed 2.7 M.)
    count = _num_params(WideResNet(depth=depth, width=width))
    assert abs(count - millions * 1e6) <= 0.05e6


def test_name():
    assert WideResNet(depth=40, width=4).name == "WRN-40-4"
    assert "WRN-16-2" in repr(WideResNet(depth=16, width=2))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_on_cifar_input(num_classes):
    model = WideResNet(depth=10, width=2, num_classes=num_classes)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, num_classes)


@pytest.mark.parametrize("width", [1, 2])
def test_output_shape_on_single_channel_8x8_input(width):
    model = WideResNet(depth=16, width=width, num_classes=10, in_channels=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert model.forward_features(torch.randn(4, 1, 8, 8)).shape == (4, 64 * width)


def test_layout():
    model = WideResNet(depth=16, width=4)
    assert len(model.stages) == 3
    assert all(len(stage) == 2 for stage in model.stages)
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256]
    assert [stage[0].conv1.stride for stage in model.stages] == [(1, 1), (2, 2), (2, 2)]
    # projections exactly where the shape changes, and only there
    assert all(stage[0].shortcut is not None for stage in model.stages)
    assert all(block.shortcut is None for stage in model.stages for block in list(stage)[1:])
    # with width 1 the first stage keeps 16 channels and stride 1: identity shortcut
    assert WideResNet(depth=10, width=1).stages[0][0].shortcut is None
    assert model.stem.bias is None
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_projection_shortcut_sees_the_preactivated_input():
    torch.manual_seed(0)
    block = _BasicBlock(8, 16, stride=2, dropout=0.0).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 8, 8)
    pre = F.relu(block.bn1(x))
    expected = block.shortcut(pre) + block.conv2(F.relu(block.bn2(block.conv1(pre))))
    torch.testing.assert_close(block(x), expected)


def test_identity_shortcut_adds_the_raw_input():
    torch.manual_seed(0)
    block = _BasicBlock(8, 8, stride=1, dropout=0.0).eval()
    x = torch.randn(2, 8, 4, 4)
    expected = x + block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x))))))
    torch.testing.assert_close(block(x), expected)


def test_initialisation():
    torch.manual_seed(0)
    model = WideResNet(depth=16, width=4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    assert torch.all(model.fc.bias == 0)
    conv = model.stages[2][1].conv1  # 256 -> 256, 3x3: large enough for a stable std
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)


def test_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=1, dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3  # one per block


def test_no_dropout_modules_without_dropout():
    model = WideResNet(depth=10, width=1, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"depth": 27}, "depth", "27"),
        ({"depth": 4}, "depth", "4"),
        ({"depth": -2}, "depth", "-2"),
        ({"depth": 28.0}, "depth", "28.0"),
        ({"width": 0}, "width", "0"),
        ({"width": 2.5}, "width", "2.5"),
        ({"num_classes": 0}, "num_classes", "0"),
        ({"dropout": 1.0}, "dropout", "1.0"),
        ({"dropout": -0.1}, "dropout", "-0.1"),
        ({"dropout": "0.3"}, "dropout", "'0.3'"),
        ({"in_channels": 0}, "in_channels", "0"),
        ({"in_channels": True}, "in_channels", "True"),
    ],
)
def test_bad_arguments_raise(kwargs, name, shown):
    with pytest.raises(ValueError) as excinfo:
        WideResNet(**kwargs)
    message = str(excinfo.value)
    assert f"`--model.member.init_args.{name}`" in message
    assert f"but got {shown}." in message


def test_depth_message_lists_the_allowed_depths():
    with pytest.raises(ValueError, match=r"6n\+4 \(10, 16, 22, 28, 40, \.\.\.\), but got 27\."):
        WideResNet(depth=27)
