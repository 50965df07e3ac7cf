"""Compare runs side by side: the paper's accuracy-vs-cost figure from TensorBoard event files.

Kondratyuk et al. 2020 (figure 1) draw one line per architecture and one point per ensemble size, accuracy
against FLOPs (multiply-adds) or latency. Every run with the
:class:`~lightning_ensembles.callbacks.EnsembleSizeAblation` callback logs those points; this command reads
the event files of many runs with TensorBoard's own reader and draws the figure:

    python -m lightning_ensembles.compare lightning_logs/ [--stage test] [--curve random] [--out DIR]

It writes ``comparison.png`` (accuracy vs GMACs), ``comparison_latency.png`` (when latency was logged),
``comparison.csv`` and ``comparison.md``, and a TensorBoard run ``<out>/tensorboard`` with the figure and
one HParams session per run, so the runs sit side by side in TensorBoard's HParams dashboard. Runs sharing
an architecture form one line; several runs of the same size (seeds) are averaged.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_ensembles.results import atomic_write_text

EVENT_GLOB = "events.out.tfevents.*"
MARKER = ".lightning_ensembles_comparison"  # marks an output folder, so later comparisons skip it


@dataclass
class Run:
    """What one run logged: its name, hyperparameters and ablation points ``{k: {column: value}}``."""

    path: Path
    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    points: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        """The architecture logged by the module (``ensemble/architecture``), else the run name."""
        return str(self.hparams.get("ensemble/architecture", self.name))


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold TensorBoard event files.

    Args:
        logdir: the root to search.

    Returns:
        Sorted run directories.

    Raises:
        FileNotFoundError: if ``logdir`` does not exist.
        ValueError: if it holds no event files.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Expected `logdir` to be a directory of TensorBoard runs, but {str(root)!r} is not."
        )
    runs = sorted(
        {
            Path(directory)
            for directory, _, files in os.walk(root, followlinks=True)  # runs are often symlinked together
            if any(fnmatch.fnmatch(f, EVENT_GLOB) for f in files)
            and not any((parent / MARKER).exists() for parent in Path(directory).parents)
        }
    )
    if not runs:
        raise ValueError(f"Found no TensorBoard runs (files {EVENT_GLOB}) under {str(root)!r}.")
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


def read_run(path: Path, root: Path, stage: str, curve: str) -> Run:
    """Read one run's hyperparameters and its last logged ablation points.

    Args:
        path: the run directory.
        root: the log root (for the run's name).
        stage: ``"val"`` or ``"test"``.
        curve: ``"first"`` (first k members) or ``"random"`` (mean over random k-subsets).

    Returns:
        The run; ``points`` is empty when the run logged no ablation for that stage.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
    accumulator.Reload()
    name = path.relative_to(root).as_posix() if path != root else path.name
    run = Run(path=path, name=name or path.name, hparams=_hparams(accumulator))
    pattern = re.compile(rf"^ablation/{stage}/(?:{curve}/)?size_(\d+)/(\w+)$")
    for tag in accumulator.Tags().get("scalars", []):
        match = pattern.match(tag)
        if match is None:
            continue
        k, column = int(match.group(1)), match.group(2)
        run.points.setdefault(k, {})[column] = float(accumulator.Scalars(tag)[-1].value)
    return run


def collect(runs: Sequence[Run]) -> dict[str, list[dict[str, float]]]:
    """One line per architecture: for each ensemble size, the mean over the runs that have it.

    Args:
        runs: runs with points.

    Returns:
        ``{architecture: [row, ...]}`` sorted by ``k``; rows hold ``k``, ``runs`` and the mean columns.
    """
    grouped: dict[str, dict[int, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for k, point in run.points.items():
            grouped[run.architecture][k].append(point)
    lines: dict[str, list[dict[str, float]]] = {}
    for architecture, sizes in sorted(grouped.items()):
        rows = []
        for k, points in sorted(sizes.items()):
            columns = sorted({c for p in points for c in p})
            row: dict[str, float] = {"k": k, "runs": len(points)}
            for column in columns:
                values = [p[column] for p in points if column in p]
                row[column] = sum(values) / len(values)
            rows.append(row)
        lines[architecture] = rows
    return lines


def comparison_figure(lines: dict[str, list[dict[str, float]]], axis: str, metric: str, title: str) -> Any:
    """The paper's figure: one line per architecture, one point per ensemble size.

    Args:
        lines: the output of :func:`collect`.
        axis: ``"gmacs"`` or ``"latency_ms"``.
        metric: the accuracy column (``"top1"``).
        title: the figure title.

    Returns:
        A matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for architecture, rows in lines.items():
        points = [r for r in rows if axis in r and metric in r]
        xs = [r[axis] for r in points]
        ys = [100 * r[metric] for r in points]
        ax.plot(xs, ys, "o-", label=architecture)
        for r, x, y in zip(points, xs, ys):
            ax.annotate(str(int(r["k"])), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GMACs (multiply-adds) per sample" if axis == "gmacs" else "latency (ms), batch 1")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="architecture (point label: ensemble size)", title_fontsize=7)
    figure.tight_layout()
    return figure


def _table(lines: dict[str, list[dict[str, float]]]) -> tuple[str, str]:
    columns = ["architecture", "k", "runs", "gmacs", "latency_ms", "top1", "nll", "ece"]
    rows: list[dict[str, Any]] = [
        {"architecture": arch, **row} for arch, arch_rows in lines.items() for row in arch_rows
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    md = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [str(row["architecture"])]
        for column in columns[1:]:
            value = row.get(column)
            if value is None:
                cells.append("")
            elif column in ("k", "runs"):
                cells.append(str(int(value)))
            elif column == "top1":
                cells.append(f"{100 * value:.2f}")
            else:
                cells.append(f"{value:.4g}")
        md.append("| " + " | ".join(cells) + " |")
    return buffer.getvalue(), "\n".join(md) + "\n"


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def compare(
    logdir: str,
    stage: Literal["val", "test"] = "test",
    curve: Literal["first", "random"] = "random",
    metric: Literal["top1"] = "top1",
    out: str | None = None,
    skip_incomplete: bool = False,
) -> dict[str, Any]:
    """Read every run under ``logdir`` and write the comparison figure, tables and TensorBoard entries.

    Args:
        logdir: a directory of TensorBoard runs (e.g. ``lightning_logs/``).
        stage: which evaluation's ablation to compare.
        curve: ``"random"`` (mean over random k-subsets) or ``"first"`` (the first k members).
        metric: the accuracy on the y-axis.
        out: where to write (default: ``<logdir>/comparison``).
        skip_incomplete: leave out runs that lack the ablation tags instead of failing.

    Returns:
        ``{"lines": ..., "files": [...], "runs": [...], "skipped": [...]}``.

    Raises:
        ValueError: for an unknown stage or curve, no runs, or runs lacking the needed tags (naming them).
    """
    if stage not in ("val", "test"):
        raise ValueError(f"Expected `--stage` to be 'val' or 'test', but got {stage!r}.")
    if curve not in ("first", "random"):
        raise ValueError(f"Expected `--curve` to be 'first' or 'random', but got {curve!r}.")
    if metric != "top1":
        raise ValueError(f"Expected `--metric` to be 'top1', but got {metric!r}.")
    root = Path(logdir)
    out_dir = Path(out) if out is not None else root / "comparison"
    paths = find_runs(root)
    runs = [read_run(p, root, stage, curve) for p in paths]
    needed = ("gmacs", metric)
    incomplete = [
        r for r in runs if not r.points or any(c not in p for p in r.points.values() for c in needed)
    ]
    if incomplete and not skip_incomplete:
        names = ", ".join(r.name for r in incomplete)
        raise ValueError(
            f"These runs lack the `ablation/{stage}/...` tags (ensemble-size {metric} and gmacs): {names}. Train "
            "them with the EnsembleSizeAblation callback (e.g. `--config callbacks/efficiency.yaml`), pass "
            "`--skip_incomplete true`, or choose another `--stage`."
        )
    complete = [r for r in runs if r not in incomplete]
    if not complete:
        raise ValueError(f"No run under {str(root)!r} has the `ablation/{stage}/...` tags.")
    lines = collect(complete)

    # Everything is computed before anything is written: a failure leaves no half-written output.
    title = f"{stage} split, {'mean over random k-subsets' if curve == 'random' else 'first k members'}"
    figures = {"comparison.png": comparison_figure(lines, "gmacs", metric, title)}
    if all("latency_ms" in row for rows in lines.values() for row in rows):
        figures["comparison_latency.png"] = comparison_figure(lines, "latency_ms", metric, title)
    csv_text, md_text = _table(lines)
    images = {name: _png(figure) for name, figure in figures.items()}

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
    _write_tensorboard(out_dir / "tensorboard", lines, complete, metric, title)
    return {
        "lines": lines,
        "files": [str(f) for f in files],
        "runs": [r.name for r in complete],
        "skipped": [r.name for r in incomplete],
        "table": md_text,
    }


def _write_tensorboard(
    directory: Path, lines: dict[str, list[dict[str, float]]], runs: list[Run], metric: str, title: str
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        writer.add_figure("comparison/accuracy_vs_gmacs", comparison_figure(lines, "gmacs", metric, title), 0)
        writer.add_text("comparison/table", _table(lines)[1], 0)
        for run in runs:
            k_max = max(run.points)
            point = run.points[k_max]
            hparams = {
                "architecture": run.architecture,
                "run": run.name,
                "num_members": k_max,
                "ensemble_gmacs": point.get("gmacs", 0.0),
            }
            metrics = {
                f"hparam/{c}": v for c, v in point.items() if c in ("top1", "nll", "ece", "latency_ms")
            }
            writer.add_hparams(hparams, metrics, run_name=re.sub(r"[^\w.-]", "_", run.name))


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (typed flags from :func:`compare`'s signature)."""
    from jsonargparse import CLI

    results = CLI(compare, args=list(args) if args is not None else None, as_positional=True)
    print(results["table"], "\n".join(f"wrote {f}" for f in results["files"]), sep="\n")
    if results["skipped"]:
        print("skipped (no ablation tags): " + ", ".join(results["skipped"]))
    return results


if __name__ == "__main__":
    main()
