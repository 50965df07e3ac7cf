"""The architecture search: an Optuna study of trained proxies, accuracy against multiply-adds or latency.

The third experiment of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single
Large Models* (arXiv 2005.00570, figure 3), searches architectures under a cost budget and then asks whether
one searched architecture replicated ``N`` times is as good as ``N`` different searched architectures of the
same total cost (their answer: nearly the same). :class:`NASSearch` runs that search over a
:class:`~lightning_ensembles.nas.NASSearchSpace` with Optuna (Akiba et al., KDD 2019):

- every trial samples an architecture, costs it (multiply-adds with
  :func:`~lightning_ensembles.cost.count_macs`, or batch-1 latency with
  :func:`~lightning_ensembles.latency.measure_ensemble_latency`) and trains a proxy: an
  :class:`~lightning_ensembles.EnsembleLightningModule` with one member, for a few epochs, through a Lightning
  ``Trainer``; its validation top-1 is the accuracy objective;
- without a target the study has two objectives (maximise top-1, minimise cost) and its result is the Pareto
  set; with ``target`` it maximises MnasNet's reward ``top1 * (cost / target) ** w`` (Tan et al., *MnasNet*,
  CVPR 2019, arXiv 1807.11626), with ``w = alpha`` at or under the target and ``beta`` above it, and bad
  trials are pruned after each epoch by an Optuna pruner
  (:class:`~lightning_ensembles.callbacks.OptunaPruning`; Optuna prunes single-objective studies only, so a
  Pareto search trains every trial to the end);
- the study lives in any Optuna storage URL (SQLite by default), so several worker processes or machines can
  share it: ``n_trials`` architectures are trained in total over all workers, and a rerun of a finished study
  trains nothing (a sampler proposing an architecture already trained gets the trial recorded as a repeat);
  workers racing to create a new storage's tables retry;
- a trial that diverges (a NaN loss, which the module reports as ``FloatingPointError``) is recorded as
  failed with its reason and the study goes on;
- in a database storage every running trial sends Optuna's heartbeat: when a worker dies (killed, out of
  memory, its machine lost), another worker records its trial as failed and trains the architecture again;
- every finished trial is logged as one line of the ``lightning_ensembles.nas`` logger: the trial, its
  result, the best so far and the time left.

:func:`~lightning_ensembles.nas.choose_architectures` picks the two arms of the comparison from the finished
trials and :func:`~lightning_ensembles.nas.export_search` writes them as LightningCLI YAML.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_ensembles._validation import check_int
from lightning_ensembles.callbacks.optuna_pruning import OptunaPruning
from lightning_ensembles.cost import count_macs, count_params
from lightning_ensembles.models.nas import NASArchitecture
from lightning_ensembles.nas._optuna import import_optuna, record_heartbeat_now
from lightning_ensembles.nas.selection import _completed, _record, pareto_front
from lightning_ensembles.nas.space import NASSearchSpace
from lightning_ensembles.nas.storage import open_storage

if TYPE_CHECKING:
    import optuna

__all__ = ["NASSearch"]

# The name users see in every progress line ("INFO lightning_ensembles.nas: Trial 3, ..."), set by name so that
# it stays the package's whatever module the search lives in.
log = logging.getLogger("lightning_ensembles.nas")

_FLAG = "--search"
_MAX_TRIALS_FACTOR = 4  # repeats of trained architectures are free, but not endless


class NASSearch:
    """An Optuna search over a :class:`~lightning_ensembles.nas.NASSearchSpace` with trained proxies.

    Args:
        space: The search space.
        n_trials: Architectures the study trains in total, over every worker sharing it and every rerun
            (pruned and failed ones count). A trial proposing an architecture the study already trained is
            recorded as pruned with ``duplicate_of`` and does not count; the study stops after
            ``4 * n_trials`` trials in any case.
        objective: The cost: ``"macs"`` (multiply-adds of one input, counted) or ``"latency"`` (median
            batch-1 latency in milliseconds, measured on ``latency_device``).
        target: ``None`` for a two-objective search (top-1 up, cost down; the result is a Pareto set), or the
            target cost of MnasNet's single reward, in GMACs (``objective="macs"``) or milliseconds
            (``"latency"``). The space's cheapest architecture must meet it.
        reward_exponents: MnasNet's ``(alpha, beta)``: the reward's exponent at or under the target and
            above it. ``(-0.07, -0.07)`` is MnasNet's soft constraint, ``(0, -1)`` a hard one.
        storage: An Optuna storage URL (``sqlite:///search.db``, ``postgresql://...``, ``mysql://...``) shared by
            the workers, or ``None`` for an in-memory study of this process only.
        study_name: The study's name in the storage.
        seed: Seed of the sampler: give every worker of a shared study its own, or they propose the same first
            architectures; ``None`` for an unseeded sampler.
        proxy_seed: Seed of every proxy's initialisation (the same for all trials and workers, so that trials
            differ by their architecture only).
        sampler: ``"tpe"`` (Optuna's default; multi-objective TPE for a Pareto search) or ``"random"``.
        proxy_epochs: Epochs each proxy is trained for.
        pruner: ``"median"`` (Optuna's median pruner, after ``pruner_startup_trials`` trials and one epoch) or
            ``"none"``; used with a ``target`` only.
        pruner_startup_trials: Finished trials before the median pruner prunes.
        optimizer: The proxies' optimizer (as ``--model.optimizer`` of the recipes).
        member_kwargs: Further :class:`~lightning_ensembles.models.NASNet` arguments of the proxies and the
            exported configs, e.g. ``{"input_size": [16, 16], "activation": "relu"}``; ``in_channels`` comes
            from the datamodule.
        trainer: Further ``Trainer`` arguments of the proxies (``accelerator``, ``precision``,
            ``limit_train_batches``, ...). Each worker trains on one device; to use eight GPUs, run eight
            workers on one storage.
        latency_device: Where latency is measured (``objective="latency"``).
        latency_repeats: Timed runs per latency measurement.
        heartbeat_interval: Seconds between the heartbeats a running trial records in a database ``storage``
            (Optuna's ``RDBStorage(heartbeat_interval=...)``); ``None`` turns them off, and then a trial of a
            worker that died stays ``RUNNING`` (and counted) for ever. No effect on an in-memory study.
        grace_period: Seconds without a heartbeat after which another worker records a running trial as
            failed; more than ``heartbeat_interval``, ``None`` for twice the interval.
        stale_retries: How often the architecture of such a trial is queued again, as a new trial that the
            next free worker trains (``0``: recorded as failed only).

    Raises:
        ValueError: For an invalid argument, naming its ``--search.*`` flag and the value.

    Example:
        >>> from lightning_ensembles.nas import StageSpace
        >>> space = NASSearchSpace(stages=[StageSpace(channels=[8], expand_ratios=[1], max_blocks=1)])
        >>> NASSearch(space, n_trials=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `--search.n_trials` to be an int >= 1, but got 0.
    """

    def __init__(
        self,
        space: NASSearchSpace,
        n_trials: int = 20,
        objective: Literal["macs", "latency"] = "macs",
        target: float | None = None,
        reward_exponents: tuple[float, float] = (-0.07, -0.07),
        storage: str | None = None,
        study_name: str = "nas",
        seed: int | None = 0,
        proxy_seed: int = 0,
        sampler: Literal["tpe", "random"] = "tpe",
        proxy_epochs: int = 3,
        pruner: Literal["median", "none"] = "median",
        pruner_startup_trials: int = 3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        member_kwargs: dict[str, Any] | None = None,
        trainer: dict[str, Any] | None = None,
        latency_device: str = "cpu",
        latency_repeats: int = 20,
        heartbeat_interval: int | None = 60,
        grace_period: int | None = None,
        stale_retries: int = 1,
    ) -> None:
        if not isinstance(space, NASSearchSpace):
            raise ValueError(f"Expected `{_FLAG}.space` to be a NASSearchSpace, but got {space!r}.")
        self.space = space
        self.n_trials = check_int(n_trials, f"{_FLAG}.n_trials", 1)
        if objective not in ("macs", "latency"):
            raise ValueError(
                f"Expected `{_FLAG}.objective` to be 'macs' or 'latency', but got {objective!r}."
            )
        self.objective = objective
        if target is not None and (
            not isinstance(target, (int, float))
            or isinstance(target, bool)
            or not math.isfinite(target)
            or target <= 0
        ):
            raise ValueError(
                f"Expected `{_FLAG}.target` to be a positive number (GMACs or ms) or null, but got {target!r}."
            )
        self.target = None if target is None else float(target)
        exponents = tuple(reward_exponents) if isinstance(reward_exponents, Sequence) else ()
        if len(exponents) != 2 or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and e <= 0 for e in exponents
        ):
            raise ValueError(
                f"Expected `{_FLAG}.reward_exponents` to be two numbers <= 0 (alpha, beta), but got "
                f"{reward_exponents!r}."
            )
        self.reward_exponents = (float(exponents[0]), float(exponents[1]))
        if storage is not None and (not isinstance(storage, str) or not storage):
            raise ValueError(
                f"Expected `{_FLAG}.storage` to be an Optuna storage URL (e.g. 'sqlite:///search.db') or null, "
                f"but got {storage!r}."
            )
        self.storage = storage
        if not isinstance(study_name, str) or not study_name:
            raise ValueError(
                f"Expected `{_FLAG}.study_name` to be a non-empty string, but got {study_name!r}."
            )
        self.study_name = study_name
        if seed is not None:
            check_int(seed, f"{_FLAG}.seed", 0)
        self.seed = seed
        self.proxy_seed = check_int(proxy_seed, f"{_FLAG}.proxy_seed", 0)
        if sampler not in ("tpe", "random"):
            raise ValueError(f"Expected `{_FLAG}.sampler` to be 'tpe' or 'random', but got {sampler!r}.")
        self.sampler = sampler
        self.proxy_epochs = check_int(proxy_epochs, f"{_FLAG}.proxy_epochs", 1)
        if pruner not in ("median", "none"):
            raise ValueError(f"Expected `{_FLAG}.pruner` to be 'median' or 'none', but got {pruner!r}.")
        self.pruner = pruner
        self.pruner_startup_trials = check_int(pruner_startup_trials, f"{_FLAG}.pruner_startup_trials", 0)
        self.optimizer = optimizer
        self.member_kwargs = dict(member_kwargs or {})
        for key in ("stages", "stem_channels", "num_features", "num_classes", "in_channels", "name"):
            if key in self.member_kwargs:
                raise ValueError(
                    f"Expected `{_FLAG}.member_kwargs` not to set {key!r}, which the search decides, but got "
                    f"{self.member_kwargs!r}."
                )
        self.trainer_kwargs = dict(trainer or {})
        devices = self.trainer_kwargs.get("devices", 1)
        if devices not in (1, "1", [0]) and not (isinstance(devices, list) and len(devices) == 1):
            raise ValueError(
                f"Expected `{_FLAG}.trainer.devices` to be 1 (each worker trains one proxy on one device; run "
                f"one worker per device on a shared `{_FLAG}.storage` to use more), but got {devices!r}."
            )
        for key in ("max_epochs", "callbacks", "logger"):
            if key in self.trainer_kwargs:
                raise ValueError(
                    f"Expected `{_FLAG}.trainer` not to set {key!r} (the search sets it; epochs are "
                    f"`{_FLAG}.proxy_epochs`), but got {self.trainer_kwargs!r}."
                )
        if self.trainer_kwargs.get("enable_progress_bar", False) is not False:
            raise ValueError(
                f"Expected `{_FLAG}.trainer.enable_progress_bar` to be false or unset (the search logs one line "
                f"per trial instead of a bar per proxy), but got {self.trainer_kwargs['enable_progress_bar']!r}."
            )
        self.latency_device = latency_device
        self.latency_repeats = check_int(latency_repeats, f"{_FLAG}.latency_repeats", 1)
        if heartbeat_interval is not None:
            check_int(heartbeat_interval, f"{_FLAG}.heartbeat_interval", 1)
        self.heartbeat_interval = heartbeat_interval
        if grace_period is not None and (
            heartbeat_interval is None
            or isinstance(grace_period, bool)
            or not isinstance(grace_period, int)
            or grace_period <= heartbeat_interval
        ):
            allowed = (
                f"null, as `{_FLAG}.heartbeat_interval` is null (no heartbeats)"
                if heartbeat_interval is None
                else f"an int > `{_FLAG}.heartbeat_interval` ({heartbeat_interval} s) or null (twice the interval)"
            )
            raise ValueError(f"Expected `{_FLAG}.grace_period` to be {allowed}, but got {grace_period!r}.")
        self.grace_period = None if heartbeat_interval is None else grace_period or 2 * heartbeat_interval
        """Seconds without a heartbeat after which a running trial is stale (``None`` without heartbeats)."""
        self.stale_retries = check_int(stale_retries, f"{_FLAG}.stale_retries", 0)
        self._durations: list[float] = []  # seconds of the architectures this process trained, this run

    # ------------------------------------------------------------------ cost

    @property
    def cost_key(self) -> str:
        """The user attribute holding each trial's cost: ``"gmacs"`` or ``"latency_ms"``."""
        return "gmacs" if self.objective == "macs" else "latency_ms"

    def member_init_args(self, datamodule: LightningDataModule) -> dict[str, Any]:
        """The :class:`~lightning_ensembles.models.NASNet` arguments of the proxies and the exported configs.

        Args:
            datamodule: Gives ``num_classes`` and ``in_channels`` (the first axis of ``input_shape``).

        Returns:
            ``num_classes``, ``in_channels`` and ``member_kwargs``.

        Raises:
            ValueError: If the datamodule lacks ``num_classes`` or ``input_shape``.
        """
        return {
            "num_classes": _num_classes(datamodule),
            "in_channels": _input_shape(datamodule)[0],
            **self.member_kwargs,
        }

    def measure(self, architecture: NASArchitecture, datamodule: LightningDataModule) -> dict[str, float]:
        """Cost an architecture: multiply-adds and parameters always, latency with ``objective="latency"``.

        Args:
            architecture: The architecture.
            datamodule: Gives ``num_classes`` and ``input_shape``.

        Returns:
            ``{"macs", "gmacs", "params"}`` and ``"latency_ms"`` (median, batch 1) when measured.
        """
        from lightning_ensembles.latency import measure_ensemble_latency
        from lightning_ensembles.module import EnsembleLightningModule

        input_shape = _input_shape(datamodule)
        member = architecture.build(**self.member_init_args(datamodule))
        macs = count_macs(member, input_shape)
        cost: dict[str, float] = {"macs": macs, "gmacs": macs / 1e9, "params": count_params(member)}
        if self.objective == "latency":
            module = EnsembleLightningModule(members=[member], num_classes=_num_classes(datamodule))
            module.to(self.latency_device)
            stats = measure_ensemble_latency(
                module, input_shape, sizes=[1], warmup=3, repeats=self.latency_repeats
            )
            cost["latency_ms"] = stats[1].p50_ms
        return cost

    def check_target(self, datamodule: LightningDataModule) -> dict[str, float] | None:
        """Fail before searching if no architecture of the space can meet ``target``.

        The space's cheapest architecture (:meth:`~lightning_ensembles.nas.NASSearchSpace.smallest`) is
        costed; if it exceeds the target, so does every other.

        Args:
            datamodule: Gives ``num_classes`` and ``input_shape``.

        Returns:
            The cost of the cheapest architecture, or ``None`` without a target.

        Raises:
            ValueError: If the cheapest architecture costs more than ``target``.
        """
        if self.target is None:
            return None
        smallest = self.space.smallest()
        cost = self.measure(smallest, datamodule)
        if cost[self.cost_key] > self.target:
            unit = "GMACs" if self.objective == "macs" else "ms (batch-1 latency, median)"
            raise ValueError(
                f"Expected `{_FLAG}.target` to be a cost some architecture of `{_FLAG}.space` can meet, but got "
                f"{self.target:g} {unit}: the cheapest architecture of the space "
                f"({', '.join(s[0] for s in smallest.block_strings())}) costs {cost[self.cost_key]:.6g} {unit} at "
                f"input shape {tuple(_input_shape(datamodule))}. Raise the target or shrink the space."
            )
        return cost

    def reward(self, top1: float, cost: float) -> float:
        """MnasNet's reward ``top1 * (cost / target) ** w``.

        Args:
            top1: Validation accuracy in ``[0, 1]``.
            cost: The architecture's cost in the target's unit.

        Returns:
            The reward (``top1`` itself without a target).
        """
        if self.target is None:
            return top1
        alpha, beta = self.reward_exponents
        return top1 * (cost / self.target) ** (alpha if cost <= self.target else beta)

    # ------------------------------------------------------------------ study

    def create_study(self) -> optuna.Study:
        """Create the study in the storage, or load it when it exists (how workers share one study).

        Returns:
            The study.

        Raises:
            ConnectionError: If the storage cannot be opened, naming ``--search.storage`` and the URL.
            ValueError: If the storage URL is malformed, or the stored study was created with other
                objectives or another space.
        """
        optuna = import_optuna()
        storage: Any = None
        if self.storage is not None:
            storage = open_storage(
                self.storage, self.heartbeat_interval, self.grace_period, self.stale_retries
            )
        sampler: Any
        if self.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed)
        pruner: Any = optuna.pruners.NopPruner()
        if self.target is not None and self.pruner == "median":
            pruner = optuna.pruners.MedianPruner(
                n_startup_trials=self.pruner_startup_trials, n_warmup_steps=1
            )
        directions = ["maximize"] if self.target is not None else ["maximize", "minimize"]
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            study_name=self.study_name,
            directions=directions,
            load_if_exists=True,
        )
        # What makes trials comparable: workers and reruns joining the study must share it.
        settings = {
            "space": json.dumps(_space_dict(self.space), sort_keys=True),
            "objective": self.objective,
            "target": self.target,
            "proxy_epochs": self.proxy_epochs,
            "proxy_seed": self.proxy_seed,
        }
        stored = study.user_attrs
        differ = [key for key, value in settings.items() if key in stored and stored[key] != value]
        if [d.name.lower() for d in study.directions] != directions and "target" not in differ:
            differ.append("target")
        if differ:
            shown = ", ".join(
                "another space" if key == "space" else f"{key} {stored.get(key)!r} (here {settings[key]!r})"
                for key in differ
            )
            raise ValueError(
                f"Expected the study {self.study_name!r} in `{_FLAG}.storage` to have been created by the same "
                f"search, but it was created with {shown}. Choose another `{_FLAG}.study_name` or the same "
                "settings."
            )
        for key, value in settings.items():
            if key not in stored:
                study.set_user_attr(key, value)
        return study

    # ------------------------------------------------------------------ trials

    def optimize(self, datamodule: LightningDataModule) -> optuna.Study:
        """Run trials until the study holds ``n_trials`` (counting those of other workers).

        Every finished trial is logged as one line (INFO, WARNING for a failed one) of this module's logger:
        the trial, its result, the best so far and the time left, estimated from the mean duration of the
        architectures trained in this process. Optuna's own line about each trial is left out, and the
        proxies show no progress bar. Running trials of workers that stopped sending heartbeats are failed
        and their architectures queued again first (see ``heartbeat_interval``).

        Args:
            datamodule: The data of the proxies: ``num_classes``, ``input_shape``, and a validation split
                (the accuracy objective; keep the test split for the final comparison).

        Returns:
            The study.

        Raises:
            ValueError: If ``target`` cannot be met, or the datamodule lacks ``num_classes``/``input_shape``.
            ConnectionError: If the storage cannot be opened.
        """
        import_optuna()  # a clear ImportError before any work
        _num_classes(datamodule), _input_shape(datamodule)
        self.check_target(datamodule)
        study = self.create_study()
        self._durations = []
        if self.storage is not None and self.heartbeat_interval is not None:
            # Here too, not only before each trial: a study that looks finished may hold a dead worker's trial.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", import_optuna().exceptions.ExperimentalWarning)
                import_optuna().storages.fail_stale_trials(study)
        trained, total = self._counts(study)
        if trained >= self.n_trials or total >= self.max_trials:
            log.info(
                "Study %r already holds %d trained architectures in %d trials (`%s.n_trials` %d): nothing to run.",
                self.study_name,
                trained,
                total,
                _FLAG,
                self.n_trials,
            )
            return study
        if self.target is None:
            log.info(
                "Two-objective search (top-1, %s): trials are not pruned (Optuna prunes single-objective "
                "studies only).",
                self.cost_key,
            )
        with _one_line_per_trial():
            study.optimize(
                lambda trial: self._objective(trial, study, datamodule),
                catch=(FloatingPointError, torch.cuda.OutOfMemoryError),
                callbacks=[self._report_trial, self._stop_when_done],
                gc_after_trial=True,
            )
        trained, total = self._counts(study)
        if trained < self.n_trials:
            log.warning(
                "Stopped after %d trials with %d of `%s.n_trials` %d architectures trained: the sampler kept "
                "proposing architectures already trained (is the space smaller than %d?).",
                total,
                trained,
                _FLAG,
                self.n_trials,
                self.n_trials,
            )
        return study

    @property
    def max_trials(self) -> int:
        """Trials after which the study stops even if fewer than ``n_trials`` architectures were trained."""
        return _MAX_TRIALS_FACTOR * self.n_trials

    @staticmethod
    def _counts(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
        """(architectures trained or in training, all trials), optionally among the trials numbered below.

        Repeats, surplus trials, queued (``WAITING``) trials and stale trials that were queued again are not
        architectures of their own: a stale trial's architecture counts once, as its retry once that runs.
        """
        trials = study.get_trials(deepcopy=False)
        counted = _counted(trials)
        if before is not None:
            trials = [t for t in trials if t.number < before]
            counted = [t for t in counted if t.number < before]
        return len(counted), len(trials)

    def _stop_when_done(self, study: optuna.Study, trial: Any) -> None:
        trained, total = self._counts(study)
        if trained >= self.n_trials or total >= self.max_trials:
            study.stop()

    def _report_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Log the one line about a finished trial: what it was, its result, the best so far, the time left."""
        trials = study.get_trials(deepcopy=False)
        counted = _counted(trials)
        attrs = trial.user_attrs
        retry = trial.system_attrs.get("retry_history") or []
        is_counted = any(t.number == trial.number for t in counted)
        if is_counted and trial.datetime_start is not None and trial.datetime_complete is not None:
            self._durations.append((trial.datetime_complete - trial.datetime_start).total_seconds())
        if "duplicate_of" in attrs:
            what = f"a repeat of trial {attrs['duplicate_of']} (not trained, not counted)"
        elif "surplus" in attrs:
            what = f"surplus (the study already trains its {self.n_trials} architectures; not counted)"
        else:
            position = sum(1 for t in counted if t.number <= trial.number)
            what = f"architecture {position} of {self.n_trials}"
        if retry:
            what += f", the retry of trial {retry[-1]} (its worker stopped)"
        state = trial.state.name
        if state == "COMPLETE":
            result = f"top-1 {attrs['top1']:.4f} at {self._cost_text(attrs)}"
            if self.target is not None:
                result = f"reward {attrs['reward']:.4f}, {result}"
            result += f", {attrs['fit_seconds']:.1f} s ({_blocks(attrs)})"
        elif state == "PRUNED" and "top1" in attrs:
            reported = trial.intermediate_values
            reward = f"reward {reported[max(reported)]:.4f}, " if reported else ""
            result = (
                f"pruned after epoch {attrs.get('epochs', '?')}: {reward}top-1 {attrs['top1']:.4f} at "
                f"{self._cost_text(attrs)}"
            )
        elif state == "FAIL":
            reason = attrs.get("fail_reason", "No reason recorded.")
            result = f"failed and is recorded as FAIL; the study continues. {reason}"
        else:
            result = state.lower()
        finished = sum(1 for t in counted if t.state.is_finished())
        log.log(
            logging.WARNING if state == "FAIL" else logging.INFO,
            "Trial %d, %s: %s. Best so far: %s. %s",
            trial.number,
            what,
            result,
            self._best_text(trials),
            self._time_left(counted, finished),
        )

    def _cost_text(self, attrs: Mapping[str, Any]) -> str:
        text = f"{attrs.get('gmacs', float('nan')):.4g} GMACs"
        if "latency_ms" in attrs:
            text += f", {attrs['latency_ms']:.3g} ms"
        if "params" in attrs:
            text += f", {attrs['params'] / 1e6:.4g} M params"
        return text

    def _best_text(self, trials: Sequence[optuna.trial.FrozenTrial]) -> str:
        records = _completed([_record(t) for t in trials], self.cost_key)
        if not records:
            return "none completed yet"
        if self.target is not None:
            best = max(records, key=lambda r: (r.get("reward", -math.inf), -r["number"]))
            return f"reward {best.get('reward', float('nan')):.4f} (trial {best['number']}, top-1 {best['top1']:.4f})"
        best = max(records, key=lambda r: (r["top1"], -r[self.cost_key], -r["number"]))
        unit = "GMACs" if self.cost_key == "gmacs" else "ms"
        front = pareto_front(records, self.cost_key)
        return (
            f"top-1 {best['top1']:.4f} (trial {best['number']}, {best[self.cost_key]:.4g} {unit}), "
            f"{len(front)} on the Pareto set"
        )

    def _time_left(self, counted: Sequence[optuna.trial.FrozenTrial], finished: int) -> str:
        left = self.n_trials - finished
        if left <= 0:
            return f"All {self.n_trials} architectures trained."
        if not self._durations:
            return f"{_architectures(left)} to go; time left not known yet."
        mean = sum(self._durations) / len(self._durations)
        me = _worker_id()
        others = {t.user_attrs.get("worker") for t in counted if t.state.name == "RUNNING"} - {me, None}
        workers = 1 + len(others)
        shared = f", shared by {workers} workers" if workers > 1 else ""
        return (
            f"About {_duration(left * mean / workers)} left ({_architectures(left)} at {mean:.1f} s each in this "
            f"process{shared})."
        )

    def _objective(self, trial: optuna.Trial, study: optuna.Study, datamodule: LightningDataModule) -> Any:
        optuna = import_optuna()
        record_heartbeat_now(trial)  # before anything can fail: Optuna's first heartbeat comes from a thread
        architecture = self.space.sample(trial)
        trial.set_user_attr("architecture", architecture.to_dict())
        trial.set_user_attr("worker", _worker_id())
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for previous in study.get_trials(deepcopy=False, states=done):
            if previous.params == trial.params and not {"duplicate_of", "surplus"} & set(previous.user_attrs):
                # A discrete space: samplers propose architectures again. Training the same proxy again would
                # give the same result, so the repeat is recorded (pruned, not counted) and costs nothing.
                trial.set_user_attr("duplicate_of", previous.number)
                raise optuna.TrialPruned(f"repeats trial {previous.number} (not trained again, not counted)")
        if self._counts(study, before=trial.number)[0] >= self.n_trials:
            # Another worker started the last architecture between this worker's check and this trial.
            trial.set_user_attr("surplus", True)
            study.stop()
            raise optuna.TrialPruned(f"surplus: the study already trains its {self.n_trials} architectures")

        cost = self.measure(architecture, datamodule)
        for key, value in cost.items():
            trial.set_user_attr(key, value)
        top1, fit_seconds, epochs = self._train_proxy(trial, architecture, datamodule, cost[self.cost_key])
        trial.set_user_attr("top1", top1)
        trial.set_user_attr("fit_seconds", fit_seconds)
        trial.set_user_attr("epochs", epochs)
        if self.target is not None:
            reward = self.reward(top1, cost[self.cost_key])
            trial.set_user_attr("reward", reward)
            return reward
        return top1, cost[self.cost_key]

    def _train_proxy(
        self, trial: optuna.Trial, architecture: NASArchitecture, datamodule: LightningDataModule, cost: float
    ) -> tuple[float, float, int]:
        optuna = import_optuna()
        from lightning_ensembles.module import EnsembleLightningModule

        kwargs = self.member_init_args(datamodule)
        module = EnsembleLightningModule(
            member=lambda: architecture.build(**kwargs),
            num_classes=kwargs["num_classes"],
            seed=self.proxy_seed,
            optimizer=self.optimizer,
        )
        callbacks: list[Callback] = []
        pruning: OptunaPruning | None = None
        if self.target is not None and self.pruner != "none":
            pruning = OptunaPruning(trial, "val/top1", transform=lambda top1: self.reward(top1, cost))
            callbacks.append(pruning)
        settings: dict[str, Any] = {
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **self.trainer_kwargs,
            "enable_progress_bar": False,  # one line per trial instead (`_report_trial`)
            "max_epochs": self.proxy_epochs,
            "callbacks": callbacks,
        }
        started = time.perf_counter()
        try:
            with _quiet_lightning():  # one line per trial from this module, not Lightning's banner per trial
                trainer = Trainer(**settings)
                trainer.fit(module, datamodule=datamodule)
        except (FloatingPointError, torch.cuda.OutOfMemoryError) as err:
            # Logged with the trial's line (`_report_trial`), once the study has recorded it as failed.
            kind = "diverged" if isinstance(err, FloatingPointError) else "out of memory"
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            trial.set_user_attr("fail_reason", f"{kind}: {message}")
            raise
        fit_seconds = time.perf_counter() - started
        metric = trainer.callback_metrics.get("val/top1")
        if metric is None:
            raise RuntimeError(
                "The proxy logged no `val/top1`: the datamodule needs a validation split (`val_dataloader`)."
            )
        top1 = float(metric)
        if pruning is not None and pruning.pruned_epoch is not None:
            trial.set_user_attr("top1", top1)
            trial.set_user_attr("fit_seconds", fit_seconds)
            trial.set_user_attr("epochs", pruning.pruned_epoch + 1)
            raise optuna.TrialPruned(
                f"pruned after epoch {pruning.pruned_epoch} (reward {pruning.last_value:.4f}, top-1 {top1:.4f})"
            )
        return top1, fit_seconds, trainer.current_epoch


class _DropOptunaTrialLines(logging.Filter):
    """Drops Optuna's own lines about each trial ("Trial 3 finished ...", "... pruned ...", "... failed ...")."""

    _LINE = re.compile(r"Trial \d+ (finished|pruned|failed)")

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and self._LINE.match(record.msg))


@contextlib.contextmanager
def _one_line_per_trial() -> Iterator[None]:
    """Within a search, leave the line about each trial to :meth:`NASSearch._report_trial`.

    Optuna's verbosity is raised to at least WARNING (its INFO line per trial) and its warnings about failed
    trials, which the search reports with their reason, are dropped; both are restored afterwards, so the
    user's own Optuna logging settings hold outside the search.
    """
    optuna = import_optuna()
    verbosity = optuna.logging.get_verbosity()
    # Optuna logs trials from these two modules; a filter acts on the logger a record is made on.
    loggers = [logging.getLogger(name) for name in ("optuna.study._optimize", "optuna.study.study")]
    drop = _DropOptunaTrialLines()
    try:
        optuna.logging.set_verbosity(max(verbosity, logging.WARNING))
        for logger in loggers:
            logger.addFilter(drop)
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
        optuna.logging.set_verbosity(verbosity)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _blocks(attrs: Mapping[str, Any]) -> str:
    if "architecture" not in attrs:
        return "?"
    return ", ".join(s[0] for s in NASArchitecture.from_dict(attrs["architecture"]).block_strings())


def _architectures(count: int) -> str:
    return f"{count} architecture{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``.

    Example:
        >>> [_duration(s) for s in (42.2, 210, 7560)]
        ['42 s', '3.5 min', '2.1 h']
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _counted(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count as architectures: not repeats, surplus, queued, or stale ones queued again."""
    # Optuna's retry callback keeps the numbers of the stale trials a retry stands for in its system attrs.
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [
        t
        for t in trials
        if t.state.name != "WAITING"
        and t.number not in retried
        and not {"duplicate_of", "surplus"} & set(t.user_attrs)
    ]


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _num_classes(datamodule: LightningDataModule) -> int:
    value = getattr(datamodule, "num_classes", None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(
            f"Expected the datamodule (`--data`) to have `num_classes`, an int >= 2, but got {value!r} from "
            f"{type(datamodule).__name__}."
        )
    return value


def _input_shape(datamodule: LightningDataModule) -> tuple[int, ...]:
    value = getattr(datamodule, "input_shape", None)
    if (
        not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, int) and v >= 1 for v in value)
    ):
        raise ValueError(
            f"Expected the datamodule (`--data`) to have `input_shape`, (C, H, W) of one image, but got {value!r} "
            f"from {type(datamodule).__name__}."
        )
    return tuple(value)


def _space_dict(space: NASSearchSpace) -> dict[str, Any]:
    import dataclasses

    return {
        "stages": [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
            for s in space.stages
        ],
        "stem_channels": space.stem_channels,
        "num_features": space.num_features,
    }
