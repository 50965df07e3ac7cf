"""Eager argument validation shared by the package (DESIGN rule 6).

Every message names the argument or CLI flag, the value given and what is allowed:
"Expected `--model.num_members` to be an int >= 1, but got 0."
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    in_range = isinstance(value, int) and value >= minimum and (maximum is None or value < maximum)
    if isinstance(value, bool) or not in_range:
        allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum})"
        raise ValueError(f"Expected `{flag}` to be {allowed}, but got {value!r}.")
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
        raise ValueError(f"Expected `{flag}` to be a bool, but got {value!r}.")
    return value


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
