"""``LatencyMonitor``: measured inference latency of every ensemble size, logged once per run.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), compare ensembles with single models on a measured-latency axis (their figure 3, in
milliseconds), one point per ensemble size. This callback measures those points with
:func:`~lightning_ensembles.latency.measure_ensemble_latency` once training has finished (or when testing
starts), outside every timed loop, for every mode the members can run in (one after another, fused, in
parallel; :data:`~lightning_ensembles.latency.MODES`), and logs them with their unit in the key::

    latency/{mode}/size_{k}/batch{b}_ms_p50     (also _ms_p10, _ms_p90)
    latency/{mode}/size_{k}/batch{b}_samples_per_s

Its ``cascade`` mode times a cascade (Wang, Kondratyuk et al., *Wisdom of Committees*, ICLR 2022;
:class:`~lightning_ensembles.cascade_inference.CascadeEnsemble`) on real evaluation batches next to the full
ensemble on the same batches::

    latency/cascade/batch{b}_ms_p50              (also _ms_p10, _ms_p90, and ms_per_sample)
    latency/full_on_batches/batch{b}_ms_p50      (also _ms_p10, _ms_p90, and ms_per_sample)
    latency/cascade/time_ratio                   cascade time / full-ensemble time, summed over the batches
    latency/cascade/mean_exit_stage              members run per sample, on average
    latency/cascade/expected_cost_ratio          multiply-adds run per sample / those of the full ensemble

The results, with the hardware and versions they were measured on, are kept in :attr:`LatencyMonitor.results`
and in the callback's ``state_dict``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ensembles._validation import check_choice, check_int, check_int_sequence, check_shape, init_arg
from lightning_ensembles.aggregation import aggregate
from lightning_ensembles.callbacks._shared import measure_latency, measuring_on_trainer
from lightning_ensembles.cascade import NEVER_EXIT, Thresholds
from lightning_ensembles.latency import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    MODES,
    LatencyStats,
    check_fused_members,
    check_mode,
    check_sizes,
    device_and_dtype,
    time_runs,
)
from lightning_ensembles.module import EnsembleLightningModule, as_ensemble
from lightning_ensembles.parallel import check_devices

__all__ = ["CALLBACK_MODES", "LatencyMonitor"]

When = Literal["fit_end", "test_start"]
_WHEN: tuple[str, ...] = get_args(When)
_STAGE = {"fit_end": "fit", "test_start": "test"}
CALLBACK_MODES: tuple[str, ...] = (*MODES, "cascade")
"""The modes :class:`LatencyMonitor` measures: those of :data:`~lightning_ensembles.latency.MODES` on random
inputs, and ``"cascade"`` on real evaluation batches."""


def _int_entries(values: Any, flag: str, minimum: int) -> tuple[int, ...]:
    """Validate a non-empty sequence of ints >= ``minimum``; keep the order, drop repeats."""
    return tuple(dict.fromkeys(check_int_sequence(values, flag, minimum)))


def _check_cascade_thresholds(value: Any) -> float | tuple[float, ...] | None:
    """Each threshold in ``[0, 1]`` or ``NEVER_EXIT``; their number is checked against ``M`` at setup."""
    allowed = (
        "None, a float in [0, 1] or NEVER_EXIT (math.inf) for every stage, or a sequence of M - 1 such floats"
    )

    def ok(v: Any) -> bool:
        return (
            isinstance(v, (int, float)) and not isinstance(v, bool) and (0.0 <= v <= 1.0 or v == NEVER_EXIT)
        )

    if value is None:
        return None
    if ok(value):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(ok(v) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(
        f"Expected `{init_arg('LatencyMonitor', 'cascade_thresholds')}` to be {allowed}, but got {value!r}."
    )


class LatencyMonitor(Callback):
    """Measure and log the inference latency of every ensemble size, once, outside the training loop.

    At the chosen moment (``on_fit_end`` or ``on_test_start``; never during the sanity check, and only on
    global rank zero) every ``mode`` x ``batch_size`` x ensemble size ``k`` is measured with
    :func:`~lightning_ensembles.latency.measure_ensemble_latency` on the Trainer's device
    (``trainer.strategy.root_device``) under the Trainer's precision (the context its test steps run in).
    Lightning moves the model to the CPU before ``on_fit_end``; the monitor moves it back to the Trainer's
    device for the measurement and returns it where it found it.

    Measurements are shared within the Trainer (``scope=trainer``): a configuration that another callback
    (:class:`~lightning_ensembles.callbacks.EnsembleSizeAblation`) or an earlier ``trainer.test`` already
    measured with at least as many runs is logged as measured then, so every figure of a run shows the same
    numbers. Each configuration is logged through every logger in ``trainer.loggers`` at
    ``trainer.global_step`` as ``latency/{mode}/size_{k}/batch{b}_ms_p50``, ``..._ms_p10``, ``..._ms_p90`` and
    ``latency/{mode}/size_{k}/batch{b}_samples_per_s``.

    The ``"cascade"`` mode runs a :class:`~lightning_ensembles.cascade_inference.CascadeEnsemble` with
    ``cascade_thresholds`` (members cheapest first, by multiply-adds on ``input_shape``) on the first
    ``cascade_batches`` batches of the evaluation data (the validation loader at ``fit_end``, the test loader
    at ``test_start``; the first loader where there are several), and the full ensemble on the same batches,
    alternating the two on each batch after ``warmup`` untimed runs of both on the first batch. It logs the
    per-batch percentiles of both (``latency/cascade/batch{b}_...`` and ``latency/full_on_batches/batch{b}_...``,
    ``b`` the first batch's size), their time per sample, the ratio of their total times, the mean exit stage
    and the expected multiply-adds as a fraction of the full ensemble's.

    Args:
        when: ``"fit_end"`` (after ``trainer.fit``) or ``"test_start"`` (at every ``trainer.test``).
        batch_sizes: batch sizes to measure (1 is the latency of one request); not used by ``"cascade"``.
        warmup: untimed runs before the timed ones, for every configuration.
        repeats: timed runs for every configuration.
        sizes: ensemble sizes, each in ``[1, M]`` (checked when the run starts); default all of ``1..M``.
        modes: how members are run; each one of :data:`CALLBACK_MODES`: ``"sequential"``, ``"fused"``
            (identical members only), ``"parallel"``, ``"cascade"``.
        input_shape: one sample's shape without the batch axis; default ``trainer.datamodule.input_shape``.
        workers: ``"parallel"``: the most workers (size ``k`` uses ``min(workers, k)``), at most ``M``;
            default as :class:`~lightning_ensembles.parallel.ParallelEnsemble` chooses (on a CPU
            ``min(k, torch.get_num_threads())``).
        threads_per_worker: ``"parallel"``: intra-op threads of every worker; default the process's threads
            split between the workers.
        devices: ``"parallel"``: the workers' devices, e.g. ``["cuda:0", "cuda:1"]`` (members are deep-copied
            onto them for the measurement; the model stays where it is); default the model's device.
        cascade_thresholds: ``"cascade"`` (required there): one threshold in ``[0, 1]`` (or ``NEVER_EXIT``)
            for every stage, or ``M - 1`` of them.
        cascade_batches: ``"cascade"``: how many evaluation batches to time.

    Raises:
        ValueError: for an invalid argument, naming it and the value given; when the run starts, for an
            ensemble size above ``M``, no ``input_shape`` to be found, a mode that does not fit the model
            (``"fused"`` for mixed members, ``workers`` or ``devices`` above ``M``, the wrong number of
            ``cascade_thresholds``).
        TypeError: when the run starts, if the model is not an ``EnsembleLightningModule``.

    Example:
        >>> LatencyMonitor(when="fit_start")
        Traceback (most recent call last):
        ...
        ValueError: Expected `LatencyMonitor(when=...)` to be one of ['fit_end', 'test_start'], but got 'fit_start'.
        >>> LatencyMonitor(modes=["cascade"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `LatencyMonitor(cascade_thresholds=...)` to be given with mode 'cascade' in ..., but got None.
    """

    def __init__(
        self,
        when: When = "fit_end",
        batch_sizes: Sequence[int] = (1, 256),
        warmup: int = DEFAULT_WARMUP,
        repeats: int = DEFAULT_REPEATS,
        sizes: Sequence[int] | None = None,
        modes: Sequence[str] = ("sequential",),
        input_shape: Sequence[int] | None = None,
        workers: int | None = None,
        threads_per_worker: int | None = None,
        devices: Sequence[str] | None = None,
        cascade_thresholds: Thresholds | None = None,
        cascade_batches: int = 10,
    ) -> None:
        self.when = check_choice(when, init_arg("LatencyMonitor", "when"), _WHEN)
        self.batch_sizes = _int_entries(batch_sizes, init_arg("LatencyMonitor", "batch_sizes"), 1)
        self.warmup = check_int(warmup, init_arg("LatencyMonitor", "warmup"), 0)
        self.repeats = check_int(repeats, init_arg("LatencyMonitor", "repeats"), 1)
        self.sizes = None if sizes is None else _int_entries(sizes, init_arg("LatencyMonitor", "sizes"), 1)
        if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
            raise ValueError(
                f"Expected `{init_arg('LatencyMonitor', 'modes')}` to be a non-empty sequence of mode names, but got {modes!r}."
            )
        self.modes = tuple(
            dict.fromkeys(
                check_mode(mode, init_arg("LatencyMonitor", "modes"), CALLBACK_MODES) for mode in modes
            )
        )
        self.input_shape = check_shape(input_shape, init_arg("LatencyMonitor", "input_shape"), optional=True)
        self.workers = (
            None if workers is None else check_int(workers, init_arg("LatencyMonitor", "workers"), 1)
        )
        self.threads_per_worker = (
            None
            if threads_per_worker is None
            else check_int(threads_per_worker, init_arg("LatencyMonitor", "threads_per_worker"), 1)
        )
        self.devices = (
            None
            if devices is None
            else tuple(str(d) for d in check_devices(devices, init_arg("LatencyMonitor", "devices")))
        )
        self.cascade_thresholds = _check_cascade_thresholds(cascade_thresholds)
        if "cascade" in self.modes and self.cascade_thresholds is None:
            raise ValueError(
                f"Expected `{init_arg('LatencyMonitor', 'cascade_thresholds')}` to be given with mode 'cascade' in "
                f"`{init_arg('LatencyMonitor', 'modes')}`, but got None."
            )
        self.cascade_batches = check_int(cascade_batches, init_arg("LatencyMonitor", "cascade_batches"), 1)
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
        return as_ensemble(pl_module, "LatencyMonitor")

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
        return check_shape(shape, "trainer.datamodule.input_shape")

    def _cascade(self, module: EnsembleLightningModule, input_shape: tuple[int, ...]) -> Any:
        from lightning_ensembles.cascade_inference import CascadeEnsemble

        assert self.cascade_thresholds is not None
        try:
            return CascadeEnsemble(module, self.cascade_thresholds, input_shape=input_shape)
        except ValueError as err:
            raise ValueError(
                str(err).replace("`thresholds`", f"`{init_arg('LatencyMonitor', 'cascade_thresholds')}`")
            ) from None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, before any training, what can only be checked with the model and data at hand."""
        if stage != _STAGE[self.when]:
            return
        module = self._ensemble(pl_module)
        num_members = len(module.members)
        check_sizes(self.sizes, num_members)
        input_shape = self._resolve_input_shape(trainer)
        if "parallel" in self.modes:
            if self.workers is not None and self.workers > num_members:
                raise ValueError(
                    f"Expected `{init_arg('LatencyMonitor', 'workers')}` to be None or an int in [1, M={num_members}] (at most one worker per "
                    f"member), but got {self.workers}."
                )
            if self.devices is not None and len(self.devices) > num_members:
                raise ValueError(
                    f"Expected `{init_arg('LatencyMonitor', 'devices')}` to hold at most M={num_members} entries (at most one worker per "
                    f"member), but got {len(self.devices)}: {list(self.devices)!r}."
                )
        if "fused" in self.modes:
            check_fused_members(list(module.members), init_arg("LatencyMonitor", "modes"))
        if "cascade" in self.modes:
            self._cascade(module, input_shape)

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
        device = trainer.strategy.root_device
        metrics: dict[str, float] = {}
        measurements: list[dict[str, Any]] = []
        cascade: dict[str, Any] = {}
        with measuring_on_trainer(trainer, module):
            for mode in self.modes:
                if mode == "cascade":
                    cascade = self._measure_cascade(trainer, module, input_shape)
                    metrics.update(cascade.pop("metrics", {}))
                    continue
                parallel = mode == "parallel"
                for batch_size in self.batch_sizes:
                    stats, measured = measure_latency(
                        trainer,
                        module,
                        input_shape,
                        mode,
                        batch_size,
                        sizes=self.sizes,
                        warmup=self.warmup,
                        repeats=self.repeats,
                        clock=self._clock,
                        workers=self.workers if parallel else None,
                        threads_per_worker=self.threads_per_worker if parallel else None,
                        devices=self.devices if parallel else None,
                    )
                    metrics.update(measured)
                    measurements += [{"mode": mode, "size": k, **s.as_dict()} for k, s in stats.items()]
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
        if cascade:
            self.results["cascade"] = cascade
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"LatencyMonitor: measured {len(measurements)} configurations on {self.results['device']} "
            f"(modes {list(self.modes)}, batch sizes {list(self.batch_sizes)})."
        )

    # ------------------------------------------------------------------ cascade

    def _evaluation_inputs(self, trainer: Trainer) -> list[Tensor]:
        """The inputs of the first ``cascade_batches`` batches of the evaluation loader, on the device."""
        loaders = trainer.val_dataloaders if self.when == "fit_end" else trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            return []
        inputs: list[Tensor] = []
        for batch in loaders:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(x, Tensor):
                raise ValueError(
                    "Expected the evaluation batches to be tensors or (inputs, targets) pairs for the 'cascade' "
                    f"mode of LatencyMonitor, but got a batch of {type(x).__name__}."
                )
            x = trainer.precision_plugin.convert_input(x.to(trainer.strategy.root_device))
            if x.shape[0] > 0:
                inputs.append(x)
            if len(inputs) == self.cascade_batches:
                break
        return inputs

    def _measure_cascade(
        self, trainer: Trainer, module: EnsembleLightningModule, input_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        inputs = self._evaluation_inputs(trainer)
        if not inputs:
            loader = "validation" if self.when == "fit_end" else "test"
            rank_zero_warn(f"LatencyMonitor: no {loader} batches to time the 'cascade' mode on; skipped.")
            return {}
        cascade = self._cascade(module, input_shape)
        clock = self._clock if self._clock is not None else time.perf_counter
        device, _ = device_and_dtype(module)
        timings: dict[str, list[float]] = {"cascade": [], "full_on_batches": []}
        exit_stages: list[Tensor] = []
        training = {submodule: submodule.training for submodule in module.modules()}
        try:
            module.eval()
            with torch.inference_mode():

                def full(x: Tensor) -> Callable[[], Tensor]:
                    return lambda: aggregate(module.member_logits(x), module.aggregation)

                def cascaded(x: Tensor) -> Callable[[], Tensor]:
                    return lambda: cascade.forward_with_exits(x).probs

                for _ in range(self.warmup):
                    cascaded(inputs[0])()
                    full(inputs[0])()
                for x in inputs:
                    timings["cascade"] += time_runs(cascaded(x), device, 0, 1, clock)
                    timings["full_on_batches"] += time_runs(full(x), device, 0, 1, clock)
                    exit_stages.append(cascade.forward_with_exits(x).exit_stage.cpu())
        finally:
            for submodule, was_training in training.items():
                submodule.training = was_training
        stages = torch.cat(exit_stages)
        num_samples = int(stages.numel())
        batch_size = int(inputs[0].shape[0])
        metrics: dict[str, float] = {}
        for name, durations in timings.items():
            stats = LatencyStats.from_seconds(durations, batch_size)
            metrics[f"latency/{name}/batch{batch_size}_ms_p50"] = stats.p50_ms
            metrics[f"latency/{name}/batch{batch_size}_ms_p10"] = stats.p10_ms
            metrics[f"latency/{name}/batch{batch_size}_ms_p90"] = stats.p90_ms
            metrics[f"latency/{name}/ms_per_sample"] = math.fsum(durations) * 1e3 / num_samples
        full_total = math.fsum(timings["full_on_batches"])
        metrics["latency/cascade/time_ratio"] = (
            math.fsum(timings["cascade"]) / full_total if full_total > 0 else math.nan
        )
        metrics["latency/cascade/mean_exit_stage"] = float(stages.double().mean())
        metrics["latency/cascade/expected_cost_ratio"] = (
            cascade.expected_cost(stages) / cascade.stage_costs[-1]
        )
        return {
            "thresholds": list(cascade.thresholds),
            "order": list(cascade.order),
            "batches": len(inputs),
            "samples": num_samples,
            "metrics": metrics,
            "batch_ms": {name: [d * 1e3 for d in durations] for name, durations in timings.items()},
        }

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": copy.deepcopy(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = copy.deepcopy(state_dict.get("results", {}))
