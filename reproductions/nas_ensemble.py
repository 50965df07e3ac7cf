r"""NAS-derived ensembles: one searched architecture replicated vs diverse searched ones (Kondratyuk et al.
2020, figure 3).

    python reproductions/nas_ensemble.py search [--config reproductions/configs/nas/search.yaml] [--out runs/nas]
    python reproductions/nas_ensemble.py compare --out runs/nas [recipe flags, e.g. --trainer.max_epochs 30]
    python reproductions/nas_ensemble.py train --config reproductions/configs/nas/searched-digits.yaml \
        --config reproductions/configs/ensemble-3.yaml

``search`` runs an Optuna study (lightning_ensembles.nas; default configs/nas/search.yaml: digits, accuracy
vs multiply-adds) in the storage ``--search.storage`` (default ``sqlite:///<out>/study.db``; start the same
command on several machines to share it), then writes pareto.yaml, searched.yaml (arm a) and diverse.yaml
(arm b) to ``--out``. ``compare`` trains both arms with the full recipe (configs/nas/digits.yaml: FLOPs
monitor, ensemble-size ablation), logs them under ``<out>/compare`` and runs ``lightning_ensembles.compare``
there. ``train`` is the plain recipe, for one config such as the shipped searched architecture. Each stage
has its own ``--help``; the flags of ``train``, and those of ``compare`` but ``--out``, are the recipe's.

The search prints one line per finished trial on stderr (its place among ``--search.n_trials``, top-1 and
cost, the best so far and the time left). A worker that dies leaves its trial to the others: after
``--search.grace_period`` seconds without a heartbeat (sent every ``--search.heartbeat_interval``) the next
worker records it as failed and trains its architecture again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from lightning.pytorch import LightningDataModule

from lightning_ensembles._help import first_sentence
from lightning_ensembles.cli import recipe_main, run_recipe, split_own_flags
from lightning_ensembles.compare import compare
from lightning_ensembles.nas import NASSearch, export_search
from lightning_ensembles.sweep import resolve_seeds, seed_args

CONFIGS = Path(__file__).resolve().parent / "configs" / "nas"
SEARCH_CONFIG = CONFIGS / "search.yaml"
TRAIN_CONFIG = CONFIGS / "digits.yaml"


class _DocstringHelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the module docstring's commands kept as they are written."""


@dataclasses.dataclass
class Selection:
    """How the two arms are chosen from the search (see ``lightning_ensembles.nas.choose_architectures``).

    Args:
        num_members: N, the ensemble size of both arms.
        budget: Per-member cost in the search's unit (GMACs or ms); null takes the median trial's.
        tolerance: Relative cost window around the budget.
    """

    num_members: int = 3
    budget: float | None = None
    tolerance: float = 0.15


def search_parser() -> ArgumentParser:
    """The ``search`` stage's parser: ``--search.*`` (NASSearch), ``--data``, ``--select.*``, ``--out``."""
    parser = ArgumentParser(prog="nas_ensemble.py search", description=search.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument(
        "--out", type=str, default="runs/nas", help="Folder for the study and the YAML files."
    )
    parser.add_class_arguments(NASSearch, "search")
    parser.add_subclass_arguments(LightningDataModule, "data")
    parser.add_class_arguments(Selection, "select")
    return parser


def search(args: list[str]) -> dict[str, Any]:
    """Run (or join) the study, then write the Pareto set and the two arms.

    The ``search`` stage; ``args`` are the flags of :func:`search_parser`, after its default config.
    """
    parser = search_parser()
    config = parser.parse_args(["--config", str(SEARCH_CONFIG), *args])
    out = Path(config.out)
    if config.search.storage is None:
        out.mkdir(parents=True, exist_ok=True)
        config.search.storage = f"sqlite:///{out.resolve() / 'study.db'}"
    init = (
        parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
    )
    study = init.search.optimize(init.data)
    result = export_search(init.search, study, init.data, out, **dataclasses.asdict(init.select))
    key = init.search.cost_key
    print(f"\n## Pareto set ({len(result['pareto'])} of {len(result['records'])} trials)\n")
    print(f"| trial | top-1 (%) | {key} | params (M) |\n|---:|---:|---:|---:|")
    for r in result["pareto"]:
        print(f"| {r['number']} | {100 * r['top1']:.2f} | {r[key]:.4g} | {r['params'] / 1e6:.3f} |")
    chosen = result["selection"]
    print(
        f"\nArm (a): trial {chosen['replicated']['number']} x {len(chosen['diverse'])}; arm (b): trials "
        f"{[r['number'] for r in chosen['diverse']]}.",
        *(f"wrote {f}" for f in result["files"]),
        sep="\n",
    )
    return result


def compare_parser() -> ArgumentParser:
    """The ``compare`` stage's own flag, ``--out``; every other flag is the recipe's, given to both arms."""
    parser = ArgumentParser(
        prog="nas_ensemble.py compare",
        usage="nas_ensemble.py compare [-h] [--out OUT] [--seeds SEEDS] [recipe flags]",
        description=(
            f"{first_sentence(compare_arms.__doc__ or '')} Arm (a) is the searched architecture "
            "<out>/searched.yaml replicated N times, arm (b) the N diverse searched architectures <out>/diverse.yaml; both are trained "
            "under every seed (seed s sets --seed_everything, --model.seed and --data.seed, as "
            "lightning_ensembles.sweep does, so the arms of a seed share the data split and order), logged under "
            "<out>/compare/<arm>/seed_<s> and compared seed by seed with lightning_ensembles.compare. Every flag "
            "but --out and --seeds is a flag of the training recipe (configs/nas/digits.yaml), given to both arms: "
            "--config FILE, --trainer.max_epochs 30; `nas_ensemble.py train --help` lists them."
        ),
    )
    parser.add_argument(
        "--out",
        type=str,
        default="runs/nas",
        help="The search's folder, written by `nas_ensemble.py search --out DIR`.",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="How many seeds (0..n-1) each arm is trained under; the arms are compared seed by seed.",
    )
    return parser


def compare_arms(args: list[str]) -> dict[str, Any]:
    """Train both arms of a finished search with the full recipe over seeds, then compare them seed by seed.

    The ``compare`` stage; ``--out`` is its own flag (:func:`compare_parser`), every other one is the recipe's.
    """
    parser = compare_parser()
    own, args = split_own_flags(parser, args)
    options = parser.parse_args(own)
    out = Path(options.out)
    seeds = resolve_seeds(options.seeds)
    searched, diverse = out / "searched.yaml", out / "diverse.yaml"
    for path in (searched, diverse):
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected {path} from `nas_ensemble.py search --out {out}`; run that first."
            )
    num_members = len(yaml.safe_load(diverse.read_text())["model"]["members"])
    logdir = out / "compare"
    arms = {
        "replicated": ["--config", str(searched), f"--model.num_members={num_members}"],
        "diverse": ["--config", str(diverse)],
    }
    results: dict[str, dict[str, Any]] = {}
    for seed in seeds:  # seed-major, as a sweep: a partial run is still paired
        for arm, arm_args in arms.items():
            logger = [
                f"--trainer.logger.init_args.save_dir={logdir}",
                f"--trainer.logger.init_args.name={arm}",
                f"--trainer.logger.init_args.version=seed_{seed}",
            ]
            result = run_recipe(
                [*args, *arm_args, *seed_args(seed), *logger],
                TRAIN_CONFIG,
                parser_kwargs={"prog": "nas_ensemble.py compare"},
            )
            results.setdefault(arm, result)  # the first seed's, for the architecture and cost
            if "table" in result:
                print(f"\n## Arm: {arm}, seed {seed}\n\n{result['table']}")
    if not all("results_file" in r for r in results.values()):
        return {"arms": results, "comparison": None}  # not rank 0 of a multi-device run
    architectures = {arm: str(r["architecture"]) for arm, r in results.items()}
    pair = f"{architectures['replicated']}@{num_members} vs {architectures['diverse']}@{num_members}"
    comparison = compare(str(logdir), pairs=[pair])
    print("\n## Replicated vs diverse (test split; lightning_ensembles.compare)\n\n" + comparison["table"])
    print("| arm | members | GMACs / input | top-1 (%) | NLL |\n|---|---:|---:|---:|---:|")
    for arm, r in results.items():
        full = r["sizes"][-1]
        print(
            f"| {arm} | {r['num_members']} | {full['macs'] / 1e9:.4g} | {100 * full['top1']:.2f} | {full['nll']:.4f} |"
        )
    return {"arms": results, "comparison": comparison}


def library_logging() -> logging.Logger:
    """Show the library's INFO messages on stderr, and only the library's: the root logger is left alone, so
    other packages (TensorBoard's directory watcher, for one) keep their own levels."""
    logger = logging.getLogger("lightning_ensembles")
    if not any(getattr(h, "_lightning_ensembles", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._lightning_ensembles = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def train(args: list[str]) -> dict[str, Any]:
    """Train one config with the plain recipe (configs/nas/digits.yaml), e.g. the shipped architecture.

    The ``train`` stage; its flags are the recipe's (``nas_ensemble.py train --help``).
    """
    return recipe_main(args, TRAIN_CONFIG, parser_kwargs={"prog": "nas_ensemble.py train"})


STAGES = {"search": search, "compare": compare_arms, "train": train}


def stages_parser() -> ArgumentParser:
    """The command line: one subcommand per stage, each with its own ``--help``.

    ``search`` and ``compare`` are parsed by :func:`search_parser` and :func:`compare_parser`; the flags of
    ``train`` (and those of ``compare`` but ``--out``) are the recipe's, parsed by
    :class:`~lightning_ensembles.cli.EnsembleCLI`.
    """
    parser = ArgumentParser(
        prog="nas_ensemble.py", description=__doc__, formatter_class=_DocstringHelpFormatter
    )
    stages = parser.add_subcommands(dest="stage", metavar="{search,compare,train}")
    stages.add_subcommand("search", search_parser(), help=first_sentence(search.__doc__ or ""))
    stages.add_subcommand("compare", compare_parser(), help=first_sentence(compare_arms.__doc__ or ""))
    train_help = first_sentence(train.__doc__ or "")
    train_stage = ArgumentParser(prog="nas_ensemble.py train", description=train_help)
    stages.add_subcommand("train", train_stage, help=train_help)
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the stage named by the first argument (``search``, ``compare`` or ``train``) with the rest."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in STAGES:
        parser = stages_parser()
        parser.parse_args(args)  # --help (exit status 0), or no stage or an unknown one (status 2)
        parser.error(
            f"expected a stage ({', '.join(STAGES)}) first, but got {args[0] if args else 'nothing'!r}"
        )
    library_logging()
    return STAGES[args[0]](args[1:])


if __name__ == "__main__":
    main()
