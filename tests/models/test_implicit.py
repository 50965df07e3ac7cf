"""Implicit ensembles as Wide ResNets: shapes, the M = 1 and the deep-ensemble equivalences, multiply-adds and
parameters against hand counts, checkpoints, and argument errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ensembles.cost import count_macs, count_params
from lightning_ensembles.models import WideResNet
from lightning_ensembles.models.implicit import BatchEnsembleWideResNet, MIMOWideResNet, PackedWideResNet

pytestmark = pytest.mark.usefixtures(
    "one_torch_thread"
)  # tiny nets: more threads only spin on a busy machine

SHAPE = (3, 8, 8)
"""Tiny RGB images: every test net is WRN-10-k (one block per stage) on 8x8 inputs."""


def _wrn(width: int = 1, seed: int = 0, **kwargs: object) -> WideResNet:
    """A WRN-10-``width`` with non-trivial batch-norm affine parameters and running statistics."""
    torch.manual_seed(seed)
    model = WideResNet(depth=10, width=width, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        model.fc.bias.uniform_(-0.5, 0.5)
    return model


def _images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = False) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if exact:
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            torch.testing.assert_close(state_a[key], state_b[key], atol=1e-5, rtol=1e-5, msg=key)


# --- the hand count ------------------------------------------------------------------------------------------


def _wrn10_layers(width: int, in_channels: int = 3, side: int = 8) -> list[tuple[str, int, int, int, int]]:
    """WRN-10-``width``'s convolutions and classifier: ``(role, c_in, c_out, kernel, output pixels)``.

    One pre-activation block per stage: two 3x3 convolutions, plus a 1x1 projection where the channels or the
    resolution change (stage 1 only when ``width > 1``); stages at side, side / 2 and side / 4.
    """
    c0, c1, c2, c3 = 16, 16 * width, 32 * width, 64 * width
    p1, p2, p3 = side**2, (side // 2) ** 2, (side // 4) ** 2
    layers = [("stem", in_channels, c0, 3, p1), ("conv", c0, c1, 3, p1), ("conv", c1, c1, 3, p1)]
    if c0 != c1:
        layers.append(("conv", c0, c1, 1, p1))
    layers += [("conv", c1, c2, 3, p2), ("conv", c2, c2, 3, p2), ("conv", c1, c2, 1, p2)]
    layers += [("conv", c2, c3, 3, p3), ("conv", c3, c3, 3, p3), ("conv", c2, c3, 1, p3)]
    layers.append(("fc", c3, 10, 1, 1))
    return layers


def _wrn10_norms(width: int) -> list[int]:
    """Channels of WRN-10-``width``'s batch norms: bn1 and bn2 of each block, then the final norm."""
    c0, c1, c2, c3 = 16, 16 * width, 32 * width, 64 * width
    return [c0, c1, c1, c2, c2, c3, c3]


def _macs(layers: list[tuple[str, int, int, int, int]], rule: dict[str, float]) -> int:
    """Sum ``c_in * c_out * kernel^2 * pixels`` over the layers, each times its role's factor in ``rule``."""
    total = sum(rule[role] * c_in * c_out * k * k * pixels for role, c_in, c_out, k, pixels in layers)
    assert total == int(total)
    return int(total)


def test_the_hand_count_is_the_wide_resnets():
    # 27,648 (stem) + 2 x 147,456 + 73,728 + 147,456 + 8,192 + 73,728 + 147,456 + 8,192 + 640 (classifier)
    assert _macs(_wrn10_layers(1), {"stem": 1, "conv": 1, "fc": 1}) == 781_952
    for width in (1, 2):
        model = WideResNet(depth=10, width=width)
        assert count_macs(model, SHAPE) == _macs(_wrn10_layers(width), {"stem": 1, "conv": 1, "fc": 1})


# --- shapes and names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        PackedWideResNet(depth=10, width=1, num_members=4, alpha=2),
        PackedWideResNet(depth=10, width=2, num_members=2, alpha=2, gamma=2, num_classes=7, dropout=0.2),
        BatchEnsembleWideResNet(depth=10, width=1, num_members=3, num_classes=7),
        MIMOWideResNet(depth=10, width=1, num_members=3, num_classes=7),
    ],
    ids=lambda model: model.name,
)
@pytest.mark.parametrize("training", [False, True])
def test_output_is_members_batch_classes(model, training):
    model.train(training)
    out = model(_images(5))
    assert out.shape == (model.num_members, 5, model.num_classes)
    assert torch.isfinite(out).all()


def test_names_and_attributes():
    packed = PackedWideResNet(depth=16, width=2, num_members=4, alpha=2)
    assert (packed.name, packed.depth, packed.width, packed.num_members) == (
        "Packed-WRN-16-2 (M=4, alpha=2)",
        16,
        2,
        4,
    )
    assert packed.member_widths == (8, 16, 32, 64)
    assert PackedWideResNet(10, 1, 4, alpha=1.5, gamma=2).name == "Packed-WRN-10-1 (M=4, alpha=1.5, gamma=2)"
    assert PackedWideResNet(10, 1, 4, alpha=1.5, gamma=2).member_widths == (6, 6, 12, 24)
    assert BatchEnsembleWideResNet(16, 2, 4).name == "BatchEnsemble-WRN-16-2 (M=4)"
    assert MIMOWideResNet(16, 2, 3).name == "MIMO-WRN-16-2 (M=3)"
    assert "Packed-WRN-16-2" in repr(packed)


def test_models_build_and_run_on_the_meta_device():
    with torch.device("meta"):
        models = [
            PackedWideResNet(10, 1, 4, alpha=2),
            BatchEnsembleWideResNet(10, 1, 3),
            MIMOWideResNet(10, 1, 3),
        ]
        for model in models:
            assert model(torch.empty(2, *SHAPE)).shape == (model.num_members, 2, 10)


# --- M = 1 is the plain network ------------------------------------------------------------------------------


def _one_member_forms(wrn: WideResNet) -> list[nn.Module]:
    mimo = MIMOWideResNet(depth=10, width=wrn.width, num_members=1)
    mimo.body.load_state_dict(wrn.state_dict())
    return [
        PackedWideResNet.from_members([wrn]),
        BatchEnsembleWideResNet.from_wide_resnet(wrn),
        mimo,
    ]


@pytest.mark.parametrize("training", [False, True])
def test_one_member_equals_the_wide_resnet(training):
    wrn = _wrn(width=2).train(training)
    x = _images()
    for model in _one_member_forms(wrn):
        reference = _wrn(width=2).train(training)  # fresh copy, so running statistics start equal
        model.train(training)
        out = model(x)
        assert out.shape == (1, 4, 10)
        torch.testing.assert_close(out[0], reference(x), atol=1e-5, rtol=1e-5, msg=type(model).__name__)
        if training:  # the running statistics moved the same way
            for got, want in zip(
                (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)),
                (m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)),
                strict=True,
            ):
                torch.testing.assert_close(got.running_mean, want.running_mean, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got.running_var, want.running_var, atol=1e-5, rtol=1e-5)


def test_batch_ensemble_from_a_wide_resnet_repeats_it_and_fast_weights_make_members_differ():
    wrn = _wrn().eval()
    model = BatchEnsembleWideResNet.from_wide_resnet(wrn, num_members=3).eval()
    x = _images()
    torch.testing.assert_close(model(x), wrn(x).expand(3, -1, -1), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    model.reset_fast_weights()
    out = model(x)
    assert not torch.allclose(out[0], out[1])
    # per-member inputs: member m's prediction is a function of its own batch only
    batches = torch.stack([x, _images(seed=2), _images(seed=3)])
    own = model(batches)
    for m in range(3):
        torch.testing.assert_close(own[m], model(batches[m])[m], atol=1e-5, rtol=1e-5)


def test_mimo_per_member_inputs_reach_their_member():
    model = MIMOWideResNet(depth=10, width=1, num_members=2).eval()
    x, y = _images(seed=1), _images(seed=2)
    both = model(torch.stack([x, y]))
    # Member 0 reads channels 0..2, member 1 channels 3..5: the stacked input is the channel concatenation.
    torch.testing.assert_close(both, model.body(torch.cat([x, y], 1)).reshape(4, 2, 10).transpose(0, 1))
    torch.testing.assert_close(model(x), model(torch.stack([x, x])))


# --- Packed-Ensembles with alpha = M, gamma = 1 is a deep ensemble -------------------------------------------


def _members(count: int = 3, width: int = 1) -> list[WideResNet]:
    return [_wrn(width=width, seed=seed) for seed in range(count)]


@pytest.mark.parametrize("training", [False, True])
def test_packed_equals_separate_members(training):
    members = [m.train(training) for m in _members(width=2)]
    packed = PackedWideResNet.from_members(members)
    assert (packed.alpha, packed.gamma, packed.training) == (3, 1, training)
    x = _images()
    out = packed(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), atol=1e-5, rtol=1e-5)
    # after one step in training mode the batch-norm running statistics agree too
    for split, member in zip(packed.to_members(), members, strict=True):
        _assert_same_state(split, member)


def test_packed_gradients_of_the_summed_loss_are_each_members_own():
    members = _members()
    packed = PackedWideResNet.from_members(members)
    x, y = _images(), torch.tensor([0, 3, 7, 9])
    packed_loss = sum(F.cross_entropy(logits, y) for logits in packed(x))
    packed_loss.backward()
    for member in members:
        F.cross_entropy(member(x), y).backward()
    grads = {name: p.grad for name, p in packed.named_parameters()}
    for m, member in enumerate(members):
        for name, p in member.named_parameters():
            got = grads[name][m] if name.startswith("fc.") else grads[name].chunk(3)[m]
            torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_round_trip_is_exact():
    members = _members()
    for member in members:  # counters as a training run leaves them
        for module in member.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.num_batches_tracked.fill_(17)
    packed = PackedWideResNet.from_members(members)
    for split, member in zip(packed.to_members(), members, strict=True):
        assert isinstance(split, WideResNet) and split.training == member.training
        _assert_same_state(split, member, exact=True)
    # and the other way: packed -> members -> packed
    again = PackedWideResNet.from_members(packed.to_members())
    _assert_same_state(again, packed, exact=True)
    assert all(p.requires_grad and p.is_leaf for p in again.parameters())


def test_packed_to_members_needs_alpha_m_and_gamma_one():
    with pytest.raises(ValueError, match="`alpha` = `num_members` and `gamma` = 1"):
        PackedWideResNet(10, 1, 4, alpha=2).to_members()
    with pytest.raises(ValueError, match="`alpha` = `num_members` and `gamma` = 1"):
        PackedWideResNet(10, 1, 2, alpha=2, gamma=2).to_members()


def test_from_members_rejects_mixed_or_foreign_members():
    with pytest.raises(ValueError, match="`members`"):
        PackedWideResNet.from_members([WideResNet(10, 1), WideResNet(10, 2)])
    with pytest.raises(ValueError, match="`members`"):
        PackedWideResNet.from_members([])
    with pytest.raises(ValueError, match="`members`"):
        PackedWideResNet.from_members([nn.Linear(2, 2)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`model`"):
        BatchEnsembleWideResNet.from_wide_resnet(nn.Linear(2, 2))  # type: ignore[arg-type]


# --- multiply-adds and parameters against the hand count -----------------------------------------------------


@pytest.mark.parametrize(
    ("num_members", "alpha", "gamma"), [(4, 2, 1), (4, 2, 2), (4, 4, 1), (2, 1, 1), (4, 1.5, 2)]
)
@pytest.mark.parametrize("width", [1, 2])
def test_packed_macs_and_params(width, num_members, alpha, gamma):
    """Convolutions after the stem cost alpha^2 / (M gamma) x the WRN's; the stem and classifier alpha x."""
    model = PackedWideResNet(10, width, num_members, alpha=alpha, gamma=gamma)
    layers = _wrn10_layers(width)
    inner = alpha**2 / (num_members * gamma)
    assert count_macs(model, SHAPE) == _macs(layers, {"stem": alpha, "conv": inner, "fc": alpha})
    # parameters: the same factors on the weights (pixels = 1), 2 per norm channel (alpha x), M x 10 biases
    weights = _macs(
        [(role, ci, co, k, 1) for role, ci, co, k, _ in layers], {"stem": alpha, "conv": inner, "fc": alpha}
    )
    norms = 2 * alpha * sum(_wrn10_norms(width))
    assert count_params(model) == weights + norms + num_members * 10


def test_packed_deep_ensemble_costs_m_models_and_sqrt_m_about_one():
    wrn = WideResNet(10, 2)
    assert count_macs(PackedWideResNet(10, 2, 4, alpha=4), SHAPE) == 4 * count_macs(wrn, SHAPE)
    assert count_params(PackedWideResNet(10, 2, 4, alpha=4)) == 4 * count_params(wrn)
    ratio = count_macs(PackedWideResNet(10, 2, 4, alpha=2), SHAPE) / count_macs(wrn, SHAPE)
    assert 1.0 < ratio < 1.05  # only the stem and the classifier are alpha = 2 x


@pytest.mark.parametrize("num_members", [1, 3])
@pytest.mark.parametrize("width", [1, 2])
def test_batch_ensemble_macs_and_params(width, num_members):
    """Every layer runs once per member: M x the WRN's multiply-adds; parameters about one WRN's."""
    model = BatchEnsembleWideResNet(10, width, num_members)
    layers = _wrn10_layers(width)
    assert count_macs(model, SHAPE) == num_members * _macs(layers, {"stem": 1, "conv": 1, "fc": 1})
    shared = _macs([(role, ci, co, k, 1) for role, ci, co, k, _ in layers], {"stem": 1, "conv": 1, "fc": 1})
    fast = num_members * sum(ci + co for _, ci, co, _, _ in layers)  # r_i and s_i of every layer
    norms = 2 * num_members * sum(_wrn10_norms(width))  # per-member batch norm
    assert count_params(model) == shared + fast + norms + num_members * 10  # + per-member classifier biases
    assert count_params(model) / count_params(WideResNet(10, width)) < 1 + 0.02 * num_members


@pytest.mark.parametrize("num_members", [1, 3])
@pytest.mark.parametrize("width", [1, 2])
def test_mimo_macs_and_params(width, num_members):
    """One WRN whose stem reads M images and whose classifier writes M x C logits."""
    model = MIMOWideResNet(10, width, num_members)
    layers = _wrn10_layers(width)
    assert count_macs(model, SHAPE) == _macs(layers, {"stem": num_members, "conv": 1, "fc": num_members})
    rule = {"stem": num_members, "conv": 1, "fc": num_members}
    weights = _macs([(role, ci, co, k, 1) for role, ci, co, k, _ in layers], rule)
    assert count_params(model) == weights + 2 * sum(_wrn10_norms(width)) + num_members * 10
    assert count_params(model) / count_params(WideResNet(10, width)) < 1 + 0.02 * num_members


# --- checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PackedWideResNet(10, 1, 4, alpha=2, gamma=2),
        lambda: BatchEnsembleWideResNet(10, 1, 3),
        lambda: MIMOWideResNet(10, 1, 3),
    ],
    ids=["packed", "batch_ensemble", "mimo"],
)
def test_checkpoints_load_with_weights_only(make, tmp_path: Path):
    torch.manual_seed(0)
    model = make()
    model(_images())  # one training-mode pass moves the running statistics
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = make().eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = _images(seed=5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# --- arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PackedWideResNet, BatchEnsembleWideResNet, MIMOWideResNet])
@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_members": 0}, "num_members"),
        ({"num_members": 2.0}, "num_members"),
        ({"num_members": True}, "num_members"),
        ({"depth": 12}, "depth"),
        ({"width": 0}, "width"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_common_arguments_are_named(cls, kwargs, flag):
    arguments = {"depth": 10, "width": 1, "num_members": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"`--model\.member\.init_args\.{flag}`"):
        cls(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_members": 3, "alpha": 2}, "alpha"),  # 16 * 2 / 3 channels
        ({"num_members": 4, "alpha": math.sqrt(2)}, "alpha"),
        ({"num_members": 64, "alpha": 2}, "alpha"),  # half a channel per member
        ({"num_members": 4, "alpha": 0}, "alpha"),
        ({"num_members": 4, "alpha": -2}, "alpha"),
        ({"num_members": 4, "alpha": True}, "alpha"),
        ({"num_members": 4, "alpha": 2, "gamma": 3}, "gamma"),  # 8 channels per member
        ({"num_members": 4, "alpha": 2, "gamma": 16}, "gamma"),
        ({"num_members": 4, "alpha": 2, "gamma": 0}, "gamma"),
    ],
)
def test_bad_packing_arguments_are_named(kwargs, flag):
    with pytest.raises(ValueError, match=rf"`--model\.member\.init_args\.{flag}`"):
        PackedWideResNet(depth=10, width=1, **kwargs)


def test_alpha_within_float_error_of_integer_channels_is_accepted():
    # widths are never rounded: 16 * 3.3 / 3 = 17.6 channels is rejected
    with pytest.raises(ValueError, match="alpha"):
        PackedWideResNet(10, 1, 3, alpha=1.1 * 3)
    # 16 * (0.1 * 30) / 4 = 12.000000000000002: integer up to float error
    assert PackedWideResNet(10, 1, 4, alpha=0.1 * 30).member_widths == (12, 12, 24, 48)


@pytest.mark.parametrize("cls", [BatchEnsembleWideResNet, MIMOWideResNet])
def test_per_member_input_must_have_m_batches(cls):
    model = cls(10, 1, 3)
    with pytest.raises(ValueError, match="num_members = 3"):
        model(torch.randn(2, 4, *SHAPE))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 8, 8))
