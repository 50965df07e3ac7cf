"""The NASNet member: architectures of the search space decode into real timm EfficientNets, build, run and are
costed. The space's own checks are tested in tests/nas/test_space.py."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from timm.models.efficientnet import EfficientNet
from torch import nn

from lightning_ensembles import EnsembleLightningModule
from lightning_ensembles.cost import count_macs
from lightning_ensembles.models import NASArchitecture, NASNet, StageArch
from lightning_ensembles.nas.space import NASSearchSpace, StageSpace
from tests.helpers import trainer_kwargs
from tests.nas.common import THREE_STAGES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPACE = THREE_STAGES


def _check_decoded(net: NASNet, arch: NASArchitecture) -> None:
    """The timm network really has the sampled stages: blocks, channels, kernels, expansion, SE, stride."""
    model = net.model
    assert isinstance(model, EfficientNet)
    assert len(model.blocks) == len(arch.stages)
    in_channels = arch.stem_channels
    for stage, blocks in zip(arch.stages, model.blocks):
        assert len(blocks) == stage.num_blocks
        for j, block in enumerate(blocks):
            assert block.conv_dw.kernel_size == (stage.kernel_size, stage.kernel_size)
            assert block.conv_dw.stride == ((stage.stride,) * 2 if j == 0 else (1, 1))
            assert block.conv_pwl.out_channels == stage.channels if stage.expand_ratio > 1 else True
            if stage.expand_ratio == 1:
                assert not hasattr(block, "conv_pwl") and block.conv_pw.out_channels == stage.channels
            else:
                assert block.conv_pw.out_channels == in_channels * stage.expand_ratio
            assert isinstance(block.se, nn.Identity) != stage.se
            in_channels = stage.channels
    assert model.conv_head.out_channels == arch.num_features


def test_every_sampled_architecture_builds_runs_and_is_costed() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    smallest = count_macs(SPACE.smallest().build(in_channels=1), (1, 8, 8))
    largest = count_macs(SPACE.largest().build(in_channels=1), (1, 8, 8))
    seen, costs = set(), []
    for _ in range(40):
        trial = study.ask()
        arch = SPACE.sample(trial)
        assert SPACE.params_of(arch) == trial.params
        net = arch.build(num_classes=7, in_channels=1)
        _check_decoded(net, arch)
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 7)
        macs = count_macs(net, (1, 8, 8))
        assert smallest <= macs <= largest
        costs.append(macs)
        seen.add(arch.digest)
        study.tell(trial, 0.0)
    assert len(seen) >= 36 and len(set(costs)) >= 30  # the space is really explored, and cost follows it
    assert smallest < largest


def test_macs_match_a_hand_count() -> None:
    # stem 3x3/2 1->8 on 8x8 -> 4x4; ds block: depthwise 3x3 on 8 channels + pointwise 8->8; head 1x1 8->32;
    # classifier 32->10. Multiply-adds: 16*8*9 + 16*8*9 + 16*8*8 + 16*8*32 + 32*10.
    net = NASNet([StageArch(8, 1, 3, 1, False)], stem_channels=8, num_features=32, in_channels=1)
    assert count_macs(net, (1, 8, 8)) == 1152 + 1152 + 1024 + 4096 + 320
    # Squeeze-excite adds its two 1x1 convolutions on the pooled vector (8 -> 2 -> 8).
    se = NASNet([StageArch(8, 1, 3, 1, True)], stem_channels=8, num_features=32, in_channels=1)
    assert count_macs(se, (1, 8, 8)) == 7744 + 8 * 2 + 2 * 8


def test_input_size_resizes_and_costs_the_larger_image() -> None:
    arch = SPACE.smallest()
    small, resized = arch.build(in_channels=1), arch.build(in_channels=1, input_size=(16, 16))
    assert resized(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert count_macs(resized, (1, 8, 8)) == count_macs(small, (1, 16, 16)) > count_macs(small, (1, 8, 8))


def test_fixed_trial_and_dict_and_yaml_round_trips() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    arch = SPACE.sample(study.ask())
    assert SPACE.sample(optuna.trial.FixedTrial(SPACE.params_of(arch))) == arch
    assert NASArchitecture.from_dict(yaml.safe_load(yaml.safe_dump(arch.to_dict()))) == arch
    net = NASNet(**arch.to_dict(), in_channels=1)
    assert net.architecture == arch and net.name == f"NAS-{arch.digest}"
    assert NASNet(**arch.to_dict(), name="searched").name == "searched"
    assert SPACE.smallest().stages[2].se is True  # a one-choice field stays fixed
    with pytest.raises(
        ValueError, match=r"stage 1 `channels` to be one of the space's choices \[16, 24\].*32"
    ):
        SPACE.params_of(
            NASArchitecture((arch.stages[0], StageArch(32, 1, 3, 3, False, 2), arch.stages[2]), 8, 64)
        )


def test_member_trains_inside_the_ensemble_module() -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    factory = functools.partial(SPACE.smallest().build, num_classes=3, in_channels=1)
    module = EnsembleLightningModule(member=factory, num_members=2, num_classes=3)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    before = [p.detach().clone() for p in module.parameters()]
    Trainer(**trainer_kwargs(max_steps=2)).fit(module, DataLoader(data, batch_size=8))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    first, second = module.members  # independently initialised (seeds 0 and 1)
    assert not torch.equal(first.model.conv_stem.weight, second.model.conv_stem.weight)


def test_invalid_architectures_and_members_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"`StageArch.kernel_size` to be an odd int"):
        StageArch(8, 1, 2, 1, False)
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        NASArchitecture.from_dict({"stages": [], "depth": 3})
    flag = r"`--model.member.init_args"
    with pytest.raises(ValueError, match=flag + r".stages\[1\].channels` to be an int >= 1, but got 0"):
        NASNet(
            [
                StageArch(8, 1, 3, 1, False),
                {"channels": 0, "num_blocks": 1, "kernel_size": 3, "expand_ratio": 1, "se": False},
            ]
        )
    with pytest.raises(ValueError, match=flag + r".stages\[0\]` to have the keys .* it lacks \['se'\]"):
        NASNet([{"channels": 8, "num_blocks": 1, "kernel_size": 3, "expand_ratio": 1}])
    with pytest.raises(ValueError, match=flag + r".stages` to be a non-empty list"):
        NASNet([])
    with pytest.raises(ValueError, match=flag + r".input_size` to be \(H, W\)"):
        NASNet([StageArch(8, 1, 3, 1, False)], input_size=(1, 16, 16))
    with pytest.raises(ValueError, match=flag + r".activation` to be a timm activation name"):
        NASNet([StageArch(8, 1, 3, 1, False)], activation="no-such-activation")


def test_checkpoint_written_before_the_nas_package_split_still_loads() -> None:
    # tests/fixtures/nasnet_v0.pt was written by the code before `lightning_ensembles/nas.py` became the
    # `lightning_ensembles.nas` package (issue 16): a one-step fit of two 3-class NASNet members on 1x8x8
    # inputs, one recorded as `lightning_ensembles.models.nas.NASNet` (a functools.partial) and one as
    # `lightning_ensembles.models.NASNet` (a YAML `class_path`), saved with `trainer.save_checkpoint`. Beside
    # Lightning's keys it holds `fixture_expected`: fixed inputs and the logits the module gave for them.
    path = Path(__file__).resolve().parents[1] / "fixtures" / "nasnet_v0.pt"
    module = EnsembleLightningModule.load_from_checkpoint(path, map_location="cpu")
    expected = torch.load(path, map_location="cpu", weights_only=True)["fixture_expected"]
    assert [member.name for member in module.members] == ["partial", "yaml"]
    assert all(isinstance(member, NASNet) for member in module.members)
    module.eval()
    with torch.no_grad():
        logits = module(expected["inputs"])
    torch.testing.assert_close(logits, expected["logits"])


def test_old_import_paths_still_work() -> None:
    # Before issue 16 the space lived in `lightning_ensembles.models.nas`, exported from `lightning_ensembles.models`,
    # and the pruning callback in `lightning_ensembles.nas`.
    import lightning_ensembles.models as models
    import lightning_ensembles.nas as nas
    from lightning_ensembles.callbacks import OptunaPruning

    assert (models.NASSearchSpace, models.StageSpace) == (NASSearchSpace, StageSpace)
    assert {"NASSearchSpace", "StageSpace"} <= set(models.__all__)
    assert nas.OptunaPruning is OptunaPruning
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        models.NoSuchName  # noqa: B018


def test_models_do_not_import_the_search() -> None:
    # Layering: the search builds on the members, never the other way round (the space is looked up lazily).
    code = (
        "import sys, lightning_ensembles.models; print(sorted(m for m in sys.modules if '.nas.' in m + '.'))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['lightning_ensembles.models.nas']"
