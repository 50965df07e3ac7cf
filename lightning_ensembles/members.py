"""Building, seeding, combining and extracting ensemble members.

Kondratyuk et al. 2020 train members that differ only in their random initialisation. Member ``i`` is built
under seed ``seed + i`` inside an isolated RNG context, so its weights depend on nothing but its own seed:
the global RNG is left as it was, and member 3 comes out the same whether or not members 0-2 were built.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a Lightning checkpoint of an
:class:`~lightning_ensembles.EnsembleLightningModule` (any number of members), or a plain ``state_dict`` of a
single member saved with ``torch.save(model.state_dict(), path)``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_ensembles._validation import check_int

__all__ = [
    "MEMBERS_PREFIX",
    "MemberFactory",
    "MemberSpec",
    "StateDict",
    "build_member",
    "build_members",
    "check_frozen",
    "check_member_optimizer",
    "describe_factory",
    "is_plain_data",
    "load_member_state_dicts",
    "load_member_weights",
    "member_specs",
    "resolve_member_spec",
    "split_member_state_dicts",
    "stack_member_logits",
]

MemberFactory = Callable[[], nn.Module]
"""Anything that returns a fresh member when called: a class, a ``functools.partial``, a LightningCLI
``class_path``/``init_args`` entry."""

MemberSpec = MemberFactory | nn.Module | str
"""A factory, an already-built module, or a timm model name (``"resnet18"``: a
:class:`~lightning_ensembles.models.TimmModel`)."""
StateDict = dict[str, Tensor]

MEMBERS_PREFIX = "members."


_PLAIN = (type(None), bool, int, float, str)


def is_plain_data(value: Any) -> bool:
    """Whether ``value`` is data a checkpoint can hold and ``torch.load(weights_only=True)`` reads back: None,
    bools, numbers, strings, and lists, tuples and str-keyed dicts of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_data(v) for k, v in value.items())
    return False


def _target_class(spec: Any) -> type | None:
    """The class a factory builds: the class itself, a ``functools.partial`` of it, or jsonargparse's
    partial (``partial(call_without_instantiate_context, instantiator, cls, **init_args)``)."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, functools.partial):
        if isinstance(spec.func, type):
            return spec.func
        classes = [a for a in spec.args if isinstance(a, type) and issubclass(a, nn.Module)]
        return classes[0] if len(classes) == 1 else None
    return None


def _class_from_path(class_path: str, where: str) -> type[nn.Module]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"Expected {where} `class_path` to name an importable class, but got {class_path!r}: {err}"
        ) from err
    # Only nn.Module classes are built from recorded data: a checkpoint cannot make this call anything else.
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Expected {where} `class_path` to name an nn.Module class, but got {class_path!r}.")
    return cls


def resolve_member_spec(spec: Any, num_classes: int | None, where: str = "`member`") -> Any:
    """Turn what the user gave into a factory, and let it build ``num_classes`` outputs where it is unset.

    - a timm model name (``"resnet18"``) becomes ``TimmModel(model_name, num_classes=num_classes)``;
    - a recorded factory ``{"class_path": ..., "init_args": {...}}`` (from a checkpoint's hyperparameters, see
      :func:`describe_factory`) becomes ``functools.partial(cls, **init_args)``; only ``nn.Module`` classes;
    - a factory whose class takes ``num_classes`` and leaves it ``None`` (``TimmModel``'s default, timm's 1000)
      gets the ensemble's ``num_classes``, so ``--data.num_classes`` reaches the members;
    - anything else (a factory that sets ``num_classes``, a lambda, a module) is returned as it is.

    Args:
        spec: the member spec.
        num_classes: the ensemble's ``C``.
        where: how the spec is named in errors.

    Returns:
        The spec to build from.

    Example:
        >>> from lightning_ensembles.models import TimmModel
        >>> factory = resolve_member_spec(functools.partial(TimmModel, "test_efficientnet"), 7)
        >>> factory.keywords["num_classes"]
        7
    """
    if isinstance(spec, str):
        from lightning_ensembles.models.timm_member import TimmModel, timm_pretrained_cfg

        timm_pretrained_cfg(spec, where.strip("`"))  # an unknown name fails here, with close names suggested
        return functools.partial(TimmModel, model_name=spec, num_classes=num_classes)
    if isinstance(spec, Mapping) and "class_path" in spec:
        init_args = dict(spec.get("init_args") or {})
        spec = functools.partial(_class_from_path(str(spec["class_path"]), where), **init_args)
    if num_classes is None:
        return spec
    cls = _target_class(spec)
    if cls is None:
        return spec
    try:
        parameter = inspect.signature(cls).parameters.get("num_classes")
    except (TypeError, ValueError):
        return spec
    if parameter is None:
        return spec
    given = (
        spec.keywords.get("num_classes", parameter.default)
        if isinstance(spec, functools.partial)
        else parameter.default
    )
    if given is None:
        return functools.partial(spec, num_classes=num_classes)
    return spec


def describe_factory(spec: Any) -> dict[str, Any] | str | None:
    """A factory as data (``{"class_path": ..., "init_args": {...}}``), to store in a checkpoint's hyperparameters.

    Recorded: a timm model name, an importable ``nn.Module`` class, or a ``functools.partial`` of one whose
    arguments are plain data (numbers, strings, lists, dicts). Everything else (a lambda, a local class, a
    partial holding an object) is code, not data: ``None``, and the checkpoint must be loaded with the
    factory passed again. Checkpoints stay loadable with ``weights_only=True``.

    Example:
        >>> from lightning_ensembles.models import WideResNet
        >>> describe_factory(functools.partial(WideResNet, depth=10, width=1))
        {'class_path': 'lightning_ensembles.models.wide_resnet.WideResNet', 'init_args': {'depth': 10, 'width': 1}}
        >>> describe_factory(lambda: nn.Linear(2, 2)) is None
        True
    """
    if isinstance(spec, str) or (isinstance(spec, Mapping) and is_plain_data(spec)):
        return spec  # type: ignore[return-value]
    cls = spec if isinstance(spec, type) else spec.func if isinstance(spec, functools.partial) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or "<" in cls.__qualname__:
        return None
    if cls.__module__ == "__main__":
        return None  # a script's class cannot be imported by the process that loads the checkpoint
    init_args: dict[str, Any] = {}
    if isinstance(spec, functools.partial):
        try:
            bound = inspect.signature(cls).bind_partial(*spec.args, **spec.keywords)
        except TypeError:
            return None
        init_args = dict(bound.arguments)
        if not is_plain_data(init_args):
            return None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_member(spec: MemberSpec, seed: int, index: int = 0) -> nn.Module:
    """Build one member under ``seed`` without touching the global RNG state.

    Args:
        spec: a factory called with no arguments, or an ``nn.Module`` used as it is (already initialised).
        seed: the seed torch, numpy and ``random`` are set to while the factory runs.
        index: the member's position, for error messages.

    Returns:
        The member.

    Raises:
        TypeError: if the factory returns something that is not an ``nn.Module``.

    Example:
        >>> a = build_member(lambda: nn.Linear(2, 2), seed=7)
        >>> b = build_member(lambda: nn.Linear(2, 2), seed=7)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise TypeError(
            f"Expected member {index} to be an nn.Module or a callable returning one (`--model.member` / "
            f"`--model.members`), but got {type(spec).__name__}: {spec!r}."
        )
    with isolate_rng():
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        member = spec()
    if not isinstance(member, nn.Module):
        raise TypeError(
            f"Expected the factory of member {index} ({spec!r}) to return an nn.Module, "
            f"but it returned {type(member).__name__}."
        )
    return member


def build_members(specs: Sequence[MemberSpec], seed: int, first_index: int = 0) -> list[nn.Module]:
    """Build members ``first_index, first_index + 1, ...`` with seeds ``seed + index``.

    Args:
        specs: one factory or module per member.
        seed: the base seed.
        first_index: the index of the first member built (used when growing an ensemble).

    Returns:
        The members, in order.
    """
    return [build_member(spec, seed + first_index + j, first_index + j) for j, spec in enumerate(specs)]


def split_member_state_dicts(
    state_dict: Mapping[str, Tensor], prefix: str = MEMBERS_PREFIX
) -> list[StateDict]:
    """Split an ensemble's ``state_dict`` into one ``state_dict`` per member.

    Args:
        state_dict: keys of the form ``members.{i}.<param>`` (other keys are ignored).
        prefix: the prefix of the member list.

    Returns:
        One ``state_dict`` per member, in index order.

    Raises:
        ValueError: if no member keys are found or member indices have gaps.

    Example:
        >>> sd = {"members.0.w": torch.zeros(1), "members.1.w": torch.ones(1)}
        >>> [list(s) for s in split_member_state_dicts(sd)]
        [['w'], ['w']]
    """
    members: dict[int, StateDict] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix) :].partition(".")
        if not index.isdigit():
            continue
        members.setdefault(int(index), {})[name] = value
    if not members:
        raise ValueError(f"Found no member weights (keys starting with {prefix!r}) in the state dict.")
    if sorted(members) != list(range(len(members))):
        raise ValueError(f"Member indices in the state dict are not contiguous: {sorted(members)}.")
    return [members[i] for i in range(len(members))]


def load_member_state_dicts(path: str | os.PathLike[str]) -> list[StateDict]:
    """Read member weights from a checkpoint file, with ``weights_only=True``.

    Args:
        path: a Lightning checkpoint of an ensemble module (any number of members), or a plain member
            ``state_dict`` saved with ``torch.save``.

    Returns:
        One ``state_dict`` per member found in the file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file cannot be read safely or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the cause
        raise ValueError(f"Could not read checkpoint {path!r} with weights_only=True: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict.")
    state_dict = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith(MEMBERS_PREFIX) for key in state_dict):
        return split_member_state_dicts(state_dict)
    if not state_dict or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"Checkpoint {path!r} holds no member weights.")
    return [dict(state_dict)]


def load_member_weights(member: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Load weights into a member strictly, with an error that says where they came from.

    Args:
        member: the freshly built member.
        state_dict: its weights.
        source: a description of where the weights come from, e.g. ``"member 1 of ckpt.pt"``.

    Raises:
        ValueError: if the keys or shapes do not match the member's architecture.
    """
    try:
        member.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"The weights of {source} do not fit member architecture {type(member).__name__}: "
            f"the checkpoint comes from another architecture. {err}"
        ) from err


def member_specs(
    member: MemberSpec | None, num_members: int | None, members: Sequence[MemberSpec] | None
) -> list[MemberSpec]:
    """One spec per member from the constructor's ``member``/``num_members`` or ``members``.

    Raises:
        ValueError: naming the flags, for neither or both of ``member`` and ``members``, an empty list, a
            ``num_members`` that disagrees with the list, or one module instance asked for several members.
    """
    if num_members is not None:
        check_int(num_members, "--model.num_members", 1)
    if (member is None) == (members is None):
        raise ValueError(
            "Expected exactly one of `--model.member` (one factory, repeated `--model.num_members` "
            "times) or `--model.members` (a list, one per member), but got "
            + ("neither." if member is None else "both.")
        )
    if members is not None:
        members = list(members)
        if not members:
            raise ValueError("Expected `--model.members` to hold at least one member, but got [].")
        if num_members is not None and num_members != len(members):
            raise ValueError(
                f"Expected `--model.num_members` to equal the {len(members)} entries of "
                f"`--model.members` (or be left unset), but got {num_members}."
            )
        return members
    if isinstance(member, nn.Module) and (num_members or 1) > 1:
        raise ValueError(
            "Expected `member` to be a factory when `num_members` > 1 (an nn.Module instance cannot be "
            f"initialised independently {num_members} times), but got a {type(member).__name__} module."
        )
    return [member] * (num_members or 1)  # type: ignore[list-item]


def check_frozen(frozen_members: Sequence[int], num_members: int) -> tuple[int, ...]:
    """The sorted distinct indices of ``frozen_members``, which must leave at least one member to train.

    Raises:
        ValueError: for an index outside ``[0, num_members)`` or every member frozen.
    """
    frozen = tuple(sorted(set(int(i) for i in frozen_members)))
    bad = [i for i in frozen if not 0 <= i < num_members]
    if bad or len(frozen) == num_members:
        raise ValueError(
            f"Expected `--model.frozen_members` to be distinct member indices in [0, {num_members}) "
            f"that leave at least one member to train, but got {list(frozen_members)}."
        )
    return frozen


def stack_member_logits(outputs: list[Tensor], indices: Sequence[int], num_classes: int) -> Tensor:
    """The members' logits ``(B, C)`` stacked to ``(M, B, C)``, after checking each one's shape.

    Raises:
        ValueError: naming the first member whose output is not ``(B, num_classes)``, with every member's shape.
    """
    expected = (outputs[0].shape[0], num_classes)
    for i, out in zip(indices, outputs):
        if not isinstance(out, Tensor) or out.ndim != 2 or tuple(out.shape) != expected:
            shapes = {f"member {j}": tuple(o.shape) for j, o in zip(indices, outputs)}
            raise ValueError(
                f"Expected every member to output logits of shape (B, C) = {expected} "
                f"(C = `--model.num_classes`, linked from `--data.num_classes`), but member {i} gave "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; "
                f"member outputs: {shapes}. A member whose own num_classes is set (e.g. "
                "`--model.member.init_args.num_classes`) must match; leave it unset (null) where the "
                "member takes it from the ensemble."
            )
    return torch.stack(outputs)


def check_member_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Refuse an optimizer that would couple the members it was given one parameter group each.

    Raises:
        ValueError: naming ``--model.optimizer``, if it regrouped the parameters, or if it rescales gradients
            by a global norm over all groups (``max_grad_norm``, ``clip_threshold_global``) with several
            members.
    """
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != len(groups) or any(
        {id(p) for p in g["params"]} != {id(p) for p in expected["params"]}
        for g, expected in zip(optimizer.param_groups, groups)
    ):
        raise ValueError(
            f"Expected `--model.optimizer` ({name}) to keep the {len(groups)} parameter groups it is given "
            f"(one per member), but it has {len(optimizer.param_groups)} groups that do not match them."
        )
    if len(groups) > 1:
        for key in ("max_grad_norm", "clip_threshold_global"):
            if optimizer.defaults.get(key) not in (None, 0, 0.0):
                raise ValueError(
                    f"`--model.optimizer` {name} has {key}={optimizer.defaults[key]!r}, which rescales "
                    "gradients by their global norm across all parameter groups and so couples ensemble "
                    f"members. Set {key}=None and use `--trainer.gradient_clip_val`, which clips each "
                    "member separately."
                )
