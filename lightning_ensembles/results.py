"""The results table of a reproduction run: accuracy and cost for every ensemble size.

Kondratyuk et al. 2020 plot one point per ensemble size, accuracy against multiply-adds. A run's table
holds exactly those points (the first ``k`` members, ``k = 1..M``, from the module's test metrics) together
with each member's cost, the full-ensemble calibration metrics, and the evidence a result needs (DESIGN,
rule 13): wall-clock, hardware and library versions. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ensembles.cost import count_macs, count_params

__all__ = [
    "ENSEMBLE_KEYS",
    "atomic_write_text",
    "build_results",
    "cpu_model",
    "ensemble_summary",
    "environment",
    "format_table",
    "member_name",
    "run_directory",
    "write_results",
]

ENSEMBLE_KEYS = (
    "top1",
    "top5",
    "nll",
    "ece",
    "brier",
    "disagreement",
    *("aece", "aurc", "risk80", "entropy", "mutual_information", "variation_ratio"),  # uncertainty
)


def atomic_write_text(path: str | os.PathLike[str], text: str | bytes) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of one.

    Args:
        path: the destination; its folder is created if needed.
        text: the content: a string (written as UTF-8) or bytes (a PNG, say).

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it the mode `open` would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def run_directory(trainer: Any) -> Path | None:
    """The run's folder for result files: the first logger's ``log_dir``, else ``default_root_dir``.

    Call it on **every** rank, not only where the files are written: under DDP ``trainer.log_dir`` is a
    broadcast from rank 0, and asking on rank 0 alone hangs the run.

    Args:
        trainer: the Trainer.

    Returns:
        The folder, or ``None`` for a ``fast_dev_run``: Lightning's dev run has no logger and no run folder
        (its ``log_dir`` is the working directory), so it writes no result files.
    """
    if getattr(trainer, "fast_dev_run", False):
        return None
    return Path(trainer.log_dir or trainer.default_root_dir)


def member_name(member: nn.Module) -> str:
    """A short architecture name: the member's ``name`` attribute (``"WRN-28-10"``) or its class name."""
    name = getattr(member, "name", None)
    return name if isinstance(name, str) else type(member).__name__


def ensemble_summary(
    members: Sequence[nn.Module], input_shape: Sequence[int] | None = None, scope: Any = None
) -> dict[str, Any]:
    """What an ensemble is, for the HParams dashboard and results tables
    (:meth:`~lightning_ensembles.EnsembleLightningModule.summary`).

    Args:
        members: the ensemble's members.
        input_shape: one sample's shape; when given, multiply-adds are counted (meta device, no compute).
        scope: where counted multiply-adds are cached (a Trainer: once per run), see
            :func:`~lightning_ensembles.cost.member_macs`.

    Returns:
        ``architecture`` (e.g. ``"WRN-16-2"``, ``"+"``-joined when mixed), ``num_members``, ``depth`` and
        ``width`` when every member has them and they agree, ``member_gmacs`` (mean) and ``ensemble_gmacs``
        when ``input_shape`` is given.
    """
    from lightning_ensembles.cost import member_macs

    names = sorted({member_name(m) for m in members})
    info: dict[str, Any] = {"architecture": "+".join(names), "num_members": len(members)}
    for attribute in ("depth", "width"):
        values = {getattr(m, attribute, None) for m in members}
        if len(values) == 1 and isinstance(next(iter(values)), int):
            info[attribute] = values.pop()
    if input_shape is not None:
        macs = [member_macs(m, input_shape, scope=scope) for m in members]
        info["member_gmacs"] = sum(macs) / len(macs) / 1e9
        info["ensemble_gmacs"] = sum(macs) / 1e9
    return info


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (as ``lscpu`` prints it), or ``None`` where there is none.

    Returns:
        e.g. ``"Intel(R) Xeon(R) Processor"``, or ``None``.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict[str, Any]:
    """Hardware and library versions, recorded with every result."""
    import lightning
    import torchmetrics

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count(),
    }


def build_results(
    members: Sequence[nn.Module],
    metrics: Mapping[str, float],
    input_shape: Sequence[int],
    stage: str = "test",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the results of one run.

    Args:
        members: the trained members, in order.
        metrics: logged metrics, e.g. ``trainer.test(...)[0]`` (keys ``test/size_{k}/top1``, ...).
        input_shape: one sample's shape, for counting multiply-adds.
        stage: the metric prefix to read.
        extra: anything else to record (config, checkpoint path, wall-clock, ...).

    Returns:
        A JSON-serialisable dict with ``members``, ``sizes`` (one row per ``k``) and ``ensemble``.

    Raises:
        KeyError: if the metrics lack an entry the table needs, naming it.
    """

    def get(key: str) -> float:
        full = f"{stage}/{key}"
        if full not in metrics:
            raise KeyError(f"The results table needs the metric {full!r}, which the run did not log.")
        return float(metrics[full])

    costs = [(count_macs(m, input_shape), count_params(m)) for m in members]
    rows = []
    for i, (member, (macs, params)) in enumerate(zip(members, costs)):
        rows.append(
            {
                "member": i,
                "architecture": member_name(member),
                "macs": macs,
                "params": params,
                "top1": get(f"member_{i}/top1"),
                "nll": get(f"member_{i}/nll"),
            }
        )
    sizes = []
    for k in range(1, len(members) + 1):
        sizes.append(
            {
                "k": k,
                "macs": sum(c[0] for c in costs[:k]),
                "params": sum(c[1] for c in costs[:k]),
                "top1": get(f"size_{k}/top1"),
                "nll": get(f"size_{k}/nll"),
            }
        )
    ensemble = {key: float(metrics[f"{stage}/{key}"]) for key in ENSEMBLE_KEYS if f"{stage}/{key}" in metrics}
    ood = f"{stage}/ood/"  # OOD detection (lightning_ensembles.ood): ood/{criterion}/{auroc,aupr,fpr95}
    ensemble.update(
        {key[len(stage) + 1 :]: float(value) for key, value in metrics.items() if key.startswith(ood)}
    )
    architectures = sorted({member_name(m) for m in members})
    return {
        "architecture": architectures[0] if len(architectures) == 1 else "+".join(architectures),
        "num_members": len(members),
        "input_shape": list(input_shape),
        "stage": stage,
        "members": rows,
        "sizes": sizes,
        "ensemble": ensemble,
        "environment": environment(),
        **dict(extra or {}),
    }


def format_table(results: Mapping[str, Any]) -> str:
    """Render results as Markdown: one row per ensemble size, then the members and the full ensemble.

    Args:
        results: the output of :func:`build_results`.

    Returns:
        Markdown text.
    """
    name = f"{results['num_members']} × {results['architecture']}"
    lines = [
        f"## {name} ({results['stage']} split)",
        "",
        "| ensemble size k | GMACs / sample | params (M) | top-1 (%) | NLL |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in results["sizes"]:
        lines.append(
            f"| {row['k']} | {row['macs'] / 1e9:.4f} | {row['params'] / 1e6:.2f} | "
            f"{100 * row['top1']:.2f} | {row['nll']:.4f} |"
        )
    lines += ["", "| member | architecture | top-1 (%) | NLL |", "|---:|---|---:|---:|"]
    for row in results["members"]:
        lines.append(
            f"| {row['member']} | {row['architecture']} | {100 * row['top1']:.2f} | {row['nll']:.4f} |"
        )
    ensemble = results["ensemble"]
    if ensemble:
        lines += ["", "ensemble: " + ", ".join(f"{k} {v:.4f}" for k, v in ensemble.items())]
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically into ``directory``.

    Args:
        results: the output of :func:`build_results`.
        directory: the run directory.

    Returns:
        The paths of the JSON and Markdown files.
    """
    directory = Path(directory)
    json_path = atomic_write_text(directory / "results.json", json.dumps(results, indent=2) + "\n")
    md_path = atomic_write_text(directory / "results.md", format_table(results))
    return json_path, md_path
