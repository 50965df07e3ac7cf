"""Ensemble members that are timm models, e.g. the EfficientNets of the ImageNet experiment.

Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large Models*
(arXiv 2005.00570), compare ensembles of small EfficientNets (Tan & Le, *EfficientNet: Rethinking Model
Scaling for Convolutional Neural Networks*, ICML 2019, arXiv 1905.11946) with single larger ones on
ImageNet (their figure 2): two B5s cost 19.8 B multiply-adds against B7's 37 B. The follow-up *Wisdom of
Committees* (Wang, Kondratyuk et al., ICLR 2022, arXiv 2012.01988) builds committees and cascades of
pretrained EfficientNets. :class:`TimmModel` makes any model of the timm registry (Ross Wightman,
``pytorch-image-models``) an ensemble member: it returns logits ``(B, C)`` as
:class:`~lightning_ensembles.module.EnsembleLightningModule` expects, and is configured from LightningCLI as

.. code-block:: yaml

    model:
      member:
        class_path: lightning_ensembles.models.TimmModel
        init_args: {model_name: efficientnet_b0}

Every EfficientNet has its own native resolution (B0 224 ... B7 600, read from timm's pretrained config).
A member resizes its input to its native resolution, so a committee of different EfficientNets shares one
input stream; the datamodule should feed the largest resolution of the committee, and every smaller member
downsamples it (bilinear with antialiasing). :func:`resolution_of` names that resolution in the datamodule's
terms; :class:`~lightning_ensembles.cli.EnsembleCLI` links it into ``--data.model_name``.

Weights: ``pretrained=True`` downloads timm's weights, which needs the internet; offline, ``checkpoint_path``
loads them from a local file in timm's format (keys without any prefix, e.g. ``conv_stem.weight``: what
``timm_model.state_dict()`` gives, or a dict holding it under ``'state_dict'`` or ``'model'``). The member's
own ``state_dict`` keys carry a ``model.`` prefix; its ``.model`` attribute is the plain timm model, for
export or for saving timm-format weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import timm
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ensembles._timm import timm_pretrained_cfg
from lightning_ensembles._validation import check_bool, expected, is_int

__all__ = ["PretrainedWeightsUnavailableError", "TimmModel", "resolution_of", "timm_pretrained_cfg"]

log = logging.getLogger(__name__)

_FLAG = "--model.member.init_args"
_NETWORK_MODULES = ("huggingface_hub", "requests", "urllib", "urllib3", "httpx", "httpcore", "socket", "ssl")


class PretrainedWeightsUnavailableError(OSError):
    """timm's pretrained weights could not be downloaded (e.g. no internet access)."""


def _arg_error(name: str, allowed: str, value: object) -> ValueError:
    return expected(f"{_FLAG}.{name}", allowed, value)


def _has_weights(cfg: dict[str, Any]) -> bool:
    return any(cfg.get(key) for key in ("file", "url", "hf_hub_id", "state_dict"))


def _is_download_error(err: BaseException) -> bool:
    module = type(err).__module__.split(".")[0]
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or module in _NETWORK_MODULES


def _check_rate(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise _arg_error(name, "a float in [0, 1) or null (timm's default)", value)
    return float(value)


class TimmModel(nn.Module):
    """A timm model as an ensemble member: ``forward`` resizes to the native resolution, returns logits.

    Args:
        model_name: A timm model name, optionally with a weights tag: ``"efficientnet_b0"``,
            ``"tf_efficientnet_b5"``, ``"tf_efficientnet_b3.in1k"``. The tag picks the pretrained config
            (resolution, crop, weights); without one timm's default weights are meant.
        pretrained: Download timm's pretrained weights (needs the internet). With ``checkpoint_path`` the
            weights are read from that file instead, through timm's pretrained-weights loader: a
            classifier whose size differs from ``num_classes`` is dropped and re-initialised, so ImageNet
            weights can start a fine-tuning run on another dataset.
        checkpoint_path: A local file of timm-format weights (keys without a prefix, as saved from
            ``timm_model.state_dict()`` or ``member.model.state_dict()``; a dict holding them under
            ``'state_dict'`` or ``'model'`` works too, ``.safetensors`` as well). Without ``pretrained``
            every tensor must match (the model's own trained weights, ``num_classes`` included).
        num_classes: Logits per image. ``None``: inside an
            :class:`~lightning_ensembles.EnsembleLightningModule`, the ensemble's ``num_classes`` (which the
            CLI links from ``--data.num_classes``); on its own, timm's default (1000, ImageNet).
        drop_rate: Dropout before the classifier; ``None`` keeps timm's default.
        drop_path_rate: Stochastic-depth rate; ``None`` keeps timm's default.
        input_size: ``(C, H, W)`` or ``(H, W)`` to resize inputs to instead of the native resolution of
            the pretrained config. ``C`` must equal the model's input channels.

    Raises:
        ValueError: If an argument is out of range or timm does not know ``model_name`` (the message
            suggests close names), naming the ``--model.member.init_args.*`` flag.
        FileNotFoundError: If ``checkpoint_path`` does not exist.
        PretrainedWeightsUnavailableError: If ``pretrained`` weights could not be downloaded.

    Example:
        >>> import torch
        >>> member = TimmModel("test_efficientnet", num_classes=3)
        >>> member.name, member.native_input_size
        ('test_efficientnet', (3, 160, 160))
        >>> member(torch.randn(2, 3, 64, 64)).shape  # resized to 160x160 inside
        torch.Size([2, 3])
        >>> member.data_config["crop_pct"]
        0.95
        >>> next(iter(member.state_dict())), next(iter(member.model.state_dict()))
        ('model.conv_stem.weight', 'conv_stem.weight')
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        num_classes: int | None = None,
        drop_rate: float | None = None,
        drop_path_rate: float | None = None,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        cfg = timm_pretrained_cfg(model_name)
        check_bool(pretrained, f"{_FLAG}.pretrained")
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            if not is_int(num_classes) or num_classes < 1:
                raise _arg_error("num_classes", "an int >= 1 or null (timm's default, 1000)", num_classes)
            kwargs["num_classes"] = num_classes
        if drop_rate is not None:
            kwargs["drop_rate"] = _check_rate("drop_rate", drop_rate)
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = _check_rate("drop_path_rate", drop_path_rate)
        self._input_size = self._check_input_size(input_size, tuple(cfg["input_size"]))
        if checkpoint_path is not None:
            if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(
                    f"Expected `{_FLAG}.checkpoint_path` to be an existing file of timm-format weights, but "
                    f"got {checkpoint_path!r}"
                    + (f" (no such file; working directory {os.getcwd()!r})." if checkpoint_path else ".")
                )
            checkpoint_path = os.fspath(checkpoint_path)
        elif pretrained and not _has_weights(cfg):
            architecture = model_name.partition(".")[0]
            tagged = timm.list_pretrained(f"{architecture}.*") or timm.list_pretrained(f"*{architecture}*")
            raise ValueError(
                f"Expected `{_FLAG}.model_name` to have pretrained weights in timm when `{_FLAG}.pretrained` "
                f"is true, but {model_name!r} has none (tag {cfg.get('tag')!r}). Names with weights: "
                f"{', '.join(tagged[:8]) or 'none'}{', ...' if len(tagged) > 8 else ''}."
            )

        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.model: nn.Module = self._create(model_name, pretrained, checkpoint_path, kwargs)
        """The plain timm model (no wrapper): use it for export or to save timm-format weights."""
        if checkpoint_path is not None and not pretrained:
            self._load_checkpoint(checkpoint_path)

    @staticmethod
    def _check_input_size(
        input_size: Sequence[int] | None, native: tuple[int, ...]
    ) -> tuple[int, ...] | None:
        if input_size is None:
            return None
        size = (
            tuple(input_size) if isinstance(input_size, Sequence) and not isinstance(input_size, str) else ()
        )
        if len(size) == 2:
            size = (native[0], *size)
        if len(size) != 3 or not all(is_int(v) and v >= 1 for v in size):
            raise _arg_error(
                "input_size", "(C, H, W) or (H, W) of ints >= 1, or null (native size)", input_size
            )
        if size[0] != native[0]:
            raise _arg_error("input_size", f"a size with the model's {native[0]} input channels", input_size)
        return size

    @staticmethod
    def _create(
        model_name: str, pretrained: bool, checkpoint_path: str | None, kwargs: dict[str, Any]
    ) -> nn.Module:
        if checkpoint_path is not None and pretrained:
            # timm's own way to load pretrained weights from a local file (classifier adapted to num_classes).
            kwargs = {**kwargs, "pretrained_cfg_overlay": {"file": checkpoint_path}}
        try:
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as err:
            if pretrained and checkpoint_path is not None:
                raise ValueError(
                    f"Expected `{_FLAG}.checkpoint_path` {checkpoint_path!r} to hold timm-format weights of "
                    f"{model_name!r}, but loading it as pretrained weights failed: {type(err).__name__}: {err}"
                ) from err
            if pretrained and checkpoint_path is None and _is_download_error(err):
                raise PretrainedWeightsUnavailableError(
                    f"The pretrained weights of {model_name!r} (`{_FLAG}.pretrained` true) could not be "
                    f"downloaded: {type(err).__name__}: {err}. Without internet access, download them on a "
                    "machine that has it (e.g. `timm.create_model(name, pretrained=True).state_dict()` saved "
                    f"with `torch.save`) and pass the local file as `{_FLAG}.checkpoint_path`. (Setting "
                    "HF_HUB_OFFLINE=1 makes an offline download fail at once instead of retrying.)"
                ) from err
            raise

    def _load_checkpoint(self, path: str) -> None:
        """Load every tensor of the model from a timm-format file (strict).

        Args:
            path: The file (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
                ``.safetensors``); timm's loader unwraps ``'state_dict'``/``'model'`` and strips ``module.``.

        Raises:
            ValueError: If the file's tensors do not match the model, naming the flag and the path.
        """
        try:
            state = timm.models.load_state_dict(path, use_ema=True, weights_only=True)
        except Exception as err:
            raise ValueError(
                f"Expected `{_FLAG}.checkpoint_path` {path!r} to be a weights file that `torch.load` "
                f"(weights_only=True) or safetensors can read, but loading failed: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(
                f"Expected `{_FLAG}.checkpoint_path` {path!r} to hold a state dict (or a dict with one under "
                f"'state_dict' or 'model'), but got a {type(state).__name__}."
            )
        own = self.model.state_dict()
        if (
            state
            and all(k.startswith("model.") for k in state)
            and not any(k.startswith("model.") for k in own)
        ):
            state = {
                k[len("model.") :]: v for k, v in state.items()
            }  # a TimmModel's state_dict, accepted too
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or mismatched:
            parts = [
                f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                if keys
            ]
            hint = (
                " This looks like an ensemble checkpoint: use `EnsembleLightningModule.from_checkpoints`."
                if any(k.startswith("members.") for k in state)
                else f" For weights of another classifier size, also set `{_FLAG}.pretrained` true (the "
                "classifier is then re-initialised)."
            )
            raise ValueError(
                f"Expected `{_FLAG}.checkpoint_path` {path!r} to hold timm-format weights of "
                f"{self.model_name!r} with the same `num_classes`, but they do not match: {'; '.join(parts)}."
                + hint
            )
        self.model.load_state_dict(state, strict=True)

    @property
    def name(self) -> str:
        """The timm model name as given, e.g. ``'tf_efficientnet_b5'`` (used in results tables)."""
        return self.model_name

    @property
    def native_input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` that inputs are resized to: ``input_size`` if given, else the pretrained config's."""
        if self._input_size is not None:
            c, h, w = self._input_size
        else:
            cfg: dict[str, Any] = getattr(self.model, "pretrained_cfg", None) or {}
            c, h, w = tuple(cfg["input_size"])
        return (int(c), int(h), int(w))

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of the model (``input_size``, ``interpolation``, ``mean``, ``std``,
        ``crop_pct``, ``crop_mode``), from ``timm.data.resolve_data_config``, ``input_size`` overridden."""
        config = dict(timm.data.resolve_data_config({}, model=self.model))
        config["input_size"] = self.native_input_size
        return config

    def forward(self, x: Tensor) -> Tensor:
        """Resize to the native resolution if needed, then apply the timm model.

        Args:
            x: Images ``(B, C, H, W)``; any ``H, W``.

        Returns:
            Logits ``(B, num_classes)``.
        """
        size = self.native_input_size[1:]
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out: Tensor = self.model(x)
        return out

    def extra_repr(self) -> str:
        """Return the model name and native input size for ``repr``."""
        return f"model_name={self.model_name!r}, native_input_size={self.native_input_size}"


def resolution_of(members: Iterable[nn.Module | tuple[str, Sequence[int] | None]]) -> dict[str, Any]:
    """The ``model_name`` and ``input_size`` that make a datamodule feed a committee of timm members.

    Members of different native resolutions share one input stream and each resizes it to its own, so the
    data should come at the largest: the member with the largest native ``(H, W)`` is chosen, and its name
    (with ``input_size`` when it overrides the native one) is what
    :class:`~lightning_ensembles.data.ImageNetDataModule` takes to choose its size, crop and normalisation.
    :class:`~lightning_ensembles.cli.EnsembleCLI` applies this when neither ``--data.model_name`` nor
    ``--data.input_size`` is given; in Python, pass the result to the datamodule yourself.

    Args:
        members: :class:`TimmModel` members (e.g. ``module.members``; other modules are skipped, having no timm
            config), or ``(model_name, input_size)`` pairs as they would be passed to :class:`TimmModel`.

    Returns:
        ``{"model_name": ..., "input_size": ...}``, ``input_size`` being the side of the chosen member's square
        size when it overrides the native one, else ``None``; an empty dict when no member is a timm model.

    Raises:
        ValueError: If a pair names a model timm does not know or an invalid ``input_size``, or if the chosen
            member's overridden size is not square (``input_size`` of the datamodule is one side).

    Example:
        >>> resolution_of([("tf_efficientnet_b0", None), ("tf_efficientnet_b2", None)])
        {'model_name': 'tf_efficientnet_b2', 'input_size': None}
        >>> resolution_of([TimmModel("test_efficientnet", num_classes=3, input_size=(64, 64)), nn.Identity()])
        {'model_name': 'test_efficientnet', 'input_size': 64}
    """
    sized: list[tuple[str, tuple[int, ...]]] = []
    for member in members:
        if isinstance(member, TimmModel):
            sized.append((member.model_name, member.native_input_size))
        elif isinstance(member, tuple):
            model_name, input_size = member
            native = tuple(timm_pretrained_cfg(model_name)["input_size"])
            sized.append((model_name, TimmModel._check_input_size(input_size, native) or native))
    if not sized:
        return {}
    model_name, size = max(sized, key=lambda named: named[1][1:])
    if size == tuple(timm_pretrained_cfg(model_name)["input_size"]):
        return {"model_name": model_name, "input_size": None}
    if size[1] != size[2]:
        raise ValueError(
            f"Expected the largest timm member ({model_name!r}) to have a square input size to feed it as "
            f"`--data.input_size` (argument `input_size`), but it resizes to {size}. Give `--data.input_size` "
            "yourself."
        )
    return {"model_name": model_name, "input_size": size[1]}
