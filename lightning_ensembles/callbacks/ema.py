"""``MemberEMA``: an exponential moving average of each member's weights, evaluated as the member.

timm's EfficientNet training recipes (used by the ImageNet reproduction of Kondratyuk et al. 2020) keep an
EMA of the weights (``--model-ema --model-ema-decay 0.9999``) and report the EMA model. In an ensemble every
member keeps its own EMA, built with timm's ``ModelEmaV3``, so members stay independent. During validation,
test and predict the EMA weights stand in for the members; the trained weights are put back afterwards, so
training, and checkpoints' ``state_dict``, keep the raw weights. The EMA weights travel in the callback's
state, so a resumed run continues them; under member-parallel training every process sends the EMAs of the
members it trains when a checkpoint is written (in ``on_save_checkpoint``, never in ``state_dict``). As in
timm, the first update copies the weights and later ones average with ``decay``.

Updates happen once per optimizer step, after it, as in Lightning's own ``WeightAveraging``: with
``accumulate_grad_batches=N`` the global step stays put for N batches, and an update per batch would apply the
decay N times per step. Lightning's ``EMAWeightAveraging`` itself does not fit an ensemble's needs: it averages
the whole LightningModule in one ``AveragedModel``, copies the average into the module when training ends (so
the final checkpoint no longer holds the trained weights), and has no notion of members trained by different
processes. Here every member has its own EMA, shared from the process that trains it, and checkpoints keep the
raw weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from timm.utils import ModelEmaV3
from torch import nn
from typing_extensions import override

from lightning_ensembles._validation import check_float, check_int, init_arg
from lightning_ensembles.callbacks._shared import restore_class_keyed_state
from lightning_ensembles.module import as_ensemble

__all__ = ["MemberEMA"]


class MemberEMA(Callback):
    """Keep an EMA of every trainable member's weights and evaluate with it.

    Args:
        decay: EMA decay per update, in ``[0, 1)`` (timm's recipes use 0.9999).
        warmup: use timm's decay warm-up (``decay * (1 - (1 + step / gamma) ** -power)``) early in training.
        every_n_steps: update every ``n`` optimizer steps.
        evaluate_with_ema: swap the EMA weights in for validation, test and predict.

    Raises:
        ValueError: for a decay outside ``[0, 1)`` or ``every_n_steps < 1``.
        TypeError: when the run starts, if the model is not an ``EnsembleLightningModule``.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = False,
        every_n_steps: int = 1,
        evaluate_with_ema: bool = True,
    ) -> None:
        self.decay = check_float(decay, init_arg("MemberEMA", "decay"), 0.0, 1.0, include_maximum=False)
        self.warmup = warmup
        self.every_n_steps = check_int(every_n_steps, init_arg("MemberEMA", "every_n_steps"), 1)
        self.evaluate_with_ema = evaluate_with_ema
        self.emas: dict[int, ModelEmaV3] = {}
        self._latest_update_step = 0
        self._restored: dict[int, dict[str, torch.Tensor]] = {}
        self._backup: dict[int, dict[str, torch.Tensor]] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            decay=self.decay, warmup=self.warmup, every_n_steps=self.every_n_steps
        )

    @staticmethod
    def _members(pl_module: LightningModule) -> nn.ModuleList:
        return as_ensemble(pl_module, "MemberEMA").members

    def _ensure(self, pl_module: LightningModule) -> None:
        members = self._members(pl_module)
        trainable = getattr(pl_module, "trainable_members", list(range(len(members))))
        for i in trainable:
            if i not in self.emas:
                ema = ModelEmaV3(
                    members[i], decay=self.decay, use_warmup=self.warmup, device=pl_module.device
                )
                if i in self._restored:
                    ema.module.load_state_dict(self._restored.pop(i))
                self.emas[i] = ema

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # `global_step` counts optimizer steps: under gradient accumulation it stays put for several batches.
        if trainer.global_step <= self._latest_update_step or trainer.global_step % self.every_n_steps != 0:
            return
        self._latest_update_step = trainer.global_step
        members = self._members(pl_module)
        # under member-parallel training, only the members this process trains
        local = set(getattr(pl_module, "local_members", self.emas))
        for i, ema in self.emas.items():
            if i in local:
                ema.update(members[i], step=trainer.global_step)

    def _share(self, trainer: Trainer, members: bool = False) -> bool:
        """Under member-parallel training, give every process every member's EMA (and, with ``members``, its
        trained weights, so that what the swap backs up is current) from the process that trains that
        member. A collective, reached by every process in the same hooks.

        Returns:
            Whether anything was shared (only under member-parallel training).
        """
        from lightning_ensembles.distributed import MemberParallelStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, MemberParallelStrategy):
            return False
        if members:
            strategy.synchronize_members()
        strategy.broadcast_from_owners({i: ema.module for i, ema in self.emas.items()})
        return True

    # ------------------------------------------------------------------ evaluate with the EMA weights

    def _swap_in(self, pl_module: LightningModule) -> None:
        if not self.evaluate_with_ema or self._backup is not None:
            return
        self._ensure(pl_module)
        members = self._members(pl_module)
        self._backup = {}
        for i, ema in self.emas.items():
            self._backup[i] = {k: v.detach().clone() for k, v in members[i].state_dict().items()}
            members[i].load_state_dict(ema.module.state_dict())

    def _swap_out(self, pl_module: LightningModule) -> None:
        if self._backup is None:
            return
        members = self._members(pl_module)
        for i, state in self._backup.items():
            members[i].load_state_dict(state)
        self._backup = None

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure(pl_module)
        self._share(trainer, members=True)
        self._swap_in(pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure(pl_module)
        self._share(trainer, members=True)
        self._swap_in(pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure(pl_module)
        self._share(trainer, members=True)
        self._swap_in(pl_module)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint written while the EMA weights stand in (e.g. from a validation-end hook) must still
        # hold the trained weights under `state_dict`.
        if self._backup is not None:
            for i, state in self._backup.items():
                for key, value in state.items():
                    checkpoint["state_dict"][f"members.{i}.{key}"] = value
        # Under member-parallel training each process updates only the EMAs of the members it trains. Every
        # process runs this hook when a checkpoint is written (after `state_dict`, which stays local), so the
        # EMAs are shared here and the checkpoint gets every member's from its owner.
        states = checkpoint.get("callbacks")
        if self._share(trainer) and isinstance(states, dict):
            states[self.state_key] = self.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        restore_class_keyed_state(self, checkpoint)

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "latest_update_step": self._latest_update_step,
            "members": {  # with the restored EMAs of members not trained yet in this run
                **copy.deepcopy(self._restored),
                **{i: copy.deepcopy(ema.module.state_dict()) for i, ema in self.emas.items()},
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = int(state_dict.get("latest_update_step", 0))
        restored = {int(i): state for i, state in state_dict.get("members", {}).items()}
        for i, state in restored.items():
            if i in self.emas:
                self.emas[i].module.load_state_dict(state)
            else:
                self._restored[i] = state

    def ema_member(self, index: int) -> nn.Module:
        """The EMA copy of member ``index`` (a plain ``nn.Module``, e.g. for export).

        Args:
            index: a trainable member's index.

        Returns:
            The EMA module.

        Raises:
            KeyError: if the member has no EMA (frozen, or training has not started).
        """
        if index not in self.emas:
            raise KeyError(f"Member {index} has no EMA; members with one: {sorted(self.emas)}.")
        return self.emas[index].module
