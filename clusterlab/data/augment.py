"""Batched augmentation on the training device (MIX'EM supplementary 1.2).

Images stay in memory as uint8 (N, 3, H, W) tensors, ideally on the GPU. Each call augments a
whole batch with per-sample random parameters through kornia, then normalises with the
dataset mean / std. No per-image PIL work happens in the training loop: on the 2-core CPU
kornia on a 512-image batch is ~30x faster than torchvision's PIL transforms (DESIGN.md).

Differences to torchvision that are worth knowing: kornia draws the colour-jitter order once
per batch rather than once per image (the four factors are still per image).
"""

from __future__ import annotations

from typing import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from clusterlab.config import AugmentConfig


def default_blur_kernel(image_size: int) -> int:
    """3x3 for 32 px (CIFAR) and 9x9 for 96 px (STL10) inputs, as in supplementary 1.2."""
    return 3 if image_size <= 64 else 9


class Normalize(nn.Module):
    """uint8 or [0, 1] float images -> (x - mean) / std, the same at training and evaluation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class BatchAugment(nn.Module):
    """SimCLR view generator: uint8 batch in, normalised float views out (same device).

    RandomResizedCrop(scale) -> horizontal flip -> colour jitter (p) -> grayscale (p) ->
    Gaussian blur (kernel, sigma range, p) -> dataset normalisation.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        kernel = cfg.blur_kernel or default_blur_kernel(image_size)
        self.pipeline = nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=cfg.crop_scale),
            K.RandomHorizontalFlip(p=cfg.hflip_p),
            K.ColorJitter(*cfg.jitter, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.grayscale_p),
            K.RandomGaussianBlur((kernel, kernel), sigma=cfg.blur_sigma, p=cfg.blur_p),
        )
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected a uint8 (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        x = self.pipeline(images.float().div_(255.0)).clamp_(0.0, 1.0)
        return self.normalize(x)
