"""The private Lightning, torch and third-party surface this package relies on, gathered in one place.

:class:`~lightning_ensembles.distributed.MemberParallelStrategy` overrides private hooks of Lightning's
``DDPStrategy`` and calls a private method of torch's ``DistributedDataParallel``; a few other modules read a
private attribute of Lightning or torch. None of these is covered by a deprecation policy, so a release may
move one without notice. This module is where they live:

- every private name the package *reads or calls* in Lightning or torch is reached through one small
  function or constant below, and the rest of the package uses those;
- every private name it *overrides* on a subclass (a hook such as ``DDPStrategy._setup_model``), or reaches
  in a third-party library (timm, torchvision, jsonargparse, argparse, optuna), is listed in
  :data:`PRIVATE_SURFACE` with where it is used.

``tests/test_compat.py`` checks every entry of :data:`PRIVATE_SURFACE` against the installed releases and
fails naming the entry, the installed release and the place that uses it. The versions each entry was checked
on are in :data:`CHECKED_ON`; ``pyproject.toml`` bounds Lightning below the next minor release for this
reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

__all__ = [
    "CHECKED_ON",
    "CLI_INSTANTIATOR_KEY",
    "PRIVATE_ATEN_OPS",
    "PRIVATE_SURFACE",
    "PrivateName",
    "backward_skipped",
    "ddp_comm_hook_settings",
    "ddp_kwargs",
    "ignore_in_ddp",
    "initial_hparams",
    "layer_sync",
    "loop_data_source",
    "private_aten_ops",
    "set_launcher",
    "set_layer_sync",
    "spawn_launcher_base",
    "uncompiled",
]

#: The releases every entry of :data:`PRIVATE_SURFACE` was checked on (``tests/test_compat.py`` passing).
CHECKED_ON = (
    "lightning 2.6.6, torch 2.14.1, torchvision 0.29.1, timm 1.0.31, jsonargparse 4.53.0, optuna 5.1.0"
)

Kind = Literal[
    "method", "staticmethod", "property", "instance_attribute", "function", "module", "aten_op", "key"
]


@dataclass(frozen=True)
class PrivateName:
    """One private name of another library that this package relies on.

    Args:
        package: the distribution that ships it (``"lightning"``, ``"torch"``, ...), for the failure message.
        owner: dotted path of the class or module that holds it.
        name: the attribute name (for ``kind="key"``, the dictionary key).
        kind: what it is: a ``method`` (overridden or called), a ``staticmethod``, a ``property``, an
            ``instance_attribute`` set by the owner's ``__init__``, a module-level ``function``, an importable
            ``module``, an ``aten_op`` of ``torch.ops.aten``, or a ``key`` the owner's source writes.
        parameters: for callables, the parameter names the package relies on (in order, ``self`` included).
        used_in: where the package uses it and what for.
    """

    package: str
    owner: str
    name: str
    kind: Kind
    parameters: tuple[str, ...] | None
    used_in: str


# ---------------------------------------------------------------------------------------------- Lightning

_DDP = "lightning.pytorch.strategies.DDPStrategy"


def ddp_kwargs(strategy: DDPStrategy) -> dict[str, Any]:
    """The keyword arguments the user gave ``DDPStrategy`` for torch's ``DistributedDataParallel``.

    Lightning keeps them in ``DDPStrategy._ddp_kwargs`` (set in ``__init__``); ``MemberParallelStrategy``
    passes them on when it wraps the model in DDP over one member group.
    """
    return dict(strategy._ddp_kwargs)


def ddp_comm_hook_settings(strategy: DDPStrategy) -> tuple[Any, Any, Any]:
    """The ``(ddp_comm_hook, ddp_comm_wrapper, ddp_comm_state)`` the user gave ``DDPStrategy``.

    Lightning keeps them in ``_ddp_comm_hook``, ``_ddp_comm_wrapper`` and ``_ddp_comm_state``;
    ``MemberParallelStrategy._register_ddp_hooks`` wraps the hook to count the gradient bytes per group.
    """
    return strategy._ddp_comm_hook, strategy._ddp_comm_wrapper, strategy._ddp_comm_state


def layer_sync(strategy: DDPStrategy) -> Any:
    """The layer-sync plugin (SyncBatchNorm) of the strategy, ``None`` without ``sync_batchnorm``.

    Lightning keeps it in ``_layer_sync`` (set in ``ParallelStrategy.__init__``) and applies it in
    ``DDPStrategy.setup`` when fitting.
    """
    return strategy._layer_sync


def set_layer_sync(strategy: DDPStrategy, plugin: Any) -> None:
    """Replace the strategy's layer-sync plugin before ``Strategy.setup`` applies it.

    ``MemberParallelStrategy`` restricts SyncBatchNorm to one member group this way.
    """
    strategy._layer_sync = plugin


def initial_hparams(module: pl.LightningModule) -> Any:
    """The module's ``AttributeDict`` of initial hyperparameters, itself (not the copy ``hparams_initial`` is).

    ``EnsembleLightningModule`` rewrites it in place before the loggers read it, so the HParams summary is
    logged without changing the hyperparameters a checkpoint keeps.
    """
    return module._hparams_initial


def backward_skipped(trainer: pl.Trainer) -> bool:
    """Whether Lightning skips the backward of this training step (``_FitLoop._skip_backward``).

    ``StochasticWeightAveraging`` sets it for its batch-norm update epoch; memory-frugal training then skips
    its per-member backward too.
    """
    return bool(trainer.fit_loop._skip_backward)


def loop_data_source(loop: Any) -> Any:
    """The ``_DataConnectorSource`` a Lightning loop reads its dataloaders from, or ``None``.

    The cost callbacks read the input shape from the first batch of plain dataloaders (no datamodule).
    """
    return getattr(loop, "_data_source", None)


#: The hyperparameter key under which Lightning (``save_hyperparameters`` under LightningCLI, 2.3+) records
#: how a module was instantiated; a checkpoint with it rebuilds its members from the recorded configuration.
def spawn_launcher_base() -> type:
    """Lightning's launcher of ``ddp_spawn``-style processes (the private ``_MultiProcessingLauncher``), which
    ``MemberParallelStrategy`` subclasses so that a spawned worker exits as soon as its work is done."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return _MultiProcessingLauncher


def set_launcher(strategy: Any, launcher: Any) -> None:
    """Replace a strategy's launcher (Lightning's private ``Strategy._launcher``) in its ``_configure_launcher``."""
    strategy._launcher = launcher


CLI_INSTANTIATOR_KEY = "_instantiator"

# -------------------------------------------------------------------------------------------------- torch


def ignore_in_ddp(model: nn.Module, names: Sequence[str]) -> None:
    """Tell torch's DDP to neither broadcast nor all-reduce these parameters and buffers of ``model``.

    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (a static method; the names are
    fully qualified within ``model``). ``MemberParallelStrategy`` uses it for the members other groups train.
    """
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(names))


def uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``module`` itself.

    The export path copies the plain members, never the compiled wrappers.
    """
    inner = getattr(module, "_orig_mod", module)
    return inner if isinstance(inner, nn.Module) else module


#: Private aten convolution and matmul ops whose multiply-adds :func:`~lightning_ensembles.cost.count_macs`
#: counts besides the public ones (CPU and scaled-fp8 kernels dispatch to these).
PRIVATE_ATEN_OPS = ("_convolution", "_slow_conv2d_forward", "_scaled_mm")


def private_aten_ops() -> list[Any]:
    """The op packets of :data:`PRIVATE_ATEN_OPS` on ``torch.ops.aten``."""
    return [getattr(torch.ops.aten, name) for name in PRIVATE_ATEN_OPS]


# ---------------------------------------------------------------------------------------- the full list

_STRATEGY = "lightning_ensembles/distributed.py (MemberParallelStrategy)"

#: Every private name of another library the package relies on; ``tests/test_compat.py`` checks each.
PRIVATE_SURFACE: tuple[PrivateName, ...] = (
    # hooks MemberParallelStrategy overrides (and calls from its own configure_ddp)
    PrivateName(
        "lightning", _DDP, "_setup_model", "method", ("self", "model"), _STRATEGY + ": wraps members in DDP"
    ),
    PrivateName(
        "lightning",
        _DDP,
        "_register_ddp_hooks",
        "method",
        ("self",),
        _STRATEGY + ": registers the per-group comm hook",
    ),
    # the spawned worker's launcher: MemberParallelStrategy exits a worker once its work is done
    PrivateName(
        "lightning", _DDP, "_configure_launcher", "method", ("self",), _STRATEGY + ": its spawn launcher"
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.strategies.launchers.multiprocessing",
        "_MultiProcessingLauncher",
        "function",
        ("strategy", "start_method"),
        _STRATEGY + " via spawn_launcher_base",
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher",
        "_wrapping_function",
        "method",
        ("self", "process_idx", "trainer", "function", "args", "kwargs", "return_queue", "global_states"),
        _STRATEGY + ": _ExitingSpawnLauncher",
    ),
    PrivateName(
        "lightning",
        _DDP,
        "_launcher",
        "instance_attribute",
        None,
        _STRATEGY + " via set_launcher",
    ),
    # DDPStrategy state read through the functions above
    PrivateName("lightning", _DDP, "_ddp_kwargs", "instance_attribute", None, _STRATEGY + " via ddp_kwargs"),
    *(
        PrivateName(
            "lightning", _DDP, name, "instance_attribute", None, _STRATEGY + " via ddp_comm_hook_settings"
        )
        for name in ("_ddp_comm_hook", "_ddp_comm_wrapper", "_ddp_comm_state")
    ),
    PrivateName(
        "lightning", _DDP, "_layer_sync", "instance_attribute", None, _STRATEGY + " via (set_)layer_sync"
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.LightningModule",
        "_hparams_initial",
        "instance_attribute",
        None,
        "lightning_ensembles/module.py (on_fit_start's HParams summary) via initial_hparams",
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.loops.fit_loop._FitLoop",
        "_skip_backward",
        "property",
        None,
        "lightning_ensembles/_frugal.py (frugal_this_step) via backward_skipped",
    ),
    *(
        PrivateName(
            "lightning",
            f"lightning.pytorch.loops.{owner}",
            "_data_source",
            "instance_attribute",
            None,
            "lightning_ensembles/callbacks/_shared.py (input shape from plain dataloaders) via loop_data_source",
        )
        for owner in (
            "fit_loop._FitLoop",
            "evaluation_loop._EvaluationLoop",
            "prediction_loop._PredictionLoop",
        )
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.callbacks.Callback",
        "_generate_state_key",
        "method",
        ("self", "kwargs"),
        "state_key of lightning_ensembles/callbacks/{latency,cascade,reliability}.py (Lightning's documented "
        "helper for callbacks with several instances per Trainer)",
    ),
    PrivateName(
        "lightning",
        "lightning.pytorch.core.mixins.hparams_mixin",
        CLI_INSTANTIATOR_KEY,
        "key",
        None,
        "lightning_ensembles/_saving.py (recorded_architecture) via CLI_INSTANTIATOR_KEY",
    ),
    # torch
    PrivateName(
        "torch",
        "torch.nn.parallel.DistributedDataParallel",
        "_set_params_and_buffers_to_ignore_for_model",
        "staticmethod",
        ("module", "params_and_buffers_to_ignore"),
        _STRATEGY + " via ignore_in_ddp",
    ),
    PrivateName(
        "torch",
        "torch._dynamo.eval_frame.OptimizedModule",
        "_orig_mod",
        "instance_attribute",
        None,
        "lightning_ensembles/export.py (plain copies of compiled members) via uncompiled",
    ),
    *(
        PrivateName(
            "torch",
            "torch.ops.aten",
            name,
            "aten_op",
            None,
            "lightning_ensembles/cost.py via private_aten_ops",
        )
        for name in PRIVATE_ATEN_OPS
    ),
    # torchvision: hooks overridden to name the missing or corrupted file
    *(
        PrivateName(
            "torchvision",
            f"torchvision.datasets.{owner}",
            "_check_integrity",
            "method",
            ("self",),
            "lightning_ensembles/data/cifar.py (_CIFAR10, _SVHN)",
        )
        for owner in ("CIFAR10", "SVHN")
    ),
    # timm: the EfficientNet builder the NAS member decodes its architecture with
    *(
        PrivateName(
            "timm",
            "timm.models._efficientnet_builder",
            name,
            "function",
            parameters,
            "lightning_ensembles/models/nas.py (NASNet)",
        )
        for name, parameters in (
            ("decode_arch_def", ("arch_def",)),
            ("round_channels", ("channels",)),
        )
    ),
    # argparse / jsonargparse: the compact --help of the recipes
    *(
        PrivateName(
            "python",
            "argparse.HelpFormatter",
            name,
            "method",
            parameters,
            "lightning_ensembles/_help.py",
        )
        for name, parameters in (
            ("_get_help_string", ("self", "action")),
            ("_format_action", ("self", "action")),
            ("_format_usage", ("self", "usage", "actions", "groups", "prefix")),
        )
    ),
    *(
        PrivateName(
            "python",
            "argparse.HelpFormatter",
            name,
            "instance_attribute",
            None,
            "lightning_ensembles/_help.py",
        )
        for name in ("_prog", "_width")
    ),
    PrivateName(
        "jsonargparse",
        "jsonargparse.DefaultHelpFormatter",
        "_get_type_str",
        "method",
        ("self", "action"),
        "lightning_ensembles/_help.py",
    ),
    PrivateName(
        "jsonargparse",
        "jsonargparse._typehints.ActionTypeHint",
        "_typehint",
        "instance_attribute",
        None,
        "lightning_ensembles/_help.py (the base class whose subclasses --help lists)",
    ),
    # optuna: the logger of its per-trial lines, filtered during a search
    PrivateName(
        "optuna",
        "optuna.study._optimize",
        "_optimize",
        "module",
        None,
        "lightning_ensembles/nas.py (_one_line_per_trial)",
    ),
)
