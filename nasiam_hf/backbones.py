"""torchvision ResNet trunks with an optional CIFAR stem.

The trunk keeps torchvision's module names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its state dict is a
torchvision ResNet's state dict without ``fc``: export and import are a key prefix away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet

BACKBONES: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet18": (resnet.resnet18, 512),
    "resnet34": (resnet.resnet34, 512),
    "resnet50": (resnet.resnet50, 2048),
}
STAGE_NAMES = ["stem", "stage1", "stage2", "stage3", "stage4"]
TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def check_backbone(name: object) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed backbones: {sorted(BACKBONES)}")
    return name


def backbone_width(name: str) -> int:
    """Width of the pooled features of a backbone (512 for ResNet-18/34, 2048 for ResNet-50)."""
    return BACKBONES[check_backbone(name)][1]


def stage_channels(name: str) -> list[int]:
    """Channels of the stem and of each of the four stages."""
    expansion = 4 if backbone_width(name) == 2048 else 1
    return [64] + [c * expansion for c in (64, 128, 256, 512)]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier; ``cifar_stem`` swaps the 7x7/2 conv and max-pool for a 3x3/1
    conv."""

    def __init__(self, name: str = "resnet18", cifar_stem: bool = True, num_channels: int = 3):
        super().__init__()
        builder, width = BACKBONES[check_backbone(name)]
        net = builder(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(num_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif num_channels != 3:
            net.conv1 = nn.Conv2d(num_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for attr in TRUNK_MODULES:
            setattr(self, attr, getattr(net, attr))
        self.num_features = width

    def forward(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Globally average-pooled last-stage features ``(B, num_features)``, or with ``return_stages`` the feature
        maps of the stem and of each stage, in the order of ``STAGE_NAMES``.

        Both go through ``__call__``, so a trunk compiled in place (``--torch_compile``) runs compiled for every user.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps if return_stages else x.mean(dim=(2, 3))
