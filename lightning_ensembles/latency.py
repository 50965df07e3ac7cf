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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_ensembles._validation import check_int
from lightning_ensembles.aggregation import aggregate

if TYPE_CHECKING:
    from lightning_ensembles.module import EnsembleLightningModule

__all__ = ["MODES", "LatencyStats", "measure_ensemble_latency"]

MODES: tuple[str, ...] = ("sequential",)
"""How the members of an ensemble are run: ``"sequential"`` runs them one after another on one device."""


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


def _check_sizes(sizes: Iterable[int] | None, num_members: int) -> list[int]:
    """Validate ensemble sizes against ``M`` (default: all of ``1..M``), keeping their order, once each."""
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


def _check_shape(input_shape: Sequence[int], flag: str = "input_shape") -> tuple[int, ...]:
    """Validate one sample's shape (without the batch axis)."""
    shape = (
        tuple(input_shape) if isinstance(input_shape, Sequence) and not isinstance(input_shape, str) else ()
    )
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(
            f"Expected `{flag}` to be a non-empty sequence of ints >= 1 (one sample's shape without the batch "
            f"axis, e.g. (3, 32, 32)), but got {input_shape!r}."
        )
    return shape


def _check_mode(mode: str, flag: str = "mode") -> str:
    if mode not in MODES:
        raise ValueError(f"Expected `{flag}` to be one of {list(MODES)}, but got {mode!r}.")
    return mode


def _device_and_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter or buffer and dtype of the first floating one."""
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floating[0] if floating else torch.get_default_dtype()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time_runs(
    run: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Callable[[], float],
) -> list[float]:
    """Durations in seconds of ``repeats`` timed calls of ``run`` after ``warmup`` untimed ones."""
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
    warmup: int = 5,
    repeats: int = 20,
    mode: str = "sequential",
    clock: Callable[[], float] | None = None,
) -> dict[int, LatencyStats]:
    """Measure the inference latency of the ensembles of the first ``k`` members, for every size ``k``.

    One run of size ``k`` is ``aggregate(module.member_logits(x, range(k)), module.aggregation)`` on a random
    input ``x`` of shape ``(batch_size, *input_shape)`` on the module's device and in its dtype: the members
    one after another (``mode="sequential"``), then the aggregation to ``(B, C)`` probabilities. Runs happen
    under :func:`torch.inference_mode` with the module in eval mode; every submodule's training flag is
    restored afterwards. The input is drawn from a private generator, so the global random state is left
    untouched.

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

    Returns:
        ``{k: LatencyStats}`` in the order of ``sizes``.

    Raises:
        ValueError: for an invalid argument, naming it and the value given.

    Example:
        >>> from torch import nn
        >>> from lightning_ensembles.module import EnsembleLightningModule
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> stats = measure_ensemble_latency(module, (4,), repeats=3)
        >>> sorted(stats), stats[2].repeats, stats[2].batch_size
        ([1, 2], 3, 1)
    """
    shape = _check_shape(input_shape)
    checked_sizes = _check_sizes(sizes, len(module.members))
    check_int(batch_size, "batch_size", 1)
    check_int(warmup, "warmup", 0)
    check_int(repeats, "repeats", 1)
    _check_mode(mode)
    clock = time.perf_counter if clock is None else clock

    device, dtype = _device_and_dtype(module)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *shape), generator=generator).to(device=device, dtype=dtype)
    training = {submodule: submodule.training for submodule in module.modules()}
    results: dict[int, LatencyStats] = {}
    try:
        module.eval()
        with torch.inference_mode():
            for k in checked_sizes:
                indices = range(k)

                def run(indices: Sequence[int] = indices) -> Tensor:
                    return aggregate(module.member_logits(x, indices), module.aggregation)

                durations = _time_runs(run, device, warmup, repeats, clock)
                results[k] = LatencyStats.from_seconds(durations, batch_size)
    finally:
        for submodule, was_training in training.items():
            submodule.training = was_training
    return results
