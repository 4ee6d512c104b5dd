"""What a backbone name means, without building it: the kind (torchvision, timm, transformers), the pooled width and
the stages (from a weightless build on the meta device), timm's keyword arguments and transformers' backbone
configs. The modules themselves are in :mod:`nasiam_hf.backbones`.

``NASiamConfig.backbone`` names the backbone:

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision's ResNets, trained from random weights unless
  :func:`nasiam_hf.backbone_weights.load_backbone_weights` says otherwise. The trunk keeps torchvision's module names
  (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its state dict is a torchvision ResNet's without ``fc``.
* ``timm/<model name>`` (always timm, a pretrained tag such as ``timm/resnet50.a1_in1k`` allowed): built offline with
  ``timm.create_model(name, pretrained=False, num_classes=0, **backbone_kwargs)``. The pooled features are timm's own
  (the model's ``global_pool``: the average for ResNets, the class token for ViTs); the stages come from
  ``forward_intermediates`` of the same module (not ``features_only``, which builds another module tree with other
  state-dict keys), so one set of weights serves the model, the classifier and the detection backbone.
* anything else is a transformers backbone, held as ``NASiamConfig.backbone_config`` (the sub-config AutoBackbone
  builds: ConvNeXt, DINOv2, Swin, ResNet...) and built with ``transformers.backbone_utils.load_backbone``; the
  ``backbone`` string is the folder or Hub id it was read from (:func:`backbone_config_values`). Its pooled features
  are the global average of its last feature map; for ViT-like backbones (DINOv2, ViTDet) that map holds the patch
  tokens after the final layer norm (the Backbone API drops the class token), so the pooled vector is their mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet

TORCHVISION = "torchvision"
TIMM = "timm"
TRANSFORMERS = "transformers"
TIMM_PREFIX = "timm/"

TORCHVISION_BACKBONES: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet18": (resnet.resnet18, 512),
    "resnet34": (resnet.resnet34, 512),
    "resnet50": (resnet.resnet50, 2048),
}
BACKBONES = TORCHVISION_BACKBONES  # the torchvision names (what --backbone accepted before timm and transformers)
RESNET_STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")
TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# timm arguments that NASiam sets itself: the trunk has no classifier, weights come from load_backbone_weights.
RESERVED_TIMM_KWARGS = {
    "num_classes": "the trunk has no classifier (num_classes=0)",
    "pretrained": "start from timm's weights with --backbone_weights timm",
    "features_only": "the stages come from forward_intermediates of the same module",
    "in_chans": "set num_channels instead",
}
TRANSFORMERS_NOT_BACKBONES = {
    "nasiam": "a NASiam folder is not a backbone config; start a torchvision/timm backbone from its weights with "
              "--backbone_weights instead",
    "timm_backbone": "name timm models as timm/<model name> instead",
}


@dataclass(frozen=True)
class BackboneInfo:
    """What the config needs to know about a backbone without building it: its kind, pooled width and stages."""

    kind: str
    hidden_size: int
    stage_names: tuple[str, ...]
    stage_channels: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------------------------------
def backbone_kind(backbone: str | None, backbone_config: Any = None) -> str:
    """``"torchvision"``, ``"timm"`` or ``"transformers"`` for a config's ``backbone`` / ``backbone_config``."""
    if backbone_config is not None:
        if backbone in TORCHVISION_BACKBONES or (isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX)):
            raise ValueError(
                f"backbone {backbone!r} names a {'timm' if backbone.startswith(TIMM_PREFIX) else 'torchvision'} "
                "model but backbone_config holds a transformers backbone; set one of the two"
            )
        return TRANSFORMERS
    if backbone is None or backbone in TORCHVISION_BACKBONES:
        return TORCHVISION
    if backbone.startswith(TIMM_PREFIX):
        if not backbone[len(TIMM_PREFIX):]:
            raise ValueError("backbone 'timm/' needs a model name, e.g. 'timm/resnet18' or 'timm/vit_tiny_patch16_224'")
        return TIMM
    raise ValueError(
        f"unknown backbone {backbone!r}; allowed backbones: {sorted(TORCHVISION_BACKBONES)}, 'timm/<model name>', or "
        "a transformers backbone given as backbone_config (backbone_config_values(name) reads one from a folder or "
        "Hub id)"
    )


def is_torchvision_backbone(backbone: str | None) -> bool:
    """Whether ``backbone`` is one of the torchvision ResNets (the only backbones with a CIFAR stem option)."""
    return backbone is None or backbone in TORCHVISION_BACKBONES


def required_packages(kind: str) -> list[str]:
    """The packages a saved folder of this backbone kind needs beyond transformers and torchvision."""
    return ["timm"] if kind == TIMM else []


# ---------------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------------
def import_timm():
    """``timm``, or an ImportError that says how to install it (the copied remote code calls this too)."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            "this NASiam model's backbone is a timm model and timm is not installed: pip install timm "
            "(or pip install 'nasiam-hf[timm]')"
        ) from error
    return timm


def check_timm_kwargs(backbone_kwargs: dict | None) -> dict:
    """A copy of ``backbone_kwargs`` (JSON-able, string keys, none of the arguments NASiam sets itself)."""
    kwargs = dict(backbone_kwargs or {})
    for key in kwargs:
        if not isinstance(key, str):
            raise ValueError(f"backbone_kwargs keys must be strings, got {key!r}")
        if key in RESERVED_TIMM_KWARGS:
            raise ValueError(f"backbone_kwargs may not set {key!r}: {RESERVED_TIMM_KWARGS[key]}")
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise ValueError(f"backbone_kwargs must be JSON values (numbers, strings, lists), got {kwargs!r}") from error
    return kwargs


def create_timm_model(backbone: str, backbone_kwargs: dict | None = None, num_channels: int = 3, **extra) -> nn.Module:
    """``timm.create_model`` of ``timm/<name>`` without a classifier; unknown names and bad kwargs become a
    ValueError naming them (``extra`` goes to timm as is: ``pretrained``, ``cache_dir``)."""
    timm = import_timm()
    name = backbone[len(TIMM_PREFIX):]
    kwargs = check_timm_kwargs(backbone_kwargs)
    architecture = timm.models.split_model_name_tag(name)[0]
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture[:6]}*")[:8]
        raise ValueError(f"backbone {backbone!r}: timm has no model {architecture!r}"
                         + (f"; similar names: {close}" if close else "; see timm.list_models()"))
    if num_channels != 3:
        kwargs["in_chans"] = num_channels
    try:
        return timm.create_model(name, num_classes=0, **kwargs, **{"pretrained": False, **extra})
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise ValueError(
            f"backbone {backbone!r}: timm cannot build it with backbone_kwargs={kwargs}: {error}"
        ) from error


def timm_stages(model: nn.Module) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stage names (timm's feature_info module names) and channels; one ``"features"`` stage when the model has no
    ``forward_intermediates``."""
    info = getattr(model, "feature_info", None)
    if hasattr(model, "forward_intermediates") and info:
        return tuple(stage["module"] for stage in info), tuple(int(stage["num_chs"]) for stage in info)
    return ("features",), (int(model.num_features),)


def timm_width(model: nn.Module) -> int:
    """Width of timm's pooled output with ``num_classes=0`` (``head_hidden_size`` where a conv head follows)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------
def check_transformers_backbone_config(backbone_config: Any) -> None:
    """Refuse a sub-config that AutoBackbone cannot build (or that is better named another way)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    model_type = getattr(backbone_config, "model_type", None)
    if model_type in TRANSFORMERS_NOT_BACKBONES:
        raise ValueError(f"backbone_config of model_type {model_type!r}: {TRANSFORMERS_NOT_BACKBONES[model_type]}")
    if model_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
        known = sorted(set(MODEL_FOR_BACKBONE_MAPPING_NAMES) - set(TRANSFORMERS_NOT_BACKBONES))
        raise ValueError(
            f"backbone_config of model_type {model_type!r} has no transformers backbone class (AutoBackbone); "
            f"model types with one: {known}"
        )
    if not getattr(backbone_config, "stage_names", None):
        raise ValueError(f"backbone_config of model_type {model_type!r} lists no stage_names")


def transformers_config_from_dict(values: dict) -> Any:
    """A transformers config from its ``to_dict()`` (what config.json holds for ``backbone_config``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"backbone_config has model_type {model_type!r}, which transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(values)


def with_all_stages(backbone_config: Any) -> Any:
    """A copy of a transformers backbone config whose ``out_features`` are all its stages (NASiam picks its own)."""
    import copy

    config = copy.deepcopy(backbone_config)
    config.set_output_features_output_indices(out_features=list(config.stage_names), out_indices=None)
    config.name_or_path = ""  # the folder it came from is NASiamConfig.backbone
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Describing a backbone (width, stages) without building its weights
# ---------------------------------------------------------------------------------------------------------------------
_DESCRIPTIONS: dict[tuple, BackboneInfo] = {}


def describe_backbone(backbone: str | None, backbone_kwargs: dict | None = None, backbone_config: Any = None,
                      num_channels: int = 3) -> BackboneInfo:
    """Kind, pooled width and stages of a backbone; timm and transformers models are built once on the meta device
    (no memory, no weights) and remembered."""
    kind = backbone_kind(backbone, backbone_config)
    if kind == TORCHVISION:
        width = TORCHVISION_BACKBONES[backbone or "resnet18"][1]
        expansion = 4 if width == 2048 else 1
        return BackboneInfo(kind, width, RESNET_STAGE_NAMES, (64, *[c * expansion for c in (64, 128, 256, 512)]))
    if kind == TIMM:
        key = (kind, backbone, json.dumps(check_timm_kwargs(backbone_kwargs), sort_keys=True), num_channels)
    else:
        check_transformers_backbone_config(backbone_config)
        key = (kind, backbone_config.to_json_string(use_diff=False))
    if key not in _DESCRIPTIONS:
        with torch.device("meta"):
            if kind == TIMM:
                model = create_timm_model(backbone, backbone_kwargs, num_channels)
                names, channels = timm_stages(model)
                info = BackboneInfo(kind, timm_width(model), names, channels)
            else:
                from transformers import AutoBackbone

                model = AutoBackbone.from_config(with_all_stages(backbone_config))
                channels = tuple(int(c) for c in model.num_features)
                info = BackboneInfo(kind, channels[-1], tuple(backbone_config.stage_names), channels)
        _DESCRIPTIONS[key] = info
    return _DESCRIPTIONS[key]


# ---------------------------------------------------------------------------------------------------------------------
# What the engines call to turn --backbone / --backbone_kwargs into config fields
# ---------------------------------------------------------------------------------------------------------------------
def backbone_config_values(backbone: str, backbone_kwargs: dict | None = None, *, cache_dir: str | None = None
                           ) -> dict[str, Any]:
    """The NASiamConfig fields for ``--backbone`` and ``--backbone_kwargs``.

    A torchvision name gives ``{"backbone": name}``; ``timm/<name>`` is checked against timm (built on the meta
    device) and gives ``backbone`` and ``backbone_kwargs``; any other value is a local folder or Hub id whose
    ``config.json`` AutoBackbone builds, read with ``AutoConfig.from_pretrained(backbone, **backbone_kwargs)`` (so
    ``backbone_kwargs`` override its values, e.g. ``{"image_size": 32}``) and returned as ``backbone_config``.
    """
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a non-empty string, got {backbone!r}")
    if backbone in TORCHVISION_BACKBONES:
        if backbone_kwargs:
            raise ValueError(f"backbone_kwargs apply to timm and transformers backbones, not to {backbone!r} "
                             f"(got {backbone_kwargs!r})")
        return {"backbone": backbone, "backbone_kwargs": None, "backbone_config": None}
    if backbone.startswith(TIMM_PREFIX):
        backbone_kind(backbone)
        describe_backbone(backbone, backbone_kwargs)  # unknown names and bad kwargs fail here, not at build time
        return {"backbone": backbone, "backbone_kwargs": check_timm_kwargs(backbone_kwargs) or None,
                "backbone_config": None}
    sub_config = read_transformers_config(backbone, backbone_kwargs, cache_dir=cache_dir)
    describe_backbone(backbone, backbone_config=sub_config)
    return {"backbone": backbone, "backbone_kwargs": None, "backbone_config": sub_config}


def read_transformers_config(backbone: str, overrides: dict | None = None, *, cache_dir: str | None = None):
    """``AutoConfig.from_pretrained`` of a folder or Hub id, as a backbone sub-config with all its stages out."""
    from pathlib import Path

    from transformers import AutoConfig

    where = "folder" if Path(backbone).is_dir() else "Hub id"
    if where == "folder" and not (Path(backbone) / "config.json").is_file():
        raise ValueError(f"backbone {backbone!r} is a folder without config.json (a transformers backbone folder has "
                         "one); torchvision names are resnet18|resnet34|resnet50, timm models are timm/<name>")
    try:
        config = AutoConfig.from_pretrained(backbone, cache_dir=cache_dir, **dict(overrides or {}))
    except (OSError, ValueError, KeyError) as error:
        from huggingface_hub import constants

        reason = str(error).splitlines()[0].rstrip(".")
        raise ValueError(
            f"backbone {backbone!r} is not resnet18|resnet34|resnet50 nor timm/<name>, so it names a transformers "
            f"backbone ({where}), and its config cannot be read: {reason}. Offline, a Hub id must already be in the "
            f"cache ({cache_dir or constants.HF_HUB_CACHE}); or pass a local folder holding its config.json"
        ) from error
    check_transformers_backbone_config(config)
    return with_all_stages(config)
