"""Latency measurement primitives: what an ensemble of the first ``k`` members costs to run.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), plot accuracy against *measured* latency (their figure 3, in milliseconds), one point per
ensemble size. :func:`measure_ensemble_latency` produces those points: for every ensemble size ``k`` it times
the inference of the first ``k`` members followed by the aggregation of their outputs, i.e. what a deployed
ensemble of size ``k`` costs, and summarises the timed runs as :class:`LatencyStats` (median, 10th and 90th
percentiles, mean and throughput).

Timing follows the usual practice for small, fast kernels: untimed warm-up runs first (allocator, cuDNN
autotuning, lazy initialisation), then ``repeats`` timed runs, each one synchronised so that it measures the
latency of one request rather than the throughput of a queue. On CUDA the runs are timed with CUDA events;
elsewhere with a host clock (``time.perf_counter`` by default, injectable so tests are deterministic).

The members of one run execute in one of :data:`MODES`: one after another (``"sequential"``), as one
vectorised computation of identical members (``"fused"``, :func:`~lightning_ensembles.fused.vmap_forward`),
or concurrently, each on its own worker (``"parallel"``, :class:`~lightning_ensembles.parallel.ParallelEnsemble`:
threads with their own intra-op thread counts on a CPU, CUDA streams or devices on GPUs), the ensemble's
outputs aggregated at the end in every mode.

Measurements can be *shared* within a scope (``scope=trainer`` in the callbacks): a configuration measured
once on a module in that scope is reused by every later request for it, so that two callbacks of one run log
the same numbers instead of two noisy draws of them.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_ensembles._scope import scoped_store
from lightning_ensembles._validation import check_bool, check_choice, check_int, check_shape
from lightning_ensembles.aggregation import aggregate
from lightning_ensembles.fused import check_fusable, vmap_forward
from lightning_ensembles.parallel import ParallelEnsemble, check_layout

if TYPE_CHECKING:
    from lightning_ensembles.module import EnsembleLightningModule

__all__ = [
    "DEFAULT_REPEATS",
    "DEFAULT_WARMUP",
    "MODES",
    "LatencyStats",
    "check_fused_members",
    "check_mode",
    "check_shape",
    "check_sizes",
    "device_and_dtype",
    "latency_metric_name",
    "measure_ensemble_latency",
    "time_runs",
]

MODES: tuple[str, ...] = ("sequential", "fused", "parallel")
"""How the members of an ensemble are run: ``"sequential"`` one after another (the module's
``member_logits``), ``"fused"`` as one ``vmap`` computation (identical members only), ``"parallel"``
concurrently, each member on its own worker (:class:`~lightning_ensembles.parallel.ParallelEnsemble`)."""

DEFAULT_WARMUP = 5
"""Untimed runs before the timed ones, for every configuration, unless told otherwise."""
DEFAULT_REPEATS = 20
"""Timed runs of every configuration, unless told otherwise."""

# scope -> module -> configuration -> (warmup, stats): measurements shared within a scope (e.g. a Trainer).
_SHARED: weakref.WeakKeyDictionary[object, weakref.WeakKeyDictionary[torch.nn.Module, dict[Hashable, Any]]]
_SHARED = weakref.WeakKeyDictionary()


def latency_metric_name(mode: str, size: int, batch_size: int, statistic: str) -> str:
    """The logged key of one statistic, e.g. ``latency/sequential/size_2/batch1_ms_p50``.

    Args:
        mode: how members are run, e.g. ``"sequential"``.
        size: ensemble size ``k``.
        batch_size: samples per run.
        statistic: ``"ms_p50"``, ``"ms_p10"``, ``"ms_p90"`` or ``"samples_per_s"``.

    Returns:
        The key.

    Example:
        >>> latency_metric_name("parallel", 2, 256, "samples_per_s")
        'latency/parallel/size_2/batch256_samples_per_s'
    """
    return f"latency/{mode}/size_{size}/batch{batch_size}_{statistic}"


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolated linearly (numpy's default method)."""
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    if lower == upper or ordered[lower] == ordered[upper]:
        return ordered[lower]
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of the timed runs of one configuration (ensemble size, batch size, mode).

    Attributes:
        p50_ms: median latency of one run, in milliseconds.
        p10_ms: 10th percentile, in milliseconds (linear interpolation).
        p90_ms: 90th percentile, in milliseconds (linear interpolation).
        mean_ms: mean latency, in milliseconds.
        repeats: number of timed runs summarised.
        batch_size: samples per run.
        throughput: samples per second at the median latency, ``batch_size / (p50_ms / 1000)``.

    Example:
        >>> stats = LatencyStats.from_seconds([0.004, 0.001, 0.002, 0.003, 0.005], batch_size=8)
        >>> stats.p50_ms, stats.p10_ms, stats.p90_ms, stats.throughput
        (3.0, 1.4, 4.6, 2666.6666666666665)
    """

    p50_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    batch_size: int
    throughput: float

    @classmethod
    def from_seconds(cls, durations_s: Iterable[float], batch_size: int) -> LatencyStats:
        """Summarise the durations of timed runs.

        Args:
            durations_s: duration of every timed run, in seconds (at least one).
            batch_size: samples per run.

        Returns:
            The summary, in milliseconds and samples per second.

        Raises:
            ValueError: if there are no durations, a duration is negative or not finite, or ``batch_size``
                is not an int >= 1.
        """
        check_int(batch_size, "batch_size", 1)
        ordered = sorted(float(d) for d in durations_s)
        if not ordered or not all(math.isfinite(d) and d >= 0.0 for d in ordered):
            raise ValueError(
                "Expected at least one finite, non-negative duration in seconds, but got "
                f"{ordered!r}; is the injected `clock` monotonic?"
            )
        median_s = _percentile(ordered, 50)
        return cls(
            p50_ms=median_s * 1e3,
            p10_ms=_percentile(ordered, 10) * 1e3,
            p90_ms=_percentile(ordered, 90) * 1e3,
            mean_ms=sum(ordered) / len(ordered) * 1e3,
            repeats=len(ordered),
            batch_size=batch_size,
            throughput=batch_size / median_s if median_s > 0 else math.inf,
        )

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain, JSON-serialisable dict.

        Returns:
            ``{"p50_ms": ..., "p10_ms": ..., "p90_ms": ..., "mean_ms": ..., "repeats": ..., "batch_size": ...,
            "throughput": ...}``.
        """
        return dataclasses.asdict(self)


def check_sizes(sizes: Iterable[int] | None, num_members: int) -> list[int]:
    """Validate ensemble sizes against ``M`` (default: all of ``1..M``), keeping their order, once each.

    Args:
        sizes: ensemble sizes, each an int in ``[1, M]``, or ``None`` for all of them.
        num_members: ``M``.

    Returns:
        The sizes, in their order, without repeats.

    Raises:
        ValueError: if ``sizes`` is not a non-empty sequence of ints in ``[1, M]``.

    Example:
        >>> check_sizes([3, 1, 3], 4), check_sizes(None, 2)
        ([3, 1], [1, 2])
    """
    if sizes is None:
        return list(range(1, num_members + 1))
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ValueError(f"Expected `sizes` to be a sequence of ensemble sizes, but got {sizes!r}.")
    checked: list[int] = []
    for k in sizes:
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"Expected every entry of `sizes` to be an int, but got {k!r}.")
        if not 1 <= k <= num_members:
            raise ValueError(f"Expected every entry of `sizes` to be in [1, M={num_members}], but got {k}.")
        if k not in checked:
            checked.append(k)
    if not checked:
        raise ValueError("Expected `sizes` to hold at least one ensemble size, but got none.")
    return checked


def check_mode(mode: str, flag: str = "mode", allowed: Sequence[str] = MODES) -> str:
    """Validate a latency mode.

    Args:
        mode: the mode.
        flag: the argument or CLI flag named in the error.
        allowed: the modes allowed (default :data:`MODES`).

    Returns:
        ``mode``, unchanged.

    Raises:
        ValueError: if ``mode`` is not one of ``allowed``.

    Example:
        >>> check_mode("vmap")
        Traceback (most recent call last):
        ...
        ValueError: Expected `mode` to be one of ['sequential', 'fused', 'parallel'], but got 'vmap'.
    """
    return str(check_choice(mode, flag, allowed))


def check_fused_members(members: Sequence[torch.nn.Module], flag: str = "mode") -> None:
    """Raise unless the members can be measured in the ``"fused"`` mode (identical members).

    Args:
        members: the members of the largest ensemble measured.
        flag: the argument or CLI flag that asked for ``"fused"``.

    Raises:
        ValueError: naming ``flag``, the first difference between the members and the modes allowed instead.
    """
    try:
        check_fusable(members, flag=flag)
    except ValueError as err:
        difference = str(err).split("; use")[0].removeprefix(f"`{flag}` fuses identical members, but ")
        raise ValueError(
            f"Expected `{flag}` to ask for 'fused' only with identical members (same class, parameter and buffer "
            f"shapes, dtypes and devices), but {difference}; allowed for these members: 'sequential' or "
            "'parallel'."
        ) from None


def device_and_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter or buffer and dtype of the first floating one.

    Args:
        module: the module.

    Returns:
        ``(device, dtype)``; the CPU and the default dtype for a module without tensors.
    """
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floating[0] if floating else torch.get_default_dtype()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_runs(
    run: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Callable[[], float],
) -> list[float]:
    """Durations in seconds of ``repeats`` timed calls of ``run`` after ``warmup`` untimed ones.

    Every timed call is synchronised: on CUDA it is timed with CUDA events on ``device``'s current stream,
    elsewhere with ``clock``.

    Args:
        run: what one run does.
        device: where it runs.
        warmup: untimed calls first.
        repeats: timed calls.
        clock: host clock in seconds, used off CUDA.

    Returns:
        The ``repeats`` durations, in seconds.
    """
    for _ in range(warmup):
        run()
    _synchronize(device)
    durations: list[float] = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize(device)  # one request at a time: the next run starts on an idle GPU
                durations.append(start.elapsed_time(end) / 1e3)
        return durations
    for _ in range(repeats):
        start_s = clock()
        run()
        _synchronize(device)
        durations.append(clock() - start_s)
    return durations


def measure_ensemble_latency(
    module: EnsembleLightningModule,
    input_shape: Sequence[int],
    *,
    sizes: Iterable[int] | None = None,
    batch_size: int = 1,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    mode: str = "sequential",
    clock: Callable[[], float] | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    devices: Sequence[str | torch.device] | None = None,
    trace: bool = False,
    scope: object | None = None,
) -> dict[int, LatencyStats]:
    """Measure the inference latency of the ensembles of the first ``k`` members, for every size ``k``.

    One run of size ``k`` computes the logits of the first ``k`` members on a random input ``x`` of shape
    ``(batch_size, *input_shape)`` on the module's device and in its dtype, then aggregates them to ``(B, C)``
    probabilities (the module's ``aggregation``). The members run

    * ``mode="sequential"``: one after another, as ``module.member_logits(x, range(k))`` (which fuses them
      only if the module's own ``execution`` says so);
    * ``mode="fused"``: as one :func:`~lightning_ensembles.fused.vmap_forward` call (identical members only);
    * ``mode="parallel"``: concurrently, on a :class:`~lightning_ensembles.parallel.ParallelEnsemble` of
      ``min(workers, k)`` workers (``devices[:k]`` with ``devices``), created once per size, before the
      warm-up, and closed afterwards. With ``devices``, members are deep-copied onto the workers' devices
      for the measurement; the module itself is never moved. With ``trace=True`` the workers run traced
      graphs of the members (``ParallelEnsemble(trace=True)``), traced by one untimed call before the
      warm-up.

    Runs happen under :func:`torch.inference_mode` with the module in eval mode; every submodule's training
    flag is restored afterwards. The input is drawn from a private generator, so the global random state is
    left untouched.

    With a ``scope`` (any object that can be weakly referenced; the callbacks pass the Trainer), a
    configuration already measured on this module in this scope, with at least as many warm-up and timed runs,
    is returned as it was measured instead of being measured again; new measurements are stored there. The
    configuration is the mode and its workers (and ``trace``), the size, batch size, input shape, the module's device and
    dtype, the autocast state and ``torch.get_num_threads()``. What is stored lives as long as the scope.

    Args:
        module: the ensemble (``.members``, ``.member_logits``, ``.aggregation``).
        input_shape: one sample's shape without the batch axis, e.g. ``(3, 32, 32)``.
        sizes: ensemble sizes to measure, each in ``[1, M]``; default ``1..M``.
        batch_size: samples per run.
        warmup: untimed runs before the timed ones, for every size.
        repeats: timed runs for every size.
        mode: how members are run; one of :data:`MODES`.
        clock: host clock in seconds used off CUDA (default :func:`time.perf_counter`); on CUDA the runs are
            timed with CUDA events and ``clock`` is not used.
        workers: ``"parallel"`` only: the most workers, in ``[1, M]`` (size ``k`` uses ``min(workers, k)``);
            default as :class:`~lightning_ensembles.parallel.ParallelEnsemble` chooses.
        threads_per_worker: ``"parallel"`` only: intra-op threads of every worker; default the caller's
            threads split between the workers.
        devices: ``"parallel"`` only: the workers' devices (at most ``M``), e.g. ``["cuda:0", "cuda:1"]``.
        trace: ``"parallel"`` only: the workers run ``torch.jit.trace`` graphs of the members, which run
            without the GIL (see :class:`~lightning_ensembles.parallel.ParallelEnsemble`).
        scope: share measurements within this object's lifetime (see above), or ``None`` to always measure.

    Returns:
        ``{k: LatencyStats}`` in the order of ``sizes``.

    Raises:
        ValueError: for an invalid argument, naming it and the value given: among others ``mode="fused"``
            with members that are not identical, ``workers`` above ``M``, ``devices`` that do not exist,
            ``trace=True`` with another mode, or a member that cannot be traced.

    Example:
        >>> from torch import nn
        >>> from lightning_ensembles.module import EnsembleLightningModule
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> stats = measure_ensemble_latency(module, (4,), repeats=3)
        >>> sorted(stats), stats[2].repeats, stats[2].batch_size
        ([1, 2], 3, 1)
        >>> parallel = measure_ensemble_latency(module, (4,), repeats=3, mode="parallel", workers=2)
        >>> sorted(parallel)
        [1, 2]
    """
    shape = check_shape(input_shape)
    num_members = len(module.members)
    checked_sizes = check_sizes(sizes, num_members)
    check_int(batch_size, "batch_size", 1)
    check_int(warmup, "warmup", 0)
    check_int(repeats, "repeats", 1)
    check_mode(mode)
    worker_devices = check_layout(num_members, workers, threads_per_worker, devices)
    check_bool(trace, "trace")
    if trace and mode != "parallel":
        raise ValueError(
            f"Expected `trace=True` only with mode='parallel' (traced graphs run on the parallel workers), but "
            f"got mode={mode!r}."
        )
    if mode == "fused":
        check_fused_members(list(module.members[: max(checked_sizes)]), "mode")
    clock = time.perf_counter if clock is None else clock
    store = scoped_store(_SHARED, scope, module)

    device, dtype = device_and_dtype(module)
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    parallel_config = (
        (workers, threads_per_worker, tuple(str(d) for d in worker_devices or ()), trace)
        if mode == "parallel"
        else ()
    )

    def config(k: int) -> Hashable:
        return (
            mode,
            k,
            batch_size,
            shape,
            str(device),
            dtype,
            autocast,
            torch.get_num_threads(),
            parallel_config,
        )

    results: dict[int, LatencyStats] = {}
    to_measure = []
    for k in checked_sizes:
        cached = store.get(config(k)) if store is not None else None
        if cached is not None and cached[0] >= warmup and cached[1].repeats >= repeats:
            results[k] = cached[1]
        else:
            to_measure.append(k)
    if not to_measure:
        return results

    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *shape), generator=generator).to(device=device, dtype=dtype)
    if getattr(module, "channels_last", False) and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    training = {submodule: submodule.training for submodule in module.modules()}
    try:
        module.eval()
        with torch.inference_mode():
            for k in to_measure:
                results[k] = _measure_size(
                    module,
                    x,
                    k,
                    mode,
                    warmup,
                    repeats,
                    clock,
                    workers,
                    threads_per_worker,
                    worker_devices,
                    trace,
                )
                if store is not None:
                    store[config(k)] = (warmup, results[k])
    finally:
        for submodule, was_training in training.items():
            submodule.training = was_training
    return {k: results[k] for k in checked_sizes}


def _measure_size(
    module: EnsembleLightningModule,
    x: Tensor,
    k: int,
    mode: str,
    warmup: int,
    repeats: int,
    clock: Callable[[], float],
    workers: int | None,
    threads_per_worker: int | None,
    devices: list[torch.device] | None,
    trace: bool = False,
) -> LatencyStats:
    """Time the runs of one ensemble size in one mode."""
    device = x.device
    members = list(module.members[:k])
    if mode == "sequential":
        indices = range(k)

        def run() -> Tensor:
            return aggregate(module.member_logits(x, indices), module.aggregation)

    elif mode == "fused":

        def run() -> Tensor:
            return aggregate(vmap_forward(members, x), module.aggregation)

    else:
        parallel = ParallelEnsemble(
            members,
            workers=None if workers is None or devices is not None else min(workers, k),
            threads_per_worker=threads_per_worker,
            devices=None if devices is None else devices[:k],
            trace=trace,
        )
        with parallel:
            if trace:
                parallel(x)  # traces the graphs for this input, untimed

            def run() -> Tensor:
                return aggregate(parallel(x), module.aggregation)

            durations = time_runs(run, parallel.output_device, warmup, repeats, clock)
            return LatencyStats.from_seconds(durations, x.shape[0])
    return LatencyStats.from_seconds(time_runs(run, device, warmup, repeats, clock), x.shape[0])
