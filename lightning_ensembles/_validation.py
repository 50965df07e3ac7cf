"""Eager argument validation shared by the package (DESIGN rule 6).

Every message names the argument or CLI flag, the value given and what is allowed:
"Expected `--model.num_members` to be an int >= 1, but got 0."
"""

from __future__ import annotations


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
