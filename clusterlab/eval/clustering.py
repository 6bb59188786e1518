"""K-means clustering of representations, scored against labels."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from clusterlab.eval.features import l2_normalize
from clusterlab.eval.metrics import clustering_metrics


def kmeans_labels(x: np.ndarray, k: int, n_init: int, max_iter: int, seed: int) -> np.ndarray:
    """Best of ``n_init`` k-means++ runs by inertia, each run to convergence (no iteration cap
    below ``max_iter``, unlike the MIX'EM release's 10)."""
    if k > len(x):
        raise ValueError(f"cannot form {k} clusters from {len(x)} samples")
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=1e-4, random_state=seed)
    return km.fit_predict(np.ascontiguousarray(x, dtype=np.float32))


def evaluate_representations(
    representation: np.ndarray, labels: np.ndarray, k: int, n_init: int, max_iter: int, seed: int
) -> dict[str, float]:
    """K-means on L2-normalised and on raw representations -> ``kmeans_{norm,raw}_{acc,nmi,ari}``."""
    out: dict[str, float] = {}
    for variant, x in (("norm", l2_normalize(representation)), ("raw", representation)):
        pred = kmeans_labels(x, k, n_init, max_iter, seed)
        out.update({f"kmeans_{variant}_{m}": v for m, v in clustering_metrics(labels, pred).items()})
    return out


def evaluate_raw_pixels(images: np.ndarray, labels: np.ndarray, k: int, n_init: int, max_iter: int,
                        seed: int) -> dict[str, float]:
    """The baseline every learned representation must beat: K-means on flattened pixels."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    pred = kmeans_labels(x, k, n_init, max_iter, seed)
    return {f"pixels_{m}": v for m, v in clustering_metrics(labels, pred).items()}
