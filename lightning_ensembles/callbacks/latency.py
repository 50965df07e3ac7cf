"""``LatencyMonitor``: measured inference latency of every ensemble size, logged once per run.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), compare ensembles with single models on a measured-latency axis (their figure 3, in
milliseconds), one point per ensemble size. This callback measures those points with
:func:`~lightning_ensembles.latency.measure_ensemble_latency` once training has finished (or when testing
starts), outside every timed loop, and logs them with their unit in the key::

    latency/{mode}/size_{k}/batch{b}_ms_p50     (also _ms_p10, _ms_p90)
    latency/{mode}/size_{k}/batch{b}_samples_per_s

The results, with the hardware and versions they were measured on, are kept in :attr:`LatencyMonitor.results`
and in the callback's ``state_dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ensembles._validation import check_int
from lightning_ensembles.latency import (
    LatencyStats,
    _check_mode,
    _check_shape,
    _check_sizes,
    _device_and_dtype,
    measure_ensemble_latency,
)
from lightning_ensembles.module import EnsembleLightningModule

__all__ = ["LatencyMonitor"]

When = Literal["fit_end", "test_start"]
_WHEN: tuple[str, ...] = get_args(When)
_STAGE = {"fit_end": "fit", "test_start": "test"}


def _int_entries(values: Any, flag: str, minimum: int) -> tuple[int, ...]:
    """Validate a non-empty sequence of ints >= ``minimum``; keep the order, drop repeats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"Expected `{flag}` to be a non-empty sequence of ints >= {minimum}, but got {values!r}."
        )
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(
                f"Expected every entry of `{flag}` to be an int >= {minimum}, but got {value!r}."
            )
    return tuple(dict.fromkeys(values))


def metric_name(mode: str, size: int, batch_size: int, statistic: str) -> str:
    """The logged key of one statistic, e.g. ``latency/sequential/size_2/batch1_ms_p50``.

    Args:
        mode: how members are run, e.g. ``"sequential"``.
        size: ensemble size ``k``.
        batch_size: samples per run.
        statistic: ``"ms_p50"``, ``"ms_p10"``, ``"ms_p90"`` or ``"samples_per_s"``.

    Returns:
        The key.

    Example:
        >>> metric_name("sequential", 2, 256, "samples_per_s")
        'latency/sequential/size_2/batch256_samples_per_s'
    """
    return f"latency/{mode}/size_{size}/batch{batch_size}_{statistic}"


def _metrics(mode: str, size: int, stats: LatencyStats) -> dict[str, float]:
    b = stats.batch_size
    return {
        metric_name(mode, size, b, "ms_p50"): stats.p50_ms,
        metric_name(mode, size, b, "ms_p10"): stats.p10_ms,
        metric_name(mode, size, b, "ms_p90"): stats.p90_ms,
        metric_name(mode, size, b, "samples_per_s"): stats.throughput,
    }


class LatencyMonitor(Callback):
    """Measure and log the inference latency of every ensemble size, once, outside the training loop.

    At the chosen moment (``on_fit_end`` or ``on_test_start``; never during the sanity check, and only on
    global rank zero) every ``mode`` x ``batch_size`` x ensemble size ``k`` is measured with
    :func:`~lightning_ensembles.latency.measure_ensemble_latency` on the Trainer's device
    (``trainer.strategy.root_device``) under the Trainer's precision (the context its test steps run in).
    Lightning moves the model to the CPU before ``on_fit_end``; the monitor moves it back to the Trainer's
    device for the measurement and returns it where it found it.

    Each configuration is logged through every logger in ``trainer.loggers`` at ``trainer.global_step`` as
    ``latency/{mode}/size_{k}/batch{b}_ms_p50``, ``..._ms_p10``, ``..._ms_p90`` and
    ``latency/{mode}/size_{k}/batch{b}_samples_per_s``.

    Args:
        when: ``"fit_end"`` (after ``trainer.fit``) or ``"test_start"`` (at every ``trainer.test``).
        batch_sizes: batch sizes to measure (1 is the latency of one request).
        warmup: untimed runs before the timed ones, for every configuration.
        repeats: timed runs for every configuration.
        sizes: ensemble sizes, each in ``[1, M]`` (checked when the run starts); default all of ``1..M``.
        modes: how members are run; each one of :data:`~lightning_ensembles.latency.MODES`.
        input_shape: one sample's shape without the batch axis; default ``trainer.datamodule.input_shape``.

    Raises:
        ValueError: for an invalid argument, naming it and the value given; when the run starts, for an
            ensemble size above ``M`` or no ``input_shape`` to be found.
        TypeError: when the run starts, if the model is not an ``EnsembleLightningModule``.

    Example:
        >>> LatencyMonitor(when="fit_start")
        Traceback (most recent call last):
        ...
        ValueError: Expected `when` to be one of ['fit_end', 'test_start'], but got 'fit_start'.
    """

    def __init__(
        self,
        when: When = "fit_end",
        batch_sizes: Sequence[int] = (1, 256),
        warmup: int = 5,
        repeats: int = 20,
        sizes: Sequence[int] | None = None,
        modes: Sequence[str] = ("sequential",),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if when not in _WHEN:
            raise ValueError(f"Expected `when` to be one of {list(_WHEN)}, but got {when!r}.")
        self.when = when
        self.batch_sizes = _int_entries(batch_sizes, "batch_sizes", 1)
        self.warmup = check_int(warmup, "warmup", 0)
        self.repeats = check_int(repeats, "repeats", 1)
        self.sizes = None if sizes is None else _int_entries(sizes, "sizes", 1)
        if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
            raise ValueError(f"Expected `modes` to be a non-empty sequence of mode names, but got {modes!r}.")
        self.modes = tuple(dict.fromkeys(_check_mode(mode, "modes") for mode in modes))
        self.input_shape = None if input_shape is None else _check_shape(input_shape)
        self.results: dict[str, Any] = {}
        # Host clock used off CUDA; None means `time.perf_counter`. Tests replace it with a fake clock.
        self._clock: Callable[[], float] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            when=self.when, batch_sizes=self.batch_sizes, sizes=self.sizes, modes=self.modes
        )

    # ------------------------------------------------------------------ resolution and checks

    @staticmethod
    def _ensemble(pl_module: LightningModule) -> EnsembleLightningModule:
        if not isinstance(pl_module, EnsembleLightningModule):
            raise TypeError(
                "Expected the model to be an `EnsembleLightningModule` (LatencyMonitor measures ensemble "
                f"sizes), but got {type(pl_module).__name__}."
            )
        return pl_module

    def _resolve_input_shape(self, trainer: Trainer) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        # `Trainer.datamodule` is set from outside `Trainer.__init__` (by its data connector): mypy cannot see it.
        shape = getattr(getattr(trainer, "datamodule", None), "input_shape", None)
        if shape is None:
            raise ValueError(
                "Expected `input_shape` to be given to LatencyMonitor or the datamodule to have an "
                "`input_shape` attribute, but got neither: pass `LatencyMonitor(input_shape=(3, 32, 32))` "
                "(one sample's shape without the batch axis)."
            )
        return _check_shape(shape, "trainer.datamodule.input_shape")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, before any training, what can only be checked with the model and data at hand."""
        if stage != _STAGE[self.when]:
            return
        module = self._ensemble(pl_module)
        _check_sizes(self.sizes, len(module.members))
        self._resolve_input_shape(trainer)

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_end":
            self._measure(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "test_start":
            self._measure(trainer, pl_module)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        module = self._ensemble(pl_module)
        input_shape = self._resolve_input_shape(trainer)
        found_on, _ = _device_and_dtype(module)
        device = trainer.strategy.root_device
        metrics: dict[str, float] = {}
        measurements: list[dict[str, Any]] = []
        try:
            module.to(device)
            with trainer.precision_plugin.test_step_context():
                for mode in self.modes:
                    for batch_size in self.batch_sizes:
                        stats = measure_ensemble_latency(
                            module,
                            input_shape,
                            sizes=self.sizes,
                            batch_size=batch_size,
                            warmup=self.warmup,
                            repeats=self.repeats,
                            mode=mode,
                            clock=self._clock,
                        )
                        for k, s in stats.items():
                            metrics.update(_metrics(mode, k, s))
                            measurements.append({"mode": mode, "size": k, **s.as_dict()})
        finally:
            module.to(found_on)
        self.results = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "torch_version": str(torch.__version__),
            "precision": str(trainer.precision),
            "cpu_threads": torch.get_num_threads(),
            "when": self.when,
            "global_step": trainer.global_step,
            "num_members": len(module.members),
            "aggregation": module.aggregation,
            "input_shape": list(input_shape),
            "metrics": metrics,
            "measurements": measurements,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"LatencyMonitor: measured {len(measurements)} configurations on {self.results['device']} "
            f"(modes {list(self.modes)}, batch sizes {list(self.batch_sizes)})."
        )

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": copy.deepcopy(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = copy.deepcopy(state_dict.get("results", {}))
