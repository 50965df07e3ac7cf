"""ParallelEnsemble: members on persistent worker threads give what the members give one after another.

Nothing here depends on timing: concurrency is shown with a barrier that only opens when two members run at
the same time (a sequential run would break it), and thread counts are read inside the workers.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_ensembles.parallel import ParallelEnsemble, check_devices

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The caller runs with two intra-op threads (whatever the machine has), restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def mixed_members(num_members: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    members: list[nn.Module] = []
    for i in range(num_members):
        if i % 2 == 0:
            members.append(
                nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
            )
        else:
            members.append(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)))
    return [m.eval() for m in members]


def sequential(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return torch.stack([member(x) for member in members])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_outputs_equal_the_members_run_one_after_another(workers: int):
    members = mixed_members(3)
    x = torch.randn(4, 3, 8, 8)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference on one thread, as every worker: the same kernels, bit for bit
    try:
        with torch.inference_mode():
            expected = sequential(members, x)
            with ParallelEnsemble(members, workers=workers, threads_per_worker=1) as parallel:
                first, second = parallel(x), parallel(x)  # the pool is reused across calls
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert first.shape == (3, 4, 5)


def test_outputs_match_with_the_callers_thread_count(two_threads: None):
    members = mixed_members(4)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad(), ParallelEnsemble(members, workers=2) as parallel:
        torch.testing.assert_close(parallel(x), sequential(members, x))


def test_members_are_assigned_round_robin_and_run_on_their_workers_threads():
    members = mixed_members(5)
    threads: dict[int, int] = {}
    for i, member in enumerate(members):
        member.register_forward_hook(lambda m, a, o, i=i: threads.__setitem__(i, threading.get_ident()))
    with torch.no_grad(), ParallelEnsemble(members, workers=2, threads_per_worker=1) as parallel:
        parallel(torch.randn(1, 3, 8, 8))
        assert parallel.assignment == ((0, 2, 4), (1, 3))
    assert threading.get_ident() not in threads.values()
    assert threads[0] == threads[2] == threads[4] != threads[1] == threads[3]


class Rendezvous(nn.Module):
    """A member that waits until the other member is running too: it only returns when both run at once."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier
        self.linear = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.barrier.wait()  # raises BrokenBarrierError after the timeout if the other member never arrives
        return self.linear(x)


def test_workers_run_their_members_at_the_same_time():
    barrier = threading.Barrier(2, timeout=30)
    members = [Rendezvous(barrier), Rendezvous(barrier)]
    with torch.no_grad(), ParallelEnsemble(members, workers=2, threads_per_worker=1) as parallel:
        assert parallel(torch.randn(3, 2)).shape == (2, 3, 3)
    # One worker runs its members one after another, so the first member waits for the second in vain.
    barrier = threading.Barrier(2, timeout=0.5)
    members = [Rendezvous(barrier), Rendezvous(barrier)]
    with torch.no_grad(), ParallelEnsemble(members, workers=1) as parallel:
        with pytest.raises(threading.BrokenBarrierError):
            parallel(torch.randn(3, 2))


def test_every_worker_gets_its_own_thread_count_and_the_process_default_is_restored(two_threads: None):
    members = mixed_members(2)
    with ParallelEnsemble(members, workers=2, threads_per_worker=1) as parallel:
        assert parallel.worker_threads == (1, 1)
        assert torch.get_num_threads() == 2  # the caller's own count
        seen: list[int] = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join()
        assert seen == [2]  # a thread started afterwards gets the caller's count, not the workers'
    with ParallelEnsemble(members, workers=1, threads_per_worker=2) as parallel:
        assert parallel.worker_threads == (2,)
    with ParallelEnsemble(members, workers=2) as parallel:  # default: the caller's threads split
        assert parallel.threads_per_worker == 1 and parallel.worker_threads == (1, 1)


def test_the_callers_autograd_state_holds_in_the_workers():
    members = mixed_members(2)
    x = torch.randn(2, 3, 8, 8)
    with ParallelEnsemble(members, workers=2) as parallel:
        with torch.inference_mode():
            assert parallel(x).is_inference()
        with torch.no_grad():
            assert not parallel(x).requires_grad
        out = parallel(x)
        assert out.requires_grad and not out.is_inference()
        out.sum().backward()
    assert all(p.grad is not None for member in members for p in member.parameters())


def test_a_members_error_reaches_the_caller_and_the_pool_survives_it():
    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("member failed")

    members: list[nn.Module] = [nn.Linear(2, 3), Failing()]
    with ParallelEnsemble(members, workers=2) as parallel:
        with pytest.raises(RuntimeError, match="member failed"):
            parallel(torch.randn(1, 2))
        assert parallel._workers[0].thread.is_alive() and parallel._workers[1].thread.is_alive()


def test_close_stops_the_workers_and_a_closed_pool_refuses_calls():
    parallel = ParallelEnsemble(mixed_members(2), workers=2)
    threads = [worker.thread for worker in parallel._workers]
    parallel.close()
    parallel.close()  # idempotent
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="closed"):
        parallel(torch.randn(1, 3, 8, 8))
    assert repr(parallel).startswith("ParallelEnsemble(members=2, workers=2, threads_per_worker=")


def test_members_on_their_device_are_not_copied():
    members = mixed_members(2)
    with ParallelEnsemble(members, devices=["cpu", "cpu"]) as parallel:
        assert parallel.workers == 2 and parallel.devices == (torch.device("cpu"),) * 2
        assert parallel._workers[0].members[0] is members[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"workers": 0},
            "Expected `workers` to be None or an int in [1, M=3] (at most one worker per member), but got 0.",
        ),
        (
            {"workers": 4},
            "Expected `workers` to be None or an int in [1, M=3] (at most one worker per member), but got 4.",
        ),
        ({"workers": True}, "Expected `workers` to be None or an int in [1, M=3]"),
        ({"threads_per_worker": 0}, "Expected `threads_per_worker` to be an int >= 1, but got 0."),
        (
            {"devices": ["cuda:99"]},
            "Expected every entry of `devices` to be 'cpu' or a CUDA device that exists",
        ),
        ({"devices": ["tpu"]}, "Expected every entry of `devices` to be 'cpu' or a CUDA device that exists"),
        ({"devices": []}, "Expected `devices` to be a non-empty list of devices"),
        ({"devices": "cpu"}, "Expected `devices` to be a non-empty list of devices"),
        ({"devices": ["cpu"] * 4}, "Expected `devices` to hold at most M=3 entries"),
        (
            {"devices": ["cpu"] * 2, "workers": 3},
            "Expected `workers` to be None or len(devices)=2 (one worker per entry of `devices`), but got 3.",
        ),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError) as err:
        ParallelEnsemble(mixed_members(3), **kwargs)
    assert str(err.value).startswith(message)
    assert not [t for t in threading.enumerate() if t.name.startswith("ParallelEnsemble-worker")]


def test_no_members_and_unpicklable():
    with pytest.raises(ValueError, match="Expected `members` to hold at least one member"):
        ParallelEnsemble([])
    with ParallelEnsemble(mixed_members(1)) as parallel, pytest.raises(TypeError, match="cannot be pickled"):
        import copy

        copy.deepcopy(parallel)


def test_check_devices_names_the_flag():
    with pytest.raises(ValueError, match=r"`--trainer.callbacks.init_args.devices`"):
        check_devices(["cuda:99"], flag="--trainer.callbacks.init_args.devices")


@pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info(), reason="the finding is about torch's OpenMP backend"
)
def test_torch_initialises_a_thread_lazily_from_the_process_wide_count(two_threads: None):
    # Why a worker calls torch.get_num_threads() before torch.set_num_threads(): the count is per thread once
    # torch has initialised the thread, but that lazy initialisation (on the first parallel op or query) copies
    # the process-wide value, which every set_num_threads call overwrites, over a count set before it. The
    # experiment lives with the benchmark that records it.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        benchmark = importlib.import_module("parallel_latency")
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert benchmark.thread_count_after_overwrite(prime=True) == 1
    assert benchmark.thread_count_after_overwrite(prime=False) == 2


def test_calls_from_several_threads_at_once_each_get_their_own_results():
    members = mixed_members(3)
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    results: dict[int, torch.Tensor] = {}
    with torch.no_grad(), ParallelEnsemble(members, workers=2) as parallel:

        def call(i: int) -> None:
            with torch.no_grad():
                results[i] = parallel(inputs[i])

        callers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        for i, x in enumerate(inputs):
            torch.testing.assert_close(results[i], sequential(members, x))


# trace=True: the workers run torch.jit.trace graphs of deep copies of the members, without the GIL.


@pytest.mark.parametrize("workers", [1, 2])
def test_traced_members_equal_the_eager_members_bit_for_bit_at_one_thread(workers: int):
    members = mixed_members(3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ParallelEnsemble(members, workers=workers, threads_per_worker=1, trace=True) as parallel:
            for batch in (4, 1, 4):  # a new shape is traced anew; a known one reuses its graphs
                x = torch.randn(batch, 3, 8, 8)
                with torch.inference_mode():
                    assert torch.equal(parallel(x), sequential(members, x))
                with torch.no_grad():
                    assert torch.equal(parallel(x), sequential(members, x))
            graphs = parallel._workers[0].graphs
    finally:
        torch.set_num_threads(saved)
    assert len(graphs) == 4  # batch 4 and 1, each under inference_mode and no_grad
    assert all(isinstance(g, torch.jit.ScriptModule) for gs in graphs.values() for g in gs)
    for member, state in zip(members, before):  # the caller's members are neither traced nor changed
        assert not isinstance(member, torch.jit.ScriptModule)
        for key, value in member.state_dict().items():
            assert torch.equal(value, state[key])


def test_traced_members_are_a_snapshot_deep_copied_at_construction():
    members = mixed_members(2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), ParallelEnsemble(members, workers=2, trace=True) as parallel:
        assert all(w.members[0] is not m for w, m in zip(parallel._workers, members))
        expected = sequential(members, x)
        for member in members:
            for p in member.parameters():
                p.add_(1.0)  # the caller changes its members afterwards: the workers keep the snapshot
        torch.testing.assert_close(parallel(x), expected)
        assert repr(parallel).endswith("trace=True)")


def test_traced_members_under_cpu_autocast_equal_the_eager_members():
    members = mixed_members(2)
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sequential(members, x)
        with ParallelEnsemble(members, workers=2, threads_per_worker=1, trace=True) as parallel:
            logits = parallel(x)
    assert logits.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)  # a branch that a trace would freeze


class DictOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x.flatten(1)}


@pytest.mark.parametrize("bad", [DataDependent, DictOutput])
def test_a_member_that_cannot_be_traced_is_named(bad: type[nn.Module]):
    members = [*mixed_members(2), bad()]
    with ParallelEnsemble(members, workers=2, trace=True) as parallel, torch.no_grad():
        with pytest.raises(ValueError) as err:
            parallel(torch.randn(2, 3, 8, 8))
    message = str(err.value)
    assert message.startswith("Expected every member to be traceable with `trace=True`")
    assert f"member 2 ({bad.__name__}) failed on an input of shape (2, 3, 8, 8)" in message


def test_trace_is_for_inference_and_a_bool():
    with ParallelEnsemble(mixed_members(2), trace=True) as parallel:
        with pytest.raises(RuntimeError, match=r"under torch.no_grad\(\) or torch.inference_mode\(\)"):
            parallel(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"Expected `trace` to be a bool, but got 'yes'."):
        ParallelEnsemble(mixed_members(2), trace="yes")  # type: ignore[arg-type]


def _rendezvous_python(flags: torch.Tensor, me: int, other: int) -> torch.Tensor:
    """Raise flag ``me``, wait (at most ``flags[4]`` checks) for flag ``other``, then raise flag ``2 + me``
    (done). Returns 1 if the other flag was seen, else 0. All of it runs in the TorchScript executor."""
    flags[me] = 1.0
    seen = torch.zeros(())
    for _ in range(int(flags[4])):
        if bool(flags[other] == 1.0):
            seen = torch.ones(())
            break
    flags[2 + me] = 1.0
    return seen


with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.script; the test needs a loop in a graph
    warnings.filterwarnings("ignore", category=FutureWarning)
    _rendezvous = torch.jit.script(_rendezvous_python)


class GraphRendezvous(nn.Module):
    """Traced member whose graph waits for flag ``1 - me`` in the input's first row (see ``_rendezvous``)."""

    def __init__(self, me: int) -> None:
        super().__init__()
        self.me = me

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rendezvous(x[0], self.me, 1 - self.me).expand(x.shape[0], 1)


def flags(spins: int) -> torch.Tensor:
    """A fresh input ``(1, 5)``: four lowered flags and the most checks a graph makes, ``spins``."""
    return torch.tensor([[0.0, 0.0, 0.0, 0.0, float(spins)]])


UNTIL_SEEN = 2**30
"""A graph that waits with this many checks stops as soon as it sees the flag; it only runs out (minutes later)
if the flag never comes. So the outcome depends on whether the two run at the same time, never on how busy the
host is: a graph run one after the other can never see the flag, however many checks it makes."""

DEADLINE_S = 120.0
"""How long this thread waits for a graph before the test fails (a wall-clock bound, not a count of checks)."""


def test_traced_members_run_at_the_same_time():
    # Each graph raises its flag in the shared input and waits, inside the TorchScript executor, for the
    # other's; the first only sees it if the two graphs run at the same time.
    members = [GraphRendezvous(0), GraphRendezvous(1)]
    with torch.no_grad(), ParallelEnsemble(members, workers=2, threads_per_worker=1, trace=True) as parallel:
        parallel(flags(0))  # traces the graphs for this signature (in this thread, one after another)
        assert parallel(flags(UNTIL_SEEN)).flatten().tolist() == [1.0, 1.0]
    with torch.no_grad(), ParallelEnsemble(members, workers=1, trace=True) as parallel:
        parallel(flags(0))
        assert parallel(flags(10_000)).flatten().tolist() == [0.0, 1.0]  # one after another: in vain


def test_a_traced_member_runs_while_another_thread_holds_the_gil():
    # The worker's graph waits for flag 1, which this thread raises and then, without ever releasing the GIL
    # (plain memory access through ctypes, no torch call, and no switch to another thread for 1000 s), waits
    # for the graph's done flag. It can only come if the graph runs without the GIL.
    with torch.no_grad(), ParallelEnsemble([GraphRendezvous(0)], trace=True) as parallel:
        parallel(flags(0))
        x = flags(UNTIL_SEEN)
        flag = [ctypes.c_float.from_address(x.data_ptr() + 4 * i) for i in range(4)]

        def call() -> None:
            with torch.no_grad():  # the autograd state is per thread
                parallel(x)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + DEADLINE_S
        while flag[0].value != 1.0 and time.monotonic() < deadline:  # until the graph runs (sleeping
            time.sleep(0.001)  # releases the GIL)
        assert flag[0].value == 1.0, "the traced graph never started"
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)  # no switch to another Python thread while this one waits
        try:
            flag[1].value = 1.0
            deadline = time.monotonic() + DEADLINE_S  # time.monotonic keeps the GIL, as the ctypes reads do
            while flag[2].value != 1.0 and time.monotonic() < deadline:
                pass
            done = flag[2].value == 1.0
        finally:
            sys.setswitchinterval(interval)
        caller.join()
    assert done


def test_the_deprecation_of_jit_trace_reaches_the_user():
    """No supported form runs a graph without the GIL (benchmarks/_gil_release_probe.py), so trace=True keeps
    torch.jit.trace; torch's FutureWarning about it is shown, not silenced."""
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        torch.jit.trace(nn.Linear(3, 2), torch.randn(1, 3))
    deprecated = [w for w in direct if issubclass(w.category, FutureWarning)]
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        with torch.no_grad(), ParallelEnsemble([nn.Linear(3, 2)], trace=True) as parallel:
            parallel(torch.randn(1, 3))
    shown = [w for w in ours if issubclass(w.category, FutureWarning)]
    assert [str(w.message) for w in shown] == [str(w.message) for w in deprecated]  # none on older torch
