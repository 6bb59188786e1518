"""Batched augmentation (MIX'EM supplementary 1.2): shapes, ranges, per-sample randomness, seeds."""

from __future__ import annotations

import torch

from clusterlab.config import AugmentConfig
from clusterlab.data.augment import BatchAugment, Normalize, default_blur_kernel

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _batch(n: int = 16, size: int = 32) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_output_shape_dtype_and_range():
    aug = BatchAugment(AugmentConfig(), 32, MEAN, STD)
    out = aug(_batch())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_parameters_are_drawn_per_sample():
    aug = BatchAugment(AugmentConfig(), 32, MEAN, STD)
    same = _batch(1).repeat(8, 1, 1, 1)  # eight copies of one image
    out = aug(same)
    diffs = [(out[0] - out[i]).abs().max().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3


def test_deterministic_under_a_seed():
    aug = BatchAugment(AugmentConfig(), 32, MEAN, STD)
    x = _batch()
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    torch.manual_seed(8)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_settings_only_normalise():
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    aug = BatchAugment(cfg, 32, MEAN, STD)
    aug.pipeline[0].ratio = (1.0, 1.0)  # full-image crop at aspect 1 is the identity resize
    x = _batch()
    torch.testing.assert_close(aug(x), Normalize(MEAN, STD)(x), atol=1e-4, rtol=0)


def test_blur_kernel_follows_the_supplementary():
    assert default_blur_kernel(32) == 3 and default_blur_kernel(96) == 9
    assert BatchAugment(AugmentConfig(), 96, MEAN, STD).pipeline[-1].flags["kernel_size"] == (9, 9)
