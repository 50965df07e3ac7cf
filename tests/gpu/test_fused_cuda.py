"""Fused (vmap) execution on CUDA equals the loop over members: float32 exactly, bfloat16 autocast closely."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_ensembles.fused import choose_execution, vmap_forward
from lightning_ensembles.members import build_members
from lightning_ensembles.models import WideResNet
from tests.gpu.helpers import DEVICE, NEEDS_CUDA, ON_DEVICE, relative_error

pytestmark = ON_DEVICE

WRN = functools.partial(WideResNet, depth=10, width=2)


def _members_and_batch(
    channels_last: bool,
) -> tuple[list[nn.Module], list[nn.Module], torch.Tensor, torch.Tensor]:
    loop = [m.to(DEVICE) for m in build_members([WRN] * 3, seed=0)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (16,), generator=g).to(DEVICE)
    if channels_last:
        loop = [m.to(memory_format=torch.channels_last) for m in loop]
        x = x.contiguous(memory_format=torch.channels_last)
    return loop, copy.deepcopy(loop), x, y


def _train_step(run: object, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
        out = run(x)  # type: ignore[operator]
        loss = sum(nn.functional.cross_entropy(o, y) for o in out)
    loss.backward()
    return out.detach()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_float32_outputs_gradients_and_statistics_equal_the_loop(
    exact_float32: None, channels_last: bool
) -> None:
    loop, fused, x, y = _members_and_batch(channels_last)
    out_loop = _train_step(lambda v: torch.stack([m(v) for m in loop]), x, y, None)
    out_fused = _train_step(lambda v: vmap_forward(fused, v), x, y, None)
    assert out_fused.device.type == DEVICE.type and out_fused.shape == (3, 16, 10)
    assert_close(out_fused, out_loop, atol=1e-4, rtol=1e-4)
    for a, b in zip(loop, fused, strict=True):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-3, msg=name)
        assert_close(dict(b.named_buffers()), dict(a.named_buffers()), atol=1e-5, rtol=1e-4)
    for m in loop + fused:
        m.eval()
    with torch.no_grad():
        assert_close(vmap_forward(fused, x), torch.stack([m(x) for m in loop]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bfloat16_autocast_outputs_and_gradients_match_the_loop(channels_last: bool) -> None:
    loop, fused, x, y = _members_and_batch(channels_last)
    reference = copy.deepcopy(loop)  # float32: how far bfloat16 alone moves the result
    out_ref = _train_step(lambda v: torch.stack([m(v) for m in reference]), x, y, None)
    out_loop = _train_step(lambda v: torch.stack([m(v) for m in loop]), x, y, torch.bfloat16)
    out_fused = _train_step(lambda v: vmap_forward(fused, v), x, y, torch.bfloat16)
    assert out_loop.dtype == torch.bfloat16 and torch.isfinite(out_fused).all()
    # bfloat16 keeps 8 significant bits, and loop and vmap round differently. Outputs must stay within a few
    # percent, in norm, of each other and of float32; gradients, which compound the rounding of every layer,
    # must be about as close to float32's as the loop's are.
    assert relative_error(out_fused, out_loop) < 0.05
    assert relative_error(out_fused, out_ref) < 0.05
    for a, b, r in zip(loop, fused, reference, strict=True):
        for (name, pa), pb, pr in zip(a.named_parameters(), b.parameters(), r.parameters(), strict=True):
            assert pb.grad is not None and torch.isfinite(pb.grad).all(), name
            assert relative_error(pb.grad, pr.grad) <= 2 * relative_error(pa.grad, pr.grad) + 0.02, name


@NEEDS_CUDA
def test_bfloat16_autocast_reaches_the_fused_convolutions() -> None:
    """Under ``vmap`` autocast must still run the members in bfloat16, or fused AMP training is float32.

    On the CPU (torch 2.14) it does not: the fused outputs, and every convolution's, come back float32 while
    the loop's are bfloat16 (pytorch/pytorch#192617 reports the same for ``nn.Linear``). This checks CUDA.
    """
    loop, fused, x, _ = _members_and_batch(channels_last=False)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out_loop = torch.stack([m(x) for m in loop])
        out_fused = vmap_forward(fused, x)
    assert out_fused.dtype == out_loop.dtype == torch.bfloat16


def test_choose_execution_times_both_paths_and_leaves_the_members_alone() -> None:
    loop, _, x, _ = _members_and_batch(channels_last=False)
    before = [copy.deepcopy(m.state_dict()) for m in loop]
    choice = choose_execution(loop, x, measure_on_cpu=True)
    assert choice in ("loop", "vmap")
    assert all(m.training for m in loop)
    for m, state in zip(loop, before, strict=True):
        assert_close(m.state_dict(), state)
