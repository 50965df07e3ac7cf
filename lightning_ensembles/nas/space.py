"""The search space of the NAS recipe: per-stage choices of MnasNet/EfficientNet-style architectures.

The third experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), searches architectures under a cost budget. The space follows the
factorised hierarchical space of MnasNet (Tan et al., *MnasNet: Platform-Aware Neural Architecture Search for
Mobile*, CVPR 2019, arXiv 1807.11626), as used by EfficientNet (Tan & Le, ICML 2019, arXiv 1905.11946): a
fixed stem and head, and a fixed number of stages, each of which chooses on its own the kernel size of its
depthwise convolutions, the expansion ratio of its inverted bottlenecks, the number of blocks, its output
channels, and whether its blocks use squeeze-and-excitation; the stride of each stage is fixed by the space.

A :class:`NASSearchSpace` samples a :class:`~lightning_ensembles.models.NASArchitecture` from an Optuna trial;
the architecture builds the member, :class:`~lightning_ensembles.models.NASNet`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lightning_ensembles._validation import check_int

# The member's own field rules, so that a space offers only what the member accepts.
from lightning_ensembles.models.nas import (
    NASArchitecture,
    StageArch,
    _check_bool,
    _check_kernel,
    _check_stride,
)

__all__ = ["NASSearchSpace", "StageSpace"]

_SPACE_FLAG = "--search.space"


class TrialLike(Protocol):
    """What :meth:`NASSearchSpace.sample` needs of an Optuna trial (``Trial``, ``FixedTrial``)."""

    def suggest_int(self, name: str, low: int, high: int) -> int: ...  # noqa: D102

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...  # noqa: D102


def _check_choices(values: object, flag: str, check: Any, what: str) -> tuple[Any, ...]:
    """A non-empty list of distinct valid choices, returned as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"Expected `{flag}` to be a non-empty list of {what}, but got {values!r}.")
    for i, value in enumerate(values):
        check(value, f"{flag}[{i}]")
    if len(set(values)) != len(values):
        raise ValueError(f"Expected `{flag}` to hold distinct {what}, but got {list(values)!r}.")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class StageSpace:
    """The choices of one stage of the search space.

    Args:
        channels: Output channel choices.
        stride: The stage's stride (fixed, 1 or 2).
        kernel_sizes: Depthwise kernel size choices (odd ints).
        expand_ratios: Expansion ratio choices (ints >= 1; 1 is a depthwise-separable block).
        min_blocks: Fewest blocks.
        max_blocks: Most blocks (``>= min_blocks``).
        se: Squeeze-and-excitation choices: ``[false, true]``, or one of them to fix it.

    Raises:
        ValueError: If a choice list is empty, holds an invalid or repeated value, or the bounds contradict
            each other, naming the ``--search.space.stages[i].*`` field.
    """

    channels: Sequence[int]
    stride: int = 1
    kernel_sizes: Sequence[int] = (3, 5)
    expand_ratios: Sequence[int] = (3, 6)
    min_blocks: int = 1
    max_blocks: int = 3
    se: Sequence[bool] = (False, True)

    def __post_init__(self) -> None:
        self.check(f"{_SPACE_FLAG}.stages[?]")

    def check(self, flag: str) -> None:
        """Validate every field, normalising the choice lists to tuples.

        Args:
            flag: The prefix named in error messages.

        Raises:
            ValueError: As described for the class.
        """
        set_ = functools.partial(object.__setattr__, self)
        set_("channels", _check_choices(self.channels, f"{flag}.channels", _check_positive, "ints >= 1"))
        _check_stride(self.stride, f"{flag}.stride")
        set_(
            "kernel_sizes",
            _check_choices(self.kernel_sizes, f"{flag}.kernel_sizes", _check_kernel, "odd ints"),
        )
        set_(
            "expand_ratios",
            _check_choices(self.expand_ratios, f"{flag}.expand_ratios", _check_positive, "ints >= 1"),
        )
        set_("se", _check_choices(self.se, f"{flag}.se", _check_bool, "booleans"))
        check_int(self.min_blocks, f"{flag}.min_blocks", 1)
        check_int(self.max_blocks, f"{flag}.max_blocks", 1)
        if self.min_blocks > self.max_blocks:
            raise ValueError(
                f"Expected `{flag}.min_blocks` ({self.min_blocks}) to be <= `{flag}.max_blocks` "
                f"({self.max_blocks}), but they contradict each other: no number of blocks satisfies both."
            )

    @property
    def size(self) -> int:
        """Number of distinct stage architectures."""
        return (
            len(self.channels)
            * len(self.kernel_sizes)
            * len(self.expand_ratios)
            * (self.max_blocks - self.min_blocks + 1)
            * len(self.se)
        )


def _check_positive(value: object, flag: str) -> int:
    return check_int(value, flag, 1)


@dataclasses.dataclass(frozen=True)
class NASSearchSpace:
    """The search space: a fixed stem and head, and per-stage choices (:class:`StageSpace`).

    Args:
        stages: One :class:`StageSpace` per stage, input to output.
        stem_channels: Output channels of the stem (fixed).
        num_features: Channels of the head convolution (fixed).

    Raises:
        ValueError: For an empty or contradictory space, naming the ``--search.space.*`` field and value.

    Example:
        >>> import optuna
        >>> space = NASSearchSpace(
        ...     stages=[StageSpace(channels=[8, 16], expand_ratios=[1]), StageSpace(channels=[24], stride=2)],
        ...     stem_channels=8, num_features=64)
        >>> space.size
        576
        >>> arch = space.sample(optuna.trial.FixedTrial(space.params_of(space.smallest())))
        >>> arch == space.smallest(), arch.block_strings()
        (True, [['ds_r1_k3_s1_c8'], ['ir_r1_k3_s2_e3_c24']])
    """

    stages: Sequence[StageSpace]
    stem_channels: int = 16
    num_features: int = 256

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(
                f"Expected `{_SPACE_FLAG}.stages` to be a non-empty list of stages (each with its choices), "
                f"but got {stages!r}."
            )
        checked = []
        for i, stage in enumerate(stages):
            flag = f"{_SPACE_FLAG}.stages[{i}]"
            if isinstance(stage, Mapping):
                try:
                    stage = StageSpace(**stage)
                except TypeError as err:
                    raise ValueError(
                        f"Expected `{flag}` to have the fields of StageSpace, but: {err}."
                    ) from err
                except ValueError as err:
                    raise ValueError(str(err).replace(f"{_SPACE_FLAG}.stages[?]", flag)) from err
            if not isinstance(stage, StageSpace):
                raise ValueError(f"Expected `{flag}` to be a StageSpace or a mapping, but got {stage!r}.")
            stage.check(flag)
            checked.append(stage)
        object.__setattr__(self, "stages", tuple(checked))
        check_int(self.stem_channels, f"{_SPACE_FLAG}.stem_channels", 1)
        check_int(self.num_features, f"{_SPACE_FLAG}.num_features", 1)

    @property
    def size(self) -> int:
        """Number of distinct architectures in the space."""
        return math.prod(stage.size for stage in self.stages)

    def _architecture(self, choose: Any) -> NASArchitecture:
        stages = []
        for i, stage in enumerate(self.stages):
            stages.append(
                StageArch(
                    channels=choose(i, "channels", stage.channels),
                    num_blocks=choose(i, "num_blocks", (stage.min_blocks, stage.max_blocks)),
                    kernel_size=choose(i, "kernel_size", stage.kernel_sizes),
                    expand_ratio=choose(i, "expand_ratio", stage.expand_ratios),
                    se=choose(i, "se", stage.se),
                    stride=stage.stride,
                )
            )
        return NASArchitecture(tuple(stages), self.stem_channels, self.num_features)

    def sample(self, trial: TrialLike) -> NASArchitecture:
        """Draw an architecture with ``trial.suggest_*`` (parameters ``stage{i}.{field}``).

        Args:
            trial: An Optuna ``Trial`` (or ``FixedTrial``, to rebuild a known architecture).

        Returns:
            The architecture.
        """

        def choose(i: int, field: str, choices: Sequence[Any]) -> Any:
            name = f"stage{i}.{field}"
            if field == "num_blocks":
                return trial.suggest_int(name, choices[0], choices[1])
            return trial.suggest_categorical(name, list(choices))

        return self._architecture(choose)

    def smallest(self) -> NASArchitecture:
        """The architecture with the smallest choice everywhere: the fewest multiply-adds of the space.

        Every choice (channels, blocks, kernel size, expansion, squeeze-excite) only adds computation, so the
        element-wise smallest architecture is also the cheapest one.

        Returns:
            The architecture.
        """
        return self._architecture(lambda i, field, choices: min(choices))

    def largest(self) -> NASArchitecture:
        """The architecture with the largest choice everywhere: the most multiply-adds of the space.

        Returns:
            The architecture.
        """
        return self._architecture(lambda i, field, choices: max(choices))

    def params_of(self, architecture: NASArchitecture) -> dict[str, Any]:
        """The trial parameters that :meth:`sample` turns into ``architecture``.

        Args:
            architecture: An architecture of this space.

        Returns:
            ``{"stage0.channels": ..., ...}``, for ``optuna.trial.FixedTrial`` or ``study.enqueue_trial``.

        Raises:
            ValueError: If ``architecture`` is not in the space, naming the first stage field that is not.
        """
        if len(architecture.stages) != len(self.stages):
            raise ValueError(
                f"Expected an architecture with the space's {len(self.stages)} stages, but it has "
                f"{len(architecture.stages)}."
            )
        params: dict[str, Any] = {}
        for i, (arch, space) in enumerate(zip(architecture.stages, self.stages)):
            allowed = {
                "channels": space.channels,
                "num_blocks": range(space.min_blocks, space.max_blocks + 1),
                "kernel_size": space.kernel_sizes,
                "expand_ratio": space.expand_ratios,
                "se": space.se,
            }
            for field, choices in allowed.items():
                value = getattr(arch, field)
                if value not in choices:
                    raise ValueError(
                        f"Expected stage {i} `{field}` to be one of the space's choices {list(choices)}, "
                        f"but the architecture has {value!r}."
                    )
                params[f"stage{i}.{field}"] = value
            if arch.stride != space.stride:
                raise ValueError(f"Expected stage {i} `stride` to be {space.stride}, but got {arch.stride}.")
        if (architecture.stem_channels, architecture.num_features) != (self.stem_channels, self.num_features):
            raise ValueError(
                "Expected the architecture's stem_channels and num_features to be the space's "
                f"({self.stem_channels}, {self.num_features}), but got "
                f"({architecture.stem_channels}, {architecture.num_features})."
            )
        return params
