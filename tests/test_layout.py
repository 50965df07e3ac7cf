"""The shape of the package and its tests: every module has a test file that mirrors it, every public module
declares ``__all__``, and the package ships ``py.typed``.

``tests/`` mirrors ``lightning_ensembles/``: the tests of ``lightning_ensembles/<path>/<name>.py`` live in
``tests/<path>/test_<name>.py``. Modules whose tests live elsewhere today are listed in ``ELSEWHERE`` with
the files that test them, so the exceptions stay visible; ``__init__.py`` and private ``_name.py`` modules
are tested through the modules that use them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_ensembles"
TESTS = ROOT / "tests"

ELSEWHERE: dict[str, tuple[str, ...]] = {
    # module (relative to lightning_ensembles/) -> the test files that cover it today
    "cli.py": ("test_cli_help.py", "test_recipe.py", "test_member_specs.py"),
    "latency.py": ("test_latency_modes.py", "callbacks/test_latency.py"),
    "members.py": ("test_member_specs.py", "test_checkpoints.py"),
    "testing.py": ("data/test_cifar.py",),  # the fake CIFAR-10 and SVHN files, read by the real loaders
    "testing_imagenet.py": ("data/test_imagenet.py",),  # the fake ImageFolder, read by the real loader
}
"""Modules without a mirrored test file, and where their tests are."""


def _modules() -> list[Path]:
    return sorted(
        path.relative_to(PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and not path.name.startswith("_")
    )


def _mirror(module: Path) -> Path:
    return TESTS / module.parent / f"test_{module.name}"


def _dotted(module: Path) -> str:
    parts = module.with_suffix("").parts
    return ".".join(("lightning_ensembles", *(p for p in parts if p != "__init__")))


def _public_modules() -> list[str]:
    """Every module not private itself nor inside a private package, ``__init__`` included."""
    return sorted(
        _dotted(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if not any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(PACKAGE).parts)
    )


@pytest.mark.parametrize("module", _modules(), ids=str)
def test_every_module_has_a_test_file(module: Path) -> None:
    mirror = _mirror(module)
    if mirror.is_file():
        assert module.as_posix() not in ELSEWHERE, f"{mirror} exists: drop {module} from ELSEWHERE"
        return
    assert module.as_posix() in ELSEWHERE, (
        f"lightning_ensembles/{module} has no tests: add {mirror.relative_to(ROOT)}, "
        "or list where its tests live in ELSEWHERE"
    )
    dotted = _dotted(module)
    for name in ELSEWHERE[module.as_posix()]:
        path = TESTS / name
        assert path.is_file(), f"ELSEWHERE names {name} for {module}, which does not exist"
        assert dotted in path.read_text(), f"{name} does not import {dotted}"


def test_the_exceptions_name_real_modules() -> None:
    modules = {module.as_posix() for module in _modules()}
    assert set(ELSEWHERE) <= modules, set(ELSEWHERE) - modules


@pytest.mark.parametrize("name", _public_modules())
def test_public_modules_declare_all(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:  # an optional extra (nas, export) that is not installed
        if (error.name or "").startswith("lightning_ensembles"):
            raise
        pytest.skip(f"{name} needs {error.name}")
    public = getattr(module, "__all__", None)
    assert isinstance(public, list | tuple) and public, f"{name} has no __all__"
    assert len(set(public)) == len(public), f"{name}.__all__ repeats a name"
    missing = [item for item in public if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names {missing}, which {name} does not define"


def test_the_package_is_typed() -> None:
    # PEP 561: without this marker type checkers ignore the package's hints. pyproject.toml packages it.
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nlightning_ensembles = ["py.typed"]' in pyproject
