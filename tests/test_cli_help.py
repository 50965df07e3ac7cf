"""Every entry point's ``--help`` and bad-flag report, and the recipes' short ``--help``.

The rule (docs/architecture.md, "Command lines"): training entry points are LightningCLI (``EnsembleCLI``),
tool entry points jsonargparse; each takes ``--config``, documents every flag in ``--help`` and reports a bad
flag as jsonargparse does: the usage, one ``error:`` line naming the flag, exit status 2. The NAS recipe's
stages are tested in ``test_nas_recipe.py``, ``python -m lightning_ensembles.export`` in ``test_export.py``.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_ensembles import cli as cli_module
from lightning_ensembles import compare as compare_module
from lightning_ensembles import sweep as sweep_module
from lightning_ensembles._help import first_sentence, short_classes
from lightning_ensembles.callbacks import EnsembleSizeAblation
from lightning_ensembles.cli import EnsembleCLI, recipe_main, split_own_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "reproductions"))

import checkpoint_selection  # noqa: E402
import cifar_wrn  # noqa: E402
import imagenet_efficientnet  # noqa: E402
import quickstart  # noqa: E402
import uncertainty_digits  # noqa: E402


def _help(recipe: object, capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*args, "--help"])  # type: ignore[attr-defined]
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", [cifar_wrn, imagenet_efficientnet], ids=["cifar_wrn", "imagenet"])
def test_help_is_short_and_names_the_librarys_classes(
    recipe: object, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(recipe, capsys)
    lines = text.splitlines()
    assert len(lines) < 300, f"--help printed {len(lines)} lines"  # 3,197 and 3,219 before
    member = text[text.index("--model.member MEMBER") : text.index("--model.num_members")]
    for name in ("WideResNet", "TimmModel", "NASNet", "timm model name"):
        assert name in member
    assert "torch.nn.ReLU" not in text and "EnsembleMetrics" not in member  # no dumps, no non-members
    callbacks = text[text.index("--trainer.callbacks CALLBACKS") : text.index("--trainer.fast_dev_run")]
    for name in ("EnsembleSizeAblation", "FlopsMonitor", "LatencyMonitor", "CascadeMonitor", "MemberEMA"):
        assert name in callbacks
    assert "ModelCheckpoint" in callbacks
    assert "--trainer.callbacks.help EnsembleSizeAblation" in " ".join(text.split())


def test_class_help_and_flags_take_short_names(capsys: pytest.CaptureFixture) -> None:
    text = _help(cifar_wrn, capsys, "--trainer.callbacks.help", "EnsembleSizeAblation")
    assert "--trainer.callbacks.num_subsets" in text
    cli = EnsembleCLI(
        args=[
            "--config",
            str(ROOT / "reproductions" / "configs" / "cifar_wrn.yaml"),
            "--config",
            str(ROOT / "reproductions" / "configs" / "cifar" / "wrn-16-1.yaml"),
            "--trainer.callbacks+=EnsembleSizeAblation",
            "--trainer.callbacks.num_subsets=3",
            "--data=DigitsDataModule",
        ]
    )
    ablations = [c for c in cli.trainer.callbacks if isinstance(c, EnsembleSizeAblation)]
    assert len(ablations) == 1 and ablations[0].num_subsets == 3


def test_first_sentence_skips_abbreviations_and_parentheses() -> None:
    assert (
        first_sentence("Resume from this file (e.g. last.ckpt). More.")
        == "Resume from this file (e.g. last.ckpt)."
    )
    assert first_sentence("Uses ``M`` members, e.g. four. Then more.") == "Uses M members, e.g. four."
    assert first_sentence("no period at all") == "no period at all"


def test_short_classes_cuts_long_lists_to_the_librarys() -> None:
    paths = [f"torch.nn.Layer{i}" for i in range(40)] + ["lightning_ensembles.models.WideResNet"]
    assert (
        short_classes(paths, "nn.Module")
        == "WideResNet; or a timm model name, or any nn.Module by class path"
    )
    callbacks = [f"lightning.pytorch.callbacks.C{i}" for i in range(40)] + ["lightning_ensembles.callbacks.A"]
    text = short_classes(callbacks, "Callback")
    assert text.startswith("A, C0, C1") and text.endswith("...; or any Callback by class path")


def _exit(
    main: Callable[[list[str]], Any], args: list[str], capsys: pytest.CaptureFixture
) -> tuple[Any, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _documented_parameters(function: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: the first words of its entry under Args:}`` for every parameter of ``function``."""
    doc = inspect.getdoc(function) or ""
    args = doc[doc.index("Args:") :].split("\n\n")[0]
    entries = dict(re.findall(r"^    (\w+): (.*)$", args, re.M))
    parameters = list(inspect.signature(function).parameters)
    assert set(parameters) <= set(entries), f"undocumented: {set(parameters) - set(entries)}"
    return {name: " ".join(entries[name].replace("``", "").split()[:4]) for name in parameters}


@pytest.mark.parametrize(
    ("main", "function", "program"),
    [
        (compare_module.main, compare_module.compare, "python -m lightning_ensembles.compare"),
        (sweep_module.main, sweep_module.sweep, "python -m lightning_ensembles.sweep"),
    ],
    ids=["compare", "sweep"],
)
def test_tool_help_documents_every_parameter_and_a_bad_flag_exits_2(
    main: Callable[[list[str]], Any],
    function: Callable[..., Any],
    program: str,
    capsys: pytest.CaptureFixture,
) -> None:
    code, out, _ = _exit(main, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: {program} [--config CONFIG]")
    shown = " ".join(out.replace("``", "").split())
    positional = [n for n, p in inspect.signature(function).parameters.items() if p.default is p.empty]
    for name, doc in _documented_parameters(function).items():
        flag = name if name in positional else f"--{name}"
        assert re.search(rf"(^|\s){re.escape(flag)}\s", shown) and doc in shown, (flag, doc)
    code, _, err = _exit(main, ["--bogus_flag", "1"], capsys)
    assert code == 2 and err.startswith(f"usage: {program} ")
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--bogus_flag" in line


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        (
            quickstart,
            {
                "--seeds": "how many seeds",
                "--workers": "parallel runs",
                "--out": "the sweep's folder",
                "--config": "configuration file",
            },
        ),
        (
            uncertainty_digits,
            {
                "--seeds": "how many seeds",
                "--workers": "parallel runs",
                "--out": "the folder of the runs",
                "--config": "configuration file",
            },
        ),
    ],
    ids=["quickstart", "uncertainty_digits"],
)
def test_seed_sweep_scripts_document_every_flag_and_the_recipe_flags(
    script: Any, flags: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = _exit(script.main, ["--help"], capsys)
    shown = " ".join(out.split())
    assert code == 0 and "flags after -- go to every recipe run" in shown.replace("``", "")
    for flag, doc in flags.items():
        assert f" {flag} " in shown and doc in shown, flag
    code, _, err = _exit(script.main, ["--seeds", "2", "--bogus_flag", "1"], capsys)
    assert code == 2 and err.startswith("usage: ")
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--bogus_flag" in line


def test_checkpoint_selection_help_and_bad_flag(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _exit(checkpoint_selection.main, ["--help"], capsys)
    shown = " ".join(out.split())
    assert code == 0 and out.startswith("usage: ") and "--config CONFIG" in shown
    assert "Test every run of a seed sweep at its three checkpoints" in shown
    assert re.search(r"\ssweep\s+the sweep's folder", shown)
    code, _, err = _exit(checkpoint_selection.main, ["runs", "--bogus_flag"], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--bogus_flag" in line


@pytest.mark.parametrize("recipe", [cifar_wrn, imagenet_efficientnet], ids=["cifar_wrn", "imagenet"])
def test_recipe_help_names_its_flags_and_a_bad_flag_exits_2(
    recipe: Any, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = _exit(recipe.main, ["--help"], capsys)
    assert code == 0
    for flag in (
        "--config CONFIG",
        "--trainer.max_epochs",
        "--trainer.devices",
        "--model.num_members",
        "--model.member",
        "--data CONFIG | CLASS_PATH_OR_NAME",
        "--ckpt_path",
        "--test_weights",
        "--train",
    ):
        assert flag in out, flag
    shown = " ".join(out.split())
    for flag, doc in (  # the recipe's own flags carry their docs
        ("--ckpt_path CKPT_PATH", "Resume training from this checkpoint file"),
        ("--test_weights {final,best}", "Weights tested after training"),
        ("--train {true,false}", "Train before testing"),
    ):
        assert f"{flag} {doc}" in shown, flag
    code, _, err = _exit(recipe.main, ["--trainer.bogus_flag", "1"], capsys)
    assert code == 2 and err.startswith("usage: ")
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--trainer.bogus_flag" in line


def test_recipe_main_prints_the_table_and_where_it_was_saved(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = []

    def fake_run_recipe(args: Any, default_config: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append((args, default_config, kwargs))
        return {"table": "| k | top-1 |", "results_file": "runs/x/results.json"}

    monkeypatch.setattr("lightning_ensembles.cli.run_recipe", fake_run_recipe)
    results = recipe_main(["--trainer.devices", "8"], "a.yaml", parser_kwargs={"prog": "x"})
    assert calls == [(["--trainer.devices", "8"], "a.yaml", {"parser_kwargs": {"prog": "x"}})]
    assert capsys.readouterr().out == "| k | top-1 |\nSaved to runs/x/results.json\n"
    assert results["results_file"] == "runs/x/results.json"
    monkeypatch.setattr("lightning_ensembles.cli.run_recipe", lambda *a, **k: {"table": "| k |"})
    recipe_main([], "a.yaml")  # another rank than 0: no results file, nothing printed
    assert capsys.readouterr().out == ""


def test_split_own_flags_keeps_the_tools_flags_and_forwards_the_rest() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--out", type=str, default="runs")
    args = ["--trainer.max_epochs", "3", "--out=a", "--config", "b.yaml", "--help", "--out", "c", "--outx=1"]
    own, rest = split_own_flags(parser, args)
    assert own == ["--out=a", "--help", "--out", "c"]
    assert rest == ["--trainer.max_epochs", "3", "--config", "b.yaml", "--outx=1"]
    assert split_own_flags(parser, ["--out"]) == (["--out"], [])  # left for the parser to report


def test_console_scripts_run_the_tools() -> None:
    # pyproject's [project.scripts], installed next to the interpreter by `pip install`
    import importlib.metadata
    import subprocess

    for tool in ("compare", "sweep", "export"):
        name = f"lightning-ensembles-{tool}"
        (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == name]
        assert entry.value == f"lightning_ensembles.cli:{tool}_command"
        assert entry.load() is getattr(cli_module, f"{tool}_command")
        script = Path(sys.executable).with_name(name)
        assert script.is_file(), f"{script} is missing: reinstall the package (pip install -e .)"
    # one of them run for real (each takes seconds to import torch and Lightning)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lightning-ensembles-sweep")), "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "--config" in done.stdout


def test_a_console_script_exits_0_after_a_successful_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # a console script calls `sys.exit(function())`: the tools' `main` returns results, the command None
    called: list[str] = []
    monkeypatch.setattr(sweep_module, "main", lambda: called.append("sweep") or {"some": "result"})
    assert cli_module.sweep_command() is None and called == ["sweep"]
