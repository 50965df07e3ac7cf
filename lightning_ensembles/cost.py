"""Cost measurement primitives: multiply-adds and parameter counts.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), compare ensembles with single models at equal "FLOPs". In that line of work, the
EfficientNet paper (Tan & Le 2019, arXiv 1905.11946) included, "FLOPs" means **multiply-adds (MACs)**,
so that is the unit used everywhere in this library: one multiply-add counts once, and
``GFLOPs = 2 x GMACs`` in the stricter convention that counts the multiply and the add separately.

:func:`count_macs` counts the forward multiply-adds of convolutions and matrix multiplications (linear
layers) only, as the papers do; batch norm, activations, pooling and element-wise additions are free.
It uses :class:`torch.utils.flop_counter.FlopCounterMode`, which reports FLOPs = 2 x MACs, on a copy of
the model living on the ``meta`` device, so no real compute happens and the caller's model is untouched.
Counting WRN-28-10 (5.243 G multiply-adds at 32x32, Zagoruyko & Komodakis 2016) takes a fraction of a
second. ptflops' ``aten`` backend agrees with this count except that it also adds one operation per output
of a linear layer's bias.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]

_aten = torch.ops.aten

#: Forward convolution and matrix-multiplication ops whose FLOPs :func:`count_macs` keeps. Backward and
#: attention kernels are deliberately left out: the unit is forward multiply-adds of conv and linear layers.
_COUNTED_OPS = frozenset(
    {
        _aten.convolution,
        _aten._convolution,
        _aten.cudnn_convolution,
        _aten.convolution_overrideable,
        _aten._slow_conv2d_forward,
        _aten.mm,
        _aten.addmm,
        _aten.bmm,
        _aten.baddbmm,
        _aten._scaled_mm,
    }
)


def _meta_copy(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` onto the ``meta`` device without copying any parameter or buffer data."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    meta_model = copy.deepcopy(model, memo)
    return meta_model.to("meta")


def _input_dtype(model: nn.Module) -> torch.dtype:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def count_macs(model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1) -> int:
    """Count the forward multiply-adds per sample of the conv and linear layers of ``model``.

    The model is copied to the ``meta`` device and run in eval mode on a meta input of shape
    ``(batch_size, *input_shape)`` under :class:`~torch.utils.flop_counter.FlopCounterMode`; only the
    convolution and matrix-multiplication ops are kept, halved (FLOPs = 2 x MACs) and divided by
    ``batch_size``. The caller's model keeps its device, values and training flag.

    Args:
        model: The network to cost, on any device.
        input_shape: Shape of one sample without the batch axis, e.g. ``(3, 32, 32)``.
        batch_size: Batch size of the counted forward pass; the result is per sample. Models whose cost
            does not scale linearly with the batch are costed at this batch size.

    Returns:
        Multiply-adds per sample (divide by ``1e9`` for GMACs; GFLOPs are twice that).

    Raises:
        ValueError: If ``input_shape`` is empty or has a non-positive entry, if ``batch_size`` is not an
            int >= 1, or if the forward pass fails on the given shape (the input shape does not fit the
            model); the last message includes the original error.

    Example:
        >>> from lightning_ensembles.models import WideResNet
        >>> count_macs(WideResNet(depth=16, width=4), (3, 32, 32))
        392612352
        >>> count_macs(WideResNet(depth=16, width=2, in_channels=1), (1, 8, 8))
        6301952
    """
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(
            f"Expected `input_shape` to be a non-empty sequence of ints >= 1 (one sample's shape without "
            f"the batch axis, e.g. (3, 32, 32)), but got {input_shape!r}."
        )
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be an int >= 1, but got {batch_size!r}.")

    meta_model = _meta_copy(model).eval()
    x = torch.empty((batch_size, *shape), dtype=_input_dtype(model), device="meta")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            meta_model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"Expected `input_shape` to fit the model, but a forward pass of {type(model).__name__} on a "
            f"(meta) input of shape {(batch_size, *shape)} failed: {err}"
        ) from err
    flops = sum(
        count for op, count in counter.get_flop_counts().get("Global", {}).items() if op in _COUNTED_OPS
    )
    return flops // (2 * batch_size)


def count_params(model: nn.Module) -> int:
    """Count all parameters of ``model``, trainable or not (shared parameters count once).

    Args:
        model: The network.

    Returns:
        The number of parameter elements.

    Example:
        >>> from lightning_ensembles.models import WideResNet
        >>> count_params(WideResNet(depth=28, width=10))
        36479194
    """
    return sum(p.numel() for p in model.parameters())
