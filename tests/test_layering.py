"""The package's layers: lower modules never import higher ones (DESIGN.md, "Where things live").

Each rule names a part of the package (a module, or a package and everything under it) and the only parts
of ``lightning_ensembles`` it may import. Every import is counted, at module level or inside a function or
an ``if TYPE_CHECKING:`` block, since each of them ties the lower layer to the higher one. To protect
another layer, add a rule to ``LAYERS``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "lightning_ensembles"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: dict[str, tuple[str, ...]] = {
    # Data modules know nothing of the model or the strategy: what they need arrives as arguments or CLI
    # links. Below them: argument checks, timm's registry (names, not models), the training-shard protocol.
    "lightning_ensembles.data": (
        "lightning_ensembles.data",
        "lightning_ensembles._validation",
        "lightning_ensembles._timm",
        "lightning_ensembles.sharding",
    ),
    # The neutral modules the data and the models or strategies share import nothing of the package.
    "lightning_ensembles._validation": (),
    "lightning_ensembles._timm": (),
    "lightning_ensembles._scope": (),
    "lightning_ensembles.sharding": (),
}


_TOP = ("callbacks", "cli", "compare", "sweep", "nas", "export", "cascade_inference")
NEVER: dict[str, tuple[str, ...]] = {
    # Primitives know nothing of callbacks, the CLI, the cross-run tools, the search or deployment wrappers.
    **{
        f"{PACKAGE}.{name}": tuple(f"{PACKAGE}.{top}" for top in _TOP)
        for name in (
            "aggregation",
            "calibration",
            "cascade",
            "cost",
            "fused",
            "latency",
            "members",
            "metrics",
            "ood",
            "parallel",
            "results",
            "schedules",
            "stats",
            "uncertainty",
        )
    },
    # Members know nothing of the ensemble module, the data, strategies or the search. (The package's
    # `__init__` keeps a lazy re-export of the moved search space, so it is not listed.)
    **{
        f"{PACKAGE}.models.{name}": tuple(
            f"{PACKAGE}.{top}" for top in ("module", "data", "distributed", "callbacks", "cli", "nas")
        )
        for name in ("implicit", "nas", "timm_member", "wide_resnet")
    },
    # The module and the member-parallel strategy meet only in `sharding.PlacedMembers` (a Protocol) and the
    # strategy's declared `supports_per_member_backward`: neither imports the other, so no import circle.
    f"{PACKAGE}.distributed": (f"{PACKAGE}.module", f"{PACKAGE}._frugal", f"{PACKAGE}._saving"),
    **{
        f"{PACKAGE}.{name}": (f"{PACKAGE}.distributed", f"{PACKAGE}.callbacks", f"{PACKAGE}.cli")
        for name in ("module", "_frugal", "_saving")
    },
}
"""Parts of the package, and the parts they must never import (for layers whose allowed set is wide)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def package_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """The ``lightning_ensembles`` modules that ``source`` imports, with their line numbers.

    Relative imports are resolved against ``module``; ``from a import b`` counts as importing ``a.b``, which
    is what it is when ``b`` is a submodule and harmless when it is a name (``a.b`` is within ``a``).
    """
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                origin = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names if alias.name != "*"]
            found += [(node.lineno, origin)] if any(alias.name == "*" for alias in node.names) else []
    return [(line, name) for line, name in found if _within(name, PACKAGE)]


def violations(part: str, allowed: tuple[str, ...]) -> list[str]:
    """Every import of the package by ``part`` that leaves ``allowed``, as ``file:line imports name``."""
    relative = Path(*part.split(".")[1:])
    files = (
        sorted((ROOT / relative).rglob("*.py")) if (ROOT / relative).is_dir() else [ROOT / f"{relative}.py"]
    )
    assert files and all(f.is_file() for f in files), f"The layer {part!r} names no module of {PACKAGE}."
    found = []
    for path in files:
        module = _module_name(path)
        for line, name in package_imports(path.read_text(encoding="utf-8"), module, path.stem == "__init__"):
            if not any(_within(name, ok) for ok in allowed):
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_layer_imports_only_what_is_below_it(part: str) -> None:
    allowed = LAYERS[part]
    found = violations(part, allowed)
    assert not found, (
        f"{part} may import only {', '.join(allowed) or 'nothing of ' + PACKAGE}, but:\n  "
        + "\n  ".join(found)
        + "\nPass what it needs as an argument or a CLI link (EnsembleCLI), or move the shared piece below "
        "both layers (see DESIGN.md, 'Where things live')."
    )


@pytest.mark.parametrize("part", sorted(NEVER))
def test_layer_never_imports_a_higher_one(part: str) -> None:
    relative = Path(*part.split(".")[1:])
    path = ROOT / f"{relative}.py"
    forbidden = NEVER[part]
    found = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
        for line, name in package_imports(path.read_text(encoding="utf-8"), part)
        if any(_within(name, bad) for bad in forbidden)
    ]
    assert not found, (
        f"{part} must not import {', '.join(forbidden)}, but:\n  " + "\n  ".join(found) + "\nSee DESIGN.md, "
        "'Where things live': lower layers never import higher ones."
    )


def test_the_rule_sees_every_kind_of_import() -> None:
    source = (
        "import lightning_ensembles.distributed\n"
        "from lightning_ensembles.module import EnsembleLightningModule\n"
        "from .sampling import make_loader\n"
        "from .. import cli\n"
        "def f():\n"
        "    from lightning_ensembles.models import TimmModel\n"
        "import torch\n"
    )
    names = [name for _, name in package_imports(source, "lightning_ensembles.data.example")]
    assert names == [
        "lightning_ensembles.distributed",
        "lightning_ensembles.module.EnsembleLightningModule",
        "lightning_ensembles.data.sampling.make_loader",
        "lightning_ensembles.cli",
        "lightning_ensembles.models.TimmModel",
    ]


def test_a_planted_violation_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of the two files the new rules guard, one of them with the import the rules forbid.
    package = tmp_path / PACKAGE
    package.mkdir()
    for name in ("distributed.py", "module.py"):
        (package / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    test_layer_never_imports_a_higher_one(f"{PACKAGE}.distributed")  # as shipped: clean
    planted = (package / "distributed.py").read_text(encoding="utf-8")
    planted += "\n\ndef _planted():\n    from lightning_ensembles.module import EnsembleLightningModule\n"
    (package / "distributed.py").write_text(planted, encoding="utf-8")
    with pytest.raises(AssertionError, match=r"distributed.py:\d+ imports lightning_ensembles.module"):
        test_layer_never_imports_a_higher_one(f"{PACKAGE}.distributed")
