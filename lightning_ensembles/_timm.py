"""timm's registry, read without building a model: the pretrained config of a model name, checked.

The EfficientNets of Kondratyuk et al., *When Ensembling Smaller Models is More Efficient than Single Large
Models* (arXiv 2005.00570), each have their own resolution and evaluation crop, which timm (Ross Wightman,
``pytorch-image-models``) keeps in the pretrained config of every model name. Both the members
(:mod:`lightning_ensembles.models.timm_member`) and the ImageNet datamodule read it, so it lives here, below
both: the datamodule needs a model *name* to choose its transforms, never the model.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
from timm.models import get_pretrained_cfg

__all__ = ["timm_pretrained_cfg"]

_FLAG = "--model.member.init_args"


def timm_pretrained_cfg(model_name: str, flag: str = f"{_FLAG}.model_name") -> dict[str, Any]:
    """Look up timm's pretrained config of a model without building it.

    This is the configuration ``timm.create_model(model_name)`` attaches to the model as ``pretrained_cfg``
    (for a name without a tag, that of timm's default weights), read from timm's registry in microseconds.

    Args:
        model_name: A timm model name, optionally with a weights tag (``"efficientnet_b0.ra_in1k"``).
        flag: The argument or CLI flag named in the error message.

    Returns:
        The config as a dict: ``input_size`` ``(C, H, W)``, ``crop_pct``, ``interpolation``, ``mean``,
        ``std``, ``hf_hub_id``, ``url``, ...

    Raises:
        ValueError: If timm does not know the model (suggesting close names) or the tag.

    Example:
        >>> timm_pretrained_cfg("tf_efficientnet_b7")["input_size"]
        (3, 600, 600)
        >>> timm_pretrained_cfg("efficentnet_b0", "--data.model_name")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `--data.model_name` to be a timm model name, but got 'efficentnet_b0'. Did you mean: 'efficientnet_b0', ...
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(
            f"Expected `{flag}` to be a timm model name (e.g. 'efficientnet_b0'), but got {model_name!r}."
        )
    architecture, _, tag = model_name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = (
            "Did you mean: " + ", ".join(repr(name) for name in close) + "?"
            if close
            else "`timm.list_models('*pattern*')` lists the names timm knows."
        )
        raise ValueError(f"Expected `{flag}` to be a timm model name, but got {model_name!r}. {hint}")
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as err:  # timm: "Invalid pretrained tag (...) for ..."
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{architecture}.*")]
        raise ValueError(
            f"Expected `{flag}` to name a weights tag timm has for {architecture!r} "
            f"({', '.join(map(repr, tags)) or 'none'}), but got {model_name!r} (tag {tag!r})."
        ) from err
    if cfg is None:  # a registered architecture always has a config; kept for safety
        raise ValueError(f"timm has no pretrained config for `{flag}` {model_name!r}.")
    return cfg.to_dict()
