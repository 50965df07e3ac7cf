"""The member of the NAS recipe: a MnasNet/EfficientNet-style architecture built as a real timm EfficientNet.

The third experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), searches architectures under a cost budget and compares one
searched architecture replicated ``N`` times with ``N`` different searched architectures. This module holds
the architectures and the member built from them; the space they are searched in and the search itself are
in :mod:`lightning_ensembles.nas`.

An architecture follows the factorised hierarchical space of MnasNet (Tan et al., *MnasNet: Platform-Aware
Neural Architecture Search for Mobile*, CVPR 2019, arXiv 1807.11626), as used by EfficientNet (Tan & Le, ICML
2019, arXiv 1905.11946): a stem convolution (stride 2), a fixed number of stages, a 1x1 head convolution,
global pooling and a classifier. Every stage (:class:`StageArch`) has its own kernel size of the depthwise
convolutions, expansion ratio of the inverted bottlenecks (1 means a depthwise-separable block without
expansion), number of blocks, output channels, stride, and squeeze-and-excitation or not.

An architecture (:class:`NASArchitecture`) is decoded into timm's block strings (``"ir_r2_k3_s2_e6_c24_se0.25"``)
and built by timm's own :func:`~timm.models._efficientnet_builder.decode_arch_def` and
:class:`~timm.models.efficientnet.EfficientNet`, so every sampled network is an ordinary timm model: trainable,
countable with :func:`~lightning_ensembles.cost.count_macs`, exportable. :class:`NASNet` wraps it as an
ensemble member configured from LightningCLI:

.. code-block:: yaml

    model:
      member:
        class_path: lightning_ensembles.models.NASNet
        init_args:
          stages:
            - {channels: 16, num_blocks: 1, kernel_size: 3, expand_ratio: 1, se: true, stride: 1}
            - {channels: 24, num_blocks: 2, kernel_size: 5, expand_ratio: 6, se: false, stride: 2}
          in_channels: 1
          input_size: [16, 16]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ensembles._validation import check_int, is_int

__all__ = ["NASArchitecture", "NASNet", "StageArch"]

_MEMBER_FLAG = "--model.member.init_args"
_STRIDES = (1, 2)


def _check_kernel(value: object, flag: str) -> int:
    if not is_int(value) or value < 1 or value % 2 == 0:  # type: ignore[operator]
        raise ValueError(f"Expected `{flag}` to be an odd int >= 1 (3, 5, 7, ...), but got {value!r}.")
    return value  # type: ignore[return-value]


def _check_stride(value: object, flag: str) -> int:
    if not is_int(value) or value not in _STRIDES:
        raise ValueError(f"Expected `{flag}` to be 1 or 2, but got {value!r}.")
    return value  # type: ignore[return-value]


def _check_bool(value: object, flag: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{flag}` to be true or false, but got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class StageArch:
    """One stage of an architecture: ``num_blocks`` identical blocks, the first with ``stride``.

    Args:
        channels: Output channels of every block of the stage.
        num_blocks: Number of blocks.
        kernel_size: Kernel size of the depthwise convolutions (odd).
        expand_ratio: Expansion ratio of the inverted bottleneck; ``1`` gives a depthwise-separable block
            (timm's ``ds``) without the expanding 1x1 convolution.
        se: Squeeze-and-excitation (reduction to a quarter of the block's input channels) in every block.
        stride: Stride of the first block (1 or 2).

    Raises:
        ValueError: If a field is out of range, naming it.

    Example:
        >>> StageArch(channels=24, num_blocks=2, kernel_size=3, expand_ratio=6, se=True, stride=2).block_string()
        'ir_r2_k3_s2_e6_c24_se0.25'
        >>> StageArch(channels=16, num_blocks=1, kernel_size=3, expand_ratio=1, se=False).block_string()
        'ds_r1_k3_s1_c16'
    """

    channels: int
    num_blocks: int
    kernel_size: int
    expand_ratio: int
    se: bool
    stride: int = 1

    def __post_init__(self) -> None:
        self.check("StageArch")

    def check(self, flag: str) -> None:
        """Validate every field.

        Args:
            flag: The prefix named in error messages, e.g. ``"--model.member.init_args.stages[2]"``.

        Raises:
            ValueError: If a field is out of range.
        """
        check_int(self.channels, f"{flag}.channels", 1)
        check_int(self.num_blocks, f"{flag}.num_blocks", 1)
        _check_kernel(self.kernel_size, f"{flag}.kernel_size")
        check_int(self.expand_ratio, f"{flag}.expand_ratio", 1)
        _check_bool(self.se, f"{flag}.se")
        _check_stride(self.stride, f"{flag}.stride")

    def block_string(self) -> str:
        """timm's block string of the stage, e.g. ``'ir_r2_k3_s2_e6_c24_se0.25'``.

        Returns:
            The string :func:`~timm.models._efficientnet_builder.decode_arch_def` decodes.
        """
        se = "_se0.25" if self.se else ""
        if self.expand_ratio == 1:
            return f"ds_r{self.num_blocks}_k{self.kernel_size}_s{self.stride}_c{self.channels}{se}"
        return f"ir_r{self.num_blocks}_k{self.kernel_size}_s{self.stride}_e{self.expand_ratio}_c{self.channels}{se}"


def _stage_from(value: StageArch | Mapping[str, Any], flag: str) -> StageArch:
    if isinstance(value, StageArch):
        value.check(flag)
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"Expected `{flag}` to be a mapping with keys channels, num_blocks, kernel_size, expand_ratio, se "
            f"and stride, but got {value!r}."
        )
    fields = {f.name for f in dataclasses.fields(StageArch)}
    unknown = sorted(set(value) - fields)
    missing = sorted(
        f.name for f in dataclasses.fields(StageArch) if f.name not in value and f.name != "stride"
    )
    if unknown or missing:
        raise ValueError(
            f"Expected `{flag}` to have the keys {sorted(fields)} (stride optional), but "
            + (f"got unknown keys {unknown}" if unknown else f"it lacks {missing}")
            + f": {dict(value)!r}."
        )
    try:
        stage = StageArch(**value)
    except ValueError as err:  # re-raised with the full flag
        raise ValueError(str(err).replace("`StageArch", f"`{flag}")) from err
    return stage


@dataclasses.dataclass(frozen=True)
class NASArchitecture:
    """A network of the search space: a stem, the stages, a 1x1 head convolution and a classifier.

    Args:
        stages: The stages, input to output.
        stem_channels: Output channels of the stem (a 3x3 convolution with stride 2).
        num_features: Channels of the 1x1 head convolution before global pooling.

    Raises:
        ValueError: If there is no stage or a field is out of range, naming it.

    Example:
        >>> arch = NASArchitecture.from_dict(
        ...     {"stages": [{"channels": 8, "num_blocks": 1, "kernel_size": 3, "expand_ratio": 1, "se": False},
        ...                 {"channels": 16, "num_blocks": 2, "kernel_size": 5, "expand_ratio": 3, "se": True,
        ...                  "stride": 2}],
        ...      "stem_channels": 8, "num_features": 64})
        >>> arch.block_strings()
        [['ds_r1_k3_s1_c8'], ['ir_r2_k5_s2_e3_c16_se0.25']]
        >>> NASArchitecture.from_dict(arch.to_dict()) == arch
        True
    """

    stages: tuple[StageArch, ...]
    stem_channels: int = 16
    num_features: int = 256

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"Expected `stages` to be a non-empty list of stages, but got {stages!r}.")
        object.__setattr__(
            self, "stages", tuple(_stage_from(s, f"stages[{i}]") for i, s in enumerate(stages))
        )
        check_int(self.stem_channels, "stem_channels", 1)
        check_int(self.num_features, "num_features", 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NASArchitecture:
        """Build from a plain dict (as written by :meth:`to_dict`, or read from YAML/JSON).

        Args:
            data: ``{"stages": [{...}, ...], "stem_channels": ..., "num_features": ...}``.

        Returns:
            The architecture.

        Raises:
            ValueError: If a key is unknown or missing, or a value is out of range.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"Expected an architecture to be a mapping, but got {data!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "stages" not in data:
            raise ValueError(
                f"Expected an architecture mapping with the keys {sorted(known)} (only `stages` required), but "
                + (f"got unknown keys {unknown}." if unknown else f"it has no `stages`: {dict(data)!r}.")
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The architecture as plain Python types (for YAML, JSON and Optuna user attributes).

        Returns:
            ``{"stages": [...], "stem_channels": ..., "num_features": ...}``.
        """
        return {
            "stages": [dataclasses.asdict(stage) for stage in self.stages],
            "stem_channels": self.stem_channels,
            "num_features": self.num_features,
        }

    def block_strings(self) -> list[list[str]]:
        """timm's architecture definition: one list with one block string per stage.

        Returns:
            What :func:`~timm.models._efficientnet_builder.decode_arch_def` takes.
        """
        return [[stage.block_string()] for stage in self.stages]

    @property
    def digest(self) -> str:
        """Eight hex digits identifying the architecture (a hash of :meth:`to_dict`)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    @property
    def num_blocks(self) -> int:
        """Blocks over all stages."""
        return sum(stage.num_blocks for stage in self.stages)

    def build(self, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> NASNet:
        """Build the network as an ensemble member.

        Args:
            num_classes: Logits per input.
            in_channels: Input channels.
            **kwargs: Further arguments of :class:`NASNet` (``input_size``, ``drop_rate``, ``name``, ...).

        Returns:
            The member.
        """
        return NASNet(
            stages=self.stages,
            stem_channels=self.stem_channels,
            num_features=self.num_features,
            num_classes=num_classes,
            in_channels=in_channels,
            **kwargs,
        )


def _check_input_size(value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    size = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(size) != 2 or not all(is_int(v) and v >= 1 for v in size):
        raise ValueError(
            f"Expected `{_MEMBER_FLAG}.input_size` to be (H, W) of ints >= 1, or null (no resizing), but got "
            f"{value!r}."
        )
    return (int(size[0]), int(size[1]))


class NASNet(nn.Module):
    """A searched architecture as an ensemble member: a timm ``EfficientNet`` built from block strings.

    Args:
        stages: The stages (:class:`StageArch` or mappings with its fields), input to output.
        stem_channels: Output channels of the stride-2 stem convolution.
        num_features: Channels of the 1x1 head convolution before global pooling.
        num_classes: Logits per input.
        in_channels: Input channels (1 for the digits, 3 for RGB images).
        input_size: ``(H, W)`` that inputs are resized to (bilinear) before the network, or ``None`` to use
            them as they come. Small images (the 8x8 digits) keep some spatial extent through the stride-2
            stem and stages when enlarged first.
        drop_rate: Dropout before the classifier, in ``[0, 1)``.
        drop_path_rate: Stochastic depth over the blocks, in ``[0, 1)``.
        activation: timm activation name (``"swish"`` as in EfficientNet, ``"relu"`` as in MnasNet).
        name: Shown in results tables and comparisons; default ``"NAS-<digest>"`` of the architecture.

    Raises:
        ValueError: If an argument is out of range, naming its ``--model.member.init_args.*`` flag.

    Example:
        >>> import torch
        >>> member = NASNet(
        ...     stages=[{"channels": 8, "num_blocks": 1, "kernel_size": 3, "expand_ratio": 1, "se": False},
        ...             {"channels": 16, "num_blocks": 2, "kernel_size": 5, "expand_ratio": 3, "se": True,
        ...              "stride": 2}],
        ...     stem_channels=8, num_features=64, in_channels=1, input_size=(16, 16))
        >>> member(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> type(member.model).__name__, member.name
        ('EfficientNet', 'NAS-b0428d22')
    """

    def __init__(
        self,
        stages: Sequence[StageArch],
        stem_channels: int = 16,
        num_features: int = 256,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        activation: str = "swish",
        name: str | None = None,
    ) -> None:
        super().__init__()
        from timm.layers import get_act_layer
        from timm.models._efficientnet_builder import decode_arch_def, round_channels
        from timm.models.efficientnet import EfficientNet

        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(
                f"Expected `{_MEMBER_FLAG}.stages` to be a non-empty list of stages, but got {stages!r}."
            )
        checked = tuple(_stage_from(s, f"{_MEMBER_FLAG}.stages[{i}]") for i, s in enumerate(stages))
        check_int(stem_channels, f"{_MEMBER_FLAG}.stem_channels", 1)
        check_int(num_features, f"{_MEMBER_FLAG}.num_features", 1)
        check_int(num_classes, f"{_MEMBER_FLAG}.num_classes", 1)
        check_int(in_channels, f"{_MEMBER_FLAG}.in_channels", 1)
        for rate_name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
                raise ValueError(
                    f"Expected `{_MEMBER_FLAG}.{rate_name}` to be a float in [0, 1), but got {rate!r}."
                )
        try:
            act_layer = get_act_layer(activation)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(
                f"Expected `{_MEMBER_FLAG}.activation` to be a timm activation name ('swish', 'relu', ...), "
                f"but got {activation!r}."
            ) from err
        if act_layer is None:
            raise ValueError(
                f"Expected `{_MEMBER_FLAG}.activation` to name an activation, but got {activation!r}."
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(
                f"Expected `{_MEMBER_FLAG}.name` to be a non-empty string or null, but got {name!r}."
            )

        self.architecture = NASArchitecture(checked, stem_channels, num_features)
        """The architecture this network was built from."""
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = _check_input_size(input_size)
        self._name = name
        self.model: nn.Module = EfficientNet(
            block_args=decode_arch_def(self.architecture.block_strings()),
            num_classes=num_classes,
            num_features=num_features,
            in_chans=in_channels,
            stem_size=stem_channels,
            fix_stem=True,
            # divisor 1: the channels are exactly those of the architecture (timm rounds to multiples of 8).
            round_chs_fn=functools.partial(round_channels, multiplier=1.0, divisor=1),
            act_layer=act_layer,
            drop_rate=float(drop_rate),
            drop_path_rate=float(drop_path_rate),
        )
        """The plain timm ``EfficientNet`` (no wrapper): use it for export."""

    @property
    def name(self) -> str:
        """The name given, else ``'NAS-<digest>'`` (used in results tables and comparisons)."""
        return self._name or f"NAS-{self.architecture.digest}"

    def forward(self, x: Tensor) -> Tensor:
        """Resize to ``input_size`` if set, then apply the network.

        Args:
            x: Images ``(B, in_channels, H, W)``.

        Returns:
            Logits ``(B, num_classes)``.
        """
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            shrink = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=shrink, align_corners=False)
        out: Tensor = self.model(x)
        return out

    def extra_repr(self) -> str:
        """Return the name, block strings and input size for ``repr``."""
        blocks = [s[0] for s in self.architecture.block_strings()]
        return f"name={self.name!r}, blocks={blocks}, input_size={self.input_size}"
