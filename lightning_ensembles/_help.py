"""A short ``--help`` for the recipes: one sentence per flag, the library's own classes, no class dumps.

jsonargparse documents a flag typed ``Callable[[], nn.Module]`` by listing every ``nn.Module`` subclass that
happens to be imported (2,600 lines of torch and timm layers under ``--model.member`` alone), and repeats the
full docstring of every Trainer argument. :class:`CompactHelpFormatter` keeps what a user scans ``--help``
for: each flag, its first sentence, its default, and the classes worth naming (this library's first, by the
short name the CLI accepts). ``--<flag>.help CLASS`` still prints any class's arguments in full.
"""

from __future__ import annotations

import re
import textwrap
from argparse import SUPPRESS, Action
from collections.abc import Iterable
from typing import Any

from jsonargparse import ActionConfigFile
from jsonargparse import DefaultHelpFormatter as _DefaultHelpFormatter

LIBRARY = "lightning_ensembles."
MAX_OTHERS = 10  # lists without a class of this library name their first 10
MAX_NAMED = 30  # class lists longer than this are cut (nn.Module lists: the library's members only)
_SIMPLE = re.compile(r"^(?:Optional\[(\w+)\]|(\w+)(?: \| null)?)$")
_KNOWN = re.compile(r", known subclasses: (.*)$", re.S)
_SENTENCE_END = re.compile(r"\.(\s|$)")
_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf")


def first_sentence(text: str) -> str:
    """The first sentence of a docstring-style help text, without reST markup.

    Example:
        >>> first_sentence("``M`` members. Each is built under ``seed + i``.")
        'M members.'
    """
    text = " ".join(text.replace("``", "").split())
    for match in _SENTENCE_END.finditer(text):
        before = text[: match.start()]
        if before.endswith(_ABBREVIATIONS) or before.count("(") > before.count(")"):
            continue  # "e.g." or a period inside parentheses does not end the sentence
        return before + "."
    return text


def short_classes(class_paths: list[str], base: str) -> str:
    """Name classes by their short names, the library's first; a long list names only the library's.

    Example:
        >>> short_classes(["torch.nn.Linear", "lightning_ensembles.models.WideResNet"], "Module")
        'WideResNet, Linear'
    """
    library = LIBRARY + "models." if base == "nn.Module" else LIBRARY  # members, not the module's metrics
    ours = [p.rpartition(".")[2] for p in class_paths if p.startswith(library)]
    others = [p.rpartition(".")[2] for p in class_paths if not p.startswith(LIBRARY)]
    base_name = base.rpartition(".")[2]
    others = [name for name in dict.fromkeys(others) if name != base_name and name not in ours]
    if not ours and len(others) > MAX_OTHERS:  # another library's classes: the first few, by short name
        return ", ".join(others[:MAX_OTHERS]) + f", ...; or any {base} by class path"
    if len(ours) + len(others) <= MAX_NAMED:
        return ", ".join([*ours, *others])
    if base == "nn.Module":
        return ", ".join(ours) + "; or a timm model name, or any nn.Module by class path"
    shown = ", ".join([*ours, *others[: MAX_NAMED - len(ours)]])
    return f"{shown}, ...; or any {base} by class path"


class CompactHelpFormatter(_DefaultHelpFormatter):
    """jsonargparse's help formatter, shortened for the recipes (see the module docstring)."""

    def _get_help_string(self, action: Action) -> str:
        if isinstance(action, ActionConfigFile) or not action.option_strings:
            return super()._get_help_string(action)
        text = first_sentence(action.help or "")
        details = []
        type_str = self._get_type_str(action)
        simple = _simple_type(type_str)
        if simple is not None:
            details.append(f"type: {simple}")
        if action.default is not SUPPRESS and "%(default)" not in text:
            details.append("default: %(default)s")
        extra = action.extra_help() if hasattr(action, "extra_help") else ""
        known = _KNOWN.search(extra)
        if known:
            typehint = getattr(action, "_typehint", None)
            base = _base_name(type_str or str(typehint))
            details.append("classes: " + short_classes([p.strip() for p in known.group(1).split(",")], base))
        text = text.replace("%", "%%")
        return text + (" (" + "; ".join(details) + ")" if details else "")

    def _format_action(self, action: Action) -> str:
        if any(option.endswith(".help") for option in action.option_strings):
            return ""  # one line in the description says how to ask for a class's arguments
        return super()._format_action(action)

    def _format_usage(self, usage: Any, actions: Iterable[Action], groups: Any, prefix: str | None) -> str:
        flags: list[str] = []
        prefixes: dict[str, None] = {}
        for action in actions:
            if not action.option_strings or action.help == SUPPRESS:
                continue
            option = action.option_strings[-1]
            if option.endswith(".help"):
                continue
            name, dot, _ = option[2:].partition(".")
            if dot or action.dest in {"trainer", "model", "data"}:
                prefixes[name] = None
            elif option not in ("-h", "--help"):
                flags.append(f"[{option} {action.metavar or action.dest.upper()}]")
        parts = ["[-h]", *(f"[--{name}.* ...]" for name in prefixes), *flags]
        start = (prefix if prefix is not None else "usage: ") + self._prog
        lines = textwrap.wrap(  # one flag is never split over two lines
            " ".join(part.replace(" ", "\0") for part in parts),
            self._width,
            initial_indent=start + " ",
            subsequent_indent=" " * (len(start) + 1),
            break_long_words=False,
        )
        return "\n".join(lines).replace("\0", " ") + "\n\n"


def _simple_type(type_str: str | None) -> str | None:
    """``int``, ``float``, ``str``, ``int | null``...; ``None`` for unions, literals and bools (the metavar or
    the class list says more)."""
    match = _SIMPLE.match(type_str or "")
    if match is None or (match.group(1) or match.group(2)) == "bool":
        return None
    name = match.group(1) or match.group(2)
    return name if name == type_str else f"{name} | null"


def _base_name(type_str: str) -> str:
    for base in ("LightningDataModule", "Module", "Callback", "Logger", "Optimizer", "LRScheduler"):
        if base in type_str:
            return "nn.Module" if base == "Module" else base
    return "class"
