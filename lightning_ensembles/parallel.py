"""Member-parallel inference in one process: every member on its own worker, run at the same time.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), point out that the members of an ensemble are independent, so unlike one large network
they can run in parallel: the latency of an ensemble of ``k`` members on ``k`` workers approaches the
latency of one member. :class:`ParallelEnsemble` does that inside one process. Members are assigned to
workers round-robin (member ``i`` to worker ``i % n``); a call hands every worker the shared input, each
worker runs its members one after another, and the call waits for all of them and stacks the logits in
member order, ``(M, B, C)``, exactly what the members give when run one after another.

A worker is a persistent thread (created once, reused by every call) bound to a device:

* on a CPU, each worker runs with its own intra-op thread count (``threads_per_worker``); torch releases
  the GIL inside its kernels, so the workers compute at the same time. In this build the intra-op thread
  count is per thread once a thread is initialised (OpenMP's ``nthreads`` and MKL's local count are thread
  state), but torch initialises each thread lazily, on its first parallel operation, from a process-wide
  value that every ``torch.set_num_threads`` call overwrites, *and that lazy initialisation undoes a
  ``set_num_threads`` made before it*. A worker therefore first lets torch initialise it
  (``torch.get_num_threads()``), then sets its own count; the caller's process-wide value is restored once
  the workers are up. :attr:`ParallelEnsemble.worker_threads` reports what each worker really got.
* on CUDA, each worker has its own CUDA stream on its device: several workers on one GPU are concurrent
  streams, workers on ``cuda:0``, ``cuda:1``, ... are devices. A worker's stream waits for the caller's
  stream before it reads the input, the input is copied to the worker's device, the logits are copied back
  to the first worker's device, and the caller's stream waits for every worker's stream, so the result can be
  used on the caller's stream without a host synchronisation.

With ``devices``, members that are not on their worker's device are *deep-copied* there: the caller's
members are never moved. Workers copy the caller's autograd and autocast state (``torch.inference_mode``,
``torch.no_grad``, ``torch.autocast``) for every call, since that state is thread-local in torch.

An eager member's forward is Python (module calls, operator dispatch) between its kernels, and that Python
holds the GIL, so eager workers overlap only inside the kernels; with small inputs (batch 1) the kernels are
short and the workers mostly take turns. With ``trace=True`` every worker runs a ``torch.jit.trace`` graph of
(a deep copy of) each member instead: the TorchScript executor runs the whole graph in C++ and releases the GIL
while it runs, so the workers' members really run at the same time. A graph is traced per input signature
(shape, dtype, device, inference mode, autocast), in the calling thread, on the first call that has it.

torch deprecates ``torch.jit.trace`` (a ``FutureWarning`` since 2.14, shown, not silenced). The supported forms
were probed on torch 2.14.1 (``benchmarks/_gil_release_probe.py``): a ``torch.export`` program's
``.module()`` and ``torch.compile`` (Inductor on CPU) need the GIL between operations, as eager does, and an
AOTInductor package holds the GIL for its whole call, so none of them lets members overlap. ``trace=True``
stays on ``torch.jit.trace`` until one does.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ensembles._validation import check_bool, check_int

__all__ = ["ParallelEnsemble", "check_devices", "check_layout"]


def _module_device(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def check_devices(devices: Sequence[str | torch.device], flag: str = "devices") -> list[torch.device]:
    """Validate a list of worker devices: each ``"cpu"`` or a CUDA device that exists.

    Args:
        devices: the devices, e.g. ``["cuda:0", "cuda:1"]``; a device may repeat (several workers on it).
        flag: the argument or CLI flag named in the error.

    Returns:
        The devices as :class:`torch.device`, a CUDA device without index resolved to the current one.

    Raises:
        ValueError: if ``devices`` is empty, or an entry is not a device, not the CPU or CUDA, or a CUDA device
            that does not exist here.

    Example:
        >>> check_devices(["cpu", "cpu"])
        [device(type='cpu'), device(type='cpu')]
        >>> check_devices(["cuda:99"])
        Traceback (most recent call last):
        ...
        ValueError: Expected every entry of `devices` to be 'cpu' or a CUDA device that exists ...
    """
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(
            f"Expected `{flag}` to be a non-empty list of devices (e.g. ['cuda:0', 'cuda:1']), but got "
            f"{devices!r}."
        )
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = "'cpu'" + (f" or cuda:0 .. cuda:{available - 1}" if available else " (no CUDA device here)")
    checked = []
    for entry in devices:
        try:
            device = torch.device(entry)
        except (RuntimeError, TypeError):
            device = None
        if device is not None and device.type == "cuda" and device.index is None and available:
            device = torch.device("cuda", torch.cuda.current_device())
        ok = device is not None and (
            device.type == "cpu"
            or (device.type == "cuda" and device.index is not None and device.index < available)
        )
        if not ok:
            raise ValueError(
                f"Expected every entry of `{flag}` to be 'cpu' or a CUDA device that exists ({allowed}), but "
                f"got {entry!r}."
            )
        assert device is not None
        checked.append(device)
    return checked


def check_layout(
    num_members: int,
    workers: int | None,
    threads_per_worker: int | None,
    devices: Sequence[str | torch.device] | None,
) -> list[torch.device] | None:
    """Validate how ``num_members`` members are spread over workers: at most one worker per member.

    Args:
        num_members: the number of members ``M``.
        workers: the number of workers, or ``None`` for the default.
        threads_per_worker: intra-op threads of every CPU worker, or ``None`` for the default.
        devices: one device per worker (see :func:`check_devices`), or ``None``.

    Returns:
        The checked devices, or ``None`` without ``devices``.

    Raises:
        ValueError: for more workers or devices than members, a worker count that is not ``len(devices)``, or
            any other invalid value, naming the argument.

    Example:
        >>> check_layout(3, None, None, ["cpu", "cpu"])
        [device(type='cpu'), device(type='cpu')]
        >>> check_layout(3, 4, None, None)
        Traceback (most recent call last):
        ...
        ValueError: Expected `workers` to be None or an int in [1, M=3] (at most one worker per member), but got 4.
    """
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= num_members
    ):
        raise ValueError(
            f"Expected `workers` to be None or an int in [1, M={num_members}] (at most one worker per member), "
            f"but got {workers!r}."
        )
    if threads_per_worker is not None:
        check_int(threads_per_worker, "threads_per_worker", 1)
    if devices is None:
        return None
    checked = check_devices(devices)
    if len(checked) > num_members:
        raise ValueError(
            f"Expected `devices` to hold at most M={num_members} entries (at most one worker per member), but "
            f"got {len(checked)}: {list(devices)!r}."
        )
    if workers is not None and workers != len(checked):
        raise ValueError(
            f"Expected `workers` to be None or len(devices)={len(checked)} (one worker per entry of `devices`), "
            f"but got {workers!r}."
        )
    return checked


@dataclass(frozen=True)
class _CallerState:
    """The thread-local autograd and autocast state of the caller, replayed in every worker, and the caller's
    current CUDA streams where the input is produced and where the output is used."""

    inference_mode: bool
    grad_enabled: bool
    autocast: dict[str, torch.dtype]  # device type -> autocast dtype, for the device types where it is on
    input_stream: torch.cuda.Stream | None  # the caller's current stream on the input's device, on CUDA
    stream: torch.cuda.Stream | None  # the caller's current stream on the output device, on CUDA

    @classmethod
    def capture(cls, device_types: set[str], x: Tensor, output_device: torch.device) -> _CallerState:
        autocast = {
            t: torch.get_autocast_dtype(t) for t in sorted(device_types) if torch.is_autocast_enabled(t)
        }
        input_stream = torch.cuda.current_stream(x.device) if x.is_cuda else None
        stream = torch.cuda.current_stream(output_device) if output_device.type == "cuda" else None
        return cls(torch.is_inference_mode_enabled(), torch.is_grad_enabled(), autocast, input_stream, stream)


_Signature = tuple[tuple[int, ...], torch.dtype, torch.device, bool, tuple[tuple[str, torch.dtype], ...]]
"""What a traced graph is specialised to: input shape, dtype and device, inference mode, autocast state."""


def _trace(member: nn.Module, index: int, x: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` one member on ``x``, refusing a trace that may not reproduce the member.

    A ``TracerWarning`` (a tensor turned into a Python value, which would freeze data-dependent control flow
    into the graph, or a traced output that differs from the member's on a second run) is an error here. torch
    2.14 deprecates ``torch.jit.trace`` with a ``FutureWarning``, which is left for the user to see: no
    supported form runs a graph without the GIL (see the module docstring). The warning filters are
    process-wide while the trace runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            return torch.jit.trace(member, x)
    except Exception as err:
        raise ValueError(
            f"Expected every member to be traceable with `trace=True` (torch.jit.trace, tensors in, one tensor "
            f"out, no data-dependent control flow), but member {index} ({type(member).__name__}) failed on an "
            f"input of shape {tuple(x.shape)}: {err}"
        ) from err


_Task = tuple[Tensor, torch.device, _CallerState, _Signature | None, Future[Tensor]]


class _Worker:
    """One persistent thread, its device, its stream (CUDA) and its members."""

    def __init__(self, index: int, device: torch.device, members: list[nn.Module], threads: int) -> None:
        self.index = index
        self.device = device
        self.members = members
        self.threads = threads
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=device) if device.type == "cuda" else None
        )
        self.graphs: dict[_Signature, list[nn.Module]] = {}  # traced members per input signature (trace=True)
        self.ready = threading.Event()
        self.thread_count = 0  # what torch.get_num_threads() says inside the worker, once started
        self.tasks: queue.SimpleQueue[_Task | None]
        self.tasks = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._loop, name=f"ParallelEnsemble-worker-{index}", daemon=True
        )
        self.thread.start()

    def _loop(self) -> None:
        torch.get_num_threads()  # torch initialises this thread now, from the process-wide value ...
        torch.set_num_threads(self.threads)  # ... so this count is not undone by that lazy initialisation
        self.thread_count = torch.get_num_threads()
        self.ready.set()
        while True:
            task = self.tasks.get()
            if task is None:
                return
            x, output_device, state, signature, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                members = self.members if signature is None else self.graphs[signature]
                future.set_result(self._run(members, x, output_device, state))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
                future.set_exception(err)

    def _run(
        self, members: list[nn.Module], x: Tensor, output_device: torch.device, state: _CallerState
    ) -> Tensor:
        with contextlib.ExitStack() as stack:
            if state.inference_mode:
                stack.enter_context(torch.inference_mode())
            else:
                stack.enter_context(torch.set_grad_enabled(state.grad_enabled))
            if self.device.type in state.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=state.autocast[self.device.type]))
            if self.stream is None:
                inputs = x.to(self.device)
                return torch.stack([member(inputs) for member in members]).to(output_device)
            caller_stream = state.stream
            stack.enter_context(torch.cuda.device(self.device))
            stack.enter_context(torch.cuda.stream(self.stream))
            if state.input_stream is not None:
                self.stream.wait_stream(state.input_stream)  # the input is ready on the caller's stream
            inputs = x.to(self.device, non_blocking=True)
            if inputs.data_ptr() == x.data_ptr() and x.is_cuda:
                x.record_stream(self.stream)  # the caller's tensor is read on this stream
            logits = torch.stack([member(inputs) for member in members])
            if caller_stream is None:
                return logits.to(output_device)
            with torch.cuda.stream(caller_stream):
                out = logits.to(output_device, non_blocking=True)
            caller_stream.wait_stream(self.stream)  # the caller may use `out` on its stream at once
            if out.data_ptr() == logits.data_ptr():
                out.record_stream(caller_stream)  # allocated on this stream, used on the caller's
            return out

    def submit(
        self, x: Tensor, output_device: torch.device, state: _CallerState, signature: _Signature | None
    ) -> Future[Tensor]:
        future: Future[Tensor] = Future()
        self.tasks.put((x, output_device, state, signature, future))
        return future

    def stop(self) -> None:
        self.tasks.put(None)
        self.thread.join()


class ParallelEnsemble:
    """Run an ensemble's members concurrently, one worker per group of members; a context manager.

    Args:
        members: the ``M`` members (in their order, which the output keeps).
        workers: the number of workers, in ``[1, M]``; default ``min(M, torch.get_num_threads())`` on a CPU
            and ``M`` (one stream each) on CUDA; with ``devices``, ``len(devices)`` (give ``None`` or that).
        threads_per_worker: intra-op threads of every worker (CPU work; a CUDA worker launches kernels);
            default ``max(1, torch.get_num_threads() // workers)``, i.e. the caller's thread budget split.
        devices: the device of every worker, e.g. ``["cuda:0", "cuda:1"]`` (member ``i`` runs on
            ``devices[i % len(devices)]``; a device may repeat, for several streams on it), at most ``M``
            entries. Members not on their worker's device are deep-copied there for this object; the
            caller's members stay where they are. Default: each worker on the device of its first member.
        trace: run every member as a ``torch.jit.trace`` graph (executed in C++, without the GIL) instead of
            eagerly, so the workers overlap even where the members' Python would make them take turns (small
            batches on a CPU). The members are deep-copied at construction: the graphs run a snapshot of the
            weights, and the caller's modules are never traced or changed. A graph is traced, in the calling
            thread, on the first call with a new input signature (shape, dtype, device, inference mode,
            autocast); that call is slow, and is where a member that cannot be traced raises. Inference only:
            calls must be under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Several threads may call the same object at once: every worker serves its calls in the order they
    arrive, and every call waits for its own results.

    Raises:
        ValueError: if there are no members, ``workers`` is not in ``[1, M]`` or disagrees with
            ``devices``, ``threads_per_worker < 1``, ``trace`` is not a bool, or ``devices`` names a device
            that does not exist or holds more entries than there are members.

    Example:
        >>> members = [nn.Linear(4, 3) for _ in range(3)]
        >>> x = torch.randn(5, 4)
        >>> with ParallelEnsemble(members, workers=2, threads_per_worker=1) as parallel, torch.no_grad():
        ...     logits = parallel(x)
        >>> logits.shape, parallel.assignment
        (torch.Size([3, 5, 3]), ((0, 2), (1,)))
        >>> torch.testing.assert_close(logits, torch.stack([m(x) for m in members]).detach())
        >>> with ParallelEnsemble(members, workers=2, trace=True) as traced, torch.no_grad():
        ...     torch.testing.assert_close(traced(x), logits)  # graphs traced on this first call
        >>> ParallelEnsemble(members, workers=4)
        Traceback (most recent call last):
        ...
        ValueError: Expected `workers` to be None or an int in [1, M=3] (at most one worker per member), but got 4.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        workers: int | None = None,
        threads_per_worker: int | None = None,
        devices: Sequence[str | torch.device] | None = None,
        trace: bool = False,
    ) -> None:
        self._workers: list[_Worker] = []
        self._closed = False
        members = list(members)
        if not members:
            raise ValueError("Expected `members` to hold at least one member, but got none.")
        self.trace = check_bool(trace, "trace")
        """Whether the workers run traced graphs of the members (see the class docstring)."""
        self._trace_lock = threading.Lock()  # one caller traces a new input signature at a time
        num_members = len(members)
        worker_devices = check_layout(num_members, workers, threads_per_worker, devices)
        if worker_devices is not None:
            workers = len(worker_devices)
        elif workers is None:
            on_cuda = _module_device(members[0]).type == "cuda"
            workers = num_members if on_cuda else min(num_members, torch.get_num_threads())
        if threads_per_worker is None:
            threads_per_worker = max(1, torch.get_num_threads() // workers)
        self.threads_per_worker = check_int(threads_per_worker, "threads_per_worker", 1)
        self.num_members = num_members

        groups: list[list[int]] = [list(range(w, num_members, workers)) for w in range(workers)]
        self.assignment: tuple[tuple[int, ...], ...] = tuple(tuple(g) for g in groups)
        """Member indices run by every worker: member ``i`` on worker ``i % workers``."""
        saved_threads = torch.get_num_threads()
        try:
            for w, group in enumerate(groups):
                device = worker_devices[w] if worker_devices else _module_device(members[group[0]])
                placed = [
                    members[i]
                    if _module_device(members[i]) == device and not trace
                    else copy.deepcopy(members[i]).to(device)
                    for i in group
                ]
                self._workers.append(_Worker(w, device, placed, self.threads_per_worker))
            for worker in self._workers:
                worker.ready.wait()
        except BaseException:
            self.close()
            raise
        finally:
            torch.set_num_threads(saved_threads)  # the workers overwrote the process-wide default
        self.output_device = self._workers[0].device
        """Where the stacked logits are returned: the first worker's device."""

    @property
    def workers(self) -> int:
        """The number of workers."""
        return len(self._workers)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every worker's device."""
        return tuple(worker.device for worker in self._workers)

    @property
    def worker_threads(self) -> tuple[int, ...]:
        """``torch.get_num_threads()`` as measured inside every worker once it started."""
        return tuple(worker.thread_count for worker in self._workers)

    def __call__(self, x: Tensor) -> Tensor:
        """The logits of every member on ``x``, computed concurrently.

        Args:
            x: the shared input batch, shape ``(B, ...)``, on any device (copied to each worker's device).

        Returns:
            Logits ``(M, B, C)`` in member order, on :attr:`output_device`.

        Raises:
            RuntimeError: if the object was closed, or with ``trace=True`` if autograd is on.
            ValueError: with ``trace=True``, if a member cannot be traced on ``x`` (naming it and its index).
            Exception: whatever a member raised, re-raised in the caller.
        """
        if self._closed:
            raise RuntimeError("This ParallelEnsemble was closed; create a new one.")
        device_types = {worker.device.type for worker in self._workers}
        state = _CallerState.capture(device_types, x, self.output_device)
        signature = self._traced(x, state) if self.trace else None
        futures = [worker.submit(x, self.output_device, state, signature) for worker in self._workers]
        per_worker = [future.result() for future in futures]
        if len(per_worker) == 1:
            return per_worker[0]
        rows: list[Tensor] = [per_worker[0][0]] * self.num_members
        for group, logits in zip(self.assignment, per_worker):
            for j, i in enumerate(group):
                rows[i] = logits[j]
        return torch.stack(rows)

    def _traced(self, x: Tensor, state: _CallerState) -> _Signature:
        """The signature of ``x`` under ``state``, with every worker's members traced for it (once)."""
        if state.grad_enabled:
            raise RuntimeError(
                "ParallelEnsemble(trace=True) runs traced copies of the members, for inference only: call it "
                "under torch.no_grad() or torch.inference_mode()."
            )
        autocast = tuple(sorted(state.autocast.items()))
        signature: _Signature = (tuple(x.shape), x.dtype, x.device, state.inference_mode, autocast)
        with self._trace_lock:
            for worker, group in zip(self._workers, self.assignment):
                if signature in worker.graphs:
                    continue
                inputs = x.to(worker.device)  # traced under the caller's own autograd and autocast state
                graphs: list[nn.Module] = [_trace(m, i, inputs) for m, i in zip(worker.members, group)]
                worker.graphs[signature] = graphs  # read by the worker after the submit below
        return signature

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if not self._closed:
            for worker in self._workers:
                worker.stop()
        self._closed = True

    def __enter__(self) -> ParallelEnsemble:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        devices = ", ".join(str(d) for d in self.devices)
        return (
            f"ParallelEnsemble(members={self.num_members}, workers={self.workers}, "
            f"threads_per_worker={self.threads_per_worker}, devices=[{devices}], trace={self.trace})"
        )

    def __getstate__(self) -> Any:
        raise TypeError("A ParallelEnsemble holds threads and cannot be pickled or copied.")
