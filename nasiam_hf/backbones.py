"""The backbone modules behind one interface: torchvision ResNets (CIFAR stem optional), timm models and transformers
backbones, each a :class:`BackboneTrunk`. What a backbone name means (kinds, widths, stages, configs) is
:mod:`nasiam_hf.backbone_specs`.

Every trunk is a :class:`BackboneTrunk`: ``trunk(x)`` gives the pooled ``(B, hidden_size)`` features and
``trunk(x, return_stages=True)`` a :class:`TrunkOutput` (pooled features, last hidden state, one map per stage) from
the same call, so a trunk compiled in place (``trunk.compile()``) runs compiled for every user.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torchvision.models import resnet

from .backbone_specs import (  # noqa: F401 - the names of a backbone are importable from here too
    BACKBONES, RESNET_STAGE_NAMES, TIMM, TIMM_PREFIX, TORCHVISION, TORCHVISION_BACKBONES, TRANSFORMERS,
    TRUNK_MODULES, BackboneInfo, backbone_config_values, backbone_kind, create_timm_model, describe_backbone,
    import_timm, is_torchvision_backbone, read_transformers_config, required_packages, timm_stages, timm_width,
    transformers_config_from_dict,
)


class TrunkOutput(NamedTuple):
    """One forward of a trunk: pooled features, the last hidden state, and one feature map per stage."""

    pooler_output: torch.Tensor
    last_hidden_state: torch.Tensor
    feature_maps: list[torch.Tensor]


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
        self.stage_names, self.stage_channels = timm_stages(self.model)
        self.hidden_size = timm_width(self.model)
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
        from transformers.backbone_utils import load_backbone

        super().__init__()
        self.model = load_backbone(config)
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
