"""Feature extraction: a trained model's per-image outputs on un-augmented images."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from clusterlab.data.augment import Normalize


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (MIX'EM Table 1 row 2: normalise before K-means). Each row is
    first divided by its largest |value|: float32 row norms of features near 1e20 overflow, near
    1e-20 underflow. One (N, D) array is allocated, the result. Zero rows stay zero."""
    x = np.asarray(x)
    largest = np.maximum(x.max(axis=1, keepdims=True), -x.min(axis=1, keepdims=True))
    out = x / np.where(largest > 0, largest, 1).astype(np.result_type(x, np.float32))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.where(norms > 0, norms, 1)
    return out


@torch.no_grad()
def iter_features(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    images: np.ndarray,
    labels: np.ndarray,
    normalize: Normalize,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> Iterator[dict[str, np.ndarray]]:
    """Yield one column batch per image batch, in the features-file schema
    (:mod:`clusterlab.eval.feature_files`).

    ``forward`` is e.g. ``method.eval_outputs``; it returns ``representation`` and optionally
    ``coefficients`` (MIX'EM; the dominant ``component`` is added) or ``probabilities``.
    Inputs get exactly the training normalisation and no other eval-time transform.
    """
    device = torch.device(device)
    normalize = normalize.to(device)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = normalize(torch.from_numpy(images[start:start + batch_size]).to(device))
        outputs = {name: value.float().cpu().numpy() for name, value in forward(x).items()}
        rows = len(outputs["representation"])
        batch = {"index": np.arange(start, start + rows), "label": labels[start:start + rows],
                 "representation": outputs["representation"],
                 "representation_l2": l2_normalize(outputs["representation"])}
        if "coefficients" in outputs:
            batch["coefficients"] = outputs["coefficients"]
            batch["component"] = outputs["coefficients"].argmax(1)
        if "probabilities" in outputs:
            batch["probabilities"] = outputs["probabilities"]
        yield batch
