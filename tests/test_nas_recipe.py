"""The NAS ensemble recipe: its configs, the shipped searched architecture, and both stages end to end."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from lightning_ensembles.cli import EnsembleCLI
from lightning_ensembles.cost import count_macs
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.models import NASNet
from lightning_ensembles.nas.search import NASSearch
from tests.helpers import fast_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "reproductions" / "configs"
NAS = CONFIGS / "nas"
sys.path.insert(0, str(ROOT / "reproductions"))

import nas_ensemble  # noqa: E402

SEARCHED = NAS / "searched-digits.yaml"


pytestmark = pytest.mark.usefixtures("quiet_optuna_one_thread")


def _search_config() -> object:
    parser = nas_ensemble.search_parser()
    config = parser.parse_args(["--config", str(NAS / "search.yaml")])
    return (
        parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
    )


def test_every_nas_config_is_tested() -> None:
    assert {p.name for p in NAS.glob("*.yaml")} == {"search.yaml", "digits.yaml", "searched-digits.yaml"}


def test_search_config_parses_and_instantiates() -> None:
    init = _search_config()
    search = init.search  # type: ignore[attr-defined]
    assert isinstance(search, NASSearch) and isinstance(init.data, DigitsDataModule)  # type: ignore[attr-defined]
    assert search.n_trials == 40 and search.objective == "macs" and search.target is None
    assert len(search.space.stages) == 4 and search.space.size > 10**5
    assert init.out == "runs/nas" and init.select.num_members == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("ensemble", [None, "ensemble-2.yaml", "ensemble-3.yaml", "ensemble-4.yaml"])
def test_searched_digits_composes_with_the_ensemble_configs(ensemble: str | None) -> None:
    args = ["--config", str(NAS / "digits.yaml"), "--config", str(SEARCHED)]
    if ensemble:
        args += ["--config", str(CONFIGS / ensemble)]
    cli = EnsembleCLI(args=args)
    size = int(ensemble.split("-")[1][0]) if ensemble else 1
    assert cli.model.num_members == size and cli.model.num_classes == 10
    assert all(isinstance(m, NASNet) and m.name == "searched-digits" for m in cli.model.members)
    assert isinstance(cli.datamodule, DigitsDataModule)


def test_searched_digits_is_in_the_space_and_costs_what_its_header_says() -> None:
    text = SEARCHED.read_text()
    member = yaml.safe_load(text)["model"]["member"]
    assert member["class_path"] == "lightning_ensembles.models.NASNet"
    net = NASNet(**member["init_args"])
    space = _search_config().search.space  # type: ignore[attr-defined]
    space.params_of(net.architecture)  # raises if the shipped architecture is not in the default space
    (claimed,) = re.findall(r"# Chosen: trial \d+ .*?, ([\d.]+) M multiply-adds", text)
    assert count_macs(net, DigitsDataModule.input_shape) / 1e6 == pytest.approx(float(claimed), rel=1e-3)


@pytest.mark.slow
def test_search_then_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "nas"
    trainer = '{"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2}'
    # A space of architectures of nearly equal cost, so that both arms can always be chosen at ±90%.
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(
        "search:\n  space:\n    stem_channels: 8\n    num_features: 32\n    stages:\n"
        "      - {channels: [8], expand_ratios: [1], max_blocks: 1}\n"
        "      - {channels: [16], stride: 2, expand_ratios: [3], max_blocks: 1}\n"
    )
    result = nas_ensemble.main(
        [
            "search", "--config", str(narrow), f"--out={out}", "--search.n_trials=4", "--search.proxy_epochs=1",
            f"--search.trainer={trainer}", "--select.num_members=2", "--select.tolerance=0.9",
        ]
    )  # fmt: skip
    assert (out / "study.db").is_file() and sum("duplicate_of" not in r for r in result["records"]) == 4
    for name in ("pareto.yaml", "searched.yaml", "diverse.yaml", "trials.json"):
        assert (out / name).is_file()
    assert "## Pareto set" in capsys.readouterr().out
    # The written configs are what the arms train: the chosen trials, as LightningCLI member configs.
    searched = yaml.safe_load((out / "searched.yaml").read_text())["model"]["member"]
    diverse = yaml.safe_load((out / "diverse.yaml").read_text())["model"]["members"]
    chosen = result["selection"]
    assert searched["init_args"]["name"] == f"nas-digits-t{chosen['replicated']['number']}"
    assert [m["init_args"]["name"] for m in diverse] == [
        f"nas-digits-t{r['number']}" for r in chosen["diverse"]
    ]

    compared = nas_ensemble.main(
        [
            "compare",
            f"--out={out}",
            "--seeds=2",
            *fast_recipe_args(tmp_path),
            "--trainer.limit_train_batches=2",
        ]
    )
    replicated, mixed = compared["arms"]["replicated"], compared["arms"]["diverse"]
    assert replicated["num_members"] == mixed["num_members"] == 2
    assert len({row["architecture"] for row in replicated["members"]}) == 1
    assert len({row["architecture"] for row in mixed["members"]}) == 2
    assert replicated["sizes"][-1]["macs"] == 2 * replicated["members"][0]["macs"]
    assert mixed["sizes"][-1]["macs"] == sum(row["macs"] for row in mixed["members"])
    lines = compared["comparison"]["lines"]
    assert len(lines) == 2 and all([p["k"] for p in points] == [1, 2] for points in lines.values())
    assert all(row["seeds"] == 2 for points in lines.values() for row in points)  # not every run as seed 0
    (pair,) = compared["comparison"]["pairs"]  # the arms, compared seed by seed
    assert (pair.name_a, pair.seeds) == (f"2 x {replicated['architecture']}", [0, 1])
    assert pair.name_b == f"2 x {mixed['architecture']}"
    assert sorted(p.name for p in (out / "compare" / "replicated").iterdir()) == ["seed_0", "seed_1"]
    assert (out / "compare" / "comparison" / "comparison.png").is_file()
    assert "| replicated | 2 |" in capsys.readouterr().out


def test_compare_without_a_search_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"searched.yaml from `nas_ensemble.py search --out"):
        nas_ensemble.main(["compare", f"--out={tmp_path}"])


def _exit_code(args: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        nas_ensemble.main(args)
    return exit_info.value.code


def test_help_describes_the_stages_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _exit_code(["--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: nas_ensemble.py {search,compare,train}")
    assert all(f"nas_ensemble.py {stage}" in printed for stage in ("search", "compare", "train"))
    stages = printed[printed.index("subcommands:") :]
    for stage, summary in (
        ("search", "Run (or join) the study"),
        ("compare", "Train both arms of a finished search"),
        ("train", "Train one config with the plain recipe"),
    ):
        assert re.search(rf"^\s+{stage}\s+{re.escape(summary)}", stages, re.M), stage
    # `compare --help` needs no finished search, and documents --out and where the other flags go.
    assert _exit_code(["compare", "--help", f"--out={tmp_path / 'nothing'}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "usage: nas_ensemble.py compare [-h] [--out OUT] [--seeds SEEDS] [recipe flags]"
    )
    assert "--out OUT" in printed and "The search's folder" in printed and "train --help" in printed
    assert _exit_code(["search", "--help"]) == 0
    assert "--search.n_trials" in capsys.readouterr().out
    assert _exit_code(["train", "--help"]) == 0  # the recipe's own help
    printed = capsys.readouterr().out
    assert printed.startswith("usage: nas_ensemble.py train") and "--trainer.max_epochs" in printed
    assert (
        _exit_code([]) == 2
        and 'expected "stage" to be one of {search,compare,train}' in capsys.readouterr().err
    )


def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "searched.yaml").write_text(SEARCHED.read_text())
    (tmp_path / "diverse.yaml").write_text(
        "model:\n  members:\n    - class_path: lightning_ensembles.models.NASNet\n"
    )
    for args, usage, error in (
        (["fit"], "nas_ensemble.py", "invalid choice: 'fit'"),
        (["--bogus"], "nas_ensemble.py", "--bogus"),
        (["search", "--search.bogus=1"], "nas_ensemble.py search", "--search.bogus"),
        (["compare", "--out"], "nas_ensemble.py compare", "argument --out: expected one argument"),
        (["compare", f"--out={tmp_path}", "--trainer.bogus=1"], "nas_ensemble.py compare", "--trainer.bogus"),
        (["train", "--trainer.bogus=1"], "nas_ensemble.py train", "--trainer.bogus"),
    ):
        assert _exit_code(args) == 2, args
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert err.startswith(f"usage: {usage} ") and error in line, (args, err)


def test_train_stage_trains_the_shipped_architecture(tmp_path: Path) -> None:
    results = nas_ensemble.main(
        ["train", "--config", str(SEARCHED), "--config", str(CONFIGS / "ensemble-2.yaml"), *fast_recipe_args(tmp_path),
         "--trainer.limit_train_batches=2"]
    )  # fmt: skip
    assert results["architecture"] == "searched-digits" and [r["k"] for r in results["sizes"]] == [1, 2]


def test_the_recipe_shows_the_librarys_log_only(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    library = logging.getLogger("lightning_ensembles")
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(library, "level", logging.NOTSET)
    nas_ensemble.library_logging()
    nas_ensemble.library_logging()  # idempotent
    assert root.level == logging.WARNING  # TensorBoard's INFO lines stay hidden
    assert library.level == logging.INFO and len(library.handlers) == 1


def _narrow_space(tmp_path: Path) -> Path:
    """A search config of architectures of nearly equal cost, so that both arms can be chosen at ±90%."""
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(
        "search:\n  space:\n    stem_channels: 8\n    num_features: 32\n    stages:\n"
        "      - {channels: [8], expand_ratios: [1], max_blocks: 1}\n"
        "      - {channels: [16], stride: 2, expand_ratios: [3], max_blocks: 1}\n"
    )
    return narrow


def test_the_search_shows_one_progress_line_per_trial_and_no_other_packages_info(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    library = logging.getLogger("lightning_ensembles")
    monkeypatch.setattr(library, "handlers", [])  # library_logging() binds its handler to this test's stderr
    monkeypatch.setattr(library, "level", logging.NOTSET)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default, which prints each trial itself
    try:
        result = nas_ensemble.main(
            [
                "search", "--config", str(_narrow_space(tmp_path)), f"--out={tmp_path / 'nas'}",
                "--search.n_trials=2", "--search.proxy_epochs=1", "--select.num_members=2",
                "--select.tolerance=0.9",
                '--search.trainer={"accelerator": "cpu", "limit_train_batches": 3, "limit_val_batches": 2}',
            ]
        )  # fmt: skip
        logging.getLogger("tensorboard").info("TensorBoard's directory watcher says hello")
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    err = capfd.readouterr().err
    for record in result["records"]:
        about = [line for line in err.splitlines() if re.search(rf"\bTrial {record['number']}\b", line)]
        assert len(about) == 1 and about[0].startswith(
            f"INFO lightning_ensembles.nas: Trial {record['number']}, "
        )
    assert "INFO lightning_ensembles.nas: Trial 0, architecture 1 of 2: top-1 " in err
    assert re.search(
        r"Best so far: top-1 [\d.]+ \(trial 0, [^)]+\), 1 on the Pareto set\. About \d+ s left \(1 architecture at",
        err,
    )
    assert "All 2 architectures trained." in err
    assert "finished with value" not in err and "says hello" not in err
    assert "it/s" not in err and "Epoch 0" not in err  # no progress bars of the proxies
    assert "GPU available" not in err  # nor Lightning's banner per proxy
    assert root.level == logging.WARNING and optuna.logging.get_verbosity() == optuna.logging.WARNING


def test_heartbeat_flags_of_the_search(capsys: pytest.CaptureFixture) -> None:
    parser = nas_ensemble.search_parser()
    flags = ["--search.heartbeat_interval=30", "--search.grace_period=90", "--search.stale_retries=2"]
    config = parser.parse_args(["--config", str(NAS / "search.yaml"), *flags])
    init = (
        parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
    )
    search = init.search
    assert (search.heartbeat_interval, search.grace_period, search.stale_retries) == (30, 90, 2)
    default = _search_config().search  # type: ignore[attr-defined]
    assert (default.heartbeat_interval, default.grace_period, default.stale_retries) == (60, 120, 1)
    with pytest.raises(
        ValueError, match=r"`--search.grace_period` to be an int > `--search.heartbeat_interval` \(30 s\)"
    ):
        nas_ensemble.search([flags[0], "--search.grace_period=10", "--search.n_trials=1"])
    with pytest.raises(SystemExit):
        nas_ensemble.main(["search", "--help"])
    printed = capsys.readouterr().out
    assert all(
        flag in printed
        for flag in ("--search.heartbeat_interval", "--search.grace_period", "--search.stale_retries")
    )
