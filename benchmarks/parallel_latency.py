"""Member-parallel inference vs members one after another: latency of 2 x WRN-16-2 on a CPU.

    python benchmarks/parallel_latency.py [--batch-sizes 1 64] [--rounds 12] [--out benchmarks/results] [--tiny]

Two WRN-16-2 members (``WideResNet(depth=16, width=2)``, randomly initialised, eval mode, float32, input
3x32x32), each run ending with the aggregation to probabilities (``aggregate(..., "mean_probs")``), as
``measure_ensemble_latency`` runs them. Candidates, per batch size:

* ``sequential_1t``: the members one after another in the main thread, 1 intra-op thread;
* ``sequential_2t``: the same with 2 intra-op threads (the same total thread budget as the parallel run);
* ``parallel_2x1``: :class:`~lightning_ensembles.parallel.ParallelEnsemble` with 2 workers x 1 thread, the
  pool created once and reused by every call;
* ``sequential_trace_1t``: ``torch.jit.trace`` graphs of the members one after another in the main thread, 1
  intra-op thread (what tracing alone gains, without any overlap);
* ``parallel_trace_2x1``: ``ParallelEnsemble(..., trace=True)`` with 2 workers x 1 thread: each worker runs
  its member's traced graph, which the TorchScript executor runs without the GIL.

Candidates alternate within every round (the thread count is set, then one untimed call, then ``--calls``
timed ones, whose median is the round's value), so drift on a shared machine hits all alike. Reported: the
median and 10th-90th percentiles of the round values, and of the per-round ratios parallel / sequential
against both baselines (goal <= 0.6, floor 0.5 for two members), and of traced parallel / traced sequential
(the overlap alone). Also recorded: whether the parallel logits (eager and traced) equal the sequential ones, what ``torch.get_num_threads()`` says inside every worker, the thread-count probe
(:func:`thread_count_after_overwrite`: is the count per thread?), the CPU model from ``lscpu`` and the load
average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch
from _timing import ratio, save, summary
from torch import Tensor, nn

from lightning_ensembles.aggregation import aggregate
from lightning_ensembles.models import WideResNet
from lightning_ensembles.parallel import ParallelEnsemble
from lightning_ensembles.results import cpu_model


def thread_count_after_overwrite(prime: bool) -> int:
    """What ``torch.get_num_threads()`` reads in a thread that asked for 1 after another thread set 2.

    The finding :class:`~lightning_ensembles.parallel.ParallelEnsemble`'s workers rely on: torch's intra-op
    thread count is per thread once torch has initialised the thread, but that lazy initialisation (on its
    first parallel operation or query) copies the process-wide value, which every ``torch.set_num_threads``
    call overwrites, over a count set before it. So a worker queries the count (``prime``) before setting it.
    Events order the two threads' steps, so the answer does not depend on scheduling. The caller's
    process-wide count is overwritten (2). ``tests/test_parallel.py`` checks the finding; :func:`thread_probe`
    records it with the results.

    Args:
        prime: let torch initialise the asking thread (``torch.get_num_threads()``) before it asks for 1.

    Returns:
        The asking thread's count at the end: 1 when primed, 2 when not (with torch's OpenMP backend).
    """
    asked, overwritten = threading.Event(), threading.Event()
    seen: list[int] = []

    def ask_for_one() -> None:
        if prime:
            torch.get_num_threads()
        torch.set_num_threads(1)
        asked.set()
        overwritten.wait(30)
        seen.append(torch.get_num_threads())

    def set_two() -> None:
        torch.get_num_threads()
        asked.wait(30)
        torch.set_num_threads(2)
        overwritten.set()

    threads = [threading.Thread(target=ask_for_one), threading.Thread(target=set_two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen[0]


def thread_probe() -> dict[str, int]:
    """``torch.get_num_threads()`` of a thread that asked for 1, after another thread set 2 process-wide: with and
    without first letting torch initialise the thread (see :mod:`lightning_ensembles.parallel`)."""

    saved = torch.get_num_threads()
    try:
        return {
            "initialised_then_set_1": thread_count_after_overwrite(True),
            "set_1_before_initialisation": thread_count_after_overwrite(False),
        }
    finally:
        torch.set_num_threads(saved)


def traced(members: list[nn.Module], x: Tensor) -> list[nn.Module]:
    """``torch.jit.trace`` graphs of the members on ``x`` (torch 2.14's deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return [torch.jit.trace(member, x) for member in members]


def run(
    depth: int,
    width: int,
    shape: tuple[int, ...],
    batch_sizes: list[int],
    rounds: int,
    calls: int,
    budget_s: float,
    out: str | None,
) -> dict:
    torch.manual_seed(0)
    members: list[nn.Module] = [WideResNet(depth, width).eval() for _ in range(2)]
    saved_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    deadline = time.perf_counter() + budget_s
    rows = []
    with (
        torch.inference_mode(),
        ParallelEnsemble(members, workers=2, threads_per_worker=1) as parallel,
        ParallelEnsemble(members, workers=2, threads_per_worker=1, trace=True) as parallel_trace,
    ):
        for batch in batch_sizes:
            x = torch.randn(batch, *shape)
            graphs = traced(members, x)

            def sequential(x: Tensor = x, members: list[nn.Module] = members) -> Tensor:
                return aggregate(torch.stack([m(x) for m in members]), "mean_probs")

            def in_parallel(x: Tensor = x, parallel: ParallelEnsemble = parallel) -> Tensor:
                return aggregate(parallel(x), "mean_probs")

            candidates: dict[str, tuple[int, Callable[[], Tensor]]] = {
                "sequential_1t": (1, sequential),
                "sequential_2t": (2, sequential),
                "parallel_2x1": (1, in_parallel),  # the main thread only waits for the workers
                "sequential_trace_1t": (1, lambda x=x, graphs=graphs: sequential(x, graphs)),
                "parallel_trace_2x1": (1, lambda x=x: in_parallel(x, parallel_trace)),
            }
            torch.set_num_threads(1)
            reference = torch.stack([m(x) for m in members])
            same = bool(torch.equal(parallel(x), reference))
            max_abs = float((parallel(x) - reference).abs().max())
            same_trace = bool(torch.equal(parallel_trace(x), reference))  # also traces for this batch size
            max_abs_trace = float((parallel_trace(x) - reference).abs().max())
            values: dict[str, list[float]] = {name: [] for name in candidates}
            batch_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (
                len(batch_sizes) - batch_sizes.index(batch)
            )
            for index in range(rounds):
                if index > 1 and time.perf_counter() >= batch_deadline:
                    break
                for name, (threads, fn) in candidates.items():
                    torch.set_num_threads(threads)
                    fn()  # untimed: a changed thread count may re-form the OpenMP team
                    timed = []
                    for _ in range(calls):
                        start = time.perf_counter()
                        fn()
                        timed.append(time.perf_counter() - start)
                    values[name].append(statistics.median(timed))
            torch.set_num_threads(saved_threads)
            rows.append(
                {
                    "members": f"2 x WRN-{depth}-{width}", "input": list(shape), "batch": batch,
                    "rounds": len(values["parallel_2x1"]), "calls_per_round": calls,
                    "workers": parallel.workers, "worker_threads": list(parallel.worker_threads),
                    "worker_threads_trace": list(parallel_trace.worker_threads),
                    "parallel_equals_sequential_1t": same, "max_abs_difference": max_abs,
                    "parallel_trace_equals_sequential_1t": same_trace, "max_abs_difference_trace": max_abs_trace,
                    "ms": {name: summary(v) for name, v in values.items()},
                    "parallel_over_sequential_1t": ratio(values["parallel_2x1"], values["sequential_1t"]),
                    "parallel_over_sequential_2t": ratio(values["parallel_2x1"], values["sequential_2t"]),
                    "sequential_2t_over_1t": ratio(values["sequential_2t"], values["sequential_1t"]),
                    "parallel_trace_over_sequential_1t": ratio(values["parallel_trace_2x1"], values["sequential_1t"]),
                    "parallel_trace_over_sequential_2t": ratio(values["parallel_trace_2x1"], values["sequential_2t"]),
                    "parallel_trace_over_sequential_trace_1t": ratio(
                        values["parallel_trace_2x1"], values["sequential_trace_1t"]
                    ),
                    "sequential_trace_over_sequential_1t": ratio(
                        values["sequential_trace_1t"], values["sequential_1t"]
                    ),
                }
            )  # fmt: skip
    torch.set_num_threads(saved_threads)
    for row in rows:
        row.update(
            {"cpu_model": cpu_model(), "process_threads": saved_threads, "load_average_before": list(load_before),
             "load_average_after": list(os.getloadavg()), "thread_probe": thread_probe()}
        )  # fmt: skip
    return save("parallel_latency", rows, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device", default="cpu", help="cpu only: worker threads (CUDA: see docs/deploying.md)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per candidate and round")
    parser.add_argument("--budget-s", type=float, default=200.0, help="no new round once this has passed")
    parser.add_argument("--out", default=None, help="folder for parallel_latency.json")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): no real numbers")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit(
            "parallel_latency.py: error: --device must be 'cpu' (this benchmark measures CPU workers)"
        )
    if args.tiny:
        return run(10, 1, (3, 8, 8), [2], 2, 1, 30.0, args.out)
    return run(16, 2, (3, 32, 32), args.batch_sizes, args.rounds, args.calls, args.budget_s, args.out)


if __name__ == "__main__":
    main()
