"""The private Lightning, torch and third-party surface in ``lightning_ensembles._compat`` still exists.

Each entry of :data:`~lightning_ensembles._compat.PRIVATE_SURFACE` is checked against the installed releases:
that the name exists, is the expected kind of thing (method, static method, property, attribute set by
``__init__``, ...) and, for callables, takes the parameters the package relies on. A failure names the entry,
the installed release that moved it and the place in the package that uses it. The negative controls remove
or change one hook and show the check fails loudly.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_ensembles
from lightning_ensembles import _compat
from lightning_ensembles._compat import CHECKED_ON, PRIVATE_SURFACE, PrivateName

OPTIONAL = {"optuna"}


def _release(package: str) -> str:
    if package == "python":
        return f"Python {platform.python_version()}"
    return f"{package} {importlib.metadata.version(package)}"


def _resolve(path: str) -> Any:
    """Import a dotted path: a module, or an attribute chain under the longest importable module."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


class _Module(pytest.importorskip("lightning.pytorch").LightningModule):  # type: ignore[misc]
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()


def _instance(owner: str) -> Any:
    """An instance of ``owner`` built the way Lightning, torch or argparse build it."""
    import lightning.pytorch as pl

    if owner == "lightning.pytorch.strategies.DDPStrategy":
        return pl.strategies.DDPStrategy()
    if owner == "lightning.pytorch.LightningModule":
        return _Module()
    if owner.startswith("lightning.pytorch.loops."):
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        loops = [trainer.fit_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop]
        return next(loop for loop in loops if isinstance(loop, _resolve(owner)))
    if owner == "torch._dynamo.eval_frame.OptimizedModule":
        return torch.compile(nn.Linear(1, 1))  # wraps only; nothing is compiled before the first call
    if owner == "argparse.HelpFormatter":
        import argparse

        return argparse.HelpFormatter("prog")
    if owner == "jsonargparse._typehints.ActionTypeHint":
        import jsonargparse

        return jsonargparse.ArgumentParser().add_argument("--x", type=int | None)
    raise AssertionError(f"tests/test_compat.py has no instance of {owner}: add one to `_instance`.")


def _problem(entry: PrivateName) -> str | None:
    """What is wrong with ``entry`` on the installed releases, or ``None``."""
    if entry.kind == "module":
        try:
            importlib.import_module(entry.owner)
        except ImportError as err:
            return f"the module cannot be imported ({err})"
        return None
    if entry.kind == "aten_op":
        return None if hasattr(torch.ops.aten, entry.name) else "torch.ops.aten has no such op"
    owner = _resolve(entry.owner)
    if entry.kind == "key":
        source = inspect.getsource(owner)
        return (
            None
            if repr(entry.name) in source or f'"{entry.name}"' in source
            else "its source no longer writes it"
        )
    if entry.kind == "instance_attribute":
        instance = _instance(entry.owner)
        present = hasattr(instance, entry.name) and not hasattr(type(instance), entry.name)  # set by __init__
        return None if present else f"a fresh {type(instance).__name__} has no such attribute"
    try:
        static = inspect.getattr_static(owner, entry.name)
    except AttributeError:
        return "it does not exist"
    if entry.kind == "property":
        return None if isinstance(static, property) else f"it is a {type(static).__name__}, not a property"
    if entry.kind == "staticmethod" and not isinstance(static, staticmethod):
        return f"it is a {type(static).__name__}, not a staticmethod"
    function = getattr(owner, entry.name)
    if not callable(function):
        return f"it is not callable (a {type(function).__name__})"
    if entry.parameters is not None:
        parameters = list(inspect.signature(function).parameters.values())
        names = tuple(p.name for p in parameters)
        extra = parameters[len(entry.parameters) :]
        required = [
            p.name for p in extra if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if names[: len(entry.parameters)] != entry.parameters or required:
            return f"its parameters are {names}, expected {entry.parameters} (further ones optional)"
    return None


def check(entry: PrivateName) -> None:
    """Fail loudly, naming the release and the user, if ``entry`` has moved or changed."""
    problem = _problem(entry)
    if problem is not None:
        raise AssertionError(
            f"Private surface moved in {_release(entry.package)}: `{entry.owner}.{entry.name}` ({entry.kind}): "
            f"{problem}. lightning-ensembles uses it in {entry.used_in}; it was checked on {CHECKED_ON}. "
            "Adapt lightning_ensembles/_compat.py (and the version bounds in pyproject.toml) to this release."
        )


@pytest.mark.parametrize("entry", PRIVATE_SURFACE, ids=lambda e: f"{e.owner}.{e.name}")
def test_private_surface_exists(entry: PrivateName) -> None:
    if entry.package in OPTIONAL:
        pytest.importorskip(entry.package)
    check(entry)


def test_negative_control_removed_hook_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    entry = next(e for e in PRIVATE_SURFACE if e.name == "_register_ddp_hooks")
    monkeypatch.delattr(DDPStrategy, "_register_ddp_hooks")
    with pytest.raises(AssertionError) as info:
        check(entry)
    message = str(info.value)
    assert "Private surface moved in lightning " in message
    assert "DDPStrategy._register_ddp_hooks" in message and "it does not exist" in message
    assert "lightning_ensembles/distributed.py" in message


def test_negative_control_changed_signature_and_attribute_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    def _setup_model(self: Any, model: nn.Module, device: Any) -> nn.Module:
        return model

    monkeypatch.setattr(DDPStrategy, "_setup_model", _setup_model)
    with pytest.raises(AssertionError, match=r"DDPStrategy._setup_model.*parameters are"):
        check(next(e for e in PRIVATE_SURFACE if e.name == "_setup_model"))

    monkeypatch.delattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    with pytest.raises(AssertionError, match=r"moved in torch .*_set_params_and_buffers_to_ignore_for_model"):
        check(next(e for e in PRIVATE_SURFACE if e.name == "_set_params_and_buffers_to_ignore_for_model"))

    original = DDPStrategy.__init__

    def without_kwargs(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._ddp_kwargs

    monkeypatch.setattr(DDPStrategy, "__init__", without_kwargs)
    with pytest.raises(AssertionError, match=r"DDPStrategy._ddp_kwargs.*has no such attribute"):
        check(next(e for e in PRIVATE_SURFACE if e.name == "_ddp_kwargs"))


def _accessed_names(path: Path) -> set[str]:
    """Private names ``path`` reads as an attribute (``x._name``) or spells as a whole string literal."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)
    return names


def test_lightning_and_torch_privates_only_in_compat() -> None:
    """Lightning and torch names reached through an accessor appear nowhere else in the package."""
    routed = {e.name for e in PRIVATE_SURFACE if " via " in e.used_in}
    root = Path(lightning_ensembles.__file__).parent
    offenders = {
        str(path.relative_to(root)): sorted(_accessed_names(path) & routed)
        for path in root.rglob("*.py")
        if path.name != "_compat.py"
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"Use the accessors of lightning_ensembles/_compat.py instead: {offenders}"


def test_accessors_read_the_live_objects() -> None:
    import lightning.pytorch as pl

    strategy = pl.strategies.DDPStrategy(find_unused_parameters=True)
    assert _compat.ddp_kwargs(strategy) == {"find_unused_parameters": True}
    assert _compat.ddp_comm_hook_settings(strategy) == (None, None, None)
    _compat.set_layer_sync(strategy, "plugin")
    assert _compat.layer_sync(strategy) == "plugin"
    module = _Module(width=5)
    assert _compat.initial_hparams(module) is module._hparams_initial and module.hparams_initial["width"] == 5
    linear = nn.Linear(1, 1)
    assert _compat.uncompiled(torch.compile(linear)) is linear and _compat.uncompiled(linear) is linear
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert _compat.backward_skipped(trainer) is False
    assert _compat.loop_data_source(trainer.fit_loop) is not None and _compat.loop_data_source(None) is None
    assert len(_compat.private_aten_ops()) == len(_compat.PRIVATE_ATEN_OPS)
