"""EnsembleSizeAblation: per-size metrics, their equalities with the module's metrics, logs and resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_ensembles.callbacks.ablation import EnsembleSizeAblation, choose_subsets
from lightning_ensembles.cost import count_macs
from lightning_ensembles.metrics import EnsembleMetrics
from lightning_ensembles.module import EnsembleLightningModule
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyDataModule, TinyNet, sgd, trainer_kwargs

M = 3


TinyData = TinyDataModule  # 64 / 40 / 50 samples (seeds 0, 1, 2) in batches of 16


def _run(tmp_path: Path, epochs: int = 1, callbacks=(), ckpt_path=None, **kwargs):
    module = EnsembleLightningModule(member=TinyNet, num_members=M, num_classes=NUM_CLASSES, optimizer=sgd())
    ablation = EnsembleSizeAblation(**kwargs)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        **trainer_kwargs(
            logger=logger,
            callbacks=[ablation, *callbacks],
            num_sanity_val_steps=2,
            enable_checkpointing=bool(callbacks),
        ),
    )
    trainer.fit(module, datamodule=TinyData(), ckpt_path=ckpt_path)
    return module, ablation, trainer


def test_size_metrics_equal_the_modules_own_metrics(tmp_path: Path) -> None:
    module, ablation, trainer = _run(tmp_path)
    (results,) = trainer.test(module, datamodule=TinyData(), verbose=False)
    rows = {row["k"]: row for row in ablation.history if row["stage"] == "test"}
    assert sorted(rows) == [1, 2, 3]
    # k = M: the whole ensemble, whichever way the subsets are drawn.
    for name in ("top1", "nll", "ece"):
        assert rows[M][f"first_{name}"] == pytest.approx(results[f"test/{name}"], abs=1e-6)
        assert rows[M][f"random_{name}"] == pytest.approx(results[f"test/{name}"], abs=1e-6)
    # k = 1 over all single-member subsets: the mean of the member metrics.
    for name in ("top1", "nll"):
        mean = sum(results[f"test/member_{i}/{name}"] for i in range(M)) / M
        assert rows[1][f"random_{name}"] == pytest.approx(mean, abs=1e-6)
    # first-k rows are the module's own per-size metrics, read from it rather than computed again.
    for k in (1, 2):
        for name in ("top1", "nll", "ece", "aece", "aurc", "risk80"):
            assert rows[k][f"first_{name}"] == results[f"test/size_{k}/{name}"]
    member_gmacs = count_macs(module.members[0], (IN_FEATURES,)) / 1e9
    assert [rows[k]["first_gmacs"] for k in (1, 2, 3)] == pytest.approx([member_gmacs * k for k in (1, 2, 3)])
    assert all(rows[k]["latency_ms"] > 0 for k in (1, 2, 3))


def test_first_k_rows_exist_when_the_random_subsets_miss_them(tmp_path: Path) -> None:
    # one random subset per size: for k = 1 and 2 it is not the first-k subset with this seed, which once
    # made the rows fail with a KeyError
    picked = choose_subsets(M, 1, seed=5)
    assert picked[1] == [(2,)] and picked[2] == [(1, 2)]
    module, ablation, trainer = _run(tmp_path, num_subsets=1, seed=5, latency_batch_size=None)
    (results,) = trainer.test(module, datamodule=TinyData(), verbose=False)
    rows = {row["k"]: row for row in ablation.history if row["stage"] == "test"}
    for k in (1, 2):
        assert rows[k]["num_subsets"] == 1
        assert rows[k]["first_top1"] == pytest.approx(results[f"test/size_{k}/top1"], abs=1e-6)


def test_logs_scalars_figures_files_and_hparams(tmp_path: Path) -> None:
    module, _, trainer = _run(tmp_path)
    trainer.test(module, datamodule=TinyData(), verbose=False)
    run_dir = tmp_path / "run" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for stage in ("val", "test"):
        for k in range(1, M + 1):
            assert {
                f"ablation/{stage}/first/size_{k}/top1",
                f"ablation/{stage}/random/size_{k}/ece",
                f"ablation/{stage}/size_{k}/gmacs",
                f"ablation/{stage}/size_{k}/latency_ms",
            } <= scalars
    images = set(events.Tags()["images"])
    assert {"ablation/test/accuracy_vs_gmacs", "ablation/test/accuracy_vs_latency_ms"} <= images
    png = events.Images("ablation/test/accuracy_vs_gmacs")[-1].encoded_image_string
    assert png.startswith(b"\x89PNG")
    (tmp_path / "figure.png").write_bytes(png)

    content = events.PluginTagToContent("hparams")
    session = next(
        plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info
        for v in content.values()
        if plugin_data_pb2.HParamsPluginData.FromString(v).HasField("session_start_info")
    )
    hparams = dict(session.hparams)
    assert hparams["ensemble/architecture"].string_value == "TinyNet"
    assert hparams["ensemble/num_members"].number_value == M
    assert hparams["ensemble/ensemble_gmacs"].number_value == pytest.approx(
        M * count_macs(module.members[0], (IN_FEATURES,)) / 1e9
    )

    saved = json.loads((run_dir / "ablation_test.json").read_text())
    assert [row["k"] for row in saved] == [1, 2, 3]
    csv_lines = (run_dir / "ablation_val.csv").read_text().splitlines()
    assert csv_lines[0].startswith("stage,epoch,step,k,num_subsets,first_top1") and len(csv_lines) == 1 + M


def test_sanity_check_is_ignored_and_history_survives_resume(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, ablation, _ = _run(tmp_path, epochs=2, callbacks=[checkpoint], latency_batch_size=None)
    assert [row["epoch"] for row in ablation.history] == [0] * M + [1] * M  # no sanity-check rows

    _, resumed, _ = _run(
        tmp_path / "second",
        epochs=3,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)],
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        latency_batch_size=None,
    )
    assert [row["epoch"] for row in resumed.history] == [0] * M + [1] * M + [2] * M
    assert resumed.history[: 2 * M] == ablation.history


def test_choose_subsets_is_complete_or_sampled_and_deterministic() -> None:
    small = choose_subsets(4, 10, seed=0)
    assert [len(small[k]) for k in (1, 2, 3, 4)] == [4, 6, 4, 1]
    big = choose_subsets(8, 5, seed=1)
    assert all(len(set(big[k])) == 5 for k in (1, 2, 3, 4, 5, 6, 7)) and big[8] == [tuple(range(8))]
    assert choose_subsets(8, 5, seed=1) == big != choose_subsets(8, 5, seed=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(metrics=["top1", "f1"]),
            r"`EnsembleSizeAblation\(metrics=\.\.\.\)`.*\['top1', 'nll', 'ece', 'aece', 'aurc', 'risk80', 'ood_auroc'\].*'f1'",
        ),
        (dict(metrics=[]), r"non-empty"),
        (dict(stages=["train"]), r"`EnsembleSizeAblation\(stages=\.\.\.\)`.*'train'"),
        (dict(num_subsets=0), r"`EnsembleSizeAblation\(num_subsets=\.\.\.\)` to be an int >= 1, but got 0"),
        (
            dict(latency_batch_size=0),
            r"`EnsembleSizeAblation\(latency_batch_size=\.\.\.\)` to be an int >= 1, but got 0",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnsembleSizeAblation(**kwargs)


def test_rejects_a_module_without_members(tmp_path: Path) -> None:
    class Plain(pl.LightningModule):
        def test_step(self, batch, batch_idx):  # pragma: no cover - never reached
            return None

    trainer = pl.Trainer(**trainer_kwargs(callbacks=[EnsembleSizeAblation()]))
    with pytest.raises(
        TypeError, match="EnsembleSizeAblation needs an EnsembleLightningModule, but got Plain"
    ):
        trainer.test(Plain(), datamodule=TinyData())


@pytest.mark.timeout(120)
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    # gloo on CPU. Every rank must take part in `trainer.log_dir` (a broadcast): asking on rank 0 alone hangs.
    module = EnsembleLightningModule(member=TinyNet, num_members=M, num_classes=NUM_CLASSES)
    kwargs = trainer_kwargs(
        default_root_dir=str(tmp_path / "ddp"), callbacks=[EnsembleSizeAblation(latency_batch_size=None)]
    )
    kwargs.update(devices=2, strategy="ddp_spawn")
    (ddp_metrics,) = pl.Trainer(**kwargs).test(module, datamodule=TinyData(), verbose=False)  # 25 per rank
    gathered = json.loads((tmp_path / "ddp" / "ablation_test.json").read_text())

    single = EnsembleSizeAblation(latency_batch_size=None)
    trainer = pl.Trainer(**trainer_kwargs(default_root_dir=str(tmp_path / "one"), callbacks=[single]))
    (one_metrics,) = trainer.test(module, datamodule=TinyData(), verbose=False)
    # The module's own metrics (torchmetrics state sync) equal the single-process values too.
    expected = {f"test/{name}" for name, _ in EnsembleMetrics(M, NUM_CLASSES).items()} | {"test/loss"}
    assert set(ddp_metrics) == set(one_metrics) == expected
    for key, value in one_metrics.items():
        assert ddp_metrics[key] == pytest.approx(value, abs=1e-6), key
    for got, expected in zip(gathered, single.history, strict=True):
        for key in ("first_top1", "first_nll", "random_top1", "random_ece", "random_aurc", "first_aece"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (got["k"], key)


@pytest.mark.parametrize("callback", ["EnsembleSizeAblation", "CascadeMonitor"])
def test_evaluation_steps_must_return_logits_and_target(callback: str) -> None:
    from lightning_ensembles import callbacks

    class Silent(EnsembleLightningModule):
        def test_step(self, batch, batch_idx):
            super().test_step(batch, batch_idx)  # returns nothing to the callbacks

    module = Silent(member=TinyNet, num_members=2, num_classes=NUM_CLASSES)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[getattr(callbacks, callback)()]))
    with pytest.raises(ValueError, match=rf"{callback} needs the evaluation step to return .*NoneType"):
        trainer.test(module, datamodule=TinyData(), verbose=False)


def test_prints_its_table_after_each_evaluation_unless_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.INFO):
        module, ablation, trainer = _run(tmp_path, latency_batch_size=None)
        trainer.test(module, datamodule=TinyData(), verbose=False)
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EnsembleSizeAblation,")]
    assert [t.splitlines()[0].split(",")[1].split()[0] for t in tables] == [
        "val",
        "test",
    ]  # not the sanity check
    test_rows = [row for row in ablation.history if row["stage"] == "test"]
    lines = tables[-1].splitlines()
    assert (
        lines[1] == "| k | GMACs | top-1 (%) | NLL | ECE | aECE | AURC | risk@80% |" and len(lines) == 3 + M
    )
    first = test_rows[0]
    assert lines[3].startswith(f"| 1 | {first['random_gmacs']:.4g} | {100 * first['random_top1']:.2f} (")

    caplog.clear()
    with caplog.at_level(logging.INFO):
        module, _, trainer = _run(tmp_path / "quiet", latency_batch_size=None, verbose=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("EnsembleSizeAblation,")]


def test_latency_modes_are_columns_and_an_old_state_without_them_still_loads() -> None:
    ablation = EnsembleSizeAblation(latency_modes=("parallel", "sequential"))
    ablation.subsets = choose_subsets(2, 10, seed=0)
    ablation.latency_ms_by_mode = {"parallel": {1: 1.0, 2: 1.5}, "sequential": {1: 1.0, 2: 2.0}}
    ablation.latency_ms = dict(ablation.latency_ms_by_mode["parallel"])  # the first mode's
    restored = EnsembleSizeAblation(latency_modes=("parallel", "sequential"))
    restored.load_state_dict(ablation.state_dict())
    assert restored.latency_ms_by_mode == ablation.latency_ms_by_mode

    old = {"subsets": {"1": [[0], [1]], "2": [[0, 1]]}, "macs": [], "latency_ms": {"1": 3.0, "2": 6.0}}
    restored = EnsembleSizeAblation()
    restored.load_state_dict(old)  # a state saved before the latency modes
    assert restored.latency_ms == {1: 3.0, 2: 6.0} and restored.latency_ms_by_mode == {}
    values = {key: {} for key in ("0", "1", "0_1")}

    class Step:
        current_epoch, global_step = 0, 1

    rows = restored._rows("val", Step(), values)  # type: ignore[arg-type]
    assert [row["latency_ms"] for row in rows] == [3.0, 6.0]
    assert not any(key.startswith("latency_ms/") for row in rows for key in row)


def test_unknown_latency_modes_are_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"Expected `EnsembleSizeAblation\(latency_modes=\.\.\.\)` to be one of \['sequential', 'fused', 'parallel'\]",
    ):
        EnsembleSizeAblation(latency_modes=("vmap",))
    with pytest.raises(
        ValueError,
        match=r"Expected `EnsembleSizeAblation\(latency_modes=\.\.\.\)` to be a non-empty sequence of mode names",
    ):
        EnsembleSizeAblation(latency_modes="sequential")


def test_first_k_ensembles_are_aggregated_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module's metrics aggregate the first k members for every k; the ablation and the cascade monitor
    # reuse those, so only the ablation's other subsets are aggregated again.
    import lightning_ensembles.callbacks.ablation as ablation_module
    import lightning_ensembles.cascade as cascade_module
    import lightning_ensembles.metrics as metrics_module
    from lightning_ensembles.aggregation import cumulative_log_probs
    from lightning_ensembles.callbacks import CascadeMonitor

    calls: dict[str, list[int]] = {"metrics": [], "ablation": [], "cascade": []}

    def counting(where: str):
        def wrapped(logits, aggregation="mean_probs"):
            calls[where].append(logits.shape[0])
            return cumulative_log_probs(logits, aggregation)

        return wrapped

    module, ablation, trainer = _run(tmp_path, callbacks=[CascadeMonitor()], latency_batch_size=None)
    for where, owner in (
        ("metrics", metrics_module),
        ("ablation", ablation_module),
        ("cascade", cascade_module),
    ):
        monkeypatch.setattr(owner, "cumulative_log_probs", counting(where))
    trainer.test(module, datamodule=TinyData(), verbose=False)
    batches = 4  # 50 test samples in batches of 16
    assert calls["metrics"] == [M] * batches
    # every subset but the first-k ones (0,), (0, 1), (0, 1, 2): (1,), (2,), (0, 2), (1, 2)
    assert sorted(calls["ablation"]) == sorted([1, 1, 2, 2] * batches)
    assert calls["cascade"] == []  # equal members run in index order: the stages are the first k


def test_full_ensemble_row_carries_the_ensemble_temperature(tmp_path: Path) -> None:
    # The k = M point is the ensemble as tested: with a fitted ensemble temperature, its NLL is test/nll.
    module = EnsembleLightningModule(
        member=TinyNet,
        num_members=M,
        num_classes=NUM_CLASSES,
        optimizer=sgd(),
        temperature_scaling="ensemble",
    )
    ablation = EnsembleSizeAblation(latency_batch_size=None, stages=["test"])
    trainer = pl.Trainer(max_epochs=1, **trainer_kwargs(callbacks=[ablation], default_root_dir=tmp_path))
    trainer.fit(module, datamodule=TinyData())
    assert float(module.ensemble_temperature) != 1.0
    (results,) = trainer.test(module, datamodule=TinyData(), verbose=False)
    rows = {row["k"]: row for row in ablation.history}
    assert rows[M]["first_nll"] == rows[M]["random_nll"] == results["test/nll"]
