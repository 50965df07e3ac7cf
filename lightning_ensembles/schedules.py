"""Learning-rate schedules of the published recipes that torch does not ship as one scheduler.

The EfficientNet schedule (Tan & Le 2019, arXiv 1905.11946, section 5.2: "learning rate ... decays by 0.97
every 2.4 epochs"), as timm's ``StepLRScheduler`` runs it in the EfficientNet-B2 recipe
(``--sched step --decay-epochs 2.4 --decay-rate .97 --warmup-lr 1e-6``, warm-up not a prefix): a linear
warm-up from ``warmup_lr`` over the first ``warmup_epochs`` epochs, then a staircase
``lr * decay_rate ** floor(epoch / decay_epochs)``. timm's scheduler is not a torch ``LRScheduler`` (Lightning
would need a custom ``lr_scheduler_step`` for it), so the same closed form is written here as one, stepped
once per epoch; tests check it against timm's and against the learning rate a Trainer actually uses.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from lightning_ensembles._validation import check_int

__all__ = ["StepDecayWithWarmup", "step_decay_with_warmup"]


def step_decay_with_warmup(
    base_lr: float, epoch: int, decay_epochs: float, decay_rate: float, warmup_epochs: int, warmup_lr: float
) -> float:
    """The learning rate of epoch ``epoch`` (from 0) of :class:`StepDecayWithWarmup`.

    Example:
        >>> [round(step_decay_with_warmup(0.064, e, 2.4, 0.97, 3, 1e-6), 6) for e in (0, 1, 3, 4, 5)]
        [1e-06, 0.021334, 0.06208, 0.06208, 0.060218]
    """
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    return base_lr * decay_rate ** math.floor(epoch / decay_epochs)


class StepDecayWithWarmup(LRScheduler):
    """Linear warm-up, then the learning rate times ``decay_rate`` every ``decay_epochs`` (a staircase).

    Step it once per epoch (``--model.lr_scheduler_interval epoch``, the default). Epoch ``e`` trains at
    ``warmup_lr + e * (lr - warmup_lr) / warmup_epochs`` while ``e < warmup_epochs``, then at
    ``lr * decay_rate ** floor(e / decay_epochs)``, ``lr`` being each parameter group's initial rate.

    Args:
        optimizer: the optimizer (one parameter group per member; each gets the same schedule).
        decay_epochs: epochs between decays (may be fractional: 2.4 for EfficientNet), > 0.
        decay_rate: the factor of each decay, in (0, 1].
        warmup_epochs: epochs of linear warm-up, >= 0 (0: none).
        warmup_lr: the learning rate of the first warm-up epoch, >= 0.
        last_epoch: the index of the last epoch when resuming (-1: start).

    Raises:
        ValueError: for an argument out of range, naming its flag.

    Example:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> schedule = StepDecayWithWarmup(optimizer, decay_epochs=2, decay_rate=0.5, warmup_epochs=2, warmup_lr=0.01)
        >>> rates = []
        >>> for _ in range(6):
        ...     rates.append(round(optimizer.param_groups[0]["lr"], 4))
        ...     optimizer.step()
        ...     schedule.step()
        >>> rates
        [0.01, 0.055, 0.05, 0.05, 0.025, 0.025]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay_epochs: float = 2.4,
        decay_rate: float = 0.97,
        warmup_epochs: int = 3,
        warmup_lr: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        flag = "--model.lr_scheduler.init_args"
        if not isinstance(decay_epochs, (int, float)) or isinstance(decay_epochs, bool) or decay_epochs <= 0:
            raise ValueError(f"Expected `{flag}.decay_epochs` to be a number > 0, but got {decay_epochs!r}.")
        if (
            not isinstance(decay_rate, (int, float))
            or isinstance(decay_rate, bool)
            or not 0 < decay_rate <= 1
        ):
            raise ValueError(f"Expected `{flag}.decay_rate` to be in (0, 1], but got {decay_rate!r}.")
        check_int(warmup_epochs, f"{flag}.warmup_epochs", 0)
        if not isinstance(warmup_lr, (int, float)) or isinstance(warmup_lr, bool) or warmup_lr < 0:
            raise ValueError(f"Expected `{flag}.warmup_lr` to be a number >= 0, but got {warmup_lr!r}.")
        self.decay_epochs = float(decay_epochs)
        self.decay_rate = float(decay_rate)
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = float(warmup_lr)
        super().__init__(optimizer, last_epoch)

    @override
    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            step_decay_with_warmup(
                float(base),
                self.last_epoch,
                self.decay_epochs,
                self.decay_rate,
                self.warmup_epochs,
                self.warmup_lr,
            )
            for base in self.base_lrs
        ]
