"""Memory-frugal training: the ensemble's summed loss differentiated one member at a time.

:class:`~lightning_ensembles.EnsembleLightningModule` calls these from ``setup`` and ``training_step``. With
more than one member to train in the process, ``training_step`` computes the gradients of the summed loss
itself, and the sum it returns carries no graph:

1. on the first batch of an accumulation window (when Lightning would zero them, after this step) the
   optimizer's gradients are zeroed with ``optimizer.zero_grad()``, and Lightning's own
   ``optimizer_zero_grad`` of this step is skipped;
2. for each member ``m`` in order: its forward and loss ``loss_m``, then the backward of ``loss_m`` exactly as
   Lightning would transform the returned sum: divided by ``trainer.accumulate_grad_batches``, multiplied by
   the precision plugin's ``GradScaler`` scale if it has one, outside autocast. The upstream gradient reaching
   ``loss_m`` is therefore the same number, computed by the same operations, as when Lightning
   back-propagates the sum (the other terms of the sum contribute nothing to ``θ_m``), so every gradient is
   bit-identical; then the member's graph and activations are freed before the next member's forward;
3. the detached sum is returned as a leaf that requires grad: Lightning's backward of it reaches no
   parameter, and everything after it (``on_after_backward``, per-member clipping, the scaler's unscale, inf
   check, step and update, the optimizer step) sees the same gradients as with one backward of the sum.

Forwards run in the same member order, so dropout masks and BatchNorm statistics are the same. A non-finite
loss is reported after the members' backward passes (one device sync, as otherwise), with the same member
and message, before any optimizer step.

Why this way: Lightning's automatic optimization stays in charge, so ``--trainer.gradient_clip_val``,
``accumulate_grad_batches``, precision plugins and every hook keep working (manual optimization would forbid
Trainer-level clipping and accumulation). A custom autograd Function that hands stashed gradients to
Lightning's backward would need the upstream gradient before Lightning computes it and a second copy of every
gradient; here each backward is the one Lightning would run, per member. See also ``docs/deploying.md``
(Memory-frugal training).

Whether it may run is asked of the strategy, not decided from its class: a strategy that back-propagates
only members of its own and reduces no gradient across members declares ``supports_per_member_backward =
True`` (``MemberParallelStrategy`` does); one device needs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ensembles._compat import backward_skipped
from lightning_ensembles._validation import expected

if TYPE_CHECKING:
    from lightning_ensembles.module import EnsembleLightningModule

__all__ = ["backward_each_member", "check_argument", "frugal_this_step", "refusal", "resolve"]


def check_argument(memory_frugal: object, execution: str) -> None:
    """The constructor's check of ``memory_frugal`` (before any member is built).

    Raises:
        ValueError: for a value other than ``True``, ``False`` or ``"auto"``, or ``True`` with
            ``execution="vmap"`` (the fused forward runs all members as one computation).
    """
    if not isinstance(memory_frugal, bool) and memory_frugal != "auto":
        raise expected("--model.memory_frugal", "true, false or 'auto'", memory_frugal)
    if memory_frugal is True and execution == "vmap":
        raise ValueError(
            "`--model.memory_frugal true` runs each member's forward and backward on its own, which the fused "
            "`--model.execution vmap` cannot (it runs all members as one computation), but got 'vmap'. Use "
            "`--model.execution loop` (or `auto`, which trains with the loop when memory_frugal is on), or "
            "`--model.memory_frugal false`."
        )


def resolve(module: EnsembleLightningModule) -> bool:
    """Whether this fit differentiates member by member.

    ``memory_frugal=True``: yes, and an error where it would not be exact; ``"auto"``: wherever it is exact,
    else the summed backward, said once (at setup, where this is called); ``False``: never.

    Raises:
        ValueError: for ``memory_frugal=True`` under a setting where it would not be exact.
    """
    mode = module.memory_frugal
    if mode is False:
        return False
    if mode == "auto" and module.execution != "loop":
        rank_zero_info(
            f"`--model.memory_frugal auto`: training with one backward of the summed loss, because "
            f"`--model.execution {module.execution}` runs all members' forwards together. Memory-frugal "
            "training needs `--model.execution loop`; `--model.memory_frugal false` silences this."
        )
        return False
    reason = refusal(module)
    if reason is None:
        return True
    if mode is True:
        raise ValueError(reason)
    rank_zero_info(
        "`--model.memory_frugal auto`: training with one backward of the summed loss (every member's "
        "activations alive until it), because member-by-member backward is not exact here. "
        + reason.replace("`--model.memory_frugal true` ", "Memory-frugal training ", 1)
    )
    return False


def refusal(module: EnsembleLightningModule) -> str | None:
    """Why the per-member backward would not be exact under the module's trainer, or ``None`` when it is."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    strategy = module.trainer.strategy
    if not getattr(strategy, "supports_per_member_backward", isinstance(strategy, SingleDeviceStrategy)):
        return (
            "`--model.memory_frugal true` back-propagates each member on its own inside `training_step`, "
            f"which needs one device or `--trainer.strategy member_parallel`, but got `--trainer.strategy` "
            f"{type(strategy).__name__}. Data-parallel DDP (`ddp`, `ddp_spawn`, ...) wraps all members in one "
            "DistributedDataParallel that all-reduces one backward per forward, and sharded strategies (FSDP, "
            "DeepSpeed) run their own backward. Use `--trainer.strategy member_parallel` (each process trains "
            "its own members and no gradient crosses members), or `--model.memory_frugal false`."
        )
    plugin = type(strategy.precision_plugin)
    if plugin.pre_backward not in (Precision.pre_backward, MixedPrecision.pre_backward) or (
        plugin.backward is not Precision.backward
    ):
        return (
            "`--model.memory_frugal true` repeats the precision plugin's loss scaling for each member, which "
            f"it knows for Lightning's own plugins only, but got {plugin.__name__}, whose backward differs. "
            "Use `--trainer.precision` 32-true, 16-mixed, bf16-mixed, 16-true or bf16-true, or "
            "`--model.memory_frugal false`."
        )
    if not module.automatic_optimization or type(module).backward is not LightningModule.backward:
        return (
            "`--model.memory_frugal true` computes the gradients inside `training_step` under Lightning's "
            "automatic optimization with its default `backward`, but this module "
            + (
                "sets `automatic_optimization = False`."
                if not module.automatic_optimization
                else f"({type(module).__name__}) overrides `backward`."
            )
            + " Set `--model.memory_frugal false`."
        )
    return None


def frugal_this_step(module: EnsembleLightningModule, indices: Sequence[int]) -> bool:
    """Whether this training step computes its gradients member by member.

    With one member to train the per-member backward is the backward of the sum, so Lightning's is kept
    (this also keeps DDP inside a member group of ``member_parallel`` untouched); and when Lightning skips
    the backward of this step (``trainer.fit_loop._skip_backward``, set by StochasticWeightAveraging) so does
    the module.
    """
    if not module._frugal_active or len(indices) < 2 or module._trainer is None:
        return False
    return not backward_skipped(module.trainer)


def backward_each_member(
    module: EnsembleLightningModule, x: Tensor, y: Tensor, indices: Sequence[int], batch_idx: int
) -> Tensor:
    """Zero the gradients when Lightning would, then each member's forward, loss and backward in turn.

    Args:
        module: the ensemble, inside its ``training_step``.
        x: the inputs ``(B, ...)``.
        y: the targets ``(B,)`` (or soft ``(B, C)``).
        indices: the members to train, in order.
        batch_idx: the batch index Lightning's accumulation window is counted in.

    Returns:
        The members' detached losses ``(len(indices),)``.
    """
    trainer = module.trainer
    accumulate = trainer.accumulate_grad_batches
    if batch_idx % accumulate == 0:  # Lightning's `_make_zero_grad_fn` condition
        for optimizer in trainer.optimizers:
            optimizer.zero_grad()
        module._zeroed_in_step = True  # so Lightning's zero_grad after this step is skipped
    scaler: Any = getattr(trainer.precision_plugin, "scaler", None)
    losses = []
    for i in indices:
        loss = F.cross_entropy(module.member_logits(x, [i])[0], y, label_smoothing=module.label_smoothing)
        # the transformations Lightning applies to the returned sum, in its order: the closure divides by the
        # accumulation count, the precision plugin's `pre_backward` scales
        closure_loss = loss / accumulate
        if scaler is not None:
            closure_loss = scaler.scale(closure_loss)
        # Lightning's backward runs outside `train_step_context`: autocast does not reach autograd's own
        # backward kernels, but Python code run by the backward (tensor hooks, custom Functions) it would
        with autocast_disabled():
            closure_loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


@contextmanager
def autocast_disabled() -> Iterator[None]:
    """Leave every enabled ``torch.autocast`` region (as Lightning's backward, outside ``train_step_context``)."""
    with ExitStack() as stack:
        for device_type in ("cpu", "cuda", "xpu", "hpu", "mps"):
            if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
