"""Eager argument validation shared by the package (DESIGN rule 6): the one place argument checks live.

Every message names the argument or CLI flag, the value given and what is allowed:
"Expected `--model.num_members` to be an int >= 1, but got 0."

How the argument is named (the ``flag`` every helper takes):

- the model and data modules, whose arguments are CLI flags of their own: the flag, ``"--model.num_members"``,
  ``"--data.batch_size"``;
- callbacks, configured under ``--trainer.callbacks`` (many of them side by side, so the flag alone would not
  say which): the class and its constructor argument, ``init_arg("EnsembleSizeAblation", "num_subsets")``,
  which reads ``EnsembleSizeAblation(num_subsets=...)`` and is the ``init_args`` key of the YAML;
- functions and other classes: the bare argument name, ``"input_shape"``.

"Is this an ensemble module?" is asked in one way, :func:`lightning_ensembles.module.as_ensemble`, which
raises ``TypeError``. It lives beside the class it checks: this module is the lowest layer and imports
nothing of the package.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload


def expected(flag: str, allowed: str, value: object) -> ValueError:
    """The error for an argument that is not what is allowed, in the one wording of the package.

    For checks the helpers below do not cover (e.g. "an int of the form 6n+4"); raise what it returns.

    Args:
        flag: the argument or CLI flag.
        allowed: what is allowed, e.g. ``"an int >= 1"``.
        value: the value given.

    Returns:
        ``ValueError("Expected `flag` to be allowed, but got value.")``.

    Example:
        >>> raise expected("--model.member.init_args.depth", "an int of the form 6n+4", 12)
        Traceback (most recent call last):
        ...
        ValueError: Expected `--model.member.init_args.depth` to be an int of the form 6n+4, but got 12.
    """
    return ValueError(f"Expected `{flag}` to be {allowed}, but got {value!r}.")


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool (``True`` is an ``int`` to Python, never to a user).

    Args:
        value: the value.

    Returns:
        ``True`` for an int that is not a bool.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def init_arg(owner: str, name: str) -> str:
    """How a callback's constructor argument is named in messages: ``Owner(name=...)``.

    Args:
        owner: the class, e.g. ``"EnsembleSizeAblation"``.
        name: the argument, e.g. ``"num_subsets"``.

    Returns:
        The name for the ``flag`` of the checks in this module.

    Example:
        >>> check_int(0, init_arg("EnsembleSizeAblation", "num_subsets"), 1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `EnsembleSizeAblation(num_subsets=...)` to be an int >= 1, but got 0.
    """
    return f"{owner}({name}=...)"


def check_int(value: object, flag: str, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum)`` (bools excluded), else raise.

    Args:
        value: the value to check.
        flag: the argument or CLI flag named in the error, e.g. ``"--data.batch_size"``.
        minimum: the smallest allowed value.
        maximum: one past the largest allowed value, or ``None`` for no upper bound.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: if ``value`` is not such an int.

    Example:
        >>> check_int(0, "--model.num_members", 1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `--model.num_members` to be an int >= 1, but got 0.
    """
    if not (is_int(value) and value >= minimum and (maximum is None or value < maximum)):  # type: ignore[operator]
        raise expected(
            flag, f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum})", value
        )
    return value  # type: ignore[return-value]


def check_bool(value: object, flag: str) -> bool:
    """Return ``value`` if it is a bool, else raise.

    Args:
        value: the value to check.
        flag: the argument or CLI flag named in the error.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: if ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise expected(flag, "a bool", value)
    return value


def check_float(
    value: object,
    flag: str,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    *,
    include_maximum: bool = True,
) -> float:
    """Return ``value`` as a float if it is a real number in ``[minimum, maximum]`` (bools excluded), else raise.

    Args:
        value: the value to check; an int is accepted and converted.
        flag: the argument or CLI flag named in the error.
        minimum: the smallest allowed value (always allowed itself).
        maximum: the largest allowed value.
        include_maximum: whether ``maximum`` itself is allowed (``False`` for ``[0, 1)``).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: if ``value`` is not such a number (NaN never is).

    Example:
        >>> check_float(1.0, "decay", 0.0, 1.0, include_maximum=False)
        Traceback (most recent call last):
        ...
        ValueError: Expected `decay` to be a float in [0, 1), but got 1.0.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    below = number and (value < maximum if not include_maximum else value <= maximum)  # type: ignore[operator]
    if not (number and value >= minimum and below):  # type: ignore[operator]
        if math.isinf(maximum):
            allowed = f"a float >= {minimum:g}" if not math.isinf(minimum) else "a float"
        elif math.isinf(minimum):
            allowed = f"a float {'<=' if include_maximum else '<'} {maximum:g}"
        else:
            allowed = f"a float in [{minimum:g}, {maximum:g}{']' if include_maximum else ')'}"
        raise expected(flag, allowed, value)
    return float(value)  # type: ignore[arg-type]


def check_choice(value: object, flag: str, allowed: Iterable[object]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise.

    Args:
        value: the value to check.
        flag: the argument or CLI flag named in the error.
        allowed: the values allowed, listed in the error in this order.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: if ``value`` is not one of ``allowed``.

    Example:
        >>> check_choice("vmap", "mode", ("sequential", "fused"))
        Traceback (most recent call last):
        ...
        ValueError: Expected `mode` to be one of ['sequential', 'fused'], but got 'vmap'.
    """
    options = list(allowed)
    # True == 1: a bool is only one of the choices when that very bool is listed
    if value not in options or (isinstance(value, bool) and not any(o is value for o in options)):
        raise expected(flag, f"one of {options}", value)
    return value


@overload
def check_shape(value: object, flag: str = ..., *, optional: Literal[False] = ...) -> tuple[int, ...]: ...
@overload
def check_shape(value: object, flag: str = ..., *, optional: bool) -> tuple[int, ...] | None: ...
def check_shape(
    value: object, flag: str = "input_shape", *, optional: bool = False
) -> tuple[int, ...] | None:
    """Return one sample's shape, without the batch axis, as a tuple; raise unless it is one.

    Args:
        value: the shape: a non-empty sequence (or other iterable, not a string) of ints >= 1.
        flag: the argument or CLI flag named in the error, e.g. ``"input_shape"``.
        optional: whether ``None`` is allowed (and returned as ``None``).

    Returns:
        The shape as a tuple (``None`` for an allowed ``None``).

    Raises:
        ValueError: unless ``value`` is such a shape.

    Example:
        >>> check_shape([3, 32, 32], "input_shape")
        (3, 32, 32)
        >>> check_shape((3, 0), "input_shape")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `input_shape` to be one sample's shape without the batch axis, ... but got (3, 0).
    """
    if optional and value is None:
        return None
    shape = tuple(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else ()
    if not shape or not all(is_int(s) and s >= 1 for s in shape):
        raise expected(
            flag,
            f"{'None or ' if optional else ''}one sample's shape without the batch axis, a non-empty sequence of "
            "ints >= 1 (e.g. (3, 32, 32))",
            value,
        )
    return shape


def check_int_sequence(values: object, flag: str, minimum: int) -> tuple[int, ...]:
    """Return ``values`` as a tuple if it is a non-empty sequence of ints >= ``minimum``, else raise.

    Args:
        values: the values to check.
        flag: the argument or CLI flag named in the error.
        minimum: the smallest allowed entry.

    Returns:
        The entries as a tuple, in order.

    Raises:
        ValueError: if ``values`` is not a non-empty sequence (a string is not one), or an entry is not an int
            >= ``minimum`` (bools excluded).

    Example:
        >>> check_int_sequence([1, 0], "batch_sizes", 1)
        Traceback (most recent call last):
        ...
        ValueError: Expected every entry of `batch_sizes` to be an int >= 1, but got 0.
    """
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)) or len(values) == 0:
        raise expected(flag, f"a non-empty sequence of ints >= {minimum}", values)
    for value in values:
        if not is_int(value) or value < minimum:
            raise ValueError(
                f"Expected every entry of `{flag}` to be an int >= {minimum}, but got {value!r}."
            )
    return tuple(values)


def check_held_out_classes(values: object, flag: str, num_classes: int) -> tuple[int, ...]:
    """Return the classes held out as an out-of-distribution set, sorted, after checking them.

    Args:
        values: the classes (``--data.ood_classes``); ``None`` or ``[]`` for none.
        flag: the argument or CLI flag named in the error.
        num_classes: the data set's number of classes.

    Returns:
        The classes as a sorted tuple (empty for ``None`` or ``[]``).

    Raises:
        ValueError: if they are not distinct ints in ``[0, num_classes)`` leaving at least 2 classes.

    Example:
        >>> check_held_out_classes([9, 8], "--data.ood_classes", 10)
        (8, 9)
        >>> check_held_out_classes([3, 3], "--data.ood_classes", 10)
        Traceback (most recent call last):
        ...
        ValueError: Expected `--data.ood_classes` to be distinct ints in [0, 9] that leave at least 2 in-distribution classes (e.g. [8, 9]), or null, but got [3, 3].
    """
    if values is None:
        return ()
    listed = list(values) if isinstance(values, (list, tuple)) else None
    if (
        listed is None
        or not all(is_int(c) and 0 <= c < num_classes for c in listed)
        or len(set(listed)) != len(listed)
        or num_classes - len(listed) < 2
    ):
        raise expected(
            flag,
            f"distinct ints in [0, {num_classes - 1}] that leave at least 2 in-distribution classes "
            "(e.g. [8, 9]), or null",
            values,
        )
    return tuple(sorted(listed))


@contextlib.contextmanager
def command_line_errors(program: str) -> Iterator[None]:
    """Turn a user's mistake into one line on stderr and exit status 2, as argparse does for bad flags.

    For the library's command-line entry points only: in Python the exception propagates as usual.

    Args:
        program: the command, e.g. ``"python -m lightning_ensembles.compare"``.

    Raises:
        SystemExit: with code 2, for a ``ValueError`` or ``FileNotFoundError`` raised inside.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"{program}: error: {err}\n")
        raise SystemExit(2) from None


def check_checkpoint_file(path: str | os.PathLike[str], flag: str) -> Any:
    """Fail with the file named when ``path`` is not a checkpoint torch can read with ``weights_only=True``.

    Lightning reports a truncated or corrupted checkpoint as a bare ``OSError: [Errno 22] Invalid argument``
    without the path; this check runs first. Remote URLs (``s3://``, ``https://``...) are left to Lightning.

    Args:
        path: the checkpoint file.
        flag: the argument or CLI flag named in the error, e.g. ``"--ckpt_path"``.

    Returns:
        The checkpoint as torch loads it (memory-mapped where the file allows), or ``None`` for a URL.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if torch cannot read it with ``weights_only=True`` (truncated, corrupted, not a
            checkpoint, or holding arbitrary Python objects, which are never unpickled).
    """
    if "://" in str(path):
        return None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"Expected `{flag}` to be a checkpoint file, but {str(path)!r} does not exist."
        )
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - mmap needs the zip format; the plain load below says what is wrong
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the path and the cause
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"Expected `{flag}` to be a readable checkpoint, but {str(path)!r} is not: {type(err).__name__}: "
                f"{reason}. It may be truncated or corrupted (an interrupted copy or save), not a checkpoint, or "
                "hold Python objects that are not weights (checkpoints are loaded with weights_only=True)."
            ) from err
