"""Fused (vmap) execution of identical members: equivalent to the loop, per-member BatchNorm and dropout."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_ensembles import fused
from lightning_ensembles.fused import check_fusable, choose_execution, vmap_forward
from lightning_ensembles.members import build_members
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import TinyConvNet, TinyNet, sgd, trainer_kwargs

WRN = functools.partial(WideResNet, depth=10, width=1)


def _images(n: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=8)


def test_outputs_gradients_and_batchnorm_statistics_equal_the_loop() -> None:
    loop = build_members([WRN] * 3, seed=0)
    vec = copy.deepcopy(loop)
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))
    out_loop = torch.stack([m(x) for m in loop])
    out_vec = vmap_forward(vec, x)
    assert_close(out_vec, out_loop, atol=1e-5, rtol=1e-4)
    sum(nn.functional.cross_entropy(o, y) for o in out_loop).backward()
    sum(nn.functional.cross_entropy(o, y) for o in out_vec).backward()
    for a, b in zip(loop, vec, strict=True):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)
        assert_close(dict(b.named_buffers()), dict(a.named_buffers()))  # running stats, num_batches_tracked
    for m in loop + vec:
        m.eval()
    assert_close(vmap_forward(vec, x), torch.stack([m(x) for m in loop]), atol=1e-5, rtol=1e-4)


def test_training_with_vmap_ends_where_the_loop_ends() -> None:
    def fit(execution: str) -> EnsembleLightningModule:
        module = EnsembleLightningModule(
            member=WRN, num_members=3, num_classes=10, optimizer=sgd(), execution=execution
        )
        pl.Trainer(max_epochs=2, **trainer_kwargs()).fit(module, _images())
        return module

    loop, vec = fit("loop"), fit("vmap")
    assert loop.state_dict().keys() == vec.state_dict().keys()  # the same per-member checkpoint format
    assert_close(vec.state_dict(), loop.state_dict(), atol=1e-4, rtol=1e-3)


def test_dropout_masks_differ_per_member() -> None:
    base = TinyNet(dropout=0.5)
    members = [copy.deepcopy(base) for _ in range(3)]  # identical weights: only dropout can differ
    x = torch.randn(64, 12)
    out = vmap_forward(members, x)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    for m in members:
        m.eval()
    out = vmap_forward(members, x)
    assert torch.equal(out[0], out[1])


def test_mixed_or_different_members_are_rejected_with_what_differs() -> None:
    with pytest.raises(
        ValueError, match=r"`--model.execution`.*member 1 is a TinyConvNet and member 0 a TinyNet"
    ):
        EnsembleLightningModule(members=[TinyNet, TinyConvNet], num_classes=5, execution="vmap")
    with pytest.raises(
        ValueError,
        match=r"`body.0.weight` of member 1 has shape \(32, 12\), float32 on cpu and of member 0 shape \(16, 12\)",
    ):
        EnsembleLightningModule(
            members=[TinyNet, functools.partial(TinyNet, hidden=32)], num_classes=5, execution="vmap"
        )
    with pytest.raises(
        ValueError, match=r"`--model.execution` to be one of \['loop', 'vmap', 'auto'\].*'fast'"
    ):
        EnsembleLightningModule(member=TinyNet, num_classes=5, execution="fast")
    members = build_members([TinyNet] * 2, seed=0)
    members[1] = members[1].double()
    with pytest.raises(ValueError, match=r"float64 on cpu"):
        check_fusable(members)
    module = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=5, execution="vmap")
    with pytest.raises(ValueError, match="member 2 is a TinyConvNet"):
        module.grow(1, member=TinyConvNet)


def test_auto_timing_leaves_members_untouched() -> None:
    members = build_members([WRN] * 2, seed=0)
    before = copy.deepcopy([dict(m.named_buffers()) for m in members])
    assert choose_execution(members, torch.randn(4, 3, 12, 12), measure_on_cpu=True) in ("loop", "vmap")
    for m, buffers in zip(members, before, strict=True):
        assert m.training  # modes restored
        assert_close(dict(m.named_buffers()), buffers)  # no running-statistics update from the timing
        assert all(p.grad is None for p in m.parameters())  # nothing trained
    assert choose_execution([TinyNet(), TinyConvNet()], torch.randn(2, 12)) == "loop"  # mixed: no timing


@pytest.mark.parametrize("vmap_faster", [True, False])
def test_auto_follows_the_measurement(monkeypatch: pytest.MonkeyPatch, vmap_faster: bool) -> None:
    clock = {"t": 0.0, "path": ""}
    monkeypatch.setattr(fused.time, "perf_counter", lambda: clock["t"])
    original = fused.vmap_forward

    def slow_or_fast_vmap(members, x):
        clock["t"] += 1.0 if vmap_faster else 100.0
        return original(members, x)

    monkeypatch.setattr(fused, "vmap_forward", slow_or_fast_vmap)
    members = build_members([TinyNet] * 3, seed=0)
    for m in members:
        m.register_forward_pre_hook(lambda *_: clock.__setitem__("t", clock["t"] + 10.0))
    # The loop costs 3 members x 10 = 30 units; vmap 1 (plus its traced member calls, identical in both runs).
    choice = choose_execution(members, torch.randn(8, 12), measure_on_cpu=True)
    assert choice == ("vmap" if vmap_faster else "loop")
    assert choose_execution(members, torch.randn(8, 12)) == "loop"  # CPU: measured slower, so the loop


def test_auto_falls_back_to_the_loop_when_vmap_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """vmap can fail where the loop runs (e.g. under CUDA autocast): `auto` then chooses the loop and says why."""

    def failing_vmap(members, x):
        raise RuntimeError("vmap: this operation is not supported under autocast")

    monkeypatch.setattr(fused, "vmap_forward", failing_vmap)
    members = build_members([TinyNet] * 2, seed=0)
    with caplog.at_level("WARNING", logger=fused.__name__):
        assert choose_execution(members, torch.randn(8, 12), measure_on_cpu=True) == "loop"
    assert "fused (vmap) path raised RuntimeError: vmap: this operation" in caplog.text
    assert all(m.training for m in members)  # modes restored on the early return too


def test_module_auto_mode_trains_and_records_its_choice() -> None:
    module = EnsembleLightningModule(member=WRN, num_members=2, num_classes=10, execution="auto")
    pl.Trainer(max_steps=2, **trainer_kwargs()).fit(module, _images())
    assert module._auto_choice == "loop"  # on CPU
    mixed = EnsembleLightningModule(members=[TinyNet, TinyConvNet], num_classes=5, execution="auto")
    mixed(torch.randn(4, 12))
    assert mixed._auto_choice == "loop"


def test_compiled_members_keep_their_names_and_outputs() -> None:
    plain = EnsembleLightningModule(member=TinyNet, num_members=2, num_classes=5)
    compiled = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=5, compile=True, compile_backend="eager"
    )
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints are unchanged
    assert all(m._compiled_call_impl is not None for m in compiled.members)
    plain.eval()
    compiled.eval()
    x = torch.randn(4, 12)
    assert_close(compiled(x), plain(x))
    pl.Trainer(max_steps=2, **trainer_kwargs()).fit(
        compiled, DataLoader(TensorDataset(x, torch.arange(4)), batch_size=2)
    )
    with pytest.raises(ValueError, match=r"`--model.compile true`.*`--model.execution loop`.*'vmap'"):
        EnsembleLightningModule(member=TinyNet, num_classes=5, compile=True, execution="vmap")
