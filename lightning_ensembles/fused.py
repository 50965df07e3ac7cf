"""Fused execution of identical members: one ``torch.func.vmap`` call instead of a loop over members.

Small members leave a GPU mostly idle when run one after another (Kondratyuk et al. 2020 ensemble small
networks precisely to save cost). Running M identical members as one vectorised computation removes that
per-member launch overhead. The members keep their own parameters and buffers: each call stacks them along
a new leading member axis, runs ``torch.func.functional_call`` under ``vmap``, and
writes BatchNorm's running statistics back to each member afterwards. Gradients flow through the stack to
every member's own parameters, so optimizer groups, checkpoints and ``extract_member`` are unchanged, and
the outputs, gradients and running statistics equal the loop's up to float32 rounding (tested). Dropout
draws independent masks per member (``randomness="different"``).

``torch.func``'s own ensembling recipe (``stack_module_state``) creates new leaf tensors and loses the
members' identity; ``replace_all_batch_norm_modules_`` deletes running statistics. Neither is used here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["EXECUTIONS", "check_fusable", "choose_execution", "vmap_forward"]

EXECUTIONS = ("loop", "vmap", "auto")
log = logging.getLogger(__name__)


def check_fusable(members: Sequence[nn.Module], flag: str = "--model.execution") -> None:
    """Raise a clear error unless the members can run as one fused computation.

    Args:
        members: the members to fuse.
        flag: the CLI flag to name.

    Raises:
        ValueError: if the members differ in class, parameter or buffer names, shapes, dtypes or devices,
            naming the first difference.
    """
    if len(members) < 1:
        raise ValueError("Fused execution needs at least one member.")
    first = members[0]
    reference = {k: (tuple(v.shape), v.dtype, v.device) for k, v in first.state_dict().items()}
    for i, member in enumerate(members[1:], start=1):
        if type(member) is not type(first):
            raise ValueError(
                f"`{flag}` fuses identical members, but member {i} is a {type(member).__name__} and member 0 "
                f"a {type(first).__name__}; use 'loop' for mixed architectures."
            )
        state = {k: (tuple(v.shape), v.dtype, v.device) for k, v in member.state_dict().items()}
        if state.keys() != reference.keys():
            diff = sorted(set(state) ^ set(reference))[:3]
            raise ValueError(
                f"`{flag}` fuses identical members, but member {i} has other parameters or buffers than member "
                f"0 (e.g. {diff}); use 'loop' for different architectures."
            )
        for key, spec in state.items():
            if spec != reference[key]:
                raise ValueError(
                    f"`{flag}` fuses identical members, but `{key}` of member {i} has {_describe(spec)} and "
                    f"of member 0 {_describe(reference[key])}; use 'loop', or give every member the same "
                    "shapes, dtype and device."
                )


def _describe(spec: tuple[tuple[int, ...], torch.dtype, torch.device]) -> str:
    shape, dtype, device = spec
    return f"shape {shape}, {str(dtype).removeprefix('torch.')} on {device}"


def vmap_forward(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Run identical members on one input as one vectorised computation.

    Args:
        members: ``M`` members with identical structure (see :func:`check_fusable`), in train or eval mode
            (all the same).
        x: the shared input batch, shape ``(B, ...)``.

    Returns:
        Outputs stacked along a leading member axis, ``(M, B, C)``. BatchNorm running statistics of each
        member are updated as in its own forward pass (in training mode).

    Raises:
        ValueError: if the members are not identical in structure or not all in the same mode.

    Example:
        >>> members = [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(2)]
        >>> vmap_forward(members, torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])
    """
    if len({m.training for m in members}) != 1:
        raise ValueError("Fused execution needs every member in the same mode (all train or all eval).")
    # One name -> tensor dict per member, then one stack per name: O(M * P). The stacks are rebuilt on every
    # call (the optimizer changes the parameters in place every step) and stay differentiable, so each
    # member's parameters receive their own gradient.
    params = _stack_by_name([dict(m.named_parameters()) for m in members])
    buffers = _stack_by_name([dict(m.named_buffers()) for m in members])
    return _run_stacked(members, params, buffers, x)


def _run_stacked(
    members: Sequence[nn.Module], params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor
) -> Tensor:
    """Run the first member's structure on the stacked state ``(M, ...)``; write BatchNorm statistics back."""
    base = members[0]

    def one(p: dict[str, Tensor], b: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(base, (p, b), (inp,))

    out = vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    if base.training and buffers:
        with torch.no_grad():
            for i, member in enumerate(members):
                for name, buf in member.named_buffers():
                    buf.copy_(buffers[name][i])
    return out


def _stack_by_name(tensors: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the members' tensors of each name (in the first member's order) along a new member axis."""
    return {name: torch.stack([member[name] for member in tensors]) for name in tensors[0]}


def choose_execution(
    members: Sequence[nn.Module], x: Tensor, repeats: int = 3, measure_on_cpu: bool = False
) -> str:
    """Time the loop and the fused path once on ``x`` and return the faster (``"loop"`` or ``"vmap"``).

    Mixed architectures always get ``"loop"``. So does a CPU input: on the 2-core CPU we measured
    (``benchmarks/RESULTS.md``), vmap ran at 0.59-0.84x the loop's speed for WRN-16-1/2/4 at M = 4, and a short
    timing on a shared CPU is too noisy to overrule that. The timing runs in eval mode without gradients, so
    it neither trains nor changes BatchNorm statistics, and the members' modes are restored.

    Args:
        members: the members to run.
        x: a representative input batch.
        repeats: timed runs of each path (after one warm-up); the median counts.
        measure_on_cpu: time on CPU inputs too instead of choosing the loop.

    If the fused path raises (vmap cannot run some operation, e.g. under CUDA autocast), the loop is chosen
    and the reason is logged as a warning: ``execution="auto"`` never fails where the loop works.

    Returns:
        ``"vmap"`` if it ran and was faster, else ``"loop"``.
    """
    try:
        check_fusable(members)
    except ValueError:
        return "loop"
    if x.device.type == "cpu" and not measure_on_cpu:
        return "loop"
    modes = [m.training for m in members]
    timings: dict[str, float] = {}
    try:
        for m in members:
            m.eval()
        with torch.no_grad():
            for name, run in (
                ("loop", lambda: [m(x) for m in members]),
                ("vmap", lambda: vmap_forward(members, x)),
            ):
                try:
                    run()  # warm-up
                except Exception as err:  # only the fused path may fail here: the loop is the fallback
                    if name == "loop":
                        raise
                    log.warning(
                        "execution='auto' chose loop: the fused (vmap) path raised %s: %s",
                        type(err).__name__,
                        err,
                    )
                    return "loop"
                samples = []
                for _ in range(repeats):
                    if x.is_cuda:
                        torch.cuda.synchronize(x.device)
                    start = time.perf_counter()
                    run()
                    if x.is_cuda:
                        torch.cuda.synchronize(x.device)
                    samples.append(time.perf_counter() - start)
                timings[name] = sorted(samples)[len(samples) // 2]
    finally:
        for m, mode in zip(members, modes):
            m.train(mode)
    choice = "vmap" if timings["vmap"] < timings["loop"] else "loop"
    log.info(
        "execution='auto' chose %s (loop %.3f ms, vmap %.3f ms)",
        choice,
        1e3 * timings["loop"],
        1e3 * timings["vmap"],
    )
    return choice
