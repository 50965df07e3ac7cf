"""Export a trained ensemble as one deployable file: every member and the aggregation in one graph.

Kondratyuk et al. 2020 (*When Ensembling Smaller Models is More Efficient than Single Large Models*, arXiv
2005.00570) put an ensemble of ``M`` small networks in the place of one large one; deploying it means shipping
the ``M`` members *and* the rule that averages them. :class:`ExportableEnsemble` is that inference function as
a plain ``nn.Module``: every member in eval mode, one after another, the fitted temperatures, the module's
aggregation, probabilities out. :func:`export_ensemble` traces it once with ``torch.export`` (a dynamic batch
axis) and writes one file:

- ``"pt2"``: a ``torch.export`` program (``torch.export.save``), loaded with ``torch.export.load``;
- ``"onnx"``: the same program translated by ``torch.onnx.export(..., dynamo=True)``, run by onnxruntime or any
  ONNX runtime (needs the ``export`` extra: onnx, onnxscript, onnxruntime).

By default the file is checked before it is written: it is loaded back and run at batch sizes 1 and 7 (neither
is the size it was traced at), and its probabilities must equal the eager ones within ``tolerance``. The file
is written atomically, so a failed export or check leaves no file, or the previous one, at the path.

On the command line (a checkpoint written by ``Trainer.fit`` or a reproduction):

    python -m lightning_ensembles.export CKPT --format onnx [--input_shape 1 8 8] [--out PATH]

``--input_shape`` defaults to the shape the checkpoint recorded in training
(:attr:`~lightning_ensembles.module.EnsembleLightningModule.input_shape`). ``--help`` lists every flag; ``--config export.yaml`` reads them from a YAML file (``input_shape: [1, 8, 8]``).

Example:
    >>> from torch import nn
    >>> from lightning_ensembles import EnsembleLightningModule
    >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
    >>> ExportableEnsemble(module)(torch.randn(5, 4)).shape
    torch.Size([5, 3])
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_ensembles._compat import uncompiled
from lightning_ensembles._validation import check_bool, check_choice, check_shape, command_line_errors
from lightning_ensembles.module import EnsembleLightningModule, as_ensemble
from lightning_ensembles.results import atomic_write_text

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

__all__ = ["FORMATS", "VERIFY_BATCH_SIZES", "ExportResult", "ExportableEnsemble", "export_ensemble", "main"]

FORMATS = ("pt2", "onnx")
"""The file formats :func:`export_ensemble` writes."""
VERIFY_BATCH_SIZES = (1, 7)
"""The batch sizes a written file is checked at: neither is the size it is traced at."""
_TRACE_BATCH = 2  # torch.export specialises a dimension of size 0 or 1 to a constant: trace at 2
_PROGRAM = "python -m lightning_ensembles.export"
_EXTRA_HINT = "pip install 'lightning-ensembles[export]' (onnx, onnxscript, onnxruntime)"


def _ensemble_log_probs(logits: Tensor, aggregation: str) -> Tensor:
    """The ensemble's log-probabilities ``(B, C)`` from member logits ``(M, B, C)``.

    The last entry of :func:`~lightning_ensembles.aggregation.cumulative_log_probs` (the same rules: mean of
    probabilities in log space, mean of logits, vote with ties to the lowest class), computed for the full
    ensemble only and without tensors created on a device, so the traced graph holds no device constant.
    """
    num_members = logits.shape[0]
    if aggregation == "mean_probs":
        return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(num_members)
    if aggregation == "mean_logits":
        return (logits.sum(dim=0) / num_members).log_softmax(dim=-1)
    votes = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return (votes.sum(dim=0) / num_members).log()


class ExportableEnsemble(nn.Module):
    """An ensemble's inference as a plain ``nn.Module``: what :func:`export_ensemble` traces and writes.

    Holds a copy of the module's members, in eval mode and without gradients (a snapshot: training the module
    later does not change it), its member temperatures ``(M,)``, its ensemble temperature and its
    aggregation. :meth:`forward` runs the members one after another (``execution="vmap"`` does not apply; a
    member compiled with ``compile=True`` or ``torch.compile`` is copied uncompiled, and weights kept
    ``channels_last`` are copied contiguous) and computes what
    ``predict_step`` returns as ``probs`` (and, with ``member_probs``, as ``member_probs``): member logits in
    float32 divided by their temperatures, aggregated, divided by the ensemble temperature, as probabilities.
    It stays in eval mode: ``train()`` does not switch BatchNorm or dropout back to training.

    Args:
        module: the trained ensemble.
        member_probs: also return each member's probabilities ``(M, B, C)``, as ``predict_step`` does with
            ``predict_members`` (for uncertainty scores such as mutual information).

    Raises:
        TypeError: if ``module`` is not an :class:`~lightning_ensembles.EnsembleLightningModule`.
        ValueError: if ``member_probs`` is not a bool.

    Example:
        >>> from torch import nn
        >>> from lightning_ensembles import EnsembleLightningModule
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> probs, member_probs = ExportableEnsemble(module, member_probs=True)(torch.randn(5, 4))
        >>> tuple(probs.shape), tuple(member_probs.shape)
        ((5, 3), (2, 5, 3))
    """

    member_temperature: Tensor
    ensemble_temperature: Tensor

    def __init__(self, module: EnsembleLightningModule, member_probs: bool = False) -> None:
        super().__init__()
        module = as_ensemble(module, "ExportableEnsemble(module=...)")
        self.member_probs = check_bool(member_probs, "member_probs")
        self.aggregation = module.aggregation
        self.num_classes = module.num_classes
        # `torch.compile(net)` wraps the module (`_orig_mod`); `nn.Module.compile()` (compile=True) is dropped
        # by the copy. Either way the copy runs the plain member.
        plain = [uncompiled(member) for member in module.members]
        self.members = copy.deepcopy(nn.ModuleList(plain))
        self.members.requires_grad_(False)
        # `channels_last=True` is an eager speed layout; torch.export.save expects contiguous weights.
        self.members.to(memory_format=torch.contiguous_format)
        self.register_buffer("member_temperature", module.member_temperature.detach().clone().float())
        self.register_buffer("ensemble_temperature", module.ensemble_temperature.detach().clone().float())
        self.train(False)

    @override
    def train(self, mode: bool = True) -> ExportableEnsemble:
        """Inference only: every submodule stays in eval mode, whatever ``mode`` is.

        Returns:
            This module.
        """
        return super().train(False)

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits in float32, before temperatures.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.

        Returns:
            Shape ``(M, B, C)``.
        """
        return torch.stack([member(x) for member in self.members]).float()

    @override
    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The ensemble's probabilities for a batch, as ``predict_step`` computes them.

        Args:
            x: a batch of inputs, shape ``(B, ...)``.

        Returns:
            ``probs`` ``(B, C)``; with ``member_probs``, the pair ``(probs, member_probs)``, the latter
            ``(M, B, C)``.
        """
        logits = self.member_logits(x) / self.member_temperature.view(-1, 1, 1)
        log_probs = _ensemble_log_probs(logits, self.aggregation)
        probs = F.log_softmax(log_probs / self.ensemble_temperature, dim=-1).exp().clamp(0.0, 1.0)
        if self.member_probs:
            return probs, logits.softmax(dim=-1)
        return probs


class ExportResult(NamedTuple):
    """What :func:`export_ensemble` wrote.

    Attributes:
        path: the file.
        format: ``"pt2"`` or ``"onnx"``.
        size_bytes: the file's size.
        max_abs_diff: the largest absolute difference between the file's outputs and the eager ones over
            :data:`VERIFY_BATCH_SIZES`; ``None`` when not verified.
    """

    path: Path
    format: str
    size_bytes: int
    max_abs_diff: float | None


def export_ensemble(
    module: EnsembleLightningModule,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    format: str = "pt2",
    member_probs: bool = False,
    verify: bool = True,
    tolerance: float = 1e-5,
) -> ExportResult:
    """Write an ensemble, every member and the aggregation, as one ``torch.export`` or ONNX file.

    The graph is :class:`ExportableEnsemble`'s, traced with ``torch.export`` at batch size 2 with a dynamic
    batch axis (any batch size >= 1 runs), on the device the module is on, with inputs of the dtype of its
    parameters. Its input is ``x`` ``(B, *input_shape)``; its output ``probs`` ``(B, C)``, and
    ``member_probs`` ``(M, B, C)`` when asked for. ONNX files name them so and call the batch axis ``batch``.

    Args:
        module: the trained ensemble (its mode is left as it is: the file holds eval-mode members).
        path: the file to write; its folder is created if needed.
        input_shape: one sample's shape without the batch axis, e.g. ``(1, 8, 8)`` for digits.
        format: ``"pt2"`` (load with ``torch.export.load(path).module()``) or ``"onnx"`` (needs the
            ``export`` extra).
        member_probs: also output each member's probabilities (see :class:`ExportableEnsemble`).
        verify: load the file back and compare it with the eager ensemble at batch sizes
            :data:`VERIFY_BATCH_SIZES` on random inputs before writing it (ONNX with onnxruntime on the CPU).
        tolerance: the largest absolute difference of probabilities ``verify`` accepts.

    Returns:
        The path, format, size in bytes and (with ``verify``) the largest difference found.

    Raises:
        ValueError: for an argument that is not allowed (naming it, the value and what is allowed), members
            that do not take ``input_shape`` or do not give ``(B, C)`` logits, a member that cannot be traced
            (naming its index, class and the tracer's error: data-dependent Python control flow, for
            instance), or a file that differs from the eager ensemble by more than ``tolerance``. Nothing
            is written then.
        ModuleNotFoundError: for ``"onnx"`` without onnxscript (or onnxruntime, when verifying).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from lightning_ensembles import EnsembleLightningModule
        >>> module = EnsembleLightningModule(member=lambda: nn.Linear(4, 3), num_members=2, num_classes=3)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = export_ensemble(module, Path(folder) / "ensemble.pt2", input_shape=(4,))
        ...     program = torch.export.load(result.path).module()
        ...     probs = program(torch.randn(5, 4))
        >>> tuple(probs.shape), result.max_abs_diff < 1e-5
        ((5, 3), True)
    """
    check_choice(format, "--format", FORMATS)
    shape = check_shape(input_shape, "--input_shape")
    check_bool(verify, "verify")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"Expected `--tolerance` to be a number >= 0, but got {tolerance!r}.")
    if format == "onnx":
        _require("onnxscript", "to write ONNX")
        if verify:
            _require("onnxruntime", "to verify ONNX (or pass verify=False / --no-verify)")
    wrapper = ExportableEnsemble(module, member_probs=member_probs)
    device, dtype = _device_and_dtype(module)
    generator = torch.Generator().manual_seed(0)  # the global random state is left alone
    example = torch.randn(_TRACE_BATCH, *shape, generator=generator).to(device=device, dtype=dtype)
    _check_members(wrapper, example, shape)
    batch = torch.export.Dim("batch", min=1)
    program = _trace(wrapper, example, batch, format)
    data = _onnx_bytes(wrapper, program, example) if format == "onnx" else _pt2_bytes(program)
    max_abs_diff = None
    if verify:
        max_abs_diff = _verify(wrapper, data, format, shape, device, dtype)
        if not max_abs_diff <= tolerance:
            raise ValueError(
                f"Expected the exported {format} file to equal the eager ensemble within `--tolerance` = "
                f"{tolerance:g}, but its outputs differ by up to {max_abs_diff:.3g} at batch sizes "
                f"{list(VERIFY_BATCH_SIZES)}; nothing was written to {os.fspath(path)!r}. Raise the tolerance, "
                "or pass verify=False (`--no-verify`) to write it anyway."
            )
    written = atomic_write_text(path, data)
    return ExportResult(written, format, len(data), max_abs_diff)


# ---------------------------------------------------------------------------------------------- steps


def _require(name: str, purpose: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"{name} is needed {purpose}: {_EXTRA_HINT}.", name=name)


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def _describe(index: int, member: nn.Module) -> str:
    return f"member {index} ({type(member).__name__})"


def _first_line(err: BaseException, root: bool = False) -> str:
    """``Type: first line`` of an error (with ``root``, of the error it was raised from, all the way down)."""
    while root and err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # no terminal colours
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _check_members(wrapper: ExportableEnsemble, example: Tensor, shape: tuple[int, ...]) -> None:
    """Run each member eagerly on the example: it must take ``input_shape`` and give ``(B, C)`` logits."""
    expected = (example.shape[0], wrapper.num_classes)
    with torch.no_grad():
        for index, member in enumerate(wrapper.members):
            try:
                out = member(example)
            except Exception as err:  # noqa: BLE001 - re-raised with the member and the shape named
                raise ValueError(
                    f"Expected `--input_shape` {list(shape)} to be one sample's shape that every member takes, "
                    f"but {_describe(index, member)} fails on a batch of shape {tuple(example.shape)}: "
                    f"{_first_line(err)}"
                ) from err
            if not isinstance(out, Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"Expected every member to output one tensor of logits of shape (B, C) = {expected}, but "
                    f"{_describe(index, member)} gave {got}."
                )


def _export(model: nn.Module, example: Tensor, batch: Any) -> torch.export.ExportedProgram:
    return torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}, strict=False)


def _where(err: BaseException) -> str:
    """``at FILE:LINE: `code``` of the last source line torch.export quotes in its error, if it quotes one."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n[ \t]+([^\n]+)', str(err))
    if not frames:
        return ""
    file, line, code = frames[-1]
    return f" at {file}:{line}: `{code.strip()}`"


def _untraceable(index: int, member: nn.Module, format: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Cannot export `module` as {format!r}: {_describe(index, member)} cannot be traced by torch.export with "
        f"a dynamic batch axis ({_first_line(err)}{_where(err)}). Allowed are members whose forward torch.export can trace: "
        "tensor operations whose control flow does not depend on tensor values (no `if x.sum() > 0:`, "
        "`.item()` or `.tolist()`; use torch.where or torch.cond), and no reshape that fixes the batch size."
    )


def _trace(
    wrapper: ExportableEnsemble, example: Tensor, batch: Any, format: str
) -> torch.export.ExportedProgram:
    """``torch.export`` the wrapper; if that fails, name the first member that cannot be traced on its own."""
    try:
        return _export(wrapper, example, batch)
    except Exception as err:  # noqa: BLE001 - re-raised naming the member, or as it is
        for index, member in enumerate(wrapper.members):
            try:
                _export(member, example, batch)
            except Exception as member_err:  # noqa: BLE001 - this member is the cause
                raise _untraceable(index, member, format, member_err) from err
        raise ValueError(
            f"Cannot export `module` as {format!r}: every member traces on its own, but the ensemble does not "
            f"({_first_line(err)})."
        ) from err


def _pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _onnx_bytes(wrapper: ExportableEnsemble, program: torch.export.ExportedProgram, example: Tensor) -> bytes:
    """The traced program as ONNX (the same graph: ``torch.onnx`` does not trace again), batch axis ``batch``."""
    output_names = ["probs", "member_probs"] if wrapper.member_probs else ["probs"]
    try:
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, input_names=["x"], output_names=output_names, verbose=False
        )
    except Exception as err:  # noqa: BLE001 - re-raised naming the member that does not translate
        for index, member in enumerate(wrapper.members):
            try:
                torch.onnx.export(
                    _export(member, example, torch.export.Dim("batch", min=1)),
                    (example,),
                    dynamo=True,
                    verbose=False,
                )
            except Exception as member_err:  # noqa: BLE001 - this member is the cause
                raise ValueError(
                    f"Cannot export `module` as 'onnx': {_describe(index, member)} traces with torch.export but "
                    f"does not translate to ONNX ({_first_line(member_err, root=True)}). Allowed are members made of "
                    "operators torch.onnx supports; export as 'pt2' instead."
                ) from err
        raise ValueError(f"Cannot export `module` as 'onnx': {_first_line(err, root=True)}") from err
    assert onnx_program is not None  # f=None: the program is returned
    model = onnx_program.model_proto
    _rename_batch_axis(model)
    return bytes(model.SerializeToString())


def _rename_batch_axis(model: Any) -> None:
    """Call the symbolic batch dimension ``batch`` (torch names it after its internal symbol, ``s77``)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if dims else ""
    if not symbol:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _verify(
    wrapper: ExportableEnsemble,
    data: bytes,
    format: str,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """The largest absolute difference between the file's outputs and the eager ones, over the check batches."""
    if format == "pt2":
        loaded = torch.export.load(io.BytesIO(data)).module()

        def run(x: Tensor) -> list[Tensor]:
            out = loaded(x)
            return list(out) if isinstance(out, (tuple, list)) else [out]

    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])

        def run(x: Tensor) -> list[Tensor]:
            outputs = session.run(None, {"x": x.detach().cpu().numpy()})
            return [torch.from_numpy(out).to(device) for out in outputs]

    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for size in VERIFY_BATCH_SIZES:
            x = torch.randn(size, *shape, generator=generator).to(device=device, dtype=dtype)
            expected = wrapper(x)
            expected = list(expected) if isinstance(expected, tuple) else [expected]
            got = run(x)
            if len(got) != len(expected):
                return math.inf
            for a, b in zip(got, expected):
                if a.shape != b.shape:
                    return math.inf
                worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> ArgumentParser:
    """The command line: jsonargparse, so ``--config`` takes a YAML of these flags and a bad flag prints the
    usage and one ``error:`` line with exit status 2, as the package's other commands do."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog=_PROGRAM,
        description=(
            "Write a trained ensemble (an EnsembleLightningModule checkpoint) as one file holding every member "
            "and the aggregation, with a dynamic batch axis: a torch.export program (.pt2) or ONNX. The file is "
            "loaded back and compared with the eager ensemble at batch sizes 1 and 7 before it is written."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these flags.")
    parser.add_argument(
        "checkpoint",
        type=str,
        metavar="CKPT",
        help="The checkpoint (written by Trainer.fit or a reproduction).",
    )
    parser.add_argument(
        "--input_shape",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help=(
            "One sample's shape without the batch axis, e.g. --input_shape 1 8 8 (digits), 3 32 32 (CIFAR). "
            "Default: the shape the checkpoint recorded when it was trained."
        ),
    )
    parser.add_argument(
        "--format", type=str, default="pt2", metavar="{pt2,onnx}", help="pt2 (torch.export) or onnx."
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="The file to write; null writes CKPT with the suffix .pt2 or .onnx.",
    )
    parser.add_argument(
        "--member_probs",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help="Also output each member's probabilities (M, B, C) as `member_probs`.",
    )
    parser.add_argument(
        "--verify",
        action=ActionYesNo(no_prefix="no-"),
        nargs="?",
        default=True,
        help="Compare the written file with the eager ensemble; --no-verify (or --verify false) skips it.",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="The largest absolute difference of probabilities the comparison accepts.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> ExportResult:
    """Command-line entry point: ``python -m lightning_ensembles.export CKPT [--input_shape ...]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        What :func:`export_ensemble` returns.

    Raises:
        SystemExit: with status 2 for a bad flag (jsonargparse prints the usage and an ``error:`` line) and
            for a value not allowed or a checkpoint that does not exist or does not load (one ``error:`` line
            naming the flag).
    """
    args = _parser().parse_args(list(argv) if argv is not None else None)  # exits with status 2 on a bad flag
    with command_line_errors(_PROGRAM):
        check_choice(args.format, "--format", FORMATS)  # before the checkpoint is loaded
        if args.input_shape is not None:  # else the checkpoint's, below
            check_shape(args.input_shape, "--input_shape")
        module = EnsembleLightningModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
        input_shape = args.input_shape if args.input_shape is not None else module.input_shape
        if input_shape is None:
            raise ValueError(
                f"Expected `--input_shape` (one sample's shape, e.g. --input_shape 1 8 8), because "
                f"{args.checkpoint!r} records none: it was written before checkpoints kept the input shape."
            )
        out = args.out if args.out is not None else Path(args.checkpoint).with_suffix(f".{args.format}")
        result = export_ensemble(
            module,
            out,
            input_shape=input_shape,
            format=args.format,
            member_probs=args.member_probs,
            verify=args.verify,
            tolerance=args.tolerance,
        )
    check = (
        "not verified"
        if result.max_abs_diff is None
        else f"max |file - eager| = {result.max_abs_diff:.2g} at batch sizes {list(VERIFY_BATCH_SIZES)}"
    )
    print(f"wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.2f} MB; {check})")
    return result


if __name__ == "__main__":
    main()
