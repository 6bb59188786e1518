"""Backbones f(.) producing the representation h that clustering runs on (MIX'EM Sec. 3.1)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from clusterlab.config import ModelConfig


def resnet18(cifar_stem: bool) -> nn.Module:
    """torchvision ResNet-18 without its classifier (512-d output).

    The CIFAR stem replaces the 7x7 stride-2 conv + max-pool with a 3x3 stride-1 conv, as
    MIX'EM does for 32 px inputs (Sec. 4: "remove the second convolutional layer and
    max-pooling").
    """
    net = torchvision.models.resnet18(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class SmallCNN(nn.Module):
    """A 4-conv network for the 8-16 px digits demo: fast enough to train on 2 CPU cores."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    """Return the backbone and its representation dimension."""
    if cfg.backbone == "small_cnn":
        net = SmallCNN(cfg.cnn_width)
        return net, net.out_dim
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and image_size <= 64)
    return resnet18(cifar_stem), 512


def macro_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's four macro-blocks in order, for freezing the early ones (LSD-C
    supplementary Sec. 1: after RotNet, the first three ResNet-18 macro-blocks stay frozen).
    ResNet-18: stem + layer1, layer2, layer3, layer4. Small CNN: its four conv blocks."""
    if isinstance(backbone, SmallCNN):
        f = backbone.features
        return [f[0:3], f[3:7], f[7:10], f[10:]]
    return [nn.ModuleList([backbone.conv1, backbone.bn1, backbone.layer1]), backbone.layer2, backbone.layer3,
            backbone.layer4]
