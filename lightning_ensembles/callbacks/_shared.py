"""What the callbacks share: finding the shape of one sample to count multiply-adds at, the setting a latency
is measured in and the names of its scalars, restoring state from checkpoints written under an older
``state_key``, and one hook for the outputs of every evaluation batch and one for the end of every evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_ensembles._compat import loop_data_source
from lightning_ensembles._validation import check_shape, init_arg

if TYPE_CHECKING:
    from lightning_ensembles.latency import LatencyStats
    from lightning_ensembles.module import EnsembleLightningModule


def is_shape(value: object) -> bool:
    """Whether ``value`` is a sample shape without the batch axis (see :func:`check_shape`)."""
    try:
        check_shape(value)
    except ValueError:
        return False
    return True


def resolve_input_shape(
    trainer: Any, given: Sequence[int] | None, owner: str, required: bool = True
) -> tuple[int, ...] | None:
    """The callback's own ``input_shape`` if given, else the datamodule's ``input_shape`` attribute, else
    (with plain dataloaders and no datamodule) the shape of one sample of the first batch.

    Args:
        trainer: the Trainer (its ``datamodule`` is read).
        given: the shape passed to the callback, or ``None``.
        owner: the callback's name, for messages.
        required: raise when no shape is found (else return ``None``).

    Returns:
        The shape, or ``None`` when not found and not required.

    Raises:
        ValueError: if a required shape is missing, or the datamodule's is not a shape.
    """
    if given is not None:
        return tuple(given)
    datamodule = getattr(trainer, "datamodule", None)
    shape = getattr(datamodule, "input_shape", None)
    if shape is None and datamodule is None:
        shape = first_batch_shape(trainer)
    if shape is None:
        if not required:
            return None
        where = (
            "no datamodule was given"
            if datamodule is None
            else f"the datamodule {type(datamodule).__name__} has no `input_shape` attribute"
        )
        raise ValueError(
            f"{owner} needs `input_shape`, the shape of one sample without the batch axis, to count each "
            f"member's multiply-adds, but it was not set and {where}. Set `{init_arg(owner, 'input_shape')}` "
            "(e.g. [3, 32, 32]) or give the datamodule an `input_shape` attribute."
        )
    if not is_shape(shape):
        raise ValueError(
            f"Expected the datamodule's `input_shape` ({type(datamodule).__name__}.input_shape) to be a "
            f"non-empty sequence of ints >= 1, but got {shape!r}; set `{init_arg(owner, 'input_shape')}` to override it."
        )
    return tuple(shape)


def first_batch_shape(trainer: Any) -> tuple[int, ...] | None:
    """The shape of one sample, read from the first batch of the dataloaders given to the Trainer.

    For runs with plain dataloaders and no datamodule: the loaders of ``fit`` (training first), ``validate``,
    ``test`` or ``predict``, whichever the Trainer holds. A batch is a tensor ``(B, ...)`` or a sequence
    whose first item is one.

    Returns:
        ``x.shape[1:]`` of the first batch's inputs, or ``None`` when no loader yields such a batch.
    """
    for loop_name in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        source = loop_data_source(getattr(trainer, loop_name, None))
        if source is None or not source.is_defined():
            continue
        loaders = source.dataloader()
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        try:
            batch = next(iter(loader))
        except (StopIteration, TypeError):  # an empty loader, or no loader here: try the next stage
            continue
        x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
        if isinstance(x, Tensor) and x.ndim >= 2 and is_shape(tuple(x.shape[1:])):
            return tuple(int(s) for s in x.shape[1:])
    return None


def evaluation_outputs(outputs: Any, owner: str) -> tuple[Tensor, Tensor]:
    """The ``(logits (M, B, C), target (B,))`` an EnsembleLightningModule's evaluation step returns.

    Args:
        outputs: what the evaluation step returned (``on_*_batch_end``'s ``outputs``).
        owner: the callback's name, for the message.

    Returns:
        The detached logits and the targets.

    Raises:
        ValueError: if ``outputs`` is not such a dict.
    """
    if (
        not isinstance(outputs, dict)
        or not isinstance(outputs.get("logits"), Tensor)
        or "target" not in outputs
    ):
        raise ValueError(
            f"{owner} needs the evaluation step to return {{'logits': (M, B, C), 'target': (B,)}} as "
            f"EnsembleLightningModule does, but got {type(outputs).__name__}."
        )
    return outputs["logits"].detach(), outputs["target"].detach()


@contextlib.contextmanager
def measuring_on_trainer(trainer: Any, module: nn.Module) -> Iterator[None]:
    """The module on the Trainer's root device, under its precision's evaluation context, for a latency
    measurement; the module goes back to the device it was found on afterwards.

    Every callback that measures latency does it in this setting, so that measurements shared within the
    Trainer (``measure_ensemble_latency(scope=trainer)``) find each other.

    Args:
        trainer: the Trainer (``strategy.root_device``, ``precision_plugin``).
        module: the ensemble.
    """
    from lightning_ensembles.latency import device_and_dtype

    found_on, _ = device_and_dtype(module)
    try:
        module.to(trainer.strategy.root_device)
        with trainer.precision_plugin.test_step_context():
            yield
    finally:
        module.to(found_on)


def latency_scalars(mode: str, size: int, stats: LatencyStats) -> dict[str, float]:
    """The scalars the callbacks log for one latency measurement, named by
    :func:`~lightning_ensembles.latency.latency_metric_name`.

    Args:
        mode: how the members ran, one of :data:`~lightning_ensembles.latency.MODES`.
        size: the ensemble size ``k``.
        stats: the measurement of the first ``k`` members.

    Returns:
        ``{"latency/{mode}/size_{k}/batch{b}_ms_p50": ..., ..._ms_p10, ..._ms_p90, ..._samples_per_s}``.
    """
    from lightning_ensembles.latency import latency_metric_name

    b = stats.batch_size
    return {
        latency_metric_name(mode, size, b, "ms_p50"): stats.p50_ms,
        latency_metric_name(mode, size, b, "ms_p10"): stats.p10_ms,
        latency_metric_name(mode, size, b, "ms_p90"): stats.p90_ms,
        latency_metric_name(mode, size, b, "samples_per_s"): stats.throughput,
    }


def measure_latency(
    trainer: Any,
    module: EnsembleLightningModule,
    input_shape: Sequence[int],
    mode: str,
    batch_size: int,
    **options: Any,
) -> tuple[dict[int, LatencyStats], dict[str, float]]:
    """Measure one mode at one batch size for every ensemble size, shared within the Trainer, and name the
    scalars to log.

    Every callback that logs latency measures through here, inside :func:`measuring_on_trainer`:
    :func:`~lightning_ensembles.latency.measure_ensemble_latency` with ``scope=trainer``, so a configuration
    one callback measured is what another one logs.

    Args:
        trainer: the Trainer, the scope the measurement is shared in.
        module: the ensemble.
        input_shape: one sample's shape, without the batch axis.
        mode: how the members run, one of :data:`~lightning_ensembles.latency.MODES`.
        batch_size: samples per timed run.
        options: the other keyword arguments of ``measure_ensemble_latency`` (``sizes``, ``warmup``,
            ``repeats``, ``clock``, ``workers``, ...; its defaults where not given).

    Returns:
        The statistics of every ensemble size ``k``, and their scalars (:func:`latency_scalars`).
    """
    from lightning_ensembles.latency import measure_ensemble_latency

    stats = measure_ensemble_latency(
        module, input_shape, batch_size=batch_size, mode=mode, scope=trainer, **options
    )
    scalars: dict[str, float] = {}
    for k, s in stats.items():
        scalars.update(latency_scalars(mode, k, s))
    return stats, scalars


def restore_class_keyed_state(callback: Callback, checkpoint: dict[str, Any]) -> None:
    """Let a checkpoint written before ``callback`` had a ``state_key`` of its own restore it.

    ``FlopsMonitor``, ``EnsembleSizeAblation`` and ``MemberEMA`` used to keep their state under their class
    name (Lightning's default ``state_key``); they now key it by their configuration, so that two instances
    can share a Trainer. Lightning's own fallback (``Callback._legacy_state_key``) covers only
    checkpoints of Lightning < 1.5, so the state found under the class name is given to the callback's new
    key, in the loaded checkpoint, before Lightning calls ``load_state_dict``. Call it from
    ``on_load_checkpoint``.

    Args:
        callback: the callback being restored.
        checkpoint: the loaded checkpoint (changed in place).
    """
    states = checkpoint.get("callbacks")
    old_key = type(callback).__qualname__
    if isinstance(states, dict) and old_key in states and callback.state_key not in states:
        states[callback.state_key] = states[old_key]


class EvaluationBatchCallback(Callback):
    """A callback that reads the outputs of every validation and test batch, and reports at the end of every
    validation and test epoch, through one method each.

    Lightning has one hook per stage for each; subclasses override :meth:`on_evaluation_batch` and
    :meth:`on_evaluation_epoch_end` instead, which are told the stage (``"val"`` or ``"test"``). Neither is
    called during the sanity check.
    """

    def on_evaluation_batch(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str, dataloader_idx: int
    ) -> None:
        """Called after every validation (``stage="val"``) and test (``stage="test"``) batch.

        Args:
            trainer: the Trainer.
            pl_module: the model.
            outputs: what the evaluation step returned.
            stage: ``"val"`` or ``"test"``.
            dataloader_idx: which of the stage's loaders the batch came from.
        """

    def on_evaluation_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called at the end of every validation (``stage="val"``) and test (``stage="test"``) epoch.

        Args:
            trainer: the Trainer.
            pl_module: the model.
            stage: ``"val"`` or ``"test"``.
        """

    @override
    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._batch_end("val", *args, **kwargs)

    @override
    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._batch_end("test", *args, **kwargs)

    def _batch_end(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Lightning's ``on_{validation,test}_batch_end``, told its stage."""
        if not trainer.sanity_checking:
            self.on_evaluation_batch(trainer, pl_module, outputs, stage, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.on_evaluation_epoch_end(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_evaluation_epoch_end(trainer, pl_module, "test")
