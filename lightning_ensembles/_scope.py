"""Results shared within a scope: what one run (the Trainer) measured or counted once, for every reader.

:func:`~lightning_ensembles.latency.measure_ensemble_latency` and :func:`~lightning_ensembles.cost.member_macs`
keep their results per scope and per module, weakly, so that two callbacks of one run read one measurement
(Kondratyuk et al. 2020 plot accuracy against one cost per ensemble size) and nothing outlives the run.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from typing import Any

from torch import nn

__all__ = ["scoped_store"]


def scoped_store(
    registry: weakref.WeakKeyDictionary[Any, Any], scope: object | None, module: nn.Module
) -> dict[Hashable, Any] | None:
    """The results kept in ``registry`` for ``module`` within ``scope`` (created empty), or ``None``.

    Args:
        registry: one module-level ``weakref.WeakKeyDictionary`` per kind of result.
        scope: any object that can be weakly referenced (the callbacks pass the Trainer), or ``None`` to share
            nothing.
        module: the module the results are about.

    Returns:
        A dict to read and fill, living as long as both ``scope`` and ``module``; ``None`` without a scope.

    Raises:
        ValueError: for a ``scope`` that cannot be weakly referenced.

    Example:
        >>> registry, layer = weakref.WeakKeyDictionary(), nn.Linear(2, 2)
        >>> class Run: ...
        >>> run = Run()
        >>> store = scoped_store(registry, run, layer)
        >>> store is scoped_store(registry, run, layer), scoped_store(registry, None, layer)
        (True, None)
    """
    if scope is None:
        return None
    try:
        per_module = registry.setdefault(scope, weakref.WeakKeyDictionary())
    except TypeError:
        raise ValueError(
            "Expected `scope` to be None or an object that can be weakly referenced (e.g. the Trainer), but got "
            f"{type(scope).__name__}."
        ) from None
    return per_module.setdefault(module, {})
