"""Export: one file with every member and the aggregation, equal to ``predict_step`` at any batch size."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import lightning_ensembles.export as export_module
from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.export import ExportableEnsemble, ExportResult, export_ensemble, main
from lightning_ensembles.models import WideResNet
from lightning_ensembles.uncertainty import uncertainty_scores
from tests.helpers import IN_FEATURES, NUM_CLASSES, TinyConvNet, TinyNet, trainer_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (1, 8, 8)
WRN = functools.partial(WideResNet, 10, 1, in_channels=1)


class ImageMLP(nn.Module):
    """A second architecture on 8x8 grey images, for mixed ensembles."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.GELU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it with a dynamic batch."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.linear = nn.Linear(IN_FEATURES, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def _with_statistics(module: EnsembleLightningModule, shape: tuple[int, ...]) -> EnsembleLightningModule:
    """Move BatchNorm running statistics away from (0, 1), then eval mode: eval must use them."""
    generator = torch.Generator().manual_seed(1)
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(2.0 * torch.randn(16, *shape, generator=generator) + 0.5)
    return module.eval()


def _temperatures(module: EnsembleLightningModule) -> None:
    """Fitted-looking temperatures, set directly: different for every member, and one for the ensemble."""
    module.member_temperature.copy_(torch.linspace(0.5, 2.5, len(module.members)))
    module.ensemble_temperature.fill_(1.7)


def image_ensemble(aggregation: str = "mean_probs", **kwargs) -> EnsembleLightningModule:
    """Mixed architectures: a WRN-10-1 and an MLP, on 1x8x8 images, with temperatures."""
    module = EnsembleLightningModule(
        members=[WRN, ImageMLP], num_classes=NUM_CLASSES, aggregation=aggregation, seed=3, **kwargs
    )
    module = _with_statistics(module, IMAGE)
    _temperatures(module)
    return module


def mlp_ensemble(aggregation: str = "mean_probs", **kwargs) -> EnsembleLightningModule:
    module = EnsembleLightningModule(
        members=[TinyNet, TinyConvNet, TinyNet], num_classes=NUM_CLASSES, aggregation=aggregation, **kwargs
    )
    module = _with_statistics(module, (IN_FEATURES,))
    _temperatures(module)
    return module


def _inputs(shape: tuple[int, ...], *sizes: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(size, *shape, generator=generator) for size in sizes]


def _predict(module: EnsembleLightningModule, x: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return module.predict_step(x, 0)


def _load_file(path: Path, fmt: str) -> Callable[[Tensor], list[Tensor]]:
    """A written file, loaded on its own (no help from the library): torch.export.load or onnxruntime."""
    if fmt == "pt2":
        program = torch.export.load(path).module()

        def run(x: Tensor) -> list[Tensor]:
            out = program(x)
            return list(out) if isinstance(out, (tuple, list)) else [out]

        return run
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: [torch.from_numpy(o) for o in session.run(None, {"x": x.numpy()})]


# ---------------------------------------------------------------------------------------------- the wrapper


@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits", "vote"])
def test_wrapper_equals_predict_step(aggregation: str) -> None:
    module = mlp_ensemble(aggregation, predict_members=True)
    wrapper = ExportableEnsemble(module, member_probs=True)
    for x in _inputs((IN_FEATURES,), 1, 9):
        expected = _predict(module, x)
        probs, member_probs = wrapper(x)
        assert_close(probs, expected["probs"], atol=1e-6, rtol=0)
        assert_close(member_probs, expected["member_probs"], atol=1e-6, rtol=0)
    # The temperatures are applied: without them the prediction differs.
    plain = ExportableEnsemble(module)
    plain.member_temperature.fill_(1.0)
    plain.ensemble_temperature.fill_(1.0)
    x = _inputs((IN_FEATURES,), 9)[0]
    if aggregation != "vote":  # votes ignore member temperatures, but not the ensemble's
        assert (plain(x) - wrapper(x)[0]).abs().max() > 1e-3


def test_wrapper_is_an_eval_mode_snapshot_and_leaves_the_module_alone() -> None:
    module = mlp_ensemble()
    module.train()
    wrapper = ExportableEnsemble(module)
    assert not any(m.training for m in wrapper.modules())
    wrapper.train()  # stays in eval mode
    assert not any(m.training for m in wrapper.modules())
    assert module.training and all(m.training for m in module.members)
    assert not any(p.requires_grad for p in wrapper.parameters())
    x = _inputs((IN_FEATURES,), 5)[0]
    before = wrapper(x)
    assert_close(before, _predict(module.eval(), x)["probs"], atol=1e-6, rtol=0)  # BatchNorm's running stats
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # training the module later does not change the snapshot
    assert_close(wrapper(x), before)


def test_wrapper_rejects_what_is_not_an_ensemble() -> None:
    with pytest.raises(
        TypeError,
        match=r"ExportableEnsemble\(module=\.\.\.\) needs an EnsembleLightningModule, but got Linear",
    ):
        ExportableEnsemble(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `member_probs` to be a bool, but got 'yes'"):
        ExportableEnsemble(mlp_ensemble(), member_probs="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("aggregation", ["mean_probs", "mean_logits", "vote"])
def test_exported_file_equals_predict_step_at_any_batch_size(
    fmt: str, aggregation: str, tmp_path: Path
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    module = image_ensemble(aggregation)
    path = tmp_path / f"ensemble.{fmt}"
    result = export_ensemble(module, path, input_shape=IMAGE, format=fmt)
    assert result.path == path and result.format == fmt
    assert result.size_bytes == path.stat().st_size > 0
    assert result.max_abs_diff is not None and 0.0 <= result.max_abs_diff <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # one file, no temporary left
    run = _load_file(path, fmt)
    for x in _inputs(IMAGE, 1, 7, 3):  # the traced batch size is 2: these all run on the dynamic axis
        (probs,) = run(x)
        assert probs.shape == (x.shape[0], NUM_CLASSES)
        assert_close(probs, _predict(module, x)["probs"], atol=1e-5, rtol=0)


def test_onnx_member_probs_and_a_named_dynamic_batch_axis(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    module = mlp_ensemble("mean_logits", predict_members=True)
    path = tmp_path / "ensemble.onnx"
    result = export_ensemble(module, path, input_shape=(IN_FEATURES,), format="onnx", member_probs=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    graph = onnx.load(str(path)).graph
    assert [v.name for v in graph.input] == ["x"]
    assert [v.name for v in graph.output] == ["probs", "member_probs"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_param or d.dim_value for d in graph.output[1].type.tensor_type.shape.dim] == [
        3,
        "batch",
        NUM_CLASSES,
    ]
    run = _load_file(path, "onnx")
    for x in _inputs((IN_FEATURES,), 1, 7):
        probs, member_probs = run(x)
        expected = _predict(module, x)
        assert_close(probs, expected["probs"], atol=1e-5, rtol=0)
        assert_close(member_probs, expected["member_probs"], atol=1e-5, rtol=0)
        # The uncertainty scores predict_step returns, from the file's two outputs (softmax of log p is p).
        scores = uncertainty_scores(member_probs.log(), log_probs=probs.log())
        for name in ("msp", "entropy", "mutual_information", "variation_ratio"):
            assert_close(scores[name], expected[name], atol=1e-5, rtol=0)


def test_compiled_members_export_as_plain_members(tmp_path: Path) -> None:
    module = EnsembleLightningModule(
        member=TinyNet, num_members=2, num_classes=NUM_CLASSES, compile=True, compile_backend="eager"
    )
    module.eval()
    wrapped = EnsembleLightningModule(
        members=[torch.compile(TinyNet(), backend="eager")], num_classes=NUM_CLASSES
    )
    for ensemble in (module, wrapped.eval()):
        result = export_ensemble(ensemble, tmp_path / "compiled.pt2", input_shape=(IN_FEATURES,))
        assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
        x = _inputs((IN_FEATURES,), 7)[0]
        (probs,) = _load_file(result.path, "pt2")(x)
        assert_close(probs, _predict(ensemble, x)["probs"], atol=1e-5, rtol=0)
        names = list(torch.export.load(result.path).state_dict)
        assert "members.0.head.weight" in names and not any("_orig_mod" in name for name in names)


def test_vmap_and_channels_last_ensembles_export_as_a_loop(tmp_path: Path) -> None:
    module = EnsembleLightningModule(
        member=WRN, num_members=2, num_classes=NUM_CLASSES, execution="vmap", channels_last=True
    )
    module = _with_statistics(module, IMAGE)
    result = export_ensemble(module, tmp_path / "vmap.pt2", input_shape=IMAGE)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    run = _load_file(result.path, "pt2")
    for x in _inputs(IMAGE, 1, 7):
        (probs,) = run(x)
        assert_close(probs, _predict(module, x)["probs"], atol=1e-5, rtol=0)  # eager runs them with vmap


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_untraceable_member_is_named_and_nothing_is_written(fmt: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    module = EnsembleLightningModule(members=[TinyNet, DataDependent], num_classes=NUM_CLASSES).eval()
    path = tmp_path / f"ensemble.{fmt}"
    path.write_bytes(b"the previous export")
    with pytest.raises(ValueError) as err:
        export_ensemble(module, path, input_shape=(IN_FEATURES,), format=fmt)
    message = str(err.value)
    assert f"Cannot export `module` as {fmt!r}: member 1 (DataDependent) cannot be traced" in message
    assert "data-dependent" in message  # the tracer's own first line
    line = DataDependent.forward.__code__.co_firstlineno + 1
    assert f"test_export.py:{line}: `if x.sum() > 0:`" in message  # and the line it stopped at
    assert "Allowed are members whose forward torch.export can trace" in message
    assert path.read_bytes() == b"the previous export"  # atomic: the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # and no temporary is left


def test_missing_onnx_packages_are_named_and_the_random_state_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = mlp_ensemble()
    state = torch.get_rng_state()
    export_ensemble(module, tmp_path / "ensemble.pt2", input_shape=(IN_FEATURES,))
    assert torch.equal(torch.get_rng_state(), state)  # exporting draws no number from the global generator
    real = export_module.importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else real(name, *a),
    )
    with pytest.raises(
        ModuleNotFoundError, match=r"onnxscript is needed to write ONNX: pip install .*\[export\]"
    ):
        export_ensemble(module, tmp_path / "ensemble.onnx", input_shape=(IN_FEATURES,), format="onnx")
    assert not (tmp_path / "ensemble.onnx").exists()


@torch.library.custom_op("lightning_ensembles_tests::twice", mutates_args=())
def _twice(x: Tensor) -> Tensor:
    return 2.0 * x


@_twice.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class CustomOp(nn.Module):
    """A member that torch.export traces (its operator has a fake) but torch.onnx cannot translate."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.linear = nn.Linear(IN_FEATURES, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_twice(x))


def test_a_member_onnx_cannot_translate_is_named(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    module = EnsembleLightningModule(members=[TinyNet, CustomOp], num_classes=NUM_CLASSES).eval()
    with pytest.raises(ValueError) as err:
        export_ensemble(module, tmp_path / "ensemble.onnx", input_shape=(IN_FEATURES,), format="onnx")
    message = str(err.value)
    assert message.startswith(
        "Cannot export `module` as 'onnx': member 1 (CustomOp) traces with torch.export but does not translate"
    )
    assert (
        "lightning_ensembles_tests.twice" in message and "\x1b" not in message
    )  # the root cause, no colours
    assert list(tmp_path.iterdir()) == []
    result = export_ensemble(module, tmp_path / "ensemble.pt2", input_shape=(IN_FEATURES,))  # pt2 holds it
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5


def test_a_failed_check_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "_verify", lambda *args: 0.25)  # as if the file were wrong
    path = tmp_path / "out" / "ensemble.pt2"
    with pytest.raises(ValueError, match=r"differ by up to 0\.25 .*nothing was written"):
        export_ensemble(mlp_ensemble(), path, input_shape=(IN_FEATURES,))
    assert not path.exists()
    unverified = export_ensemble(mlp_ensemble(), path, input_shape=(IN_FEATURES,), verify=False)
    assert unverified.max_abs_diff is None and path.is_file()


def test_bad_arguments_name_the_argument_and_the_value(tmp_path: Path) -> None:
    module = mlp_ensemble()
    path = tmp_path / "ensemble.pt2"
    cases = [
        (dict(format="tflite"), r"Expected `--format` to be one of \['pt2', 'onnx'\], but got 'tflite'"),
        (dict(input_shape=()), r"Expected `--input_shape` to be one sample's shape .* but got \(\)"),
        (dict(input_shape=(12, 0)), r"`--input_shape` .* ints >= 1 .* but got \(12, 0\)"),
        (
            dict(input_shape=(1, 8, 8)),
            r"`--input_shape` \[1, 8, 8\] .* member 0 \(TinyNet\) fails on a batch",
        ),
        (dict(tolerance=-1.0), r"Expected `--tolerance` to be a number >= 0, but got -1\.0"),
        (dict(verify="no"), r"Expected `verify` to be a bool, but got 'no'"),
    ]
    for overrides, match in cases:
        kwargs = dict(input_shape=(IN_FEATURES,)) | overrides
        with pytest.raises(ValueError, match=match):
            export_ensemble(module, path, **kwargs)  # type: ignore[arg-type]
    wrong_classes = EnsembleLightningModule(
        members=[TinyNet, functools.partial(nn.Linear, IN_FEATURES, 3)], num_classes=NUM_CLASSES
    )
    with pytest.raises(ValueError, match=r"member 1 \(Linear\) gave \(2, 3\)"):
        export_ensemble(wrong_classes, path, input_shape=(IN_FEATURES,))
    assert not path.exists()


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def fitted_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of two WRN-10-1 members on 8x8 images, written by Trainer.fit (two steps)."""
    root = tmp_path_factory.mktemp("fit")
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, *IMAGE, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    )
    module = EnsembleLightningModule(
        member=WRN, num_members=2, num_classes=10, temperature_scaling="ensemble"
    )
    trainer = pl.Trainer(max_steps=2, **trainer_kwargs(limit_val_batches=1))
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    assert float(module.ensemble_temperature) != 1.0  # fitted on the validation batch
    path = root / "ensemble.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_cli_round_trip_from_a_fitted_checkpoint(
    fmt: str, fitted_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"deployed.{fmt}"
    result = main(
        [str(fitted_checkpoint), "--format", fmt, "--out", str(out), "--input_shape", "1", "8", "8"]
    )
    assert result.path == out and out.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} ({fmt}, ") and "max |file - eager|" in printed
    loaded = EnsembleLightningModule.load_from_checkpoint(fitted_checkpoint, map_location="cpu").eval()
    run = _load_file(out, fmt)
    for x in _inputs(IMAGE, 1, 7):
        (probs,) = run(x)
        assert_close(probs, _predict(loaded, x)["probs"], atol=1e-5, rtol=0)


def test_cli_takes_the_input_shape_the_checkpoint_recorded(
    fitted_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No --input_shape: the shape the module saw in training (kept in the checkpoint) is used."""
    saved = torch.load(fitted_checkpoint, map_location="cpu", weights_only=True)
    assert saved["lightning_ensembles_input_shape"] == list(IMAGE)
    result = main([str(fitted_checkpoint), "--out", str(tmp_path / "auto.pt2")])
    assert result.path.is_file() and result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    assert EnsembleLightningModule.load_from_checkpoint(fitted_checkpoint).input_shape == IMAGE

    # A checkpoint written before the shape was kept: the flag is asked for by name.
    del saved["lightning_ensembles_input_shape"]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    with pytest.raises(SystemExit) as exit_info:
        main([str(old), "--out", str(tmp_path / "old.pt2")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Expected `--input_shape`" in err and "records none" in err
    assert main([str(old), "--out", str(tmp_path / "old.pt2"), "--input_shape", "1", "8", "8"]).path.is_file()


def test_cli_default_out_is_the_checkpoint_with_the_formats_suffix(fitted_checkpoint: Path) -> None:
    result = main([str(fitted_checkpoint), "--input_shape", "1", "8", "8", "--no-verify"])
    try:
        assert result.path == fitted_checkpoint.with_suffix(".pt2") and result.max_abs_diff is None
    finally:
        result.path.unlink()


def test_cli_errors_are_one_line_and_exit_2(
    fitted_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    program = "python -m lightning_ensembles.export"
    cases = [
        (["--format", "tflite"], "`--format` to be one of ['pt2', 'onnx'], but got 'tflite'"),
        (["--input_shape", "1", "0", "8"], "`--input_shape` to be one sample's shape"),
        (["--input_shape", "3", "32", "32"], "`--input_shape` [3, 32, 32] to be one sample's shape"),
    ]
    for flags, expected in cases:
        args = [
            str(fitted_checkpoint),
            "--out",
            str(tmp_path / "x.pt2"),
            "--input_shape",
            "1",
            "8",
            "8",
            *flags,
        ]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{program}: error: ") and expected in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.ckpt"), "--input_shape", "1", "8", "8"])
    assert exit_info.value.code == 2 and "missing.ckpt' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.pt2").exists()


def test_bad_flags_are_reported_as_jsonargparse_does(
    fitted_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = [
        (["--input_shape", "1", "eight"], 'Parser key "input_shape"', "eight"),
        (["--input_shape", "1", "8", "8", "--bogus", "1"], "unrecognized arguments: --bogus", ""),
        (["--input_shape", "1", "8", "8", "--tolerance", "small"], 'Parser key "tolerance"', "small"),
        ([], "the following arguments are required: checkpoint", ""),  # --input_shape has a default now
    ]
    for flags, expected, value in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(fitted_checkpoint), *flags] if flags else [])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m lightning_ensembles.export ")
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert expected in line and value in err, err


def test_cli_takes_a_config_file_and_both_forms_of_the_booleans(
    fitted_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []

    def fake_export(module: object, out: object, **kwargs: object) -> ExportResult:
        calls.append({"out": out, **kwargs})
        return ExportResult(Path(str(out)), str(kwargs["format"]), 0, None)

    monkeypatch.setattr(export_module, "export_ensemble", fake_export)
    config = tmp_path / "export.yaml"
    config.write_text(
        f"checkpoint: {fitted_checkpoint}\ninput_shape: [1, 8, 8]\nformat: onnx\nverify: false\n"
    )
    main(["--config", str(config)])
    main([str(fitted_checkpoint), "--input_shape", "1", "8", "8", "--member_probs", "--no-verify"])
    main(
        [
            str(fitted_checkpoint),
            "--input_shape",
            "1",
            "8",
            "8",
            "--member_probs",
            "false",
            "--verify",
            "false",
        ]
    )
    main([str(fitted_checkpoint), "--input_shape", "1", "8", "8", "--tolerance", "0.1"])
    got = [(c["input_shape"], c["format"], c["member_probs"], c["verify"], c["tolerance"]) for c in calls]
    assert got == [
        ([1, 8, 8], "onnx", False, False, 1e-5),
        ([1, 8, 8], "pt2", True, False, 1e-5),
        ([1, 8, 8], "pt2", False, False, 1e-5),
        ([1, 8, 8], "pt2", False, True, 0.1),
    ]
    assert calls[0]["out"] == fitted_checkpoint.with_suffix(".onnx")


def test_help_names_and_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for flag, doc in (
        ("CKPT", "The checkpoint"),
        ("--config CONFIG", "A YAML file of these flags"),
        ("--input_shape N [N ...]", "One sample's shape without the batch axis"),
        ("--format {pt2,onnx}", "pt2 (torch.export) or onnx"),
        ("--out OUT", "The file to write"),
        ("--member_probs", "each member's probabilities"),
        ("--no-verify", "Compare the written file with the eager ensemble"),
        ("--tolerance TOLERANCE", "The largest absolute difference"),
    ):
        assert f"{flag} " in shown and doc in shown, flag


def test_python_dash_m_reports_a_bad_format_in_one_line() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}  # no runpy double-import warning
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_ensembles.export",
            "x.ckpt",
            "--format",
            "tflite",
            "--input_shape",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "python -m lightning_ensembles.export: error: Expected `--format` to be one of ['pt2', 'onnx'], but got "
        "'tflite'."
    ]
