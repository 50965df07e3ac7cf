"""Names a package exports without importing their modules with it: a module ``__getattr__`` (PEP 562).

The package root exports the export wrappers this way (``python -m lightning_ensembles.export`` would
otherwise find its module imported already and warn that it runs twice), and ``lightning_ensembles.models``
the search space that moved to ``lightning_ensembles.nas.space`` (members never import the search).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each of ``names`` from its module on first use.

    Args:
        module: the name of the module that exports the names (its ``__name__``), for the error message.
        names: ``{name: module it is imported from}``.

    Returns:
        The ``__getattr__``: the named object, imported on first use; ``AttributeError``, worded as Python's
        own, for any other name.

    Example:
        >>> __getattr__ = lazy_getattr("example", {"sqrt": "math"})
        >>> __getattr__("sqrt")(4.0)
        2.0
        >>> __getattr__("cbrt")
        Traceback (most recent call last):
        ...
        AttributeError: module 'example' has no attribute 'cbrt'
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
