"""ParallelEnsemble on CUDA: streams on one GPU, members deep-copied onto other devices, the caller's stream."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_ensembles.latency import measure_ensemble_latency
from lightning_ensembles.models import WideResNet
from lightning_ensembles.module import EnsembleLightningModule
from lightning_ensembles.parallel import ParallelEnsemble
from tests.gpu.helpers import NEEDS_CUDA

pytestmark = [pytest.mark.gpu, NEEDS_CUDA]


def members(n: int, device: str) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [WideResNet(10, 1).to(device).eval() for _ in range(n)]


def test_streams_on_one_gpu_give_the_sequential_logits(exact_float32: None) -> None:
    ms = members(3, "cuda")
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.inference_mode(), ParallelEnsemble(ms) as parallel:
        assert parallel.workers == 3 and all(w.stream is not None for w in parallel._workers)
        expected = torch.stack([m(x) for m in ms])
        for _ in range(3):
            torch.testing.assert_close(parallel(x), expected)


def test_traced_members_on_streams_give_the_sequential_logits(exact_float32: None) -> None:
    ms = members(2, "cuda")
    for x in (torch.randn(1, 3, 32, 32, device="cuda"), torch.randn(4, 3, 32, 32)):  # a CPU input is copied
        with torch.inference_mode(), ParallelEnsemble(ms, trace=True) as parallel:
            expected = torch.stack([m(x.cuda()) for m in ms])
            for _ in range(3):  # the first call traces; the graph executor optimises (may fuse) on later ones
                torch.testing.assert_close(parallel(x), expected, rtol=1e-4, atol=1e-4)
            graphs = next(iter(parallel._workers[0].graphs.values()))
        assert all(isinstance(g, torch.jit.ScriptModule) for g in graphs)


def test_a_non_default_caller_stream_is_waited_for(exact_float32: None) -> None:
    ms = members(2, "cuda")
    side = torch.cuda.Stream()
    with torch.inference_mode(), ParallelEnsemble(ms, workers=2) as parallel, torch.cuda.stream(side):
        x = torch.randn(64, 3, 32, 32, device="cuda") * 3  # produced on the caller's (side) stream
        out = parallel(x)
        expected = torch.stack([m(x) for m in ms])  # on the side stream too
        torch.testing.assert_close(out, expected)


def test_cpu_members_are_deep_copied_onto_the_devices_and_stay_where_they_were(exact_float32: None) -> None:
    ms = members(2, "cpu")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = torch.stack([m(x) for m in ms])
        with ParallelEnsemble(ms, devices=["cuda:0", "cuda:0"]) as parallel:
            out = parallel(x)
    assert out.device == torch.device("cuda", 0)
    assert all(p.device.type == "cpu" for m in ms for p in m.parameters())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_one_member_per_device_gathers_on_the_first(exact_float32: None) -> None:
    ms = members(2, "cuda:0")
    x = torch.randn(4, 3, 32, 32, device="cuda:0")
    with torch.inference_mode(), ParallelEnsemble(ms, devices=["cuda:0", "cuda:1"]) as parallel:
        out = parallel(x)
        assert parallel._workers[1].members[0] is not ms[1]
        torch.testing.assert_close(out, torch.stack([m(x) for m in ms]))
    assert out.device == torch.device("cuda", 0)


def test_parallel_latency_on_cuda_is_timed_and_leaves_the_module_alone() -> None:
    module = EnsembleLightningModule(
        member=functools.partial(WideResNet, 10, 1), num_members=3, num_classes=10
    ).cuda()
    stats = measure_ensemble_latency(module, (3, 32, 32), mode="parallel", batch_size=8, warmup=2, repeats=5)
    assert list(stats) == [1, 2, 3] and all(s.p50_ms > 0 for s in stats.values())
    assert module.training and all(p.is_cuda for p in module.parameters())
