"""Tests for TimmModel: timm models as ensemble members (CPU, tiny models, never downloading)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm
import timm.models._builder as timm_builder
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lightning_ensembles.models import TimmModel, timm_member
from lightning_ensembles.models.timm_member import PretrainedWeightsUnavailableError, timm_pretrained_cfg
from lightning_ensembles.module import EnsembleLightningModule

TINY = "test_efficientnet"  # timm's 0.36 M-parameter EfficientNet for tests, native 160x160
FLAG = "--model.member.init_args"
TF_SIZES = {0: 224, 1: 240, 2: 260, 3: 300, 4: 380, 5: 456, 6: 528, 7: 600}  # EfficientNet paper, Table 2
TF_CROPS = {0: 0.875, 1: 0.882, 2: 0.89, 3: 0.904, 4: 0.922, 5: 0.934, 6: 0.942, 7: 0.949}


@pytest.fixture(scope="module")
def tiny() -> TimmModel:
    torch.manual_seed(0)
    return TimmModel(TINY, num_classes=3).eval()


def test_builds_and_returns_logits(tiny: TimmModel) -> None:
    assert tiny.name == TINY
    assert tiny.native_input_size == (3, 160, 160)
    assert sum(p.numel() for p in tiny.parameters()) < 500_000
    with torch.no_grad():
        assert tiny(torch.randn(2, 3, 160, 160)).shape == (2, 3)
    assert isinstance(tiny.model, timm.models.EfficientNet)


def test_efficientnet_b0_untrained_on_a_small_input() -> None:
    member = TimmModel("efficientnet_b0", input_size=(64, 64)).eval()
    assert member.native_input_size == (3, 64, 64)
    with torch.no_grad():
        assert member(torch.randn(1, 3, 64, 64)).shape == (1, 1000)  # timm's default num_classes kept


@pytest.mark.parametrize("b", range(8))
def test_native_input_size_of_tf_efficientnets_from_the_pretrained_config(b: int) -> None:
    with torch.device("meta"):  # no memory, no init compute: B7 builds in a fraction of a second
        member = TimmModel(f"tf_efficientnet_b{b}")
    assert member.native_input_size == (3, TF_SIZES[b], TF_SIZES[b])
    assert member.data_config["crop_pct"] == TF_CROPS[b]
    # The registry look-up the datamodule uses agrees with the config timm attaches to the built model.
    assert timm_pretrained_cfg(f"tf_efficientnet_b{b}") == member.model.pretrained_cfg


def test_input_size_overrides_native_size_and_data_config() -> None:
    member = TimmModel(TINY, num_classes=3, input_size=[3, 96, 64])
    assert member.native_input_size == (3, 96, 64)
    config = member.data_config
    assert config["input_size"] == (3, 96, 64)
    assert config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    assert config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN


def test_resizes_to_native_size_and_only_when_needed(
    tiny: TimmModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    interpolate = F.interpolate

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return interpolate(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(timm_member.F, "interpolate", spy)
    x = torch.rand(2, 3, 200, 180)
    resized = interpolate(x, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        out = tiny(x)
        assert calls == [(2, 3, 200, 180)]
        assert_close(out, tiny.model(resized))
        assert_close(tiny(resized), out)  # already native: passed through untouched
    assert calls == [(2, 3, 200, 180)]


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("efficientnet_b9", "'efficientnet_b8'"), ("efficentnet_b0", "'efficientnet_b0'")],
)
def test_unknown_model_name_suggests_close_names(name: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="Did you mean") as info:
        TimmModel(name)
    message = str(info.value)
    assert f"`{FLAG}.model_name`" in message and repr(name) in message and suggestion in message


def test_unknown_weights_tag_lists_the_tags() -> None:
    with pytest.raises(
        ValueError, match=r"`--model.member.init_args.model_name`.*'ra_in1k'.*'efficientnet_b0.nope'"
    ):
        TimmModel("efficientnet_b0.nope")


def test_pretrained_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network in this test")

    # Every way timm fetches weights; nothing reaches the network.
    for name in (
        "load_state_dict_from_hf",
        "load_state_dict_from_url",
        "download_cached_file",
        "load_custom_from_hf",
    ):
        monkeypatch.setattr(timm_builder, name, offline)
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        TimmModel(TINY, pretrained=True)
    message = str(info.value)
    assert "could not be downloaded" in message and "no network in this test" in message
    assert f"`{FLAG}.checkpoint_path`" in message and repr(TINY) in message


def test_pretrained_without_weights_in_timm_is_refused_before_building() -> None:
    with pytest.raises(ValueError, match=r"'efficientnet_b7' has none.*tf_efficientnet_b7\.\w+"):
        TimmModel("efficientnet_b7", pretrained=True)  # timm's efficientnet_b7 is 'untrained'


def _save(state: object, path: Path) -> str:
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "member"])
def test_checkpoint_path_round_trip(tiny: TimmModel, tmp_path: Path, wrap: str) -> None:
    weights = tiny.model.state_dict()
    state = {
        "plain": weights,
        "state_dict": {"state_dict": weights, "epoch": 3},
        "model": {"model": weights},
        "member": tiny.state_dict(),  # keys with the `model.` prefix are accepted too
    }[wrap]
    torch.manual_seed(123)  # a different initialisation, overwritten by the file
    loaded = TimmModel(TINY, num_classes=3, checkpoint_path=_save(state, tmp_path / "w.pth")).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert_close(loaded(x), tiny(x), rtol=0, atol=0)


def test_checkpoint_path_with_pretrained_adapts_the_classifier(tiny: TimmModel, tmp_path: Path) -> None:
    path = _save(tiny.model.state_dict(), tmp_path / "w.pth")
    member = TimmModel(TINY, pretrained=True, checkpoint_path=path, num_classes=5)
    assert_close(member.model.conv_stem.weight, tiny.model.conv_stem.weight)
    assert member.model.get_classifier().out_features == 5


def test_checkpoint_path_errors_name_the_flag_and_path(tiny: TimmModel, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=rf"`{FLAG}.checkpoint_path`.*nope\.pth"):
        TimmModel(TINY, checkpoint_path=str(missing))
    path = _save(tiny.model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"checkpoint_path`.*w\.pth.*shape \(2\).*classifier") as info:
        TimmModel(TINY, checkpoint_path=path, num_classes=4)
    assert "pretrained` true" in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint_path`.*garbage\.pth"):
        TimmModel(TINY, checkpoint_path=str(garbage))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
        ({"pretrained": "yes"}, "pretrained"),
        ({"input_size": (1, 64, 64)}, "input_size"),
        ({"input_size": (0, 64)}, "input_size"),
        ({"model_name": ""}, "model_name"),
    ],
)
def test_bad_arguments_name_their_flag(kwargs: dict[str, object], flag: str) -> None:
    kwargs = {"model_name": TINY, **kwargs}
    with pytest.raises(ValueError, match=rf"`{FLAG}\.{flag}`") as info:
        TimmModel(**kwargs)  # type: ignore[arg-type]
    assert repr(kwargs[flag]) in str(info.value)


def test_only_given_options_reach_timm() -> None:
    default = TimmModel(TINY)
    assert default.model.drop_rate == timm.create_model(TINY).drop_rate
    assert default.model.num_classes == 1000
    custom = TimmModel(TINY, drop_rate=0.3, num_classes=7)
    assert custom.model.drop_rate == 0.3 and custom.model.num_classes == 7


def test_members_of_an_ensemble() -> None:
    factory = functools.partial(TimmModel, model_name=TINY, num_classes=3, input_size=(3, 64, 64))
    module = EnsembleLightningModule(member=factory, num_members=2, num_classes=3)
    first, second = module.members
    assert isinstance(first, TimmModel) and first.name == TINY
    assert not torch.equal(first.model.conv_stem.weight, second.model.conv_stem.weight)  # seeds 0 and 1
    assert all(k.startswith("members.0.model.") for k in module.state_dict() if k.startswith("members.0."))
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(4, 3, 96, 96)).shape == (2, 4, 3)  # (M, B, C), resized to 64 inside
    assert module.summary()["architecture"] == TINY


def test_a_committee_of_different_native_resolutions_shares_one_input() -> None:
    members = [
        TimmModel(TINY, num_classes=3, input_size=(3, 48, 48)),
        TimmModel(TINY, num_classes=3, input_size=(3, 64, 64)),
    ]
    module = EnsembleLightningModule(members=members, num_classes=3).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        assert module(torch.randn(2, 3, 64, 64)).shape == (2, 2, 3)
