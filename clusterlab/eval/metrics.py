"""Clustering metrics as the papers report them (MIX'EM Sec. 4: Hungarian ACC, NMI, ARI)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _check(labels: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if labels.shape != pred.shape or labels.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-D of equal length, got {labels.shape} and {pred.shape}")
    if labels.size and (labels.min() < 0 or pred.min() < 0):
        raise ValueError("labels and predictions must be >= 0 (drop unlabelled samples first)")
    return labels, pred


def cluster_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one cluster -> class mapping (Hungarian method).

    Clusters may outnumber classes (over-clustering); unmatched clusters count as wrong,
    never as a majority vote.
    """
    labels, pred = _check(labels, pred)
    if labels.size == 0:
        raise ValueError("cannot score an empty evaluation split")
    size = max(labels.max(), pred.max()) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / labels.size)


def clustering_metrics(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of a clustering against ground-truth labels."""
    labels, pred = _check(labels, pred)
    return {
        "acc": cluster_accuracy(labels, pred),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "ari": float(adjusted_rand_score(labels, pred)),
    }
