"""Seed sweeps: every (arm, seed) of a comparison as one run of a recipe, with the seed as a first-class axis.

Kondratyuk et al. 2020 compare ensembles of small networks with one larger network at equal multiply-adds;
the differences are a fraction of a point, so each point needs several seeds (DESIGN, rule 13). A sweep is
the grid *arms x seeds*: an arm is a recipe configuration (an architecture and an ensemble size, e.g.
``cifar/wrn-16-2.yaml`` + ``ensemble-4.yaml``), and each run is the recipe's own ``main(args)`` with three
seed flags added:

- ``--seed_everything s`` (Lightning's global seed),
- ``--model.seed s * SEED_STRIDE`` (member ``i`` is initialised under ``s * SEED_STRIDE + i``, so no two
  seeds share a member initialisation),
- ``--data.seed s`` (the data split and the training order).

Every arm of seed ``s`` gets the same data split and order: the design is *paired*, and
:mod:`lightning_ensembles.stats` compares arms seed by seed. Each run logs to ``<out>/<arm>/seed_<s>/``
(TensorBoard events, ``config.yaml``, ``results.json``, checkpoints), so
``python -m lightning_ensembles.compare <out>`` draws the figure over seeds.

Runs go to a pool of worker processes on this machine (one per GPU, or one per CPU core with one torch
thread each), or, on a cluster, one per task of an existing launcher: ``--task_index $SLURM_ARRAY_TASK_ID``
runs exactly one job of the grid, so a SLURM job array of ``len(jobs)`` tasks runs the sweep. A finished run
(its ``results.json`` exists) is skipped, and an interrupted one resumes from its ``last.ckpt``.

    python -m lightning_ensembles.sweep --config reproductions/configs/sweeps/digits-figure1.yaml --seeds 5
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ensembles._validation import check_int, command_line_errors

__all__ = [
    "Job",
    "Outcome",
    "SEED_STRIDE",
    "SweepResult",
    "arm_args",
    "default_workers",
    "load_recipe",
    "load_recipe_module",
    "main",
    "plan",
    "progress_line",
    "resolve_seeds",
    "resume_args",
    "run_job",
    "run_sweep",
    "seed_args",
    "slug",
    "sweep",
    "training_cost",
]

SEED_STRIDE = 1000
"""Member ``i`` of seed ``s`` is initialised under ``s * SEED_STRIDE + i``: no two seeds share a member."""


@dataclass(frozen=True)
class Job:
    """One run of a sweep: an arm of the comparison under one seed."""

    index: int
    arm: str
    seed: int
    args: tuple[str, ...]
    directory: Path

    @property
    def results_file(self) -> Path:
        """The recipe's ``results.json``: it exists once the run has finished."""
        return self.directory / "results.json"

    @property
    def log_file(self) -> Path:
        """Where the run's console output goes when it runs in a worker process."""
        return self.directory / "console.log"

    @property
    def done(self) -> bool:
        """Whether the run has finished (and so is skipped)."""
        return self.results_file.is_file()


@dataclass
class Outcome:
    """What happened to one job: its results (``None`` if it failed), the error and the wall time."""

    job: Job
    results: dict[str, Any] | None
    error: str | None = None
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class SweepResult:
    """Every job's outcome, in grid order, and the sweep's wall time and worker settings."""

    outcomes: list[Outcome]
    seconds: float
    workers: int
    threads: int | None

    @property
    def failed(self) -> list[Outcome]:
        """The outcomes of the runs that failed."""
        return [o for o in self.outcomes if o.results is None]

    def failure_message(self, retry: str) -> str:
        """One sentence naming each failed run, its error and console log, then how to retry (``retry``)."""
        failed = "; ".join(
            f"{o.job.arm} seed {o.job.seed} ({o.error}; log {o.job.log_file})" for o in self.failed
        )
        return f"{len(self.failed)} of {len(self.outcomes)} sweep runs failed: {failed}. {retry}"


def slug(name: str) -> str:
    """A folder name for an arm: ``"4 x WRN-16-2"`` -> ``"4_x_WRN-16-2"``."""
    cleaned = re.sub(r"[^\w.+-]+", "_", name.strip()).strip("_")
    if not cleaned:
        raise ValueError(f"Expected an arm name with at least one letter or digit, but got {name!r}.")
    return cleaned


def seed_args(seed: int, data_seed: bool = True) -> list[str]:
    """The flags that put a recipe run under sweep seed ``seed`` (see the module docstring).

    Args:
        seed: the sweep seed.
        data_seed: also seed the datamodule's split and order (``--data.seed``); off for a datamodule that
            has no ``seed`` argument.

    Example:
        >>> seed_args(2)
        ['--seed_everything=2', '--model.seed=2000', '--data.seed=2']
    """
    flags = [f"--seed_everything={seed}", f"--model.seed={seed * SEED_STRIDE}"]
    return [*flags, f"--data.seed={seed}"] if data_seed else flags


def resolve_seeds(seeds: int | Sequence[int]) -> list[int]:
    """``5`` -> ``[0, 1, 2, 3, 4]``; a list is kept (it must hold distinct non-negative ints).

    Raises:
        ValueError: naming ``--seeds``, for a count below 1 or a bad list.
    """
    if isinstance(seeds, int):
        return list(range(check_int(seeds, "--seeds", 1)))
    values = list(seeds)
    if not values or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in values):
        raise ValueError(
            f"Expected `--seeds` to be a count >= 1 or a list of distinct ints >= 0, but got {seeds!r}."
        )
    if len(set(values)) != len(values):
        raise ValueError(f"Expected the seeds in `--seeds` to be distinct, but got {values}.")
    return values


def arm_args(entries: Sequence[str], config_dir: Path | None) -> list[str]:
    """Expand an arm's entries: ``*.yaml`` files become ``--config <file>``, flags are kept.

    A relative YAML path is looked up in ``config_dir`` (the recipe's ``configs/`` folder) first, then in the
    working directory.

    Raises:
        FileNotFoundError: for a YAML file found in neither place.
    """
    args: list[str] = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")) and not entry.startswith("-"):
            path = Path(entry)
            if not path.is_absolute() and config_dir is not None and (config_dir / path).is_file():
                path = config_dir / path
            if not path.is_file():
                where = f" or in {str(config_dir)!r}" if config_dir is not None else ""
                raise FileNotFoundError(
                    f"Expected the sweep config entry {entry!r} to be a YAML file in the working directory"
                    f"{where}, but it was not found."
                )
            args += ["--config", str(path.resolve())]
        else:
            args.append(entry)
    return args


def plan(
    arms: Mapping[str, Sequence[str]],
    seeds: int | Sequence[int],
    out: str | os.PathLike[str],
    base: Sequence[str] = (),
    args: Sequence[str] = (),
    config_dir: str | os.PathLike[str] | None = None,
    data_seed: bool = True,
) -> list[Job]:
    """The grid of a sweep, seed-major (every arm of seed 0 first), so a partial sweep is still paired.

    Args:
        arms: ``{arm name: entries}``; entries are config files (``*.yaml``) or recipe flags.
        seeds: a count (seeds ``0..n-1``) or the seeds.
        out: the sweep's folder; run ``j`` logs to ``<out>/<slug(arm)>/seed_<s>``.
        base: entries given to every arm first (e.g. the dataset's config).
        args: recipe flags given to every arm last (they override the configs).
        config_dir: where relative config files are looked up first.
        data_seed: pass ``--data.seed`` (see :func:`seed_args`).

    Returns:
        The jobs.

    Raises:
        ValueError: for no arms, two arms with the same folder, or bad seeds.

    Example:
        >>> jobs = plan({"one": ["--model.num_members=1"], "two": ["--model.num_members=2"]}, 2, "runs")
        >>> [(j.arm, j.seed, j.directory.as_posix()) for j in jobs]
        [('one', 0, 'runs/one/seed_0'), ('two', 0, 'runs/two/seed_0'), ('one', 1, 'runs/one/seed_1'), ('two', 1, 'runs/two/seed_1')]
    """
    seed_list = resolve_seeds(seeds)
    if not arms:
        raise ValueError("Expected `--arms` to name at least one arm (name: list of configs), but got none.")
    folders = [slug(name) for name in arms]
    if len(set(folders)) != len(folders):
        raise ValueError(
            f"Expected the arms to have distinct folder names, but got {folders} from {list(arms)}."
        )
    config_path = Path(config_dir) if config_dir is not None else None
    base_args = arm_args(base, config_path)
    expanded = {name: arm_args(entries, config_path) for name, entries in arms.items()}
    out_path = Path(out)
    jobs: list[Job] = []
    for seed in seed_list:
        for name, folder in zip(arms, folders):
            logger = [
                f"--trainer.logger.init_args.save_dir={out_path}",
                f"--trainer.logger.init_args.name={folder}",
                f"--trainer.logger.init_args.version=seed_{seed}",
            ]
            run_args = [*base_args, *expanded[name], *seed_args(seed, data_seed), *logger, *args]
            directory = out_path / folder / f"seed_{seed}"
            jobs.append(Job(len(jobs), name, seed, tuple(run_args), directory))
    return jobs


def resume_args(job: Job) -> list[str]:
    """``--ckpt_path`` of the job's ``last.ckpt`` when an earlier attempt left one, else nothing."""
    last = job.directory / "checkpoints" / "last.ckpt"
    return [f"--ckpt_path={last}"] if last.is_file() else []


def load_recipe_module(recipe: str | os.PathLike[str]) -> Any:
    """Import a recipe script (``reproductions/cifar_wrn.py``) as a module, its folder on ``sys.path``.

    Raises:
        FileNotFoundError: if the script does not exist.
    """
    path = Path(recipe).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected `--recipe` to be a recipe script, but {str(recipe)!r} does not exist."
        )
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_recipe_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(recipe: str | os.PathLike[str]) -> Callable[[list[str]], dict[str, Any]]:
    """The ``main(args) -> results`` function of a recipe script.

    Raises:
        FileNotFoundError: if the script does not exist.
        AttributeError: if it has no ``main``.
    """
    main = getattr(load_recipe_module(recipe), "main", None)
    if not callable(main):
        raise AttributeError(f"Expected the recipe {str(recipe)!r} to define `main(args)`, but it has none.")
    return main


@contextlib.contextmanager
def _console_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors too) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _summary(results: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: results[key]
        for key in ("architecture", "num_members", "sizes", "ensemble", "fit_seconds", "results_file")
        if key in results
    }


def run_job(recipe: str, job: Job, capture: bool = True) -> dict[str, Any]:
    """Run one job with the recipe's ``main`` in this process.

    Args:
        recipe: the recipe script.
        job: the job.
        capture: send the run's console output to ``job.log_file``.

    Returns:
        The run's results summary (architecture, sizes, ensemble metrics, fit seconds).
    """
    main = load_recipe(recipe)
    args = [*job.args, *resume_args(job)]
    if not capture:
        return _summary(main(args))
    with _console_to(job.log_file):
        return _summary(main(args))


def _init_worker(devices: Any, threads: int | None) -> None:
    """Pool initialiser: pin this worker to one GPU (before CUDA starts) and set its torch threads."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def _worker_run(recipe: str, job: Job) -> dict[str, Any]:
    return run_job(recipe, job, capture=True)


def default_workers() -> tuple[int, int | None]:
    """One worker per CUDA GPU (threads untouched), else one per CPU core with one torch thread each."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 0:
        return gpus, None
    return max(1, os.cpu_count() or 1), 1


def run_sweep(
    recipe: str | os.PathLike[str],
    jobs: Sequence[Job],
    workers: int | None = None,
    threads: int | None = None,
    on_done: Callable[[Outcome, int, int, float, float], None] | None = None,
) -> SweepResult:
    """Run every job not yet done: in ``workers`` processes, or in this process when ``workers == 0``.

    Jobs are submitted in grid order; a failed job is recorded and the others go on.

    Args:
        recipe: the recipe script.
        jobs: from :func:`plan`.
        workers: processes (default: :func:`default_workers`); 0 runs the jobs here, one after another.
        threads: torch threads per worker process (default: 1 on CPU, untouched with GPUs).
        on_done: called after each job with ``(outcome, finished, total, elapsed seconds, estimated seconds
            left)``; the estimate is the mean run time so far x the runs left / the workers.

    Returns:
        The outcomes in grid order.

    Raises:
        ValueError: for ``workers < 0`` or ``threads < 1``.
    """
    auto_workers, auto_threads = default_workers()
    workers = auto_workers if workers is None else check_int(workers, "--workers", 0)
    threads = auto_threads if threads is None else check_int(threads, "--threads", 1)
    recipe = str(Path(recipe).resolve())
    started = time.perf_counter()
    outcomes: dict[int, Outcome] = {}
    for job in jobs:
        if job.done:
            outcomes[job.index] = Outcome(
                job, _summary(json.loads(job.results_file.read_text())), skipped=True
            )
    pending = [job for job in jobs if job.index not in outcomes]
    total = len(jobs)

    trained_seconds: list[float] = []

    def finished(outcome: Outcome) -> None:
        outcomes[outcome.job.index] = outcome
        trained_seconds.append(outcome.seconds)
        if on_done is not None:
            remaining = total - len(outcomes)
            left = sum(trained_seconds) / len(trained_seconds) * remaining / max(1, workers or 1)
            on_done(outcome, len(outcomes), total, time.perf_counter() - started, left)

    if workers == 0:
        for job in pending:
            t0 = time.perf_counter()
            try:
                results = run_job(recipe, job, capture=False)
                finished(Outcome(job, results, seconds=time.perf_counter() - t0))
            except (Exception, SystemExit) as err:  # recorded, reported at the end; the other jobs go on
                finished(Outcome(job, None, _describe(err), time.perf_counter() - t0))
    elif pending:
        _run_pool(recipe, pending, min(workers, len(pending)), threads, finished)
    ordered = [outcomes[job.index] for job in jobs]
    return SweepResult(
        outcomes=ordered,
        seconds=time.perf_counter() - started,
        workers=workers,
        threads=threads,
    )


def _run_pool(
    recipe: str,
    pending: Sequence[Job],
    workers: int,
    threads: int | None,
    finished: Callable[[Outcome], None],
) -> None:
    import torch

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    devices = None
    gpus = torch.cuda.device_count()
    if gpus > 0:
        devices = context.Manager().Queue()
        for i in range(workers):
            devices.put(i % gpus)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(devices, threads)
    ) as pool:
        submitted: dict[Future[dict[str, Any]], tuple[Job, float]] = {}
        queue = list(pending)
        while queue or submitted:
            while queue and len(submitted) < workers:
                job = queue.pop(0)
                submitted[pool.submit(_worker_run, recipe, job)] = (job, time.perf_counter())
            done, _ = wait(list(submitted), return_when=FIRST_COMPLETED)
            for future in done:
                job, t0 = submitted.pop(future)
                seconds = time.perf_counter() - t0
                try:
                    results = future.result()
                except (Exception, SystemExit) as err:  # recorded, reported at the end; the others go on
                    finished(Outcome(job, None, _describe(err), seconds))
                else:
                    finished(Outcome(job, results, seconds=seconds))


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):  # jsonargparse exits on a bad flag, after printing why to the console
        return f"the recipe exited with status {err.code} (a bad flag or config?)"
    return f"{type(err).__name__}: {err}"


def training_cost(recipe: str | os.PathLike[str], job: Job, train_samples: int) -> dict[str, Any]:
    """Multiply-adds of training one job, counted on its real members (no data is loaded).

    The recipe's configuration is built as the run would build it (the recipe's ``DEFAULT_CONFIG`` first,
    then the job's flags), the members' forward multiply-adds are counted on the meta device, and training
    is estimated as 3 x forward (forward, and a backward pass of about twice the forward's cost) per
    training sample and epoch. A datamodule with a ``train_size`` (a training subset, e.g.
    ``FashionMNISTDataModule(train_size=6000)``) trains on that many samples per epoch instead of
    ``train_samples``.

    Args:
        recipe: the recipe script.
        job: the job.
        train_samples: training samples per epoch (50,000 for CIFAR-10 without a validation split).

    Returns:
        ``members``, ``gmacs_per_sample`` (the ensemble's forward), ``epochs``, ``train_samples`` (per epoch)
        and ``train_macs``.
    """
    from lightning_ensembles.cli import EnsembleCLI
    from lightning_ensembles.cost import count_macs

    check_int(train_samples, "--train_samples", 1)
    default = getattr(load_recipe_module(recipe), "DEFAULT_CONFIG", None)
    args = [*(["--config", str(default)] if default is not None else []), *job.args, "--trainer.logger=false"]
    cli = EnsembleCLI(args=args)
    shape = cli.datamodule.input_shape
    macs = sum(count_macs(member, shape) for member in cli.model.members)
    epochs = int(cli.trainer.max_epochs or 0)
    subset = getattr(cli.datamodule, "train_size", None)
    samples = min(train_samples, subset) if isinstance(subset, int) else train_samples
    return {
        "members": len(cli.model.members),
        "gmacs_per_sample": macs / 1e9,
        "epochs": epochs,
        "train_samples": samples,
        "train_macs": 3 * macs * samples * epochs,
    }


def progress_line(
    outcome: Outcome, finished: int, total: int, elapsed: float, left: float | None = None
) -> str:
    """``[ 3/18] 4 x WRN-16-2  seed 1  top-1 98.67%  41 s · 2:03 elapsed, about 4:10 left``.

    ``left`` defaults to the elapsed time per finished run times the runs left."""
    job = outcome.job
    if outcome.results is None:
        what = f"FAILED ({outcome.error}); see {job.log_file}"
    elif outcome.skipped:
        what = "already done"
    else:
        top1 = outcome.results.get("sizes", [{}])[-1].get("top1")
        what = (f"top-1 {100 * top1:.2f}%  " if isinstance(top1, float) else "") + f"{outcome.seconds:.0f} s"
    width = len(str(total))
    if left is None:
        left = elapsed / finished * (total - finished) if finished else 0.0
    return f"[{finished:>{width}}/{total}] {job.arm}  seed {job.seed}  {what} · {_clock(elapsed)} elapsed" + (
        f", about {_clock(left)} left" if finished < total else ""
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def sweep(
    recipe: str,
    arms: dict[str, list[str]],
    seeds: int | list[int] = 5,
    out: str = "runs/sweep",
    base: list[str] | None = None,
    args: list[str] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    task_index: int | None = None,
    dry_run: bool = False,
    train_samples: int | None = None,
    sustained_tflops: float = 100.0,
    data_seed: bool = True,
) -> dict[str, Any]:
    """Run a seed sweep of a recipe (the ``python -m lightning_ensembles.sweep`` command).

    Args:
        recipe: the recipe script, e.g. ``reproductions/cifar_wrn.py``.
        arms: ``{arm name: entries}``: config files (looked up in the recipe's ``configs/`` first) and flags.
        seeds: a count (seeds ``0..n-1``) or the list of seeds.
        out: the sweep's folder (``<out>/<arm>/seed_<s>/`` per run).
        base: entries every arm starts with (e.g. ``digits/quickstart.yaml``).
        args: recipe flags every run ends with (e.g. ``--trainer.max_epochs=5``).
        workers: local worker processes (default: one per GPU, else one per CPU core); 0 runs in this process.
        threads: torch threads per worker (default: 1 on CPU).
        task_index: run only job ``task_index`` of the grid, here (``$SLURM_ARRAY_TASK_ID``).
        dry_run: list the jobs and the array size, run nothing.
        train_samples: with ``dry_run``, also estimate each arm's training cost from its counted
            multiply-adds for this many training samples per epoch (see :func:`training_cost`).
        sustained_tflops: the sustained throughput (dense TFLOP/s, 2 FLOPs per multiply-add) that turns the
            estimate into GPU-hours: an assumption to state, not a measurement.
        data_seed: seed the datamodule's split and order with ``--data.seed``; ``false`` for a datamodule
            without a ``seed`` argument (its order then follows ``--seed_everything``, if it uses the global RNG).

    Returns:
        ``{"jobs": [...], "seconds": ...}`` (and ``"costs"`` for a dry run with ``train_samples``).

    Raises:
        ValueError: for a ``task_index`` outside the grid, or bad arms or seeds.
        RuntimeError: if any run failed (after the others ran), naming each failed run's console log.
    """
    recipe_path = Path(recipe)
    jobs = plan(
        arms,
        seeds,
        out,
        base or (),
        args or (),
        config_dir=recipe_path.resolve().parent / "configs",
        data_seed=data_seed,
    )
    listing = [
        {"index": j.index, "arm": j.arm, "seed": j.seed, "directory": str(j.directory), "done": j.done}
        for j in jobs
    ]
    if dry_run:
        for row in listing:
            print(f"{row['index']:>4}  {row['arm']}  seed {row['seed']}  {row['directory']}")
        print(f"{len(jobs)} jobs: a SLURM array of --array=0-{len(jobs) - 1} runs one per task.")
        costs = _print_costs(recipe, jobs, train_samples, sustained_tflops) if train_samples else {}
        return {"jobs": listing, "seconds": 0.0, "costs": costs}
    if task_index is not None:
        if not 0 <= task_index < len(jobs):
            raise ValueError(
                f"Expected `--task_index` to be in [0, {len(jobs) - 1}] (the sweep has {len(jobs)} jobs), "
                f"but got {task_index}."
            )
        jobs = [jobs[task_index]]
        workers = 0
    result = run_sweep(
        recipe_path, jobs, workers, threads, on_done=lambda *a: print(progress_line(*a), flush=True)
    )
    if result.failed:
        raise RuntimeError(
            result.failure_message("Run the sweep again to retry them: finished runs are skipped.")
        )
    return {
        "jobs": [
            {**listing[o.job.index], "seconds": round(o.seconds, 2), "error": o.error, "skipped": o.skipped}
            for o in result.outcomes
        ],
        "seconds": round(result.seconds, 2),
    }


def _print_costs(
    recipe: str, jobs: Sequence[Job], train_samples: int, sustained_tflops: float
) -> dict[str, dict[str, Any]]:
    if not (isinstance(sustained_tflops, (int, float)) and sustained_tflops > 0):
        raise ValueError(f"Expected `--sustained_tflops` to be a number > 0, but got {sustained_tflops!r}.")
    runs: dict[str, int] = {}
    first: dict[str, Job] = {}
    for job in jobs:
        runs[job.arm] = runs.get(job.arm, 0) + 1
        first.setdefault(job.arm, job)
    costs = {}
    print(
        f"\n| arm | members | GMACs / sample | samples / epoch | epochs | training PMACs / run | runs | GPU-hours at "
        f"{sustained_tflops:g} TFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for arm, job in first.items():
        cost = training_cost(recipe, job, train_samples)
        hours = 2 * cost["train_macs"] * runs[arm] / (sustained_tflops * 1e12) / 3600
        costs[arm] = {**cost, "runs": runs[arm], "gpu_hours": hours}
        print(
            f"| {arm} | {cost['members']} | {cost['gmacs_per_sample']:.4g} | {cost['train_samples']} | {cost['epochs']} | "
            f"{cost['train_macs'] / 1e15:.4g} | {runs[arm]} | {hours:.3g} |"
        )
    total = sum(c["gpu_hours"] for c in costs.values())
    print(f"\nTotal: {total:.3g} GPU-hours at an assumed sustained {sustained_tflops:g} TFLOP/s.")
    return costs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (typed flags from :func:`sweep`'s signature, ``--config`` for YAML)."""
    from jsonargparse import CLI

    program = "python -m lightning_ensembles.sweep"
    with command_line_errors(program):
        return CLI(sweep, args=list(argv) if argv is not None else None, prog=program)


if __name__ == "__main__":
    main()
