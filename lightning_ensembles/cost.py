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
element of every bias (of linear layers and of convolutions that have one).

:func:`count_training_macs` counts one training step instead: the forward pass in training mode plus the
backward pass of a cross-entropy loss, again only convolutions and matrix multiplications, again on the
``meta`` device. Stock ``FlopCounterMode`` counts the weight gradient of a grouped (e.g. depthwise)
convolution as if it had ``groups = 1``, which makes EfficientNet's training cost come out about 14 times
too high (41.7 x its forward instead of about 3 x); this module replaces that formula with one that is exact
for any ``groups``: the input gradient and the weight gradient of a convolution each cost as many
multiply-adds as its forward pass.

:func:`member_macs` is the one cost source of a run: a count asked for within a scope (``scope=trainer``
in the callbacks and the module) is made once per member and configuration and read by everyone after, so
``FlopsMonitor``, ``EnsembleSizeAblation`` and ``CascadeMonitor`` count each member once between them and
log the same numbers.

:func:`ptflops_macs` is the independent cross-check: ptflops' ``aten`` backend on a real forward pass at batch
1 (an optional dependency, ``pip install "lightning-ensembles[flops]"``). The tests compare the two counts,
and ``FlopsMonitor(cross_check=True)`` logs both.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Hashable, Sequence
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ensembles._compat import private_aten_ops
from lightning_ensembles._scope import scoped_store
from lightning_ensembles._validation import check_int, check_shape

__all__ = ["count_macs", "count_params", "count_training_macs", "member_macs", "ptflops_macs"]

_aten = torch.ops.aten

#: Forward convolution and matrix-multiplication ops whose FLOPs :func:`count_macs` keeps. Backward and
#: attention kernels are deliberately left out: the unit is forward multiply-adds of conv and linear layers.
_COUNTED_OPS = frozenset(
    {
        _aten.convolution,
        _aten.cudnn_convolution,
        _aten.convolution_overrideable,
        _aten.mm,
        _aten.addmm,
        _aten.bmm,
        _aten.baddbmm,
        *private_aten_ops(),  # _convolution, _slow_conv2d_forward, _scaled_mm
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


def _check_input_shape(input_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    """Validate ``input_shape`` and ``batch_size``; return the shape as a tuple."""
    shape = check_shape(input_shape, "input_shape")
    check_int(batch_size, "batch_size", 1)
    return shape


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
    shape = _check_input_shape(input_shape, batch_size)

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


def _conv_forward_macs(
    x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int], transposed: bool
) -> int:
    """Multiply-adds of one (possibly grouped or transposed) convolution over the whole batch.

    The weight already holds only one group's channels: ``(C_out, C_in / groups, *kernel)`` for a
    convolution, ``(C_in, C_out / groups, *kernel)`` for a transposed one. Every element of ``w`` meets every
    spatial position of the output (of the input, for a transposed convolution) once per sample.
    """
    spatial = (x_shape if transposed else out_shape)[2:]
    return x_shape[0] * prod(spatial) * prod(w_shape)


def _conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: Sequence[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs (2 x multiply-adds) of ``aten.convolution_backward``, exact for any ``groups``.

    The gradient of the input is a transposed convolution of the output gradient with the same weight, and
    the gradient of the weight correlates the input with the output gradient within each group; each
    multiplies every pair (weight element, output position) exactly once per sample, like the forward pass.
    So each requested gradient (``output_mask`` = input, weight, bias) costs the forward's multiply-adds;
    the bias gradient is a sum and free. Stock ``FlopCounterMode`` multiplies the weight term by ``groups``.
    """
    forward = _conv_forward_macs(x_shape, w_shape, grad_out_shape, transposed)
    return 2 * forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


#: Ops kept by :func:`count_training_macs`: the forward ones plus the convolution backward (the backward of
#: a linear layer is ``mm`` ops, already in :data:`_COUNTED_OPS`).
_TRAINING_OPS = _COUNTED_OPS | {_aten.convolution_backward}


def count_training_macs(
    model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, num_classes: int | None = None
) -> int:
    """Count the multiply-adds per sample of one training step's forward and backward pass.

    The model is copied to the ``meta`` device, put in training mode and run on a meta input of shape
    ``(batch_size, *input_shape)``; the cross-entropy of its output against meta class targets is then
    back-propagated, all under :class:`~torch.utils.flop_counter.FlopCounterMode`. As in
    :func:`count_macs`, only convolutions and matrix multiplications count (forward and backward), halved
    to multiply-adds and divided by ``batch_size``; the optimizer update is not counted. The backward pass
    computes what autograd computes: a weight gradient for every parameter with ``requires_grad`` and
    input gradients for every layer but the first (the input needs no gradient), so a convolution or linear
    layer costs about three times its forward pass and the whole step a little under three times
    :func:`count_macs`. Grouped and depthwise convolutions are counted exactly (see the module docstring).
    A model without trainable parameters costs its forward pass only. The caller's model is untouched, and
    the count works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (e.g. in a test loop).

    Args:
        model: The network to cost, on any device.
        input_shape: Shape of one sample without the batch axis, e.g. ``(3, 32, 32)``.
        batch_size: Batch size of the counted step; the result is per sample. Batch norm on a single value
            per channel (after global pooling, or ``BatchNorm1d`` after a linear layer) cannot train on a
            batch of one: use ``batch_size=2`` for such models.
        num_classes: If given, the number of classes the model's output must have along axis 1.

    Returns:
        Multiply-adds per sample of forward plus backward (GFLOPs are twice the GMACs).

    Raises:
        ValueError: If ``input_shape``, ``batch_size`` or ``num_classes`` is invalid, if the model does not
            return a tensor of logits of shape ``(B, C, ...)`` (with ``C == num_classes`` when given), or if
            the forward or backward pass fails on the given shape; the last message includes the original
            error.

    Example:
        >>> from lightning_ensembles.models import WideResNet
        >>> model = WideResNet(depth=16, width=4)
        >>> count_training_macs(model, (3, 32, 32), num_classes=10)
        1177394688
        >>> round(count_training_macs(model, (3, 32, 32)) / count_macs(model, (3, 32, 32)), 3)
        2.999
    """
    shape = _check_input_shape(input_shape, batch_size)
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ValueError(f"Expected `num_classes` to be None or an int >= 1, but got {num_classes!r}.")

    counter = FlopCounterMode(
        display=False, custom_mapping={_aten.convolution_backward: _conv_backward_flops}
    )
    # Lightning runs evaluation hooks under inference mode; meta tensors made there could not enter autograd.
    with torch.inference_mode(False), torch.enable_grad():
        meta_model = _meta_copy(model).train()
        x = torch.empty((batch_size, *shape), dtype=_input_dtype(model), device="meta")
        with counter:
            try:
                out = meta_model(x)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise _step_error(model, (batch_size, *shape), "forward", err) from err
            loss = _meta_loss(model, out, batch_size, num_classes)
            if loss.requires_grad:
                try:
                    loss.backward()
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    raise _step_error(model, (batch_size, *shape), "backward", err) from err
    flops = sum(
        count for op, count in counter.get_flop_counts().get("Global", {}).items() if op in _TRAINING_OPS
    )
    return flops // (2 * batch_size)


def _step_error(model: nn.Module, shape: tuple[int, ...], stage: str, err: Exception) -> ValueError:
    return ValueError(
        f"Expected `input_shape` to fit the model, but the training {stage} pass of {type(model).__name__} "
        f"on a (meta) input of shape {shape} failed: {err}"
    )


def _meta_loss(model: nn.Module, out: object, batch_size: int, num_classes: int | None) -> torch.Tensor:
    """Cross-entropy of ``out`` (``(B, C, ...)`` logits) against meta targets of the matching shape."""
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != batch_size:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"Expected {type(model).__name__} to return logits of shape (B, C, ...) with B = {batch_size} "
            f"for a training step, but it returned {got}."
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(
            f"Expected {type(model).__name__} to return `num_classes` = {num_classes} logits along axis 1, "
            f"but its output has shape {tuple(out.shape)}."
        )
    target = torch.empty((out.shape[0], *out.shape[2:]), dtype=torch.long, device=out.device)
    return F.cross_entropy(out, target)


# scope -> member -> configuration -> multiply-adds per sample: counts shared within a scope (e.g. a Trainer).
_SHARED: weakref.WeakKeyDictionary[object, weakref.WeakKeyDictionary[nn.Module, dict[Hashable, int]]]
_SHARED = weakref.WeakKeyDictionary()


def member_macs(
    member: nn.Module,
    input_shape: Sequence[int],
    *,
    training: bool = False,
    batch_size: int = 1,
    scope: object | None = None,
) -> int:
    """Multiply-adds per sample of one member, counted once per ``scope``.

    :func:`count_macs` (or, with ``training``, :func:`count_training_macs`) of ``member``; with a ``scope``
    (any object that can be weakly referenced; the callbacks pass the Trainer) a count already made for this
    member object in this scope, with the same shape, batch size and (for a training step) the same
    trainable parameters, is returned without counting again. What is stored lives as long as the scope.

    Args:
        member: the network to cost.
        input_shape: one sample's shape without the batch axis.
        training: count one training step (forward and backward) instead of the forward pass.
        batch_size: batch size of the counted pass; the result is per sample.
        scope: share counts within this object's lifetime, or ``None`` to always count.

    Returns:
        Multiply-adds per sample.

    Raises:
        ValueError: as :func:`count_macs` and :func:`count_training_macs`, or for a ``scope`` that cannot be
            weakly referenced.

    Example:
        >>> class Run: ...
        >>> run, layer = Run(), nn.Linear(4, 3)
        >>> member_macs(layer, (4,), scope=run), member_macs(layer, (4,), training=True, scope=run)
        (12, 24)
    """
    shape = tuple(input_shape)
    trainable = tuple(p.requires_grad for p in member.parameters()) if training else ()
    key: Hashable = (training, shape, batch_size, trainable)
    store = scoped_store(_SHARED, scope, member)
    if store is not None and key in store:
        return store[key]
    if training:
        macs = count_training_macs(member, shape, batch_size=batch_size)
    else:
        macs = count_macs(member, shape, batch_size=batch_size)
    if store is not None:
        store[key] = macs
    return macs


def ptflops_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward multiply-adds per sample as ptflops' ``aten`` backend counts them: the independent cross-check.

    ptflops runs one real forward pass at batch 1, here on a CPU copy of ``model`` in eval mode without
    gradients, so the caller's model (its weights, BatchNorm statistics and mode) is untouched. It counts the
    convolutions and matrix multiplications :func:`count_macs` counts, plus one operation per output element of
    every bias, so its number is slightly larger (by ``num_classes`` for a Wide ResNet).

    Args:
        model: the network.
        input_shape: one sample's shape without the batch axis.

    Returns:
        ptflops' count.

    Raises:
        ImportError: if ptflops is not installed (it is the ``flops`` extra).
        ValueError: for an ``input_shape`` that is not a non-empty sequence of ints >= 1.
    """
    try:
        import ptflops
    except ImportError as err:
        raise ImportError(
            'The ptflops cross-check needs ptflops: `pip install "lightning-ensembles[flops]"` (or `pip install '
            "ptflops`)."
        ) from err
    shape = _check_input_shape(input_shape, 1)
    copied = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        macs, _ = ptflops.get_model_complexity_info(
            copied, shape, backend="aten", as_strings=False, print_per_layer_stat=False
        )
    return int(macs)
