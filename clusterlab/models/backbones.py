"""Backbones f(.) producing the representation h that clustering runs on (MIX'EM Sec. 3.1)."""

from __future__ import annotations

import numbers

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


class IICVGG4(nn.Module):
    """The MNIST network of LSD-C (Sec. 4, "Experimental details": "For MNIST we use a model
    inspired from VGG-4, described in [27]"), [27] being IIC (Ji, Henriques, Vedaldi,
    "Invariant Information Clustering", ICCV 2019), whose public code calls this trunk
    "ClusterNet6c". Written here from that description, not copied from either code base.

    Layers, VGG-style: [conv 64, max-pool 2, conv 128, max-pool 2, conv 256, max-pool 2,
    conv 512]. Every conv is 5x5, stride 1, padding 2, no bias, followed by BatchNorm2d and
    ReLU; the max-pools are 2x2 with stride 2. The representation is the flattened last
    feature map, 512 * s * s with s = image_size // 8 (three floor-halvings): 4608 at 28 px
    (28 -> 14 -> 7 -> 3; IIC's heads take 512 * 3 * 3 for its 24 px crops), 8192 at 32 px.
    There is no global pooling, so the representation size is fixed by the input size given
    here: inputs of another size that pool to a different s are refused.

    3 input channels like the other backbones (grey datasets are served as 3 equal channels).
    Its four macro-blocks (LSD-C supplementary Sec. 1 freezing) are the four conv stages,
    ``features[0..3]``: [conv1], [pool + conv2], [pool + conv3], [pool + conv4 + flatten].
    """

    widths = (64, 128, 256, 512)

    def __init__(self, image_size: int) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 8:
            raise ValueError(f"model.backbone=iic_vgg4 needs images of at least 8 px (three 2x2 max-pools leave "
                             f"image_size // 8 pixels per side), got data.image_size={image_size!r}")

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 5, stride=1, padding=2, dilation=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        w1, w2, w3, w4 = self.widths
        self.features = nn.Sequential(
            nn.Sequential(*conv(3, w1)),
            nn.Sequential(nn.MaxPool2d(2, 2), *conv(w1, w2)),
            nn.Sequential(nn.MaxPool2d(2, 2), *conv(w2, w3)),
            nn.Sequential(nn.MaxPool2d(2, 2), *conv(w3, w4), nn.Flatten()),
        )
        self.image_size = int(image_size)
        self.out_dim = w4 * (self.image_size // 8) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if h.shape[1] != self.out_dim:
            raise ValueError(f"iic_vgg4 was built for {self.image_size} px inputs (representation {self.out_dim}); "
                             f"got {tuple(x.shape[-2:])} px inputs (representation {h.shape[1]}). This backbone has "
                             "no global pooling: every view must have the size it was built for")
        return h


def build_backbone(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    """Return the backbone and its representation dimension."""
    if cfg.backbone == "small_cnn":
        net = SmallCNN(cfg.cnn_width)
        return net, net.out_dim
    if cfg.backbone == "iic_vgg4":
        net = IICVGG4(image_size)
        return net, net.out_dim
    cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and image_size <= 64)
    return resnet18(cifar_stem), 512


def macro_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's four macro-blocks in order, for freezing the early ones (LSD-C
    supplementary Sec. 1: after RotNet, the first three ResNet-18 macro-blocks stay frozen).
    ResNet-18: stem + layer1, layer2, layer3, layer4. Small CNN: its four conv blocks.
    IIC VGG-4: its four conv stages (each after the pool before it; the last with the flatten)."""
    if isinstance(backbone, SmallCNN):
        f = backbone.features
        return [f[0:3], f[3:7], f[7:10], f[10:]]
    if isinstance(backbone, IICVGG4):
        return list(backbone.features)
    return [nn.ModuleList([backbone.conv1, backbone.bn1, backbone.layer1]), backbone.layer2, backbone.layer3,
            backbone.layer4]
