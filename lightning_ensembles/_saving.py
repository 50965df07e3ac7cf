"""The checkpoint format of :class:`~lightning_ensembles.EnsembleLightningModule` (as Lightning keeps
``core/saving.py`` beside ``core/module.py``).

What a checkpoint holds beyond Lightning's own keys, and how it is read back:

- ``lightning_ensembles_rng``: torch's, Python's, numpy's (and CUDA's) random states, restored only when
  resuming a fit, so that a resumed run draws the same dropout masks and augmentations;
- ``lightning_ensembles_input_shape``: one sample's shape, so export and cost callbacks need no
  ``--input_shape``;
- the members' architecture as data in the hyperparameters (a class path and plain arguments), so that
  ``load_from_checkpoint(path)`` and ``from_checkpoints`` rebuild Python-built ensembles without arguments.

Everything loads with ``torch.load(weights_only=True)``. Older checkpoints (no numpy state, no temperatures,
temperatures at their old keys) load too.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_ensembles._compat import CLI_INSTANTIATOR_KEY
from lightning_ensembles._validation import check_checkpoint_file
from lightning_ensembles.members import (
    MemberFactory,
    MemberSpec,
    describe_factory,
    is_plain_data,
    load_member_state_dicts,
    load_member_weights,
)

if TYPE_CHECKING:
    from lightning_ensembles.module import EnsembleLightningModule

__all__ = [
    "CheckpointFormat",
    "INPUT_SHAPE_KEY",
    "NameUnreadableCheckpoint",
    "RNG_KEY",
    "check_loadable",
    "combine_checkpoints",
    "record_factories",
    "restore",
    "save",
]

log = logging.getLogger(__name__)

RNG_KEY = "lightning_ensembles_rng"
INPUT_SHAPE_KEY = "lightning_ensembles_input_shape"


class CheckpointFormat:
    """The checkpoint half of :class:`~lightning_ensembles.EnsembleLightningModule`, a mixin placed before
    ``LightningModule`` (as Lightning composes ``LightningModule`` from ``CheckpointHooks`` and others): the
    extra keys on save and load, the checks before ``load_from_checkpoint``, and ``from_checkpoints``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save(cast("EnsembleLightningModule", self), checkpoint)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ) -> EnsembleLightningModule:
        """Lightning's ``load_from_checkpoint``, after checking that the file is a readable checkpoint.

        Args:
            checkpoint_path: the checkpoint file (or a URL, left to Lightning).
            *args: forwarded to ``LightningModule.load_from_checkpoint``.
            **kwargs: forwarded too (``member=``/``members=`` for a Python-built ensemble, ``map_location``...).

        Returns:
            The module with the checkpoint's weights.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if it is truncated, corrupted or not loadable with ``weights_only=True`` (unless
                ``weights_only=False`` is passed), naming the file.
        """
        check_loadable(checkpoint_path, kwargs, LightningModule.CHECKPOINT_HYPER_PARAMS_KEY)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc,no-any-return]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore(cast("EnsembleLightningModule", self), checkpoint)

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[str | os.PathLike[str]],
        member: MemberFactory | None = None,
        members: Sequence[MemberSpec] | None = None,
        **kwargs: Any,
    ) -> EnsembleLightningModule:
        """Combine separately trained checkpoints into one ensemble.

        Every member found in the checkpoints, in order, becomes a member of the new ensemble.

        Args:
            checkpoints: Lightning checkpoints of ensemble modules (any number of members each) or plain
                member ``state_dict`` files.
            member: the architecture of every member (a factory), or
            members: one factory per member found in the checkpoints (mixed architectures). With neither,
                each checkpoint's recorded architecture is used (CLI checkpoints, and Python-built ensembles
                whose factories are classes or partials of them with plain arguments).
            **kwargs: the other arguments of :class:`EnsembleLightningModule`; ``num_classes`` defaults to
                the checkpoints' when they record one.

        Returns:
            The combined ensemble, weights loaded.

        Raises:
            ValueError: if ``checkpoints`` is empty, the factory count differs from the member count, or a
                checkpoint comes from another architecture (naming the checkpoint and member).
        """
        return combine_checkpoints(cls, checkpoints, member, members, kwargs)  # type: ignore[arg-type]


def save(module: EnsembleLightningModule, checkpoint: dict[str, Any]) -> None:
    """Add the random states and the input shape to ``checkpoint`` (``on_save_checkpoint``)."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint[RNG_KEY] = rng
    if module.input_shape is not None:
        checkpoint[INPUT_SHAPE_KEY] = list(module.input_shape)


def restore(module: EnsembleLightningModule, checkpoint: dict[str, Any]) -> None:
    """Check the member count, and restore the input shape and (when resuming a fit) the random states
    (``on_load_checkpoint``).

    Raises:
        ValueError: if the checkpoint holds another number of members than ``module``.
    """
    saved = len({k.split(".")[1] for k in checkpoint.get("state_dict", {}) if k.startswith("members.")})
    if saved and saved != len(module.members):
        raise ValueError(
            f"The checkpoint holds {saved} members but this module has {len(module.members)}: build the "
            f"module with `num_members={saved}` (or the matching `members` list)."
        )
    shape = checkpoint.get(INPUT_SHAPE_KEY)
    if shape is not None and module.input_shape is None:
        module.record_input_shape(shape)
    rng = checkpoint.get(RNG_KEY)
    # Restore the random state only when resuming training, so that a resumed run draws the same dropout
    # masks and augmentations as an uninterrupted one (numpy's too: timm's Mixup and CutMix draw from
    # np.random); loading for evaluation leaves it alone. Checkpoints written before numpy's state was saved
    # resume without it.
    if rng is not None and module._trainer is not None and module.trainer.state.fn == "fit":
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_random_state(rng["python"]))
        if "numpy" in rng:
            _set_numpy_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])


def check_loadable(checkpoint_path: str | os.PathLike[str], kwargs: dict[str, Any], hparams_key: str) -> None:
    """Before Lightning's ``load_from_checkpoint``: the file is a readable checkpoint, and its members can be
    rebuilt (a recorded architecture, or ``member=``/``members=`` in ``kwargs``).

    Sets ``kwargs["weights_only"]`` to ``True`` unless given.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is truncated, corrupted or not loadable with ``weights_only=True``, or records no
            architecture and none is given, naming the file.
    """
    kwargs.setdefault("weights_only", True)  # explicit, whatever torch's default
    if kwargs["weights_only"] is False:
        return
    checkpoint = check_checkpoint_file(checkpoint_path, "checkpoint_path")
    given = any(kwargs.get(key) is not None for key in ("member", "members"))
    hparams = checkpoint.get(hparams_key) if isinstance(checkpoint, dict) else None
    if isinstance(checkpoint, dict) and not given and not recorded_architecture(hparams):
        raise ValueError(
            f"Cannot load {os.fspath(checkpoint_path)!r} without `member=`: {PYTHON_FACTORY_HINT}"
        )


def combine_checkpoints(
    cls: type[EnsembleLightningModule],
    checkpoints: Sequence[str | os.PathLike[str]],
    member: MemberFactory | None,
    members: Sequence[MemberSpec] | None,
    kwargs: dict[str, Any],
) -> EnsembleLightningModule:
    """:meth:`EnsembleLightningModule.from_checkpoints`: every member of ``checkpoints``, in order, in one
    new ensemble of class ``cls``."""
    if not checkpoints:
        raise ValueError("Expected `checkpoints` to name at least one checkpoint file, but got none.")
    per_checkpoint = [(os.fspath(path), load_member_state_dicts(path)) for path in checkpoints]
    found = [(path, j, state) for path, states in per_checkpoint for j, state in enumerate(states)]
    if member is None and members is None:
        members, num_classes = recorded_members([(path, len(states)) for path, states in per_checkpoint])
        if kwargs.get("num_classes") is None and num_classes is not None:
            kwargs["num_classes"] = num_classes
    if members is not None and len(members) != len(found):
        raise ValueError(
            f"Expected one entry of `members` per member in the checkpoints ({len(found)}), but got {len(members)}."
        )
    if member is not None:
        kwargs["num_members"] = len(found)
    module = cls(member=member, members=list(members) if members is not None else None, **kwargs)
    for i, (path, j, state) in enumerate(found):
        load_member_weights(module.members[i], state, f"member {j} of checkpoint {path!r}")
    return module


def record_factories(hparams: Any) -> None:
    """Keep ``member``/``members`` given in Python as data (class path and arguments) where they are a class
    or a ``functools.partial`` of one with plain arguments, so ``load_from_checkpoint(path)`` needs no
    arguments, as for CLI checkpoints; then drop every other hyperparameter that is code, not data (lambdas,
    local classes, optimizers), so checkpoints stay ``weights_only=True``-loadable. Under LightningCLI the
    hyperparameters are config dicts and kept."""
    for key in ("member", "members"):
        value = hparams.get(key)
        if value is None or is_plain_data(value):
            continue
        described: Any = [describe_factory(v) for v in value] if key == "members" else describe_factory(value)
        if described is not None and (key == "member" or all(d is not None for d in described)):
            hparams[key] = described
    for key in [k for k, v in hparams.items() if not is_plain_data(v)]:
        del hparams[key]


def recorded_members(checkpoints: list[tuple[str, int]]) -> tuple[list[Any], int | None]:
    """The member specs and ``num_classes`` recorded in each checkpoint's hyperparameters, one per member.

    Args:
        checkpoints: each checkpoint file with the number of members whose weights it holds.
    """
    specs: list[Any] = []
    classes: set[int] = set()
    for path, count in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        hparams = (
            checkpoint.get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY)
            if isinstance(checkpoint, dict)
            else None
        )
        if not isinstance(hparams, dict):
            raise ValueError(
                f"Expected `member=` or `members=` to say how to build the members of {path!r}: it is a plain "
                "state_dict, which records no architecture."
            )
        if hparams.get("member") is None and hparams.get("members") is None:
            raise ValueError(
                f"Cannot combine {path!r} without `member=` or `members=`: {PYTHON_FACTORY_HINT}"
            )
        recorded = hparams["members"] if hparams.get("members") is not None else [hparams["member"]] * count
        if len(recorded) != count:
            raise ValueError(
                f"Checkpoint {path!r} records {len(recorded)} members but holds weights for {count}."
            )
        specs.extend(recorded)
        if isinstance(hparams.get("num_classes"), int):
            classes.add(hparams["num_classes"])
    return specs, classes.pop() if len(classes) == 1 else None


def recorded_architecture(hparams: Any) -> bool:
    return isinstance(hparams, dict) and (
        hparams.get("member") is not None
        or hparams.get("members") is not None
        or CLI_INSTANTIATOR_KEY in hparams
    )


PYTHON_FACTORY_HINT = (
    "its members were built in Python from a factory that is code, not data (a lambda, a local function or "
    "class, a class defined in a script's __main__, or a partial holding objects), so the checkpoint cannot "
    "rebuild them. Pass the factory again, e.g. `EnsembleLightningModule.load_from_checkpoint(path, "
    "member=MyNet)`, or build members from an importable nn.Module class (or a functools.partial of one "
    "with plain arguments), which checkpoints record."
)


class NameUnreadableCheckpoint(Callback):
    """When ``Trainer.fit/validate/test(ckpt_path=...)`` fails, say whether the checkpoint is the cause.

    Lightning reports a truncated or corrupted checkpoint as a bare ``OSError: [Errno 22] Invalid argument``
    with no path, and restores it after every hook a module could check it in. This adds a note to the
    exception naming the file and what is wrong with it; the exception itself, and Lightning's teardown, are
    unchanged.
    """

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        ckpt_path = trainer.ckpt_path
        if ckpt_path is None or not isinstance(exception, Exception):
            return
        try:
            check_checkpoint_file(ckpt_path, "ckpt_path")
        except (ValueError, FileNotFoundError) as err:
            if hasattr(exception, "add_note"):  # Python >= 3.11
                exception.add_note(str(err))
            else:
                log.error("%s", err)


def _numpy_state() -> dict[str, Any]:
    """numpy's global random state as plain values and a tensor, so that ``weights_only=True`` loads it."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_numpy_state` saved."""
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["kind"], keys, state["position"], state["has_gauss"], state["cached_gaussian"])
    )


def _as_random_state(state: Any) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
