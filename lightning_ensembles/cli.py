"""The LightningCLI subclass every reproduction shares.

A reproduction is ``python reproductions/<name>.py [--config ...] [--trainer.devices N]`` with no
subcommand: it trains, tests the final weights (``--test_weights best``: the best checkpoint on a validation
split), then prints and saves the results table (:mod:`lightning_ensembles.results`); its ``main`` is
:func:`recipe_main`. The typed ``__init__`` signatures of the module and the datamodule are the
configuration; ``num_classes`` is given once, by the datamodule, and linked into the module, and a timm
member's name is given once, in the model, and linked into ``--data.model_name``
(:func:`link_member_resolution`).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

import lightning_ensembles.callbacks  # noqa: F401 - registers the callbacks' short names with the CLI
from lightning_ensembles._help import CompactHelpFormatter
from lightning_ensembles._validation import check_checkpoint_file
from lightning_ensembles.distributed import plan_members
from lightning_ensembles.models.timm_member import TimmModel, resolution_of
from lightning_ensembles.module import EnsembleLightningModule, as_ensemble
from lightning_ensembles.results import build_results, format_table, run_directory, write_results

__all__ = [
    "EnsembleCLI",
    "SUMMARY_METRICS",
    "TIMM_MEMBER",
    "check_devices",
    "check_strategy",
    "log_run_summary",
    "recipe_main",
    "run_hparams",
    "run_recipe",
    "split_at_dashes",
    "split_own_flags",
]

log = logging.getLogger(__name__)

HELP_DESCRIPTION = (
    "Train an ensemble (or one model), test it, and write its results table next to the TensorBoard logs. "
    "Flags override the recipe's config. Classes are given by short name or class path, e.g. "
    "--trainer.callbacks+=EnsembleSizeAblation; `--<flag>.help CLASS` prints a class's arguments "
    "(--model.member.help WideResNet, --trainer.callbacks.help EnsembleSizeAblation) and --print_config the "
    "whole configuration."
)


def check_devices(devices: Any, accelerator: Any) -> None:
    """Fail early, with the flag named, when ``--trainer.devices`` asks for more devices than exist.

    Args:
        devices: the value of ``--trainer.devices`` (an int, a digit string, a list of indices or ``"auto"``).
        accelerator: the value of ``--trainer.accelerator``.

    Raises:
        ValueError: if more GPUs are requested than CUDA reports, or more CPU processes than CPU cores
            when no GPU is used.
    """
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        requested = max(int(d) for d in devices) + 1 if devices else 0
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        requested = devices
    else:
        return  # "auto", -1: Lightning picks what exists
    accelerator = str(accelerator or "auto")
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        if requested > gpus:
            raise ValueError(
                f"Expected `--trainer.devices` to be at most {gpus} (the CUDA GPUs on this machine), "
                f"but got {devices!r}."
            )
    elif accelerator == "cpu" or (accelerator == "auto" and gpus == 0):
        cores = os.cpu_count() or 1
        if requested > cores:
            raise ValueError(
                f"Expected `--trainer.devices` to be at most {cores} on this machine (no GPU, {cores} CPU "
                f"cores, one process each), but got {devices!r}."
            )


def check_strategy(strategy: Any) -> None:
    """Fail early, with the flag named and the closest names suggested, on an unknown strategy name.

    Args:
        strategy: the value of ``--trainer.strategy`` (a name, or a strategy given by class path).

    Raises:
        ValueError: if ``strategy`` is a name that is neither ``"auto"`` nor registered with Lightning.
    """
    if not isinstance(strategy, str) or strategy == "auto":
        return
    available = StrategyRegistry.available_strategies()
    if strategy in available:
        return
    close = difflib.get_close_matches(strategy, available, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Expected `--trainer.strategy` to be 'auto' or a registered strategy name "
        f"({', '.join(sorted(available))}), but got {strategy!r}.{hint}"
    )


TIMM_MEMBER = "lightning_ensembles.models.TimmModel"


def _timm_names_as_classes(model: Namespace) -> None:
    """``--model.member resnet18`` (a timm model name) becomes the ``TimmModel`` entry it means, so the saved
    config says what was built and jsonargparse serialises it as a class like any other member."""

    def as_class(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return Namespace(class_path=TIMM_MEMBER, init_args=Namespace(model_name=value))

    if isinstance(model.get("member"), str):
        model["member"] = as_class(model["member"])
    if isinstance(model.get("members"), list):
        model["members"] = [as_class(value) for value in model["members"]]


def _import_class(path: Any) -> Any:
    """The object at the dotted ``path`` (e.g. ``lightning_ensembles.models.TimmModel``), or ``None``."""
    module, _, name = str(path).rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def link_member_resolution(model: Namespace, data: Namespace) -> None:
    """Link the model's timm members into the datamodule's ``--data.model_name`` and ``--data.input_size``.

    A datamodule with both arguments (:class:`~lightning_ensembles.data.ImageNetDataModule`) chooses its
    image size, crop and normalisation from a timm model name. When the user gives neither, they are set,
    in the parsed config, to what :func:`~lightning_ensembles.models.resolution_of` says of the
    ``TimmModel`` members of ``--model.member``/``--model.members``: the member with the largest native
    resolution, so the model name is written once, in the model. The saved config shows the linked values.
    A value the user gives wins; that is why this is not a jsonargparse ``link_arguments`` link, whose target
    cannot be given on the command line.

    Args:
        model: the parsed ``model`` config (members already turned into ``TimmModel`` entries).
        data: the parsed ``data`` config (``class_path`` and ``init_args``).
    """
    init_args = data.get("init_args") if isinstance(data, Namespace) else None
    if not isinstance(init_args, Namespace) or not {"model_name", "input_size"} <= set(init_args.keys()):
        return
    if init_args.get("model_name") is not None or init_args.get("input_size") is not None:
        return
    entries = [model.get("member"), *(model.get("members") or [])]
    pairs = []
    for entry in entries:
        cls = _import_class(entry.get("class_path")) if isinstance(entry, Namespace) else None
        if isinstance(cls, type) and issubclass(cls, TimmModel):
            args = entry.get("init_args") or Namespace()
            pairs.append((args.get("model_name"), args.get("input_size")))
    for key, value in resolution_of(pairs).items():
        init_args[key] = value


def _registered_name(path: str) -> str | None:
    """The registered name of the strategy class at ``path`` (e.g. ``lightning_ensembles.MemberParallelStrategy``
    -> ``member_parallel``), preferring its plain entry; ``None`` if ``path`` is not such a class."""
    cls = _import_class(path)
    if cls is None:
        return None
    names = [n for n in StrategyRegistry.available_strategies() if StrategyRegistry[n]["strategy"] is cls]
    plain = [n for n in names if StrategyRegistry[n]["init_params"] in ({}, {"start_method": "popen"})]
    return (plain or names or [None])[0]


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    class_path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if isinstance(strategy, dict) else None
    )
    return "member_parallel" if class_path and class_path.endswith("MemberParallelStrategy") else ""


def _count_devices(devices: Any, accelerator: Any) -> int | None:
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None  # "auto", -1: known only once Lightning has looked


class EnsembleCLI(LightningCLI):
    """LightningCLI for ensembles: links ``num_classes``, checks devices, adds ``--ckpt_path``.

    Args:
        *args: forwarded to ``LightningCLI``.
        **kwargs: forwarded to ``LightningCLI``; defaults: ``EnsembleLightningModule`` as the model,
            datamodules in subclass mode, ``run=False``, and the config saved next to the logs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", EnsembleLightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("run", False)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("formatter_class", CompactHelpFormatter)
        parser_kwargs.setdefault("description", HELP_DESCRIPTION)
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume training from this checkpoint file (e.g. <run dir>/checkpoints/last.ckpt).",
        )
        parser.add_argument(
            "--test_weights",
            type=Literal["final", "best"],
            default="final",
            help=(
                "Weights tested after training: 'final' (the last epoch's) or 'best' (the checkpoint "
                "callback's best by its monitor; final when validation runs on the test split). Final is the "
                "default: over 20 seeds on digits the best-val-top-1 checkpoint cost 0.2 to 1.3 points (docs)."
            ),
        )
        parser.add_argument(
            "--train",
            type=bool,
            default=True,
            help="Train before testing; false evaluates the members as built (a committee of pretrained models).",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # The recipes always pass `args` (their own argv, with the default config first). Lightning warns when
        # `args` and `sys.argv` are both given, which is every recipe run: parse with `sys.argv` hidden. It is
        # restored at once, so Lightning's DDP launcher still re-runs the script with the real command line.
        if args is None:
            return super().parse_arguments(parser, args)
        argv = sys.argv
        sys.argv = argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        if isinstance(config.trainer.strategy, str):
            # `--trainer.strategy some.module.StrategyClass` without arguments parses as a plain string,
            # which Lightning rejects: use the name the class is registered under.
            config.trainer.strategy = _registered_name(config.trainer.strategy) or config.trainer.strategy
        check_strategy(config.trainer.strategy)
        _timm_names_as_classes(config.model)
        link_member_resolution(config.model, config.data)
        if _strategy_name(config.trainer.strategy).startswith("member_parallel"):
            members = config.model.get("num_members") or len(config.model.get("members") or []) or 1
            processes = _count_devices(config.trainer.devices, config.trainer.accelerator)
            if processes is not None:  # fail before launching W processes
                plan_members(processes * int(config.trainer.num_nodes or 1), int(members))
        check_devices(config.trainer.devices, config.trainer.accelerator)

    def fit_test_report(self) -> dict[str, Any]:
        """Train, test, and write the results table into the run directory.

        ``--test_weights final`` (the default) tests the weights of the last epoch. ``--test_weights best``
        tests the best checkpoint by the checkpoint callback's monitor, when the datamodule validates on a
        split of its own; when validation runs on the test split (``val_size == 0``), choosing the best epoch
        there would select on the test set, so the final weights are tested instead.

        Returns:
            The results dict (see :func:`lightning_ensembles.results.build_results`).
        """
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        started = time.perf_counter()
        train = self.config.get("train", True)
        if train:
            ckpt_path = self.config.get("ckpt_path")
            if ckpt_path is not None:
                check_checkpoint_file(ckpt_path, "--ckpt_path")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - started
        val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if not train:
            best, selection = "", "members as built, not trained (--train false)"
        elif self.config.get("test_weights", "final") == "final":
            best, selection = "", "final weights"
        elif getattr(datamodule, "val_size", None) == 0:
            best, selection = "", "final weights (validation ran on the test split)"
        else:
            selection = "best checkpoint on the validation split" if best else "final weights"
        # One dict per test loader: [in-distribution, OOD] when the datamodule has an OOD set.
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics = {key: value for per_loader in tested for key, value in per_loader.items()}
        model = as_ensemble(model, "EnsembleCLI's results table")
        results = build_results(
            list(model.members),
            metrics,
            input_shape=datamodule.input_shape,
            extra={
                "checkpoint": best or None,
                "tested": selection,
                "fit_seconds": round(fit_seconds, 2),
                "epochs": trainer.current_epoch,
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
                "config": _plain(self.config),
                "hparams": _jsonable(run_hparams(model, datamodule)),
            },
        )
        log_run_summary(trainer, model, datamodule, {**val_metrics, **metrics}, results)
        self._save_results(results, run_directory(self.trainer))  # every rank: a collective under DDP
        return results

    @rank_zero_only
    def _save_results(self, results: dict[str, Any], directory: Path | None) -> None:
        if directory is None:
            log.info("fast_dev_run: no results files are written (Lightning's dev run has no run folder).")
            return
        json_path, _ = write_results(results, directory)
        results["results_file"] = str(json_path)
        log.info("Results written to %s", json_path)


SUMMARY_METRICS = ("val/top1", "val/nll", "test/top1", "test/nll", "test/ece")


def log_run_summary(
    trainer: Any, model: LightningModule, datamodule: Any, metrics: dict[str, Any], results: dict[str, Any]
) -> None:
    """Give the run's TensorBoard HParams session its real results, in place of Lightning's ``hp_metric = -1``.

    The session's hyperparameters are the module's (``model/``, ``ensemble/``) and the datamodule's under
    ``data/``, without Lightning's internal keys (``_instantiator``, ...). Its metrics are the run's last
    validation and its test top-1, NLL and ECE, and the ensemble's multiply-adds, logged as
    ``hparams/{val,test}_{metric}`` and ``hparams/ensemble_gmacs``. TensorBoard shows the first session of a
    run, so the recipes' loggers set ``default_hp_metric: false``: no placeholder session is written when
    training starts, and this is the run's only one.

    Args:
        trainer: the Trainer (its TensorBoard loggers are written to, on rank 0).
        model: the module.
        datamodule: the datamodule, or ``None``.
        metrics: the logged metrics (``val/...`` and ``test/...``).
        results: the results dict (for the ensemble's multiply-adds).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    if not loggers or not trainer.is_global_zero:
        return
    params = run_hparams(model, datamodule)
    summary = {
        f"hparams/{key.replace('/', '_')}": float(metrics[key]) for key in SUMMARY_METRICS if key in metrics
    }
    sizes = results.get("sizes") or []
    if sizes:
        summary["hparams/ensemble_gmacs"] = sizes[-1]["macs"] / 1e9
    for logger in loggers:
        logger.log_hyperparams(params, summary, step=trainer.global_step)


def run_hparams(model: LightningModule, datamodule: Any) -> dict[str, Any]:
    """The run's hyperparameters: the module's (``model/``, ``ensemble/``, e.g. ``ensemble/architecture``) and
    the datamodule's under ``data/``, without Lightning's internal keys (``_instantiator``, ...).

    The same dict goes to TensorBoard's HParams session (:func:`log_run_summary`) and to ``results.json``
    (``hparams``), where :mod:`lightning_ensembles.compare` reads it whatever the logger.

    Args:
        model: the module, after its ``setup`` (which adds the ``ensemble/`` summary).
        datamodule: the datamodule, or ``None``.

    Returns:
        ``{name: value}``, e.g. ``{"ensemble/architecture": "WRN-16-2", "data/train_size": 5900, ...}``.
    """
    params = {k: v for k, v in dict(model.hparams_initial).items() if not k.startswith("_")}
    data = dict(getattr(datamodule, "hparams_initial", {}) or {})
    params.update({f"data/{k}": v for k, v in data.items() if not k.startswith("_")})
    return params


def _plain(config: Namespace) -> Any:
    value = config.as_dict() if isinstance(config, Namespace) else config
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    return str(value)


def run_recipe(
    args: Sequence[str] | None = None, default_config: str | os.PathLike[str] | None = None, **cli_kwargs: Any
) -> dict[str, Any]:
    """Run a reproduction: parse ``args`` (or ``sys.argv``), fit, test and report.

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv[1:]``.
        default_config: the recipe's default config, placed first so later ``--config`` files and flags
            override it (jsonargparse's ``default_config_files`` loses callable ``class_path`` defaults).
        **cli_kwargs: forwarded to :class:`EnsembleCLI`.

    Returns:
        The results dict, with ``table`` holding the Markdown table.
    """
    args = list(sys.argv[1:] if args is None else args)
    if default_config is not None:
        args = ["--config", os.fspath(default_config), *args]
    cli = EnsembleCLI(args=args, **cli_kwargs)
    results = cli.fit_test_report()
    results["table"] = format_table(results)
    return results


def recipe_main(
    args: Sequence[str] | None, default_config: str | os.PathLike[str], **cli_kwargs: Any
) -> dict[str, Any]:
    """The ``main`` of a training recipe: :func:`run_recipe`, then the results table on stdout (rank 0).

    Every reproduction script is its docstring, its default config and ``main = recipe_main(args,
    DEFAULT_CONFIG)``; ``--help`` is :class:`EnsembleCLI`'s and a bad flag exits with status 2, as
    jsonargparse reports it. Only rank 0 of a multi-device run prints (the one that wrote the results file).

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv[1:]``.
        default_config: the recipe's default config (see :func:`run_recipe`).
        **cli_kwargs: forwarded to :class:`EnsembleCLI`.

    Returns:
        What :func:`run_recipe` returns.
    """
    results = run_recipe(args, default_config=default_config, **cli_kwargs)
    if "results_file" in results:  # rank 0 only
        print(results["table"], f"\nSaved to {results['results_file']}", sep="", flush=True)
    return results


def split_own_flags(parser: ArgumentParser, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``args`` into the flags ``parser`` defines and the rest, which a tool forwards to a recipe.

    jsonargparse has no ``parse_known_args`` (a typo would go unnoticed); a tool that takes a few flags of its
    own and passes every other one to :func:`run_recipe` (which reports a bad one, exit status 2) splits
    them with this first, then parses its own with ``parser``. The tool's flags are ``-h``/``--help`` and
    ``--<key>`` for each key of ``parser.get_defaults()``, each taking one value (``--out runs`` or
    ``--out=runs``); abbreviations are not recognised.

    Args:
        parser: the tool's own parser.
        args: the command line after the tool's name.

    Returns:
        ``(own, rest)``, each in the order given.

    Example:
        >>> from jsonargparse import ArgumentParser
        >>> parser = ArgumentParser()
        >>> _ = parser.add_argument("--out", type=str, default="runs")
        >>> split_own_flags(parser, ["--out", "x", "--trainer.max_epochs=3", "--config", "a.yaml", "-h"])
        (['--out', 'x', '-h'], ['--trainer.max_epochs=3', '--config', 'a.yaml'])
    """
    takes_value = {"-h": False, "--help": False, **{f"--{key}": True for key in parser.get_defaults().keys()}}
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in takes_value:
            value = takes_value[name] and "=" not in arg and i + 1 < len(args)
            own.extend(args[i : i + 2] if value else [arg])
            i += 2 if value else 1
        else:
            rest.append(arg)
            i += 1
    return own, rest


def split_at_dashes(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Split a tool's command line at ``--``: its own flags before, the recipe flags it forwards after.

    Args:
        argv: the command line after the tool's name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        ``(own, recipe)``; ``recipe`` is empty when there is no ``--``.

    Example:
        >>> split_at_dashes(["--seeds", "3", "--", "--trainer.max_epochs=5"])
        (['--seeds', '3'], ['--trainer.max_epochs=5'])
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1 :]


def _run_tool(name: str) -> None:
    """Run ``python -m lightning_ensembles.<name>``'s ``main`` as a console command: a console script exits
    with whatever its function returns, and the tools' ``main`` returns their results, so this returns
    ``None`` (exit status 0)."""
    importlib.import_module(f"lightning_ensembles.{name}").main()


def compare_command() -> None:
    """``lightning-ensembles-compare``: ``python -m lightning_ensembles.compare``."""
    _run_tool("compare")


def sweep_command() -> None:
    """``lightning-ensembles-sweep``: ``python -m lightning_ensembles.sweep``."""
    _run_tool("sweep")


def export_command() -> None:
    """``lightning-ensembles-export``: ``python -m lightning_ensembles.export``."""
    _run_tool("export")
