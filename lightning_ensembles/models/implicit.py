"""Implicit ensembles: Wide ResNets that emit M predictions from one network.

Three ways of getting an ensemble's M predictions out of one network of about one model's size, each built on
the CIFAR :class:`~lightning_ensembles.models.WideResNet` (Zagoruyko & Komodakis, arXiv 1605.07146) and each
returning logits of shape ``(M, B, C)``, the ensemble axis first, like
:class:`~lightning_ensembles.EnsembleLightningModule`:

- :class:`PackedWideResNet`, *Packed-Ensembles* (Laurent et al., ICLR 2023, arXiv 2210.09184): every layer
  becomes a grouped one holding M members of ``alpha / M`` times the base width, each split into ``gamma``
  groups; it costs about ``alpha**2 / (M * gamma)`` times one model. ``alpha = M, gamma = 1`` is a deep
  ensemble run as one grouped network, and :meth:`PackedWideResNet.from_members` and
  :meth:`PackedWideResNet.to_members` move weights between it and M separate WideResNets.
- :class:`BatchEnsembleWideResNet`, *BatchEnsemble* (Wen et al., ICLR 2020, arXiv 2002.06715): one set of shared
  weights ``W`` and, per member, rank-1 fast weights: member ``i`` uses ``W * (s_i r_i^T)``. It costs M models'
  multiply-adds at about one model's parameters.
- :class:`MIMOWideResNet`, *MIMO* (Havasi et al., ICLR 2021, arXiv 2010.06610): one plain network whose first
  convolution reads M images stacked on the channel axis and whose classifier writes M sets of logits. It
  costs about one model.

The layers are our own rather than torch-uncertainty's (see ``docs/cifar-wrn.md``): they keep the members on
an axis of their own in what they return (never folded into the batch), and they leave the loss to the caller, whose rule is
the *sum* of the member losses.

Inside the Packed and BatchEnsemble networks, activations hold the members side by side on the channel axis,
``(B, M * C, H, W)``, member ``m`` in channels ``[m * C, (m + 1) * C)``, so batch norm over channels is per
member with no reshaping; the pooled features are then split into ``(M, B, F)`` for the per-member heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ensembles._validation import check_float, check_int, expected, is_int
from lightning_ensembles.models.wide_resnet import WideResNet

__all__ = ["BatchEnsembleWideResNet", "MIMOWideResNet", "PackedWideResNet"]

_FLAG = "--model.member.init_args"
_STRIDES = (1, 2, 2)
#: Standard deviation of the normal around 1 the fast weights are drawn from, as in uncertainty-baselines'
#: BatchEnsemble recipes (``random_sign_init = -0.5``).
_FAST_WEIGHT_STD = 0.5
#: How far ``width * alpha / num_members`` may be from an integer and still count as one (float error only).
_INTEGER_TOLERANCE = 1e-6

_ConvFactory = Callable[[int, int, int, int], nn.Module]
"""``(in_channels, out_channels, kernel_size, stride) -> conv`` in channels of one member."""
_NormFactory = Callable[[int], nn.Module]
"""``channels -> norm`` in channels of one member."""


def _flag(name: str) -> str:
    return f"{_FLAG}.{name}"


class _ImplicitWideResNet(nn.Module):
    """What the implicit WRNs share: the arguments of a WRN and ``num_members``, checked and kept once."""

    depth: int
    width: int
    num_members: int
    num_classes: int
    in_channels: int
    dropout: float

    def _set_common(
        self,
        depth: object,
        width: object,
        num_members: object,
        num_classes: object,
        in_channels: object,
        dropout: object,
    ) -> tuple[int, int, int, int, int, float]:
        """Validate the arguments every implicit WRN shares, keep them as attributes of the same names
        (``num_classes`` defaulted to 10), and return them."""
        num_classes = 10 if num_classes is None else num_classes
        if not is_int(depth) or depth < 10 or (depth - 4) % 6 != 0:  # type: ignore[operator]
            raise expected(_flag("depth"), "an int of the form 6n+4 (10, 16, 22, 28, 40, ...)", depth)
        self.depth = int(depth)  # type: ignore[call-overload]
        self.width = check_int(width, _flag("width"), 1)
        self.num_members = check_int(num_members, _flag("num_members"), 1)
        self.num_classes = check_int(num_classes, _flag("num_classes"), 1)
        self.in_channels = check_int(in_channels, _flag("in_channels"), 1)
        self.dropout = check_float(dropout, _flag("dropout"), 0.0, 1.0, include_maximum=False)
        return self.depth, self.width, self.num_members, self.num_classes, self.in_channels, self.dropout


class _Block(nn.Module):
    """WideResNet's pre-activation basic block with its convolutions and norms made by factories.

    The attribute names are :class:`~lightning_ensembles.models.wide_resnet._BasicBlock`'s, so the state-dict
    keys of an implicit WRN are a plain WRN's.

    Args:
        in_channels: Channels of one member's input.
        out_channels: Channels of one member's output.
        stride: Stride of the first 3x3 convolution and of the projection shortcut.
        dropout: Dropout probability between the two convolutions; ``0`` disables it.
        conv: Makes a convolution from one member's channel counts, the kernel size and the stride.
        norm: Makes a batch norm from one member's channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dropout: float,
        conv: _ConvFactory,
        norm: _NormFactory,
    ) -> None:
        super().__init__()
        self.bn1 = norm(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, stride)
        self.bn2 = norm(out_channels)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, 1)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = conv(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(B, M * C_in, H, W)``.

        Returns:
            Output of shape ``(B, M * C_out, H / stride, W / stride)``.
        """
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        residual = x if self.shortcut is None else self.shortcut(pre)
        return residual + out


def _stages(
    stem_width: int,
    widths: Sequence[int],
    blocks_per_stage: int,
    dropout: float,
    conv: _ConvFactory,
    norm: _NormFactory,
) -> nn.Sequential:
    """The three stages of a WRN, in channels of one member."""
    stages: list[nn.Module] = []
    channels = stem_width
    for stage_width, stride in zip(widths, _STRIDES, strict=True):
        blocks: list[nn.Module] = []
        for i in range(blocks_per_stage):
            blocks.append(_Block(channels, stage_width, stride if i == 0 else 1, dropout, conv, norm))
            channels = stage_width
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


def _split_members(x: Tensor, num_members: int) -> Tensor:
    """Globally average-pool ``(B, M * F, H, W)`` and split it into per-member features ``(M, B, F)``."""
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pooled.reshape(pooled.shape[0], num_members, -1).transpose(0, 1)


def _stack_inputs(x: Tensor, num_members: int, owner: str) -> Tensor:
    """Members' inputs on the channel axis: ``(B, C, H, W)`` repeated, or ``(M, B, C, H, W)`` side by side."""
    if x.ndim == 4:
        return x.repeat(1, num_members, 1, 1)
    if x.ndim == 5 and x.shape[0] == num_members:
        return x.transpose(0, 1).flatten(1, 2)
    raise ValueError(
        f"Expected the input of {owner} to be images of shape (B, C, H, W), or one batch per member of shape "
        f"(M, B, C, H, W) with M = num_members = {num_members}, but got shape {tuple(x.shape)}."
    )


class _GroupedLinear(nn.Module):
    """M independent linear layers applied to ``(M, B, F)`` features: one batched matrix multiplication.

    Args:
        num_members: M.
        in_features: Features of one member.
        out_features: Outputs of one member.
    """

    def __init__(self, num_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_members, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each member's weight as :class:`torch.nn.Linear`'s default, the bias zero (as in WideResNet)."""
        bound = 1 / math.sqrt(self.weight.shape[-1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply member ``m``'s layer to ``x[m]``.

        Args:
            x: Features of shape ``(M, B, F)``.

        Returns:
            Outputs of shape ``(M, B, out_features)``.
        """
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        members, out_features, in_features = self.weight.shape
        return f"num_members={members}, in_features={in_features}, out_features={out_features}"


class PackedWideResNet(_ImplicitWideResNet):
    """Packed-Ensembles (Laurent et al., ICLR 2023) of WRN-``depth``-``width``: M grouped members in one network.

    Every member is a WRN-``depth``-``width`` whose every layer is ``alpha / num_members`` times as wide: its
    stem has ``16 * alpha / M`` channels and its stages ``16k``, ``32k`` and ``64k`` times ``alpha / M``
    (``member_widths``). Inside the network the members lie side by side on the channel axis and every
    convolution after the stem is grouped with ``groups = num_members * gamma`` (each member split into
    ``gamma`` groups); the stem is an ordinary convolution from the shared image to all members' channels (the
    same as M separate stems), batch norm is per channel and so per member, and the classifier is one linear
    layer per member.

    Cost, in multiply-adds per image: every convolution after the stem costs ``alpha**2 / (M * gamma)`` times the
    WRN's, the stem and the classifier ``alpha`` times theirs; parameters scale the same way (batch norms by
    ``alpha``). ``alpha = M, gamma = 1`` computes exactly M separate WRNs (see :meth:`from_members`);
    ``alpha = sqrt(M)`` with ``gamma = 1`` costs about one WRN.

    Widths are not rounded: ``c * alpha / num_members`` must be an integer (up to float error) for every base
    width ``c`` in ``(16, 16k, 32k, 64k)``, and ``gamma`` must divide each result, else the constructor raises.
    (torch-uncertainty's layers instead round channel counts up, and lower ``gamma`` where groups would be
    small, silently.)

    Args:
        depth: Depth of each member; of the form ``6n + 4`` (10, 16, 22, 28, 40, ...).
        width: Widening factor ``k`` of the base network.
        num_members: M, the number of members (predictions).
        alpha: Width factor of the whole network: each member is ``alpha / M`` of the base width.
        gamma: Groups per member in every convolution after the stem.
        num_classes: Logits per member; ``None``: 10.
        in_channels: Channels of the input images.
        dropout: Dropout probability between the two convolutions of every block, in ``[0, 1)``.

    Raises:
        ValueError: If an argument is out of range, ``alpha`` gives a non-integer channel count or ``gamma`` does
            not divide one; the message names the argument and its CLI flag.

    Example:
        >>> import torch
        >>> from lightning_ensembles.cost import count_macs
        >>> model = PackedWideResNet(depth=10, width=1, num_members=4, alpha=2)
        >>> model.name, model.member_widths
        ('Packed-WRN-10-1 (M=4, alpha=2)', (8, 8, 16, 32))
        >>> model(torch.randn(5, 3, 8, 8)).shape
        torch.Size([4, 5, 10])
        >>> count_macs(model, (3, 8, 8)), count_macs(WideResNet(depth=10, width=1), (3, 8, 8))
        (810240, 781952)
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_members: int = 4,
        alpha: float = 2.0,
        gamma: int = 1,
        num_classes: int | None = None,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        depth, width, num_members, num_classes, in_channels, dropout = self._set_common(
            depth, width, num_members, num_classes, in_channels, dropout
        )
        if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0 < alpha < math.inf):
            raise expected(_flag("alpha"), "a float > 0", alpha)
        alpha = float(alpha)
        base = (16, 16 * width, 32 * width, 64 * width)
        member_widths = []
        for channels in base:
            exact = channels * alpha / num_members
            rounded = round(exact)
            if rounded < 1 or abs(exact - rounded) > _INTEGER_TOLERANCE * max(1.0, exact):
                raise expected(
                    _flag("alpha"),
                    f"a float > 0 such that c * alpha / num_members is an integer >= 1 for every base width c in "
                    f"{base} (num_members = {num_members}; {channels} * alpha / {num_members} = {exact:g})",
                    alpha,
                )
            member_widths.append(rounded)
        check_int(gamma, _flag("gamma"), 1)
        if any(channels % gamma for channels in member_widths):
            raise expected(
                _flag("gamma"),
                f"an int >= 1 dividing every member's channel count {tuple(member_widths)}",
                gamma,
            )

        self.alpha = alpha
        self.gamma = gamma
        self.member_widths: tuple[int, ...] = tuple(member_widths)
        self.num_features = member_widths[-1]

        groups = num_members * gamma

        def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
            return nn.Conv2d(
                num_members * cin, num_members * cout, kernel, stride, kernel // 2, groups=groups, bias=False
            )

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(num_members * channels)

        stem_width = member_widths[0]
        self.stem = nn.Conv2d(in_channels, num_members * stem_width, 3, stride=1, padding=1, bias=False)
        self.stages = _stages(stem_width, member_widths[1:], (depth - 4) // 6, dropout, conv, norm)
        self.norm = norm(self.num_features)
        self.fc = _GroupedLinear(num_members, self.num_features, num_classes)
        self.reset_parameters()

    @property
    def name(self) -> str:
        """E.g. ``'Packed-WRN-16-2 (M=4, alpha=2)'``; ``gamma`` is named when it is not 1."""
        gamma = f", gamma={self.gamma}" if self.gamma != 1 else ""
        return f"Packed-WRN-{self.depth}-{self.width} (M={self.num_members}, alpha={self.alpha:g}{gamma})"

    def reset_parameters(self) -> None:
        """Initialise each member as :meth:`WideResNet.reset_parameters` would initialise it on its own.

        Convolutions get Kaiming-normal weights with the fan-out of one member's group (``out_channels /
        groups`` times the kernel area; for the stem, ``out_channels / M``), batch norms weight 1 and bias 0,
        and each member's classifier PyTorch's default linear weight and a zero bias.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                groups = self.num_members if module is self.stem else module.groups
                fan_out = module.out_channels // groups * math.prod(module.kernel_size)
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, _GroupedLinear):
                module.reset_parameters()

    def forward_features(self, x: Tensor) -> Tensor:
        """Compute every member's pooled features.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``, shared by all members.

        Returns:
            Features of shape ``(M, B, member_widths[-1])``.
        """
        x = F.relu(self.norm(self.stages(self.stem(x))))
        return _split_members(x, self.num_members)

    def forward(self, x: Tensor) -> Tensor:
        """Compute every member's logits.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``, shared by all members.

        Returns:
            Logits of shape ``(M, B, num_classes)``: ``[m]`` is member ``m``'s prediction for the batch.
        """
        return self.fc(self.forward_features(x))

    @classmethod
    def from_members(cls, members: Sequence[WideResNet]) -> PackedWideResNet:
        """Pack M WideResNets of one configuration into one network that computes exactly what they compute.

        The result has ``alpha = M`` and ``gamma = 1`` and holds copies of the members' weights and batch-norm
        statistics (member ``m`` in the ``m``-th block of every layer), on their device and in their dtype and
        training mode. Its forward equals the members' forwards stacked, in evaluation and in training mode
        (batch statistics and running averages included) up to float rounding; :meth:`to_members` undoes it.
        Batch norm's ``num_batches_tracked`` counters become one counter per layer, the members' largest (it
        only matters for ``momentum=None``).

        Args:
            members: WideResNets with the same depth, width, classes, input channels and dropout.

        Returns:
            The packed network.

        Raises:
            ValueError: If ``members`` is empty, holds something other than a WideResNet, or mixes
                configurations.

        Example:
            >>> import torch
            >>> members = [WideResNet(depth=10, width=1).eval() for _ in range(3)]
            >>> packed = PackedWideResNet.from_members(members)
            >>> packed.name
            'Packed-WRN-10-1 (M=3, alpha=3)'
            >>> x = torch.randn(2, 3, 8, 8)
            >>> torch.allclose(packed(x), torch.stack([m(x) for m in members]), atol=1e-5)
            True
        """
        members = list(members)
        if not members or not all(isinstance(m, WideResNet) for m in members):
            raise expected("members", "a non-empty list of WideResNet", [type(m).__name__ for m in members])
        configs = {(m.depth, m.width, m.num_classes, m.in_channels, m.dropout) for m in members}
        if len(configs) > 1:
            raise expected(
                "members",
                "WideResNets of one (depth, width, num_classes, in_channels, dropout)",
                sorted(configs),
            )
        first = members[0]
        with torch.device("meta"):
            packed = cls(
                first.depth,
                first.width,
                len(members),
                alpha=len(members),
                gamma=1,
                num_classes=first.num_classes,
                in_channels=first.in_channels,
                dropout=first.dropout,
            )
        states = [m.state_dict() for m in members]
        state = {}
        for key in states[0]:
            tensors = [s[key] for s in states]
            if key.endswith("num_batches_tracked"):
                state[key] = torch.stack(tensors).amax()
            elif key.startswith("fc."):
                state[key] = torch.stack(tensors)
            else:
                state[key] = torch.cat(tensors)
        packed.load_state_dict(state, assign=True)
        return packed.train(first.training)

    def to_members(self) -> list[WideResNet]:
        """Split a network with ``alpha = M`` and ``gamma = 1`` into M separate WideResNets.

        Each member gets copies of its weights and batch-norm statistics (and the layer's
        ``num_batches_tracked``), on this network's device and in its dtype and training mode. For a network made
        by :meth:`from_members`, the round trip gives the members back exactly.

        Returns:
            The M WideResNets, member ``m`` at index ``m``.

        Raises:
            ValueError: If ``alpha != num_members`` or ``gamma != 1`` (the members are then not WideResNets).
        """
        if self.alpha != self.num_members or self.gamma != 1:
            raise ValueError(
                f"Expected a PackedWideResNet with `alpha` = `num_members` and `gamma` = 1 to split into "
                f"WideResNets, but got alpha={self.alpha:g}, num_members={self.num_members}, gamma={self.gamma}."
            )
        state = self.state_dict()
        members = []
        for m in range(self.num_members):
            member_state = {}
            for key, tensor in state.items():
                if key.endswith("num_batches_tracked"):
                    member_state[key] = tensor.clone()
                elif key.startswith("fc."):
                    member_state[key] = tensor[m].clone()
                else:
                    member_state[key] = tensor.chunk(self.num_members)[m].clone()
            with torch.device("meta"):
                member = WideResNet(self.depth, self.width, self.num_classes, self.dropout, self.in_channels)
            member.load_state_dict(member_state, assign=True)
            members.append(member.train(self.training))
        return members

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, member_widths={self.member_widths}, num_classes={self.num_classes}, "
            f"dropout={self.dropout}, in_channels={self.in_channels}"
        )


class _BatchEnsembleConv2d(nn.Module):
    """BatchEnsemble convolution: member ``i`` computes ``conv(x * r_i, W) * s_i`` with ``W`` shared.

    Equivalent to convolving with ``W * (s_i r_i^T)`` (Wen et al., eq. 2). On ``(B, M * C_in, H, W)`` inputs it
    is one grouped convolution with ``W`` repeated for every member. No bias: in a WRN a batch norm follows.

    Args:
        num_members: M.
        in_channels: Input channels of one member.
        out_channels: Output channels of one member.
        kernel_size: Square kernel size; padding keeps the size (``kernel_size // 2``).
        stride: Stride.
    """

    def __init__(
        self, num_members: int, in_channels: int, out_channels: int, kernel_size: int, stride: int
    ) -> None:
        super().__init__()
        self.num_members = num_members
        self.stride = stride
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.r = nn.Parameter(torch.ones(num_members, in_channels))
        self.s = nn.Parameter(torch.ones(num_members, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """Apply every member's convolution to its channels.

        Args:
            x: Input of shape ``(B, M * C_in, H, W)``.

        Returns:
            Output of shape ``(B, M * C_out, H / stride, W / stride)``.
        """
        weight = self.weight.repeat(self.num_members, 1, 1, 1)
        out = F.conv2d(
            x * self.r.reshape(1, -1, 1, 1), weight, None, self.stride, self.padding, 1, self.num_members
        )
        return out * self.s.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        out_channels, in_channels, kernel, _ = self.weight.shape
        return (
            f"num_members={self.num_members}, {in_channels}, {out_channels}, kernel_size={kernel}, "
            f"stride={self.stride}"
        )


class _BatchEnsembleLinear(nn.Module):
    """BatchEnsemble classifier: member ``i`` computes ``((x * r_i) W^T) * s_i + b_i``, ``W`` shared.

    Args:
        num_members: M.
        in_features: Features of one member.
        out_features: Outputs of one member.
    """

    def __init__(self, num_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_members, out_features))
        self.r = nn.Parameter(torch.ones(num_members, in_features))
        self.s = nn.Parameter(torch.ones(num_members, out_features))

    def forward(self, x: Tensor) -> Tensor:
        """Apply member ``m``'s layer to ``x[m]``.

        Args:
            x: Features of shape ``(M, B, F)``.

        Returns:
            Outputs of shape ``(M, B, out_features)``.
        """
        return (x * self.r.unsqueeze(1)) @ self.weight.T * self.s.unsqueeze(1) + self.bias.unsqueeze(1)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"num_members={self.r.shape[0]}, in_features={in_features}, out_features={out_features}"


class BatchEnsembleWideResNet(_ImplicitWideResNet):
    """BatchEnsemble (Wen et al., ICLR 2020) of WRN-``depth``-``width``: shared weights, rank-1 fast weights.

    Every convolution (stem, block convolutions, projection shortcuts) and the classifier has one weight ``W``
    shared by the members and, per member ``i``, fast weights ``r_i`` (one per input channel) and ``s_i`` (one
    per output channel): member ``i``'s layer is ``W * (s_i r_i^T)``, computed as ``(x * r_i) W * s_i``.
    Choices, where Wen et al. leave room:

    - **Per-member batch norm.** Each member has its own batch-norm weights, biases and running statistics,
      computed over its own copy of the batch. (uncertainty-baselines' BatchEnsemble WRN shares one batch norm
      over the M stacked copies.) So member ``i``'s output depends on its own weights and batch only, ``M = 1``
      is exactly a WideResNet, and it costs ``4 * C`` numbers per member and norm (two of them parameters).
    - **Per-member classifier bias** ``b_i``, as in Wen et al.'s and edward2's dense layer; the convolutions have
      no bias, as in WideResNet (a batch norm follows each).
    - **Fast weights drawn from N(1, 0.5)**, as in uncertainty-baselines' CIFAR recipes; the shared weights are
      initialised as WideResNet's.

    Cost: every layer runs once per member, so M WRNs' multiply-adds per image; parameters are one WRN's plus
    ``M * (C_in + C_out)`` per layer, M batch norms and M classifier biases, a few per cent of a WRN.

    Args:
        depth: Depth of the network; of the form ``6n + 4`` (10, 16, 22, 28, 40, ...).
        width: Widening factor ``k``.
        num_members: M, the number of members (predictions).
        num_classes: Logits per member; ``None``: 10.
        in_channels: Channels of the input images.
        dropout: Dropout probability between the two convolutions of every block, in ``[0, 1)``.

    Raises:
        ValueError: If an argument is out of range; the message names the argument and its CLI flag.

    Example:
        >>> import torch
        >>> model = BatchEnsembleWideResNet(depth=10, width=1, num_members=3)
        >>> model.name
        'BatchEnsemble-WRN-10-1 (M=3)'
        >>> model(torch.randn(5, 3, 8, 8)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_members: int = 4,
        num_classes: int | None = None,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        depth, width, num_members, num_classes, in_channels, dropout = self._set_common(
            depth, width, num_members, num_classes, in_channels, dropout
        )
        self.num_features = 64 * width

        def conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
            return _BatchEnsembleConv2d(num_members, cin, cout, kernel, stride)

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(num_members * channels)

        self.stem = conv(in_channels, 16, 3, 1)
        self.stages = _stages(16, (16 * width, 32 * width, 64 * width), (depth - 4) // 6, dropout, conv, norm)
        self.norm = norm(self.num_features)
        self.fc = _BatchEnsembleLinear(num_members, self.num_features, num_classes)
        self.reset_parameters()

    @property
    def name(self) -> str:
        """E.g. ``'BatchEnsemble-WRN-16-2 (M=4)'``."""
        return f"BatchEnsemble-WRN-{self.depth}-{self.width} (M={self.num_members})"

    def reset_parameters(self) -> None:
        """Initialise the shared weights as :meth:`WideResNet.reset_parameters`, then draw the fast weights.

        Convolution weights are Kaiming-normal (fan-out, ReLU gain), batch norms weight 1 and bias 0, the
        classifier weight PyTorch's linear default and the biases 0; see :meth:`reset_fast_weights`.
        """
        for module in self.modules():
            if isinstance(module, _BatchEnsembleConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, _BatchEnsembleLinear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                nn.init.zeros_(module.bias)
        self.reset_fast_weights()

    def reset_fast_weights(self, std: float = _FAST_WEIGHT_STD) -> None:
        """Draw every fast weight ``r_i``, ``s_i`` from a normal around 1, which makes the members differ.

        Args:
            std: Standard deviation; ``0`` sets every fast weight to 1 (all members equal).

        Raises:
            ValueError: If ``std`` is negative.
        """
        std = check_float(std, "std", 0.0)
        for module in self.modules():
            if isinstance(module, _BatchEnsembleConv2d | _BatchEnsembleLinear):
                for fast in (module.r, module.s):
                    if std > 0:
                        nn.init.normal_(fast, 1.0, std)
                    else:
                        nn.init.ones_(fast)

    def forward_features(self, x: Tensor) -> Tensor:
        """Compute every member's pooled features.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``, which every member sees, or one batch per member,
                ``(M, B, in_channels, H, W)``.

        Returns:
            Features of shape ``(M, B, 64 * width)``.
        """
        x = _stack_inputs(x, self.num_members, type(self).__name__)
        x = F.relu(self.norm(self.stages(self.stem(x))))
        return _split_members(x, self.num_members)

    def forward(self, x: Tensor) -> Tensor:
        """Compute every member's logits.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``: the batch is repeated for each member (Wen et al.'s
                training and evaluation), or one batch per member, ``(M, B, in_channels, H, W)``.

        Returns:
            Logits of shape ``(M, B, num_classes)``: ``[m]`` is member ``m``'s prediction for its batch.
        """
        return self.fc(self.forward_features(x))

    @classmethod
    def from_wide_resnet(cls, model: WideResNet, num_members: int = 1) -> BatchEnsembleWideResNet:
        """A BatchEnsemble whose shared weights are ``model``'s and whose fast weights are all 1.

        Every member then computes exactly what ``model`` computes: batch norms and the classifier bias are
        copied to every member. The result is on ``model``'s device, in its dtype and training mode. Call
        :meth:`reset_fast_weights` to make the members differ (e.g. to fine-tune a pretrained WRN as an
        ensemble).

        Args:
            model: The WideResNet.
            num_members: M.

        Returns:
            The BatchEnsemble.

        Raises:
            ValueError: If ``model`` is not a WideResNet or ``num_members`` is not an int >= 1.

        Example:
            >>> import torch
            >>> wrn = WideResNet(depth=10, width=1).eval()
            >>> ensemble = BatchEnsembleWideResNet.from_wide_resnet(wrn, num_members=2).eval()
            >>> x = torch.randn(2, 3, 8, 8)
            >>> torch.allclose(ensemble(x), torch.stack([wrn(x), wrn(x)]), atol=1e-6)
            True
        """
        if not isinstance(model, WideResNet):
            raise expected("model", "a WideResNet", model)
        num_members = check_int(num_members, "num_members", 1)
        with torch.device("meta"):
            ensemble = cls(
                model.depth, model.width, num_members, model.num_classes, model.in_channels, model.dropout
            )
        source = model.state_dict()
        state: dict[str, Tensor] = {}
        for name, module in ensemble.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, _BatchEnsembleConv2d | _BatchEnsembleLinear):
                weight = source[f"{prefix}weight"]
                state[f"{prefix}weight"] = weight.clone()
                state[f"{prefix}r"] = weight.new_ones(module.r.shape)
                state[f"{prefix}s"] = weight.new_ones(module.s.shape)
            if isinstance(module, _BatchEnsembleLinear):
                state[f"{prefix}bias"] = source[f"{prefix}bias"].repeat(num_members, 1)
            elif isinstance(module, nn.BatchNorm2d):
                for key in ("weight", "bias", "running_mean", "running_var"):
                    state[f"{prefix}{key}"] = source[f"{prefix}{key}"].repeat(num_members)
                state[f"{prefix}num_batches_tracked"] = source[f"{prefix}num_batches_tracked"].clone()
        ensemble.load_state_dict(state, assign=True)
        return ensemble.train(model.training)

    def extra_repr(self) -> str:
        return f"name={self.name}, num_classes={self.num_classes}, dropout={self.dropout}, in_channels={self.in_channels}"


class MIMOWideResNet(_ImplicitWideResNet):
    """MIMO (Havasi et al., ICLR 2021) WRN-``depth``-``width``: M inputs in, M predictions out of one network.

    The network is one plain :class:`~lightning_ensembles.models.WideResNet`, :attr:`body`, whose stem reads
    ``M * in_channels`` channels (member ``m``'s image in channels ``[m * in_channels, (m + 1) *
    in_channels)``) and whose classifier writes ``M * num_classes`` logits (member ``m``'s in
    ``[m * num_classes, (m + 1) * num_classes)``). Cost: one WRN's multiply-adds and parameters plus ``M - 1``
    extra copies of the stem's input side and of the classifier, a fraction of a per cent for CIFAR WRNs.

    Two kinds of input, as in the paper:

    - **evaluation**, ``(B, in_channels, H, W)``: the images are repeated M times, every member sees the same
      image, and the M predictions form the ensemble;
    - **training**, ``(M, B, in_channels, H, W)``: ``x[m]`` is member ``m``'s batch; MIMO trains each member on
      its own independently shuffled batch (the caller makes them), so that the members learn to ignore each
      other's inputs.

    Args:
        depth: Depth of the network; of the form ``6n + 4`` (10, 16, 22, 28, 40, ...).
        width: Widening factor ``k``.
        num_members: M, the number of inputs and predictions.
        num_classes: Logits per member; ``None``: 10.
        in_channels: Channels of one input image.
        dropout: Dropout probability between the two convolutions of every block, in ``[0, 1)``.

    Raises:
        ValueError: If an argument is out of range; the message names the argument and its CLI flag.

    Example:
        >>> import torch
        >>> model = MIMOWideResNet(depth=10, width=1, num_members=3)
        >>> model.name
        'MIMO-WRN-10-1 (M=3)'
        >>> model(torch.randn(5, 3, 8, 8)).shape, model(torch.randn(3, 5, 3, 8, 8)).shape
        (torch.Size([3, 5, 10]), torch.Size([3, 5, 10]))
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_members: int = 3,
        num_classes: int | None = None,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        depth, width, num_members, num_classes, in_channels, dropout = self._set_common(
            depth, width, num_members, num_classes, in_channels, dropout
        )
        self.body = WideResNet(depth, width, num_members * num_classes, dropout, num_members * in_channels)

    @property
    def name(self) -> str:
        """E.g. ``'MIMO-WRN-16-2 (M=3)'``."""
        return f"MIMO-WRN-{self.depth}-{self.width} (M={self.num_members})"

    def reset_parameters(self) -> None:
        """Initialise :attr:`body` as :meth:`WideResNet.reset_parameters` does."""
        self.body.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Compute every member's logits.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``, which every member sees (evaluation), or one batch per
                member, ``(M, B, in_channels, H, W)`` (training).

        Returns:
            Logits of shape ``(M, B, num_classes)``: ``[m]`` is member ``m``'s prediction for its input.

        Raises:
            ValueError: If ``x`` has neither shape.
        """
        logits = self.body(_stack_inputs(x, self.num_members, type(self).__name__))
        return logits.reshape(logits.shape[0], self.num_members, self.num_classes).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"name={self.name}, num_classes={self.num_classes}, dropout={self.dropout}, in_channels={self.in_channels}"
