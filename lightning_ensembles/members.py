"""Building, seeding, combining and extracting ensemble members.

Kondratyuk et al. 2020 train members that differ only in their random initialisation. Member ``i`` is built
under seed ``seed + i`` inside an isolated RNG context, so its weights depend on nothing but its own seed:
the global RNG is left as it was, and member 3 comes out the same whether or not members 0-2 were built.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a Lightning checkpoint of an
:class:`~lightning_ensembles.EnsembleLightningModule` (any number of members), or a plain ``state_dict`` of a
single member saved with ``torch.save(model.state_dict(), path)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

MemberFactory = Callable[[], nn.Module]
"""Anything that returns a fresh member when called: a class, a ``functools.partial``, a LightningCLI
``class_path``/``init_args`` entry."""

MemberSpec = MemberFactory | nn.Module
StateDict = dict[str, Tensor]

MEMBERS_PREFIX = "members."


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
