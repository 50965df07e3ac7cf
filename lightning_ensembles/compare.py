"""Compare runs side by side: the paper's accuracy-vs-cost figure over seeds, with paired evidence.

Kondratyuk et al. 2020 (figure 1) draw one line per architecture and one point per ensemble size, accuracy
against FLOPs (multiply-adds) or latency. Every run with the
:class:`~lightning_ensembles.callbacks.EnsembleSizeAblation` callback records those points; this command reads
them back from many runs and draws the figure:

    python -m lightning_ensembles.compare lightning_logs/ [--stage test] [--curve random] [--metric top1]

A run is a folder with the ablation's ``ablation_{stage}.json`` (its rows: the metrics of
:data:`~lightning_ensembles.metrics.SIZE_METRICS`, multiply-adds and latency for every ``k``), whatever the
logger, or without any logger; its hyperparameters come from the recipe's ``results.json`` (``hparams``) or
the ``hparams.yaml`` Lightning's loggers write. TensorBoard event files are read, with TensorBoard's own
reader, only for what a run's files lack (runs from before the files held it); either source gives the same
comparison.

Runs sharing an architecture form one line; runs of the same size (seeds) give the point's mean and its
sample standard deviation (the error bar). A run's seed is the ``seed_everything`` of the ``config.yaml``
LightningCLI saves in the run folder (a :mod:`~lightning_ensembles.sweep` sets it). Matched pairs, each
ensemble point against the single model (``k = 1``) of another architecture with the nearest multiply-adds
within ``--pair_tolerance`` (or the pairs given with ``--pairs``), are compared seed by seed
(:func:`~lightning_ensembles.stats.paired_difference`): mean difference, 95% confidence interval, t and
wins/ties/losses, for top-1, NLL and ECE.

With ``--group_by data/train_size`` (any hyperparameter the runs logged), runs that differ in it become separate
lines (one per architecture and training-set size, say: same colour per architecture, one marker and line style
per group), and automatic pairs stay within a group. :func:`pair_contrast` then tests the paper's trends: the
gap of one pair against the gap of another, seed by seed.

It writes ``comparison.png`` (the metric vs GMACs), ``comparison_latency.png`` (when latency was logged; one
line per run group and latency mode, ``sequential``, ``fused``, ``parallel``, where the ablation logged
``latency_ms/{mode}``, else one line per run group from the older ``latency_ms``),
``comparison.csv``, ``comparison.md`` and ``comparison.json`` (every run's per-seed points and the pairs),
and a TensorBoard run ``<out>/tensorboard`` with the figure, the tables and one HParams session per run.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_ensembles._validation import command_line_errors
from lightning_ensembles.metrics import SIZE_METRIC_LABELS, SIZE_METRICS, SizeMetric
from lightning_ensembles.plotting import close, png_bytes, pyplot, style_axes
from lightning_ensembles.results import atomic_write_text
from lightning_ensembles.stats import (
    LOWER_IS_BETTER,
    PairedDifference,
    format_difference,
    paired_difference,
    spread,
    verdict,
)

__all__ = [
    "COLUMNS",
    "METRICS",
    "Pair",
    "Point",
    "Run",
    "collect",
    "compare",
    "compare_pairs",
    "comparison_figure",
    "find_runs",
    "latency_modes",
    "main",
    "match_pairs",
    "Trend",
    "ablation_points",
    "pair_contrast",
    "paper_trends",
    "pair_verdicts",
    "pairs_table",
    "parse_pair",
    "per_seed",
    "read_hparams",
    "read_run",
    "run_seed",
]

EVENT_GLOB = "events.out.tfevents.*"
ABLATION_GLOB = "ablation_*.json"  # EnsembleSizeAblation's rows, one file per stage
RESULTS_FILE = "results.json"  # a recipe's results, with the run's hyperparameters
MARKER = ".lightning_ensembles_comparison"  # marks an output folder, so later comparisons skip it
METRICS = SIZE_METRICS
"""The metrics compared: :data:`lightning_ensembles.metrics.SIZE_METRICS`, those the ablation records."""
COLUMNS = ("gmacs", "latency_ms", *METRICS)
_LABELS = SIZE_METRIC_LABELS


@dataclass
class Run:
    """What one run logged: its name, seed, hyperparameters and ablation points ``{k: {column: value}}``."""

    path: Path
    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    points: dict[int, dict[str, float]] = field(default_factory=dict)
    seed: int | None = None
    group: str | None = None
    """The run's value of the ``--group_by`` hyperparameter (e.g. ``"5900"`` for ``data/train_size``)."""
    group_by: str | None = None
    """The hyperparameter that groups runs into separate lines (``--group_by``), if any."""

    @property
    def architecture(self) -> str:
        """The architecture logged by the module (``ensemble/architecture``), else the run name."""
        return str(self.hparams.get("ensemble/architecture", self.name))

    @property
    def line(self) -> str:
        """The run's line of the figure: its architecture, and with ``--group_by`` its group,
        ``"WRN-10-2 (train_size=5900)"``."""
        if self.group_by is None:
            return self.architecture
        return f"{self.architecture} ({self.group_by.rsplit('/', 1)[-1]}={self.group})"


@dataclass(frozen=True)
class Point:
    """One point of a line: an architecture at ensemble size ``k``."""

    architecture: str
    k: int

    def __str__(self) -> str:
        return f"{self.architecture}@{self.k}"


@dataclass
class Pair:
    """A matched pair: ensemble point ``a`` against point ``b``, compared on the seeds both have."""

    a: Point
    b: Point
    gmacs_a: float
    gmacs_b: float
    seeds: list[int]
    differences: dict[str, PairedDifference]
    per_seed: dict[str, dict[int, float]] = field(default_factory=dict)
    """``{metric: {seed: a - b}}``: the per-seed differences behind :attr:`differences`."""

    @property
    def name_a(self) -> str:
        """``"4 x WRN-16-2"`` for an ensemble point, the architecture for ``k = 1``."""
        return _point_name(self.a)

    @property
    def name_b(self) -> str:
        """Like :attr:`name_a`, for ``b``."""
        return _point_name(self.b)

    def as_dict(self) -> dict[str, Any]:
        """The pair as plain data (for JSON)."""
        return {
            "a": str(self.a),
            "b": str(self.b),
            "name_a": self.name_a,
            "name_b": self.name_b,
            "gmacs_a": self.gmacs_a,
            "gmacs_b": self.gmacs_b,
            "seeds": self.seeds,
            "differences": {m: d.as_dict() for m, d in self.differences.items()},
            "per_seed": {m: {str(s): v for s, v in values.items()} for m, values in self.per_seed.items()},
        }


def _point_name(point: Point) -> str:
    return point.architecture if point.k == 1 else f"{point.k} x {point.architecture}"


def _is_run(files: Sequence[str]) -> bool:
    """Whether a folder holding ``files`` is a run: the ablation's ``ablation_*.json`` or, for runs of any age,
    TensorBoard event files. (A ``results.json`` alone is not: the quickstart's summary of a sweep has that
    name too.)"""
    return any(fnmatch.fnmatch(f, ABLATION_GLOB) or fnmatch.fnmatch(f, EVENT_GLOB) for f in files)


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold a run: the ``ablation_*.json`` files
    :class:`~lightning_ensembles.callbacks.EnsembleSizeAblation` writes, or TensorBoard event files.

    Args:
        logdir: the root to search.

    Returns:
        Sorted run directories.

    Raises:
        FileNotFoundError: if ``logdir`` does not exist.
        ValueError: if it holds no run.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected `logdir` to be a directory of TensorBoard runs or other run folders, but {str(root)!r} is "
            "not."
        )
    runs = sorted(
        {
            Path(directory)
            for directory, _, files in os.walk(root, followlinks=True)  # runs are often symlinked together
            if _is_run(files) and not any((parent / MARKER).exists() for parent in Path(directory).parents)
        }
    )
    if not runs:
        raise ValueError(
            f"Found no TensorBoard runs (files {EVENT_GLOB}) and no run folders with the ablation's result files "
            f"({ABLATION_GLOB}) under {str(root)!r}."
        )
    return runs


def _hparams(accumulator: Any) -> dict[str, Any]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    found: dict[str, Any] = {}
    try:
        contents = accumulator.PluginTagToContent("hparams")
    except KeyError:  # the run logged no hyperparameters
        return found
    for content in contents.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                found[key] = getattr(value, kind) if kind else None
    return found


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hyperparameters named as Lightning's TensorBoard logger names them in the HParams session:
    ``{"model/member": {"init_args": {"depth": 16}}}`` -> ``{"model/member/init_args/depth": 16}``, a list of
    mappings by index (``model/members/0/class_path``)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, list) and all(isinstance(item, Mapping) for item in value):
            for i, item in enumerate(value):
                flat.update(_flatten(item, f"{name}/{i}/"))
        else:
            flat[name] = value
    return flat


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` where there is no such file (result files are written atomically, so
    one that exists is whole).

    Raises:
        ValueError: naming the file, if it is not JSON.
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"Expected {str(path)!r} to hold JSON, as the run wrote it, but: {err}") from err


def _read_yaml(path: Path) -> Any:
    """The YAML in ``path``; ``None`` where there is none or it is not plain YAML (``hparams.yaml`` can hold
    Python objects that ``safe_load`` refuses; :func:`run_seed` reads it the same way)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _has_events(path: Path) -> bool:
    return any(fnmatch.fnmatch(entry.name, EVENT_GLOB) for entry in path.iterdir() if entry.is_file())


def _accumulator(path: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def read_hparams(path: Path, accumulator: Any = None) -> dict[str, Any]:
    """A run's hyperparameters, flattened as ``{"ensemble/architecture": "WRN-16-2", "data/train_size": 5900}``.

    The recipe's ``results.json`` records them (``hparams``: the module's and, under ``data/``, the datamodule's)
    whatever the logger. Without it (a run trained from Python, or from before ``results.json`` held them):
    the ``hparams.yaml`` Lightning's TensorBoard and CSV loggers write, and, where the run has event files, its
    TensorBoard HParams session over it.

    Args:
        path: the run directory.
        accumulator: the run's loaded ``EventAccumulator``, if it has been read already (else it is read here
            when needed).

    Returns:
        The hyperparameters; empty when the run recorded none.
    """
    results = _read_json(path / RESULTS_FILE)
    if isinstance(results, dict) and isinstance(results.get("hparams"), dict):
        return _flatten(results["hparams"])
    saved = _read_yaml(path / "hparams.yaml")
    found = _flatten(saved) if isinstance(saved, dict) else {}
    if accumulator is None and _has_events(path):
        accumulator = _accumulator(path)
    if accumulator is not None:
        found.update(_hparams(accumulator))
    return found


def ablation_points(rows: Sequence[Mapping[str, Any]], curve: str) -> dict[int, dict[str, float]]:
    """A run's points from the rows of its ``ablation_{stage}.json``: ``{k: {column: value}}``, as from its
    TensorBoard scalars.

    Every column holds its last value (rows are in the order they were recorded). The metrics and the cost are
    the curve's own (``{curve}_{column}``; the cost of a run from before ``random_gmacs`` existed falls back to
    the first-k ``first_gmacs``); ``latency_ms`` and ``latency_ms/{mode}`` are shared by both curves.

    Args:
        rows: the ablation's rows (``k``, ``first_top1``, ``random_top1``, ..., ``first_gmacs``,
            ``random_gmacs``, ``latency_ms``, ``latency_ms/{mode}``).
        curve: ``"first"`` (first k members) or ``"random"`` (mean over random k-subsets).

    Returns:
        ``{k: {column: value}}`` with columns ``gmacs``, the metrics and the latency columns.

    Example:
        >>> rows = [{"k": 1, "first_top1": 0.9, "random_top1": 0.8, "first_gmacs": 1.0, "latency_ms": 2.0}]
        >>> ablation_points(rows, "random")
        {1: {'top1': 0.8, 'gmacs': 1.0, 'latency_ms': 2.0}}
    """
    points: dict[int, dict[str, float]] = {}
    fallback: dict[int, dict[str, float]] = {}
    own = f"{curve}_"
    for row in rows:
        k = row.get("k")
        if not isinstance(k, int) or isinstance(k, bool):
            continue
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith(own):
                points.setdefault(k, {})[key[len(own) :]] = float(value)
            elif key == "first_gmacs":
                fallback.setdefault(k, {})["gmacs"] = float(value)
            elif key == "latency_ms" or key.startswith("latency_ms/"):
                fallback.setdefault(k, {})[key] = float(value)
    return _with_shared(points, fallback)


def _with_shared(
    points: dict[int, dict[str, float]], shared: dict[int, dict[str, float]]
) -> dict[int, dict[str, float]]:
    """``points`` with the columns both curves share (first-k ``gmacs``, latency) where the curve has none."""
    for k, columns in shared.items():
        for column, value in columns.items():
            points.setdefault(k, {}).setdefault(column, value)
    return points


def _event_points(accumulator: Any, stage: str, curve: str) -> dict[int, dict[str, float]]:
    """A run's points from its TensorBoard scalars ``ablation/{stage}/...`` (runs without ``ablation_*.json``)."""
    pattern = re.compile(rf"^ablation/{stage}/(?:(first|random)/)?size_(\d+)/(\w+|latency_ms/\w+)$")
    points: dict[int, dict[str, float]] = {}
    fallback: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        match = pattern.match(tag)
        if match is None:
            continue
        kind, k, column = match.group(1), int(match.group(2)), match.group(3)
        value = float(accumulator.Scalars(tag)[-1].value)
        if kind == curve:
            points.setdefault(k, {})[column] = value
        elif kind is None:  # shared columns: first-k gmacs and latency
            fallback.setdefault(k, {})[column] = value
    return _with_shared(points, fallback)


def run_seed(path: Path, hparams: dict[str, Any] | None = None) -> int | None:
    """The run's seed: ``seed_everything`` in the ``config.yaml`` LightningCLI saved in ``path``; for a run
    trained from Python (no ``config.yaml``), the ``seed`` hyperparameter (from ``hparams``, see
    :func:`read_hparams`, or the ``hparams.yaml`` Lightning's TensorBoard and CSV loggers write); else ``None``."""
    import yaml

    config = path / "config.yaml"
    if config.is_file():
        try:
            seed = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
        except yaml.YAMLError:
            return None
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    seed = (hparams or {}).get("seed")
    saved = path / "hparams.yaml"
    if seed is None and saved.is_file():
        try:
            seed = (yaml.safe_load(saved.read_text()) or {}).get("seed")
        except yaml.YAMLError:
            return None
    if isinstance(seed, float) and seed.is_integer():  # TensorBoard keeps numbers as floats
        seed = int(seed)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def read_run(path: Path, root: Path, stage: str, curve: str, group_by: str | None = None) -> Run:
    """Read one run's hyperparameters, seed and its last recorded ablation points.

    The points come from the run's ``ablation_{stage}.json`` (:func:`ablation_points`), whatever the logger;
    a run without it is read from its TensorBoard scalars ``ablation/{stage}/...``, which hold the same
    values. Hyperparameters come from :func:`read_hparams`. The cost of a point is the curve's own (for
    ``random``, the mean over the k-subsets, which differs from the first k members' when the members
    differ); runs recorded before that column existed fall back to the first-k cost.

    Args:
        path: the run directory.
        root: the log root (for the run's name).
        stage: ``"val"`` or ``"test"``.
        curve: ``"first"`` (first k members) or ``"random"`` (mean over random k-subsets).
        group_by: a logged hyperparameter (e.g. ``data/train_size``) whose value puts the run in a group.

    Returns:
        The run; ``points`` is empty when the run logged no ablation for that stage.

    Raises:
        ValueError: naming ``--group_by``, when the run did not log that hyperparameter.
    """
    rows = _read_json(path / f"ablation_{stage}.json")
    accumulator = None
    if not isinstance(rows, list) and _has_events(path):  # a run from before the ablation's JSON
        accumulator = _accumulator(path)
    name = path.relative_to(root).as_posix() if path != root else path.name
    hparams = read_hparams(path, accumulator)
    run = Run(path=path, name=name or path.name, hparams=hparams, seed=run_seed(path, hparams))
    if group_by is not None:
        if group_by not in run.hparams:
            logged = ", ".join(sorted(k for k in run.hparams if "/" in k)) or "none"
            raise ValueError(
                f"Expected `--group_by` to name a hyperparameter every run logged, but the run {run.name!r} has no "
                f"{group_by!r} (it logged: {logged})."
            )
        value = run.hparams[group_by]  # TensorBoard keeps numbers as floats: 5900 comes back as 5900.0
        integral = isinstance(value, float) and value.is_integer()
        run.group, run.group_by = str(int(value) if integral else value), group_by
    if isinstance(rows, list):
        run.points = ablation_points([r for r in rows if isinstance(r, dict)], curve)
    elif accumulator is not None:
        run.points = _event_points(accumulator, stage, curve)
    return run


def collect(runs: Sequence[Run]) -> dict[str, list[dict[str, float]]]:
    """One line per architecture: for each ensemble size, the mean and spread over the runs that have it.

    Args:
        runs: runs with points.

    Returns:
        ``{architecture: [row, ...]}`` sorted by ``k``; rows hold ``k``, ``runs``, ``seeds`` (distinct known
        seeds), and for every column its mean and ``{column}_std`` (sample std over runs, 0 for one run).
    """
    grouped: dict[str, dict[int, list[tuple[int | None, dict[str, float]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        for k, point in run.points.items():
            grouped[run.line][k].append((run.seed, point))
    lines: dict[str, list[dict[str, float]]] = {}
    for architecture, sizes in sorted(grouped.items()):
        rows = []
        for k, entries in sorted(sizes.items()):
            points = [p for _, p in entries]
            row: dict[str, float] = {
                "k": k,
                "runs": len(points),
                "seeds": len({s for s, _ in entries if s is not None}),
            }
            for column in sorted({c for p in points for c in p}):
                s = spread([p[column] for p in points if column in p])
                row[column] = s.mean
                row[f"{column}_std"] = s.std
            rows.append(row)
        lines[architecture] = rows
    return lines


def per_seed(runs: Sequence[Run], point: Point, column: str) -> dict[int, float]:
    """``{seed: value}`` of one point and column, averaging runs that share a seed; runs without a seed
    are left out."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        if run.seed is None or run.line != point.architecture:
            continue
        value = run.points.get(point.k, {}).get(column)
        if value is not None:
            values[run.seed].append(value)
    return {seed: sum(v) / len(v) for seed, v in sorted(values.items())}


def parse_pair(text: str) -> tuple[Point, Point]:
    """``"WRN-16-2@4 vs WRN-16-4@1"`` -> the two points.

    Raises:
        ValueError: naming ``--pairs``, for text of another form.
    """
    match = re.fullmatch(r"\s*(.+?)@(\d+)\s+vs\s+(.+?)@(\d+)\s*", text)
    if match is None:
        raise ValueError(
            f"Expected each of `--pairs` to look like 'WRN-16-2@4 vs WRN-16-4@1' (architecture@k vs "
            f"architecture@k), but got {text!r}."
        )
    return Point(match.group(1), int(match.group(2))), Point(match.group(3), int(match.group(4)))


def match_pairs(
    lines: dict[str, list[dict[str, float]]],
    tolerance: float,
    groups: Mapping[str, str | None] | None = None,
) -> list[tuple[Point, Point]]:
    """Every ensemble point (``k >= 2``) with the single model (``k = 1``) of another architecture whose
    multiply-adds are nearest, if they differ by at most ``tolerance`` (relative to the single model's).

    With ``groups`` (``{line: group}``, from ``--group_by``), a point is paired only within its own group: a
    model trained on 5,900 images is not the match of an ensemble trained on 59,000.

    Example:
        >>> lines = {"A": [{"k": 1, "gmacs": 1.0}, {"k": 4, "gmacs": 4.0}], "B": [{"k": 1, "gmacs": 3.9}]}
        >>> [(str(a), str(b)) for a, b in match_pairs(lines, 0.1)]
        [('A@4', 'B@1')]
    """
    singles = [
        (arch, row["gmacs"])
        for arch, rows in lines.items()
        for row in rows
        if row["k"] == 1 and "gmacs" in row
    ]
    pairs = []
    for arch, rows in lines.items():
        for row in rows:
            if row["k"] < 2 or "gmacs" not in row:
                continue
            candidates = [
                (abs(row["gmacs"] - g) / g, other)
                for other, g in singles
                if other != arch and g > 0 and (groups is None or groups.get(other) == groups.get(arch))
            ]
            gap, other = min(candidates, default=(math.inf, ""))
            if gap <= tolerance:
                pairs.append((Point(arch, int(row["k"])), Point(other, 1)))
    return pairs


def compare_pairs(
    runs: Sequence[Run],
    lines: dict[str, list[dict[str, float]]],
    pairs: Sequence[tuple[Point, Point]],
    confidence: float = 0.95,
) -> list[Pair]:
    """Paired differences ``a - b`` over the seeds both points have, for every metric both logged.

    Raises:
        ValueError: for a pair naming a point no run logged.
    """
    gmacs = {
        Point(arch, int(row["k"])): row.get("gmacs", math.nan) for arch, rows in lines.items() for row in rows
    }
    results = []
    for a, b in pairs:
        for point in (a, b):
            if point not in gmacs:
                known = ", ".join(str(p) for p in gmacs)
                raise ValueError(
                    f"Expected `--pairs` to name logged points ({known}), but got {str(point)!r}."
                )
        differences: dict[str, PairedDifference] = {}
        by_seed: dict[str, dict[int, float]] = {}
        seeds: list[int] = []
        for metric in METRICS:
            values_a, values_b = per_seed(runs, a, metric), per_seed(runs, b, metric)
            shared = sorted(set(values_a) & set(values_b))
            if not shared:
                continue
            seeds = shared
            differences[metric] = paired_difference(
                [values_a[s] for s in shared], [values_b[s] for s in shared], metric, confidence
            )
            by_seed[metric] = {s: values_a[s] - values_b[s] for s in shared}
        results.append(Pair(a, b, gmacs[a], gmacs[b], seeds, differences, by_seed))
    return results


def _log_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def latency_modes(lines: dict[str, list[dict[str, float]]]) -> list[str]:
    """The latency modes with a ``latency_ms/{mode}`` column in any row, sorted.

    Args:
        lines: the output of :func:`collect`.

    Returns:
        The modes, e.g. ``["parallel", "sequential"]``; empty for runs that logged only ``latency_ms``.

    Example:
        >>> latency_modes({"wrn": [{"k": 1, "latency_ms/sequential": 1.0, "latency_ms/sequential_std": 0.0}]})
        ['sequential']
    """
    return sorted(
        {
            column.removeprefix("latency_ms/")
            for rows in lines.values()
            for row in rows
            for column in row
            if column.startswith("latency_ms/") and not column.endswith("_std")
        }
    )


def comparison_figure(lines: dict[str, list[dict[str, float]]], axis: str, metric: str, title: str) -> Any:
    """The paper's figure: one line per architecture, one point per ensemble size, error bars over seeds.

    On the latency axis there is one line per architecture and latency mode (``latency_ms/{mode}``); an
    architecture whose runs logged only ``latency_ms`` (before the modes) gets one line, as before.

    Args:
        lines: the output of :func:`collect`.
        axis: ``"gmacs"`` or ``"latency_ms"``.
        metric: the y column, one of :data:`METRICS`.
        title: the figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    scale = 100.0 if metric == "top1" else 1.0
    figure, ax = pyplot().subplots(figsize=(6.5, 4.7), dpi=110)
    modes = latency_modes(lines) if axis == "latency_ms" else []
    series = []
    for architecture, rows in lines.items():
        own = latency_modes({architecture: rows}) if modes else []
        series += [(architecture, rows, f"{axis}/{mode}", mode) for mode in own] or [
            (architecture, rows, axis, "")
        ]
    styles = ["o-", "s--", "^:", "d-."]
    grouped = [re.fullmatch(r"(.+) \((\w+=.*)\)", name) for name, *_ in series]
    families = sorted({m.group(1) for m in grouped if m is not None})
    group_names = sorted({m.group(2) for m in grouped if m is not None})
    for (architecture, rows, column, mode), found in zip(series, grouped):
        points = [r for r in rows if column in r and metric in r]
        if not points:
            continue
        xs = [r[column] for r in points]
        ys = [scale * r[metric] for r in points]
        errors = [scale * r.get(f"{metric}_std", 0.0) for r in points]
        runs = max((int(r["runs"]) for r in points), default=0)
        label = f"{architecture}{f', {mode}' if mode else ''} (up to {runs} runs)"
        style = styles[modes.index(mode) % len(styles)] if mode else "o-"
        colour = {}
        if found is not None and not mode:  # --group_by: colour per architecture, style per group
            style = styles[group_names.index(found.group(2)) % len(styles)]
            colour = {"color": f"C{families.index(found.group(1)) % 10}"}
        ax.errorbar(xs, ys, yerr=errors, fmt=style, capsize=3, label=label, **colour)
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"k={int(r['k'])}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
    _log_axis(ax)
    ax.set_xlabel(
        "GMACs (multiply-adds) per sample, log scale" if axis == "gmacs" else "latency (ms), batch 1"
    )
    ax.set_ylabel(_LABELS.get(metric, metric) + ", mean ± std over runs")
    style_axes(
        ax, title, title_size=8, grid="both", title="architecture (k: ensemble size)", title_fontsize=7
    )
    figure.tight_layout()
    return figure


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in ("k", "runs", "seeds"):
        return str(int(value))
    if column.startswith("top1"):
        return f"{100 * value:.2f}"
    return f"{value:.4g}"


def _table(lines: dict[str, list[dict[str, float]]]) -> tuple[str, str]:
    """The CSV (every column's mean and ``_std`` apart) and the markdown (one ``mean ± std`` cell per metric)."""
    means = []
    for column in COLUMNS:
        if any(column in row for rows in lines.values() for row in rows):
            means.append(column)
        if column == "latency_ms":
            means += [f"latency_ms/{mode}" for mode in latency_modes(lines)]
    columns = ["architecture", "k", "runs", "seeds", *(c for m in means for c in (m, f"{m}_std"))]
    rows: list[dict[str, Any]] = [
        {"architecture": arch, **row} for arch, arch_rows in lines.items() for row in arch_rows
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    headers = ["architecture", "k", "runs", "seeds", *(_HEADERS.get(m, m) for m in means)]
    md = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for row in rows:
        cells = [str(row["architecture"])] + [_cell(c, row.get(c)) for c in ("k", "runs", "seeds")]
        for m in means:
            mean, std = _cell(m, row.get(m)), _cell(m, row.get(f"{m}_std"))
            cells.append(mean if m == "gmacs" or not mean or not std else f"{mean} ± {std}")
        md.append("| " + " | ".join(cells) + " |")
    return buffer.getvalue(), "\n".join(md) + "\n"


_HEADERS = {"gmacs": "GMACs", "top1": "top-1 (%)", "latency_ms": "latency (ms)"}


def _display(metric: str) -> tuple[float, int, str]:
    """How a metric's differences are shown: ``(scale, decimals, unit)``; top-1 in points."""
    return (100.0, 2, " points") if metric == "top1" else (1.0, 4, "")


def pairs_table(pairs: Sequence[Pair]) -> str:
    """Markdown: one row per pair and metric, with the difference, its interval, t and wins/ties/losses."""
    levels = {round(100 * d.confidence) for pair in pairs for d in pair.differences.values()}
    level = f"{levels.pop()}% CI" if len(levels) == 1 else "CI"
    lines = [
        f"| ensemble | vs single | GMACs | metric | seeds | difference [{level}] | t | wins/ties/losses |",
        "|---|---|---|---|---:|---|---:|---|",
    ]
    for pair in pairs:
        for metric, d in pair.differences.items():
            scale, digits, unit = _display(metric)
            t = f"{d.t:.2f}" if math.isfinite(d.t) else "n/a"
            lines.append(
                f"| {pair.name_a} | {pair.name_b} | {pair.gmacs_a:.4g} vs {pair.gmacs_b:.4g} | {metric} | {d.n} | "
                f"{format_difference(d, scale, digits)}{' pts' if unit else ''} | {t} | "
                f"{d.wins}/{d.ties}/{d.losses} |"
            )
    return "\n".join(lines) + "\n"


def pair_verdicts(pairs: Sequence[Pair], metric: str = "top1") -> list[str]:
    """One plain-words sentence per pair on ``metric`` (see :func:`lightning_ensembles.stats.verdict`)."""
    sentences = []
    for pair in pairs:
        d = pair.differences.get(metric)
        if d is None:
            sentences.append(f"{pair.name_a} vs {pair.name_b}: no shared seeds, so no paired comparison.")
            continue
        scale, digits, unit = _display(metric)
        sentences.append(verdict(d, pair.name_a, pair.name_b, scale=scale, unit=unit, digits=digits))
    return sentences


def pair_contrast(
    x: Pair, y: Pair, metric: str = "top1", confidence: float = 0.95
) -> PairedDifference | None:
    """Whether the gap of pair ``x`` exceeds the gap of pair ``y``: the paired difference, seed by seed, of
    ``x``'s difference (ensemble minus single model) and ``y``'s, on the seeds both have.

    This is how the paper's trends are tested: "as model sizes get larger, the performance gap widens" is
    ``x`` = the larger FLOP-matched pair, ``y`` = the smaller one, and a positive contrast on top-1; the gap
    growing as the data shrinks is ``x`` = a pair trained on a subset, ``y`` = the same pair on all the data.

    Args:
        x: the first pair (from :func:`compare_pairs`).
        y: the second pair.
        metric: the metric whose differences are contrasted.
        confidence: coverage of the interval.

    Returns:
        The contrast ``x - y`` with its interval, t and wins (seeds where ``x``'s gap is the more favourable to
        the ensemble), or ``None`` when the pairs share no seed for ``metric``.

    Example:
        >>> from lightning_ensembles.stats import paired_difference
        >>> def pair(diffs):
        ...     d = paired_difference([1.0 + v for v in diffs], [1.0] * len(diffs), "top1")
        ...     return Pair(Point("A", 4), Point("B", 1), 1.0, 1.0, [0, 1, 2], {"top1": d},
        ...                 {"top1": dict(enumerate(diffs))})
        >>> c = pair_contrast(pair([0.03, 0.02, 0.04]), pair([0.01, 0.01, 0.01]))
        >>> round(c.mean, 4), c.n, c.wins
        (0.02, 3, 3)
    """
    values_x, values_y = x.per_seed.get(metric, {}), y.per_seed.get(metric, {})
    shared = sorted(set(values_x) & set(values_y))
    if not shared:
        return None
    return paired_difference([values_x[s] for s in shared], [values_y[s] for s in shared], metric, confidence)


@dataclass
class Trend:
    """One test of a trend of the paper: the gap (ensemble minus single model) of pair ``x`` against ``y``."""

    kind: Literal["model size", "data size"]
    x: Pair
    y: Pair
    contrast: PairedDifference

    @property
    def outcome(self) -> Literal["seen", "reversed", "unresolved"]:
        """``"seen"`` when the interval lies above 0 (the gap of ``x`` is the larger, in the ensemble's
        favour), ``"reversed"`` below 0, else ``"unresolved"``."""
        if not self.contrast.significant:
            return "unresolved"
        favourable = (
            self.contrast.mean < 0 if self.contrast.metric in LOWER_IS_BETTER else self.contrast.mean > 0
        )
        return "seen" if favourable else "reversed"

    def sentence(self) -> str:
        """The test in plain words, with the numbers."""
        scale, digits, unit = _display(self.contrast.metric)
        claim = (
            "the gap widens as the models grow"
            if self.kind == "model size"
            else "the gap widens as the training set shrinks"
        )
        d = self.contrast
        detectable = (
            f"; {d.n} seeds detect about {scale * d.detectable:.{digits}f}{unit} with 80% power"
            if math.isfinite(d.detectable)
            else ""
        )
        return (
            f"{self.kind.capitalize()}: {claim}? {self.outcome.upper()}. Gap of {_pair_name(self.x)} minus gap of "
            f"{_pair_name(self.y)} on {d.metric} = {format_difference(d, scale, digits)}{unit} "
            f"({round(100 * d.confidence)}% CI; {d.wins} of {d.n} seeds in the ensemble's favour{detectable})."
        )

    def as_dict(self) -> dict[str, Any]:
        """The test as plain data (for JSON)."""
        return {
            "kind": self.kind,
            "x": _pair_name(self.x),
            "y": _pair_name(self.y),
            "outcome": self.outcome,
            "contrast": self.contrast.as_dict(),
            "sentence": self.sentence(),
        }


def _pair_name(pair: Pair) -> str:
    return f"{pair.name_a} vs {pair.name_b}"


_GROUPED = re.compile(r"(.+) \((\w+)=(.*)\)")


def _split_line(line: str) -> tuple[str, str | None]:
    """``"WRN-10-2 (train_size=5900)"`` -> ``("WRN-10-2", "5900")``; ungrouped lines have group ``None``."""
    found = _GROUPED.fullmatch(line)
    return (found.group(1), found.group(3)) if found else (line, None)


def _group_order(group: str | None) -> float:
    """Sort key of a group value: numbers by size; ``None`` (e.g. ``train_size: null``, all data) last."""
    try:
        return float(group) if group is not None else math.inf
    except ValueError:
        return math.inf if group in ("None", "null") else math.nan


def paper_trends(pairs: Sequence[Pair], metric: str = "top1", confidence: float = 0.95) -> list[Trend]:
    """Test the paper's two trends on matched pairs, each as a :func:`pair_contrast`.

    - **Model size** ("as model sizes get larger, the performance gap widens"): within a group, every pair
      against the next smaller one (ordered by the single model's multiply-adds).
    - **Data size** (the gap is "largest when the models approach the size of what their dataset can
      foster"): the same pair (same architectures and ensemble size) trained on a smaller training set
      (``--group_by data/train_size``) against the next larger one; ``None`` (all the data) is the largest.

    Args:
        pairs: from :func:`compare_pairs`, with per-seed differences.
        metric: the metric contrasted.
        confidence: coverage of the intervals.

    Returns:
        The tests, model size first; pairs that share no seed are left out.
    """
    keyed = []
    for pair in pairs:
        family_a, group = _split_line(pair.a.architecture)
        family_b, _ = _split_line(pair.b.architecture)
        keyed.append(((family_a, pair.a.k, family_b), group, pair))
    trends: list[Trend] = []
    groups = sorted({g for _, g, _ in keyed}, key=lambda g: (_group_order(g), str(g)))
    for group in groups:
        members = sorted((p for _, g, p in keyed if g == group), key=lambda p: p.gmacs_b)
        for smaller, larger in zip(members, members[1:]):
            contrast = pair_contrast(larger, smaller, metric, confidence)
            if contrast is not None:
                trends.append(Trend("model size", larger, smaller, contrast))
    for key in dict.fromkeys(k for k, _, _ in keyed):
        same = sorted(
            ((g, p) for k, g, p in keyed if k == key), key=lambda gp: (_group_order(gp[0]), str(gp[0]))
        )
        for (_, less_data), (_, more_data) in zip(same, same[1:]):
            contrast = pair_contrast(less_data, more_data, metric, confidence)
            if contrast is not None:
                trends.append(Trend("data size", less_data, more_data, contrast))
    return trends


def _png(figure: Any) -> bytes:
    data = png_bytes(figure)
    close(figure)
    return data


def _title(runs: Sequence[Run], stage: str, curve: str) -> str:
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run.line] += 1
    curve_text = "mean over random k-subsets" if curve == "random" else "first k members"
    named = ", ".join(f"{arch} ({n} run{'s' if n != 1 else ''})" for arch, n in sorted(counts.items()))
    wrapped = textwrap.fill(
        named, width=95, break_long_words=False
    )  # many lines (--group_by) stay on the page
    return f"{stage} split, {curve_text}; error bars: std over runs\n{wrapped}"


def compare(
    logdir: str,
    stage: Literal["val", "test"] = "test",
    curve: Literal["first", "random"] = "random",
    metric: SizeMetric = "top1",
    out: str | None = None,
    skip_incomplete: bool = False,
    pairs: list[str] | None = None,
    pair_tolerance: float = 0.1,
    confidence: float = 0.95,
    group_by: str | None = None,
) -> dict[str, Any]:
    """Read every run under ``logdir`` and write the comparison figure, tables and TensorBoard entries.

    Args:
        logdir: a directory of runs (e.g. ``lightning_logs/`` or a sweep's folder): folders with the ablation's
            ``ablation_{stage}.json``, whatever the logger, or older runs' TensorBoard event files.
        stage: which evaluation's ablation to compare.
        curve: ``"random"`` (mean over random k-subsets) or ``"first"`` (the first k members).
        metric: the y-axis of the figure and the metric of the verdicts: ``top1``, ``nll``, ``ece``, ``aece``,
            ``aurc``, ``risk80`` or ``ood_auroc`` (at test, with an OOD test loader).
        out: where to write (default: ``<logdir>/comparison``).
        skip_incomplete: leave out runs that lack the ablation's points instead of failing.
        pairs: the matched pairs, as ``"WRN-16-2@4 vs WRN-16-4@1"``; by default every ensemble point is
            paired with the single model of nearest multiply-adds within ``pair_tolerance``; ``[]`` for none.
        pair_tolerance: the largest relative multiply-add gap of an automatic pair.
        confidence: coverage of the paired differences' intervals.
        group_by: a hyperparameter every run recorded (in ``results.json``, ``hparams.yaml`` or its HParams
            session; e.g. ``data/train_size``): runs with different values become separate lines,
            ``"WRN-10-2 (train_size=5900)"``, and automatic pairs stay within a group. ``None``: one line per
            architecture.

    Returns:
        ``{"lines", "pairs", "verdicts", "trends", "files", "runs", "skipped", "table", "record"}``; ``trends``
        are :func:`paper_trends` of the pairs.

    Raises:
        ValueError: for an unknown stage, curve or metric, a bad pair, no runs, or runs lacking the needed
            points (naming them).
    """
    if stage not in ("val", "test"):
        raise ValueError(f"Expected `--stage` to be 'val' or 'test', but got {stage!r}.")
    if curve not in ("first", "random"):
        raise ValueError(f"Expected `--curve` to be 'first' or 'random', but got {curve!r}.")
    if metric not in METRICS:
        raise ValueError(f"Expected `--metric` to be one of {', '.join(METRICS)}, but got {metric!r}.")
    if not (isinstance(pair_tolerance, (int, float)) and pair_tolerance >= 0):
        raise ValueError(f"Expected `--pair_tolerance` to be a number >= 0, but got {pair_tolerance!r}.")
    explicit = [parse_pair(p) for p in pairs] if pairs is not None else None
    root = Path(logdir)
    out_dir = Path(out) if out is not None else root / "comparison"
    paths = find_runs(root)
    runs = [read_run(p, root, stage, curve, group_by) for p in paths]
    needed = ("gmacs", metric)
    incomplete = [
        r for r in runs if not r.points or any(c not in p for p in r.points.values() for c in needed)
    ]
    if incomplete and not skip_incomplete:
        names = ", ".join(r.name for r in incomplete)
        raise ValueError(
            f"These runs lack the `ablation/{stage}/...` tags and `ablation_{stage}.json` rows (ensemble-size "
            f"{metric} and gmacs): {names}. Train them with the EnsembleSizeAblation callback (e.g. `--config "
            "callbacks/efficiency.yaml`), pass `--skip_incomplete true`, or choose another `--stage`."
        )
    complete = [r for r in runs if r not in incomplete]
    if not complete:
        raise ValueError(
            f"No run under {str(root)!r} has the `ablation/{stage}/...` tags or `ablation_{stage}.json` rows."
        )
    lines = collect(complete)
    groups = {run.line: run.group for run in complete}
    automatic = match_pairs(lines, pair_tolerance, groups if group_by is not None else None)
    matched = compare_pairs(complete, lines, explicit if explicit is not None else automatic, confidence)
    verdicts = pair_verdicts(matched, metric)
    trends = paper_trends(matched, metric, confidence)

    # Everything is computed before anything is written: a failure leaves no half-written output.
    title = _title(complete, stage, curve)
    figures = {"comparison.png": comparison_figure(lines, "gmacs", metric, title)}
    if all("latency_ms" in row for rows in lines.values() for row in rows):
        figures["comparison_latency.png"] = comparison_figure(lines, "latency_ms", metric, title)
    csv_text, md_text = _table(lines)
    if matched:
        md_text += "\n" + pairs_table(matched) + "\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    if trends:
        md_text += (
            "\nThe paper's trends, seed by seed:\n\n" + "\n".join(f"- {t.sentence()}" for t in trends) + "\n"
        )
    images = {name: _png(figure) for name, figure in figures.items()}
    record = {
        "stage": stage,
        "curve": curve,
        "metric": metric,
        "group_by": group_by,
        "lines": lines,
        "pairs": [p.as_dict() for p in matched],
        "verdicts": verdicts,
        "trends": [t.as_dict() for t in trends],
        "runs": [
            {
                "name": r.name,
                "architecture": r.architecture,
                "line": r.line,
                "group": r.group,
                "seed": r.seed,
                "points": r.points,
            }
            for r in complete
        ],
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).touch()
    files = []
    for name, data in images.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / name)
        files.append(out_dir / name)
    files.append(atomic_write_text(out_dir / "comparison.csv", csv_text))
    files.append(atomic_write_text(out_dir / "comparison.md", md_text))
    files.append(atomic_write_text(out_dir / "comparison.json", json.dumps(record, indent=2) + "\n"))
    _write_tensorboard(out_dir / "tensorboard", lines, complete, metric, title, md_text)
    return {
        "lines": lines,
        "pairs": matched,
        "verdicts": verdicts,
        "trends": trends,
        "files": [str(f) for f in files],
        "runs": [r.name for r in complete],
        "skipped": [r.name for r in incomplete],
        "table": md_text,
        "record": record,
    }


def _write_tensorboard(
    directory: Path,
    lines: dict[str, list[dict[str, float]]],
    runs: list[Run],
    metric: str,
    title: str,
    table: str,
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        tag = "comparison/accuracy_vs_gmacs" if metric == "top1" else f"comparison/{metric}_vs_gmacs"
        writer.add_figure(tag, comparison_figure(lines, "gmacs", metric, title), 0)
        writer.add_text("comparison/table", table, 0)
        for run in runs:
            k_max = max(run.points)
            point = run.points[k_max]
            hparams = {
                "architecture": run.architecture,
                "run": run.name,
                "num_members": k_max,
                "seed": -1 if run.seed is None else run.seed,
                "ensemble_gmacs": point.get("gmacs", 0.0),
            }
            metrics = {f"hparam/{c}": v for c, v in point.items() if c in (*METRICS, "latency_ms")}
            writer.add_hparams(hparams, metrics, run_name=re.sub(r"[^\w.-]", "_", run.name))


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (typed flags from :func:`compare`'s signature)."""
    from jsonargparse import CLI

    program = "python -m lightning_ensembles.compare"
    with command_line_errors(program):
        results = CLI(
            compare, args=list(args) if args is not None else None, as_positional=True, prog=program
        )
    print(results["table"], "\n".join(f"wrote {f}" for f in results["files"]), sep="\n")
    if results["skipped"]:
        print("skipped (no ablation points): " + ", ".join(results["skipped"]))
    return results


if __name__ == "__main__":
    main()
