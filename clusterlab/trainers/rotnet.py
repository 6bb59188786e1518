"""RotNet (Gidaris et al., ICLR 2018), LSD-C's self-supervised pretraining (LSD-C Sec. 3.1):
each image is shown at 0, 90, 180 and 270 degrees and a linear head predicts which."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import BatchAugment
from clusterlab.models import build_backbone
from clusterlab.trainers.base import DataMeta, Method, register


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> the 4N rotated images (0, 90, 180, 270 degrees, in blocks of N) and
    their rotation labels 0..3. Square images keep their shape."""
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


@register("rotnet")
class RotNet(Method):
    """Backbone + 4-way linear rotation classifier, cross-entropy over the four rotations."""

    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__(cfg, data)
        self.backbone, feat_dim = build_backbone(cfg.model, data.image_size)
        self.rotation_head = nn.Linear(feat_dim, 4)
        self.augment = BatchAugment(cfg.augment, data.image_size, data.mean, data.std)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images)]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, views: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        rotated, labels = rotate_batch(views[0])
        logits = self.rotation_head(self.backbone(rotated)).float()
        accuracy = (logits.argmax(1) == labels).float().mean().detach()
        return {"terms": {"rotation": F.cross_entropy(logits, labels)}, "stats": {"rotation_acc": accuracy}}
