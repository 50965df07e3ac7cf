"""``FlopsMonitor``: multiply-adds and parameters of every member and of the whole ensemble, logged once.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models* (arXiv
2005.00570), put ensembles and single models on one "FLOPs" axis. As in the EfficientNet paper (Tan & Le
2019), their FLOPs are **multiply-adds**: one multiply-add counts once. This callback reports that unit as
``gmacs`` (billions of multiply-adds per sample) and, for readers used to the stricter convention that counts
the multiply and the add separately, ``gflops = 2 x gmacs``. Only convolutions and matrix multiplications
(linear layers) are counted; batch norm, activations, pooling and bias additions are free.

Each member is counted separately, so mixed architectures are costed correctly, and the ensemble costs the
sum of its members (every member sees every sample). The keys logged, each with its unit in the name:

- ``flops/member_{i}_gmacs``, ``flops/member_{i}_gflops``: forward cost of member ``i`` per sample;
- ``flops/member_{i}_mparams``: its parameters, in millions;
- ``flops/member_{i}_train_gmacs``: forward + backward of one training step per sample (with
  ``count_training``); about three times the forward, see
  :func:`~lightning_ensembles.cost.count_training_macs`;
- ``flops/ensemble_gmacs``, ``flops/ensemble_gflops``, ``flops/ensemble_mparams``,
  ``flops/ensemble_train_gmacs``: the sums over members.

Counting uses :func:`~lightning_ensembles.cost.count_macs`,
:func:`~lightning_ensembles.cost.count_training_macs` and :func:`~lightning_ensembles.cost.count_params` on
``meta``-device copies of the members: no real compute and the trained members are untouched. Multiply-adds
come from the run's one cost source, :func:`~lightning_ensembles.cost.member_macs` with ``scope=trainer``:
``EnsembleSizeAblation`` and ``CascadeMonitor`` in the same Trainer read the same counts. On a 2-core CPU
EfficientNet-B7 at 600x600 takes about 0.5 s (forward) plus 2.5 s (training step) to count.

With ``cross_check=True`` every member is also counted by ptflops (:func:`~lightning_ensembles.cost.ptflops_macs`,
one real forward pass at batch 1 on a CPU copy; ptflops is the ``flops`` extra), logged as
``flops/member_{i}_ptflops_gmacs`` and ``flops/ensemble_ptflops_gmacs``, and a warning names any member whose two
counts differ by more than 1% (ptflops also counts bias additions, a fraction of a percent for convnets).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ensembles._validation import check_bool, check_shape, init_arg
from lightning_ensembles.callbacks._shared import resolve_input_shape, restore_class_keyed_state
from lightning_ensembles.cost import count_params, member_macs, ptflops_macs
from lightning_ensembles.module import as_ensemble
from lightning_ensembles.results import member_name

__all__ = ["FlopsMonitor"]


#: Batch size of the training count: batch norm on one value per channel (after global pooling, or
#: ``BatchNorm1d``) cannot run in training mode on a single sample. The count is per sample either way.
_TRAIN_BATCH = 2


class FlopsMonitor(Callback):
    """Count and log the multiply-adds and parameters of every member and of the ensemble, once per run.

    The count happens at the start of the first of ``fit``, ``validate``, ``test`` or ``predict`` that this
    callback instance sees (never during the sanity check) and is logged to every logger in
    ``trainer.loggers`` on global rank zero at the current ``trainer.global_step``. Later stages of the same
    run do not count again. The numbers are kept in :attr:`results` and in the checkpoint, so a resumed run
    logs them without counting again, unless the number of members (e.g. after
    :meth:`~lightning_ensembles.module.EnsembleLightningModule.grow`) or the input shape has changed.

    ``results`` holds ints: ``{"input_shape": [...], "members": [{"name", "macs", "params", "train_macs"},
    ...], "ensemble": {"macs", "params", "train_macs"}}`` (``train_macs`` only with ``count_training``). A
    member whose parameters are all frozen gets no backward pass, so its ``train_macs`` equal its ``macs``.

    Args:
        input_shape: Shape of one sample without the batch axis, e.g. ``(3, 32, 32)``. Defaults to the
            datamodule's ``input_shape`` attribute (every datamodule of this package has one).
        count_training: Also count the forward + backward multiply-adds of one training step.
        cross_check: Also count each member with ptflops (independent of our counter) and log it next to ours.

    Raises:
        ValueError: If ``input_shape`` is not a non-empty sequence of ints >= 1 or ``count_training`` is not
            a bool; at the start of a run, if there is no input shape, or if it does not fit a member
            (naming the member).
        TypeError: At the start of a run, if the LightningModule is not an ``EnsembleLightningModule``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_ensembles.module import EnsembleLightningModule
        >>> module = EnsembleLightningModule(members=[lambda: nn.Linear(4, 3), lambda: nn.Linear(4, 3)],
        ...                                  num_classes=3)
        >>> monitor = FlopsMonitor(input_shape=(4,))
        >>> trainer = Trainer(max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
        >>> trainer.fit(module, data)
        >>> monitor.results["ensemble"]
        {'macs': 24, 'params': 30, 'train_macs': 48}
    """

    def __init__(
        self, input_shape: Sequence[int] | None = None, count_training: bool = True, cross_check: bool = False
    ) -> None:
        super().__init__()
        self.input_shape = check_shape(input_shape, init_arg("FlopsMonitor", "input_shape"), optional=True)
        self.count_training = check_bool(count_training, init_arg("FlopsMonitor", "count_training"))
        # Not part of `state_key`: it adds entries to the state, and old checkpoints' states still restore.
        self.cross_check = check_bool(cross_check, init_arg("FlopsMonitor", "cross_check"))
        self.results: dict[str, Any] = {}
        self._logged = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(input_shape=self.input_shape, count_training=self.count_training)

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._count_and_log(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._count_and_log(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._count_and_log(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._count_and_log(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.results)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = copy.deepcopy(dict(state_dict))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        restore_class_keyed_state(self, checkpoint)

    # ------------------------------------------------------------------ counting

    def _count_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._logged:
            return
        members = self._members(pl_module)
        shape = self._resolve_input_shape(trainer)
        if self._needs_count(members, shape):
            self.results = self._count(members, shape, trainer)
        metrics = self._metrics()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        ensemble = self.results["ensemble"]
        rank_zero_info(
            f"{type(self).__name__}: the ensemble of {len(members)} member(s) costs "
            f"{ensemble['macs'] / 1e9:.4g} GMACs ({2 * ensemble['macs'] / 1e9:.4g} GFLOPs) per sample of "
            f"shape {shape} and has {ensemble['params'] / 1e6:.4g} M parameters."
        )
        self._logged = True

    @staticmethod
    def _members(pl_module: pl.LightningModule) -> nn.ModuleList:
        return as_ensemble(pl_module, "FlopsMonitor").members

    def _resolve_input_shape(self, trainer: pl.Trainer) -> tuple[int, ...]:
        shape = resolve_input_shape(trainer, self.input_shape, "FlopsMonitor")
        assert shape is not None  # required=True raises instead
        return shape

    def _needs_count(self, members: nn.ModuleList, shape: tuple[int, ...]) -> bool:
        results = self.results
        if not results or len(results.get("members", ())) != len(members):
            return True
        if list(results.get("input_shape", ())) != list(shape):
            return True
        if self.cross_check and "ptflops_macs" not in results.get("ensemble", {}):
            return True
        return self.count_training and "train_macs" not in results.get("ensemble", {})

    def _count(self, members: nn.ModuleList, shape: tuple[int, ...], scope: pl.Trainer) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for i, member in enumerate(members):
            try:
                row: dict[str, Any] = {
                    "name": member_name(member),
                    "macs": member_macs(member, shape, scope=scope),
                    "params": count_params(member),
                }
                if self.count_training:
                    row["train_macs"] = member_macs(
                        member, shape, training=True, batch_size=_TRAIN_BATCH, scope=scope
                    )
                if self.cross_check:
                    row["ptflops_macs"] = ptflops_macs(member, shape)
            except ValueError as err:
                raise ValueError(
                    f"Expected `input_shape` {list(shape)} (one sample, without the batch axis; "
                    f"`FlopsMonitor(input_shape=...)` or the datamodule's `input_shape`) to fit every member, but "
                    f"member {i} ({member_name(member)}) failed: {err}"
                ) from err
            rows.append(row)
        ensemble = {key: sum(row[key] for row in rows) for key in rows[0] if key != "name"}
        if self.cross_check:
            for i, row in enumerate(rows):
                gap = abs(row["ptflops_macs"] - row["macs"]) / max(row["macs"], 1)
                if gap > 0.01:
                    rank_zero_warn(
                        f"FlopsMonitor: ptflops counts {row['ptflops_macs']} multiply-adds for member {i} "
                        f"({row['name']}) and lightning_ensembles.cost {row['macs']}: they differ by "
                        f"{100 * gap:.1f}%, more than the bias additions ptflops adds. Check the member's ops."
                    )
        return {"input_shape": list(shape), "members": rows, "ensemble": ensemble}

    def _metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        entries = [(f"member_{i}", row) for i, row in enumerate(self.results["members"])]
        for prefix, row in [*entries, ("ensemble", self.results["ensemble"])]:
            metrics[f"flops/{prefix}_gmacs"] = row["macs"] / 1e9
            metrics[f"flops/{prefix}_gflops"] = 2 * row["macs"] / 1e9
            metrics[f"flops/{prefix}_mparams"] = row["params"] / 1e6
            if self.count_training and "train_macs" in row:
                metrics[f"flops/{prefix}_train_gmacs"] = row["train_macs"] / 1e9
            if self.cross_check and "ptflops_macs" in row:
                metrics[f"flops/{prefix}_ptflops_gmacs"] = row["ptflops_macs"] / 1e9
        return metrics
