"""Backbones behind one interface: torchvision ResNets (CIFAR stem optional), timm models, transformers backbones.

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

Every trunk is a :class:`BackboneTrunk`: ``trunk(x)`` gives the pooled ``(B, hidden_size)`` features and
``trunk(x, return_stages=True)`` a :class:`TrunkOutput` (pooled features, last hidden state, one map per stage) from
the same call, so a trunk compiled in place (``trunk.compile()``) runs compiled for every user.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

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


class TrunkOutput(NamedTuple):
    """One forward of a trunk: pooled features, the last hidden state, and one feature map per stage."""

    pooler_output: torch.Tensor
    last_hidden_state: torch.Tensor
    feature_maps: list[torch.Tensor]


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


def _timm_stages(model: nn.Module) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stage names (timm's feature_info module names) and channels; one ``"features"`` stage when the model has no
    ``forward_intermediates``."""
    info = getattr(model, "feature_info", None)
    if hasattr(model, "forward_intermediates") and info:
        return tuple(stage["module"] for stage in info), tuple(int(stage["num_chs"]) for stage in info)
    return ("features",), (int(model.num_features),)


def _timm_width(model: nn.Module) -> int:
    """Width of timm's pooled output with ``num_classes=0`` (``head_hidden_size`` where a conv head follows)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------
def _load_backbone():
    try:  # transformers >= 5.20 moved the backbone helpers to the top level
        from transformers.backbone_utils import load_backbone
    except ImportError:  # pragma: no cover - older 5.x
        from transformers.utils.backbone_utils import load_backbone
    return load_backbone


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
                names, channels = _timm_stages(model)
                info = BackboneInfo(kind, _timm_width(model), names, channels)
            else:
                from transformers import AutoBackbone

                model = AutoBackbone.from_config(with_all_stages(backbone_config))
                channels = tuple(int(c) for c in model.num_features)
                info = BackboneInfo(kind, channels[-1], tuple(backbone_config.stage_names), channels)
        _DESCRIPTIONS[key] = info
    return _DESCRIPTIONS[key]


# ---------------------------------------------------------------------------------------------------------------------
# Trunks
# ---------------------------------------------------------------------------------------------------------------------
class BackboneTrunk(nn.Module):
    """What every backbone looks like to NASiam: ``trunk(x)`` -> pooled ``(B, hidden_size)`` features,
    ``trunk(x, return_stages=True)`` -> :class:`TrunkOutput`. ``native`` is the module whose state dict carries the
    library's own key names (torchvision's, timm's, transformers'), which is what pretrained weights load into.
    """

    kind: ClassVar[str]
    hidden_size: int
    stage_names: tuple[str, ...]
    stage_channels: tuple[int, ...]

    @property
    def native(self) -> nn.Module:
        return self

    @property
    def native_prefix(self) -> str:
        """Key prefix of ``native`` inside this trunk's state dict."""
        return ""

    @property
    def num_features(self) -> int:
        return self.hidden_size

    unused_names: tuple[str, ...] = ()  # set by build_trunk for trunks that serve pooled features only

    def unused_in_pooling(self) -> list[nn.Parameter]:
        """Trainable-looking parameters that take no part in the pooled features (see :func:`pooling_unused_names`);
        frozen in trunks that serve pooled features only, because DDP raises on parameters without gradients."""
        parameters = dict(self.named_parameters())
        return [parameters[name] for name in self.unused_names]


class ResNetTrunk(BackboneTrunk):
    """A torchvision ResNet without its classifier; ``cifar_stem`` swaps the 7x7/2 conv and max-pool for a 3x3/1
    conv."""

    kind = TORCHVISION

    def __init__(self, name: str = "resnet18", cifar_stem: bool = True, num_channels: int = 3):
        super().__init__()
        if name not in TORCHVISION_BACKBONES:
            backbone_kind(name)  # raises the error naming the allowed backbones
            raise ValueError(f"ResNetTrunk builds torchvision ResNets only, got {name!r}")
        builder, width = TORCHVISION_BACKBONES[name]
        net = builder(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(num_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif num_channels != 3:
            net.conv1 = nn.Conv2d(num_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for attr in TRUNK_MODULES:
            setattr(self, attr, getattr(net, attr))
        _mark_last_residual_norms(self)
        info = describe_backbone(name)
        self.hidden_size, self.stage_names, self.stage_channels = width, info.stage_names, info.stage_channels
        self.cifar_stem = bool(cifar_stem)

    def forward(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | TrunkOutput:
        """Globally average-pooled last-stage features, or with ``return_stages`` a :class:`TrunkOutput` whose maps are
        those of the stem and of each stage, in the order of ``stage_names``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        pooled = x.mean(dim=(2, 3))
        return TrunkOutput(pooled, x, maps) if return_stages else pooled


def is_last_residual_norm(module: nn.Module) -> bool:
    """Whether ``module`` is the last BatchNorm of a torchvision residual block (``bn2`` of a BasicBlock, ``bn3`` of
    a Bottleneck), which ``zero_init_residual`` starts at zero so that every block begins as the identity."""
    return getattr(module, "_nasiam_last_residual_norm", False)


def _mark_last_residual_norms(trunk: nn.Module) -> None:
    # marked on the norm itself: transformers' init skips container modules without tensors of their own in custom
    # code, so the block could not zero its norm
    for block in trunk.modules():
        if isinstance(block, resnet.Bottleneck):
            block.bn3._nasiam_last_residual_norm = True
        elif isinstance(block, resnet.BasicBlock):
            block.bn2._nasiam_last_residual_norm = True


class LibraryTrunk(BackboneTrunk):
    """A trunk around another library's model (``self.model``), whose state dict is the library's own."""

    model: nn.Module

    @property
    def native(self) -> nn.Module:
        return self.model

    @property
    def native_prefix(self) -> str:
        return "model."


class TimmTrunk(LibraryTrunk):
    """A timm model with ``num_classes=0``: its own pooling for the features, ``forward_intermediates`` for the
    stages (timm's feature_info names: ``act1, layer1 ... layer4`` for ResNets, ``blocks.0 ...`` for ViTs)."""

    kind = TIMM

    def __init__(self, backbone: str, backbone_kwargs: dict | None = None, num_channels: int = 3):
        super().__init__()
        self.model = create_timm_model(backbone, backbone_kwargs, num_channels)
        for module in self.model.modules():  # NASiam's _init_weights leaves timm's initialisation alone
            module._nasiam_keeps_own_init = True
        self.stage_names, self.stage_channels = _timm_stages(self.model)
        self.hidden_size = _timm_width(self.model)
        self._has_intermediates = self.stage_names != ("features",)

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.model, "pretrained_cfg", None) or {})

    def forward(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | TrunkOutput:
        if not return_stages:
            return self.model(x)
        if self._has_intermediates:
            final, maps = self.model.forward_intermediates(x, indices=len(self.stage_names))
        else:
            final = self.model.forward_features(x)
            maps = [final]
        return TrunkOutput(self.model.forward_head(final, pre_logits=True), final, list(maps))


class TransformersTrunk(LibraryTrunk):
    """A transformers backbone (``load_backbone`` of the config's ``backbone_config``, whose ``out_features`` are all
    its stages); pooled features are the global average of the last feature map."""

    kind = TRANSFORMERS

    def __init__(self, config: Any):
        super().__init__()
        self.model = _load_backbone()(config)
        self.stage_names = tuple(config.backbone_config.stage_names)
        self.stage_channels = tuple(int(c) for c in self.model.num_features)
        self.hidden_size = self.stage_channels[-1]

    def forward(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | TrunkOutput:
        maps = list(self.model(x, return_dict=True).feature_maps)
        last = maps[-1]
        pooled = last.mean(dim=(2, 3)) if last.ndim == 4 else last.mean(dim=1)
        return TrunkOutput(pooled, last, maps) if return_stages else pooled


def find_trunk(model: nn.Module) -> BackboneTrunk:
    """The online :class:`BackboneTrunk` of a NASiam model, a downstream head, or a trunk itself."""
    if isinstance(model, BackboneTrunk):
        return model
    for path in ("backbone", "nasiam.backbone"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, BackboneTrunk):
            return module
    raise TypeError(f"cannot find a NASiam backbone in a {type(model).__name__}")


def build_trunk(config: Any, serve_stages: bool = False) -> BackboneTrunk:
    """The trunk a NASiamConfig describes (``backbone``, ``backbone_kwargs``, ``backbone_config``, ``cifar_stem``,
    ``num_channels``). Unless it serves the stage maps (``serve_stages``: NASiamBackbone), the parameters the pooled
    features do not use are frozen (:func:`pooling_unused_names`)."""
    kind = backbone_kind(config.backbone, config.backbone_config)
    if kind == TORCHVISION:
        return ResNetTrunk(config.backbone, bool(config.cifar_stem), config.num_channels)
    trunk = TimmTrunk(config.backbone, config.backbone_kwargs, config.num_channels) if kind == TIMM \
        else TransformersTrunk(config)
    if not serve_stages:
        trunk.unused_names = pooling_unused_names(config)
        for parameter in trunk.unused_in_pooling():
            parameter.requires_grad_(False)
    return trunk


_UNUSED: dict[tuple, tuple[str, ...]] = {}


def pooling_unused_names(config: Any) -> tuple[str, ...]:
    """Names (inside the trunk) of the parameters that take no part in the pooled features: the per-stage norms of
    the other stages (ConvNeXt, Swin), a base model's final norm that its Backbone class skips, DINOv2's mask token.

    Found exactly by one backward pass in eval mode through a twin of the trunk built on the meta device (no memory,
    no weights), once per backbone; () for torchvision ResNets (they use every tensor) and for a model that cannot run
    on the meta device (a DDP run of such a model needs ``find_unused_parameters``)."""
    kind = backbone_kind(config.backbone, config.backbone_config)
    if kind == TORCHVISION:
        return ()
    source = json.dumps(config.backbone_kwargs, sort_keys=True) if kind == TIMM else \
        config.backbone_config.to_json_string(use_diff=False)
    key = (kind, config.backbone, source, config.num_channels, config.image_size)
    if key not in _UNUSED:
        with torch.device("meta"):
            twin = build_trunk(config, serve_stages=True).eval()
            try:
                twin(torch.empty(2, config.num_channels, config.image_size, config.image_size)).float().sum().backward()
                _UNUSED[key] = tuple(n for n, p in twin.named_parameters() if p.requires_grad and p.grad is None)
            except Exception:  # an op without a meta kernel: nothing is known
                _UNUSED[key] = ()
    return _UNUSED[key]


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


__all__ = [
    "BACKBONES",
    "BackboneInfo",
    "BackboneTrunk",
    "RESNET_STAGE_NAMES",
    "ResNetTrunk",
    "TIMM_PREFIX",
    "TORCHVISION_BACKBONES",
    "TimmTrunk",
    "TransformersTrunk",
    "TrunkOutput",
    "backbone_config_values",
    "backbone_kind",
    "build_trunk",
    "create_timm_model",
    "describe_backbone",
    "find_trunk",
    "import_timm",
    "is_torchvision_backbone",
    "pooling_unused_names",
    "is_last_residual_norm",
    "read_transformers_config",
    "required_packages",
    "transformers_config_from_dict",
]
