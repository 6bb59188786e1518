"""Feature extraction: a trained model's per-image outputs on un-augmented images."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from clusterlab.data.augment import Normalize


@torch.no_grad()
def extract_features(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    images: np.ndarray,
    normalize: Normalize,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``forward`` (e.g. ``method.eval_outputs``) over uint8 (N, 3, H, W) ``images``.

    Inputs get exactly the normalisation used in training (no other eval-time transform), as
    DESIGN.md requires. Returns one float32 array per output, N rows each.
    """
    device = torch.device(device)
    normalize = normalize.to(device)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                      disable=not progress, leave=False):
        x = normalize(torch.from_numpy(images[start:start + batch_size]).to(device))
        for name, value in forward(x).items():
            chunks.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (MIX'EM Table 1 row 2: normalise before K-means)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
