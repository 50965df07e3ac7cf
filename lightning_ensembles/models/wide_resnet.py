"""Wide Residual Networks for CIFAR-sized inputs.

Implements the CIFAR layout of *Wide Residual Networks* (Zagoruyko & Komodakis, BMVC 2016, arXiv 1605.07146):
a 3x3 stem convolution to 16 channels, three stages of ``n = (depth - 4) / 6`` pre-activation basic blocks
with widths ``16k``, ``32k`` and ``64k`` and strides 1, 2 and 2, then batch norm, ReLU, global average pooling
and a linear classifier. This is the architecture whose ensembles make up figure 1 of Kondratyuk et al.,
*When Ensembling Smaller Models is More Efficient than Single Large Models* (arXiv 2005.00570).

As in the authors' reference implementation, when a block changes the number of channels or the resolution,
its first BN-ReLU output feeds both the 3x3 convolution path and the 1x1 projection shortcut. WRN-28-10 has
36,479,194 parameters and costs 5.243 G multiply-adds per 32x32 image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ensembles._validation import check_float, check_int, expected, is_int

__all__ = ["WideResNet"]

_FLAG = "--model.member.init_args"


def _flag(name: str) -> str:
    return f"{_FLAG}.{name}"


class _BasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus a shortcut.

    Args:
        in_channels: Channels of the block's input.
        out_channels: Channels of the block's output.
        stride: Stride of the first 3x3 convolution and of the projection shortcut.
        dropout: Dropout probability between the two convolutions; ``0`` disables it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(B, C_in, H, W)``.

        Returns:
            Output of shape ``(B, C_out, H / stride, W / stride)``.
        """
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # The projection sees the pre-activated input, as in the reference implementation.
        residual = x if self.shortcut is None else self.shortcut(pre)
        return residual + out


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``width`` for small (CIFAR-sized) images.

    Args:
        depth: Total number of weighted layers; must be of the form ``6n + 4`` with ``n >= 1``
            (10, 16, 22, 28, 40, ...), giving ``n`` blocks per stage.
        width: Widening factor ``k``; the stages have ``16k``, ``32k`` and ``64k`` channels.
        num_classes: Number of output logits. ``None``: inside an
            :class:`~lightning_ensembles.EnsembleLightningModule`, the ensemble's ``num_classes`` (linked from
            ``--data.num_classes`` by the CLI); on its own, 10 (CIFAR-10).
        dropout: Dropout probability between the two convolutions of every block, in ``[0, 1)``.
        in_channels: Channels of the input images (3 for RGB, 1 for grey-scale).

    Raises:
        ValueError: If an argument is out of range; the message names the argument, its CLI flag, the
            value given and what is allowed.

    Example:
        >>> import torch
        >>> model = WideResNet(depth=16, width=4, num_classes=10)
        >>> model.name
        'WRN-16-4'
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in WideResNet(depth=28, width=10).parameters())
        36479194
        >>> WideResNet(depth=16, width=2, in_channels=1)(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int | None = None,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        num_classes = 10 if num_classes is None else num_classes
        if not is_int(depth) or depth < 10 or (depth - 4) % 6 != 0:
            raise expected(_flag("depth"), "an int of the form 6n+4 (10, 16, 22, 28, 40, ...)", depth)
        check_int(width, _flag("width"), 1)
        check_int(num_classes, _flag("num_classes"), 1)
        check_float(dropout, _flag("dropout"), 0.0, 1.0, include_maximum=False)
        check_int(in_channels, _flag("in_channels"), 1)

        self.depth = depth
        self.width = width
        self.num_classes = num_classes
        self.dropout = float(dropout)
        self.in_channels = in_channels
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.num_features = widths[-1]

        self.stem = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        channels = 16
        for stage_width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks: list[nn.Module] = []
            for i in range(blocks_per_stage):
                blocks.append(_BasicBlock(channels, stage_width, stride if i == 0 else 1, self.dropout))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    @property
    def name(self) -> str:
        """The conventional name ``WRN-depth-width``, e.g. ``'WRN-28-10'``."""
        return f"WRN-{self.depth}-{self.width}"

    def reset_parameters(self) -> None:
        """Initialise as in the reference implementation.

        Convolutions get Kaiming-normal weights (fan-out, ReLU gain), batch norms weight 1 and bias 0, and the
        linear layer a zero bias (its weight keeps PyTorch's default initialisation).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Compute the pooled features that feed the classifier.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``; any ``H, W >= 1`` works.

        Returns:
            Features of shape ``(B, 64 * width)``.
        """
        x = self.stages(self.stem(x))
        x = F.relu(self.norm(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        return self.fc(self.forward_features(x))

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, num_classes={self.num_classes}, dropout={self.dropout}, "
            f"in_channels={self.in_channels}"
        )
