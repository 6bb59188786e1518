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


def hungarian_match(labels: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Contingency table (clusters x classes) and the cluster -> class mapping that maximises
    the matched count, by the Hungarian method (scipy ``linear_sum_assignment``).

    With at most as many clusters as classes the mapping is one-to-one (the papers' ACC).
    With more clusters than classes (over-clustering) it is many-to-one *by the assignment*:
    every cluster is assigned to a class and each class receives at most ceil(K / C) clusters
    (each class column is repeated that many times in the assignment problem). Unlike a
    majority vote, which lets one class absorb any number of clusters and so rewards
    over-clustering, the cap keeps the reading close to the balanced one-to-one ACC.
    """
    labels, pred = _check(labels, pred)
    if labels.size == 0:
        raise ValueError("cannot score an empty evaluation split")
    n_clusters, n_classes = int(pred.max()) + 1, int(labels.max()) + 1
    counts = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    capacity = -(-n_clusters // n_classes)  # ceil(K / C); 1 when K <= C
    rows, cols = linear_sum_assignment(np.tile(counts, (1, capacity)), maximize=True)
    return counts, dict(zip(rows.tolist(), (cols % n_classes).tolist()))


def cluster_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Share of samples whose cluster is mapped to their class by :func:`hungarian_match`:
    one-to-one when K <= C, capacity-limited many-to-one when over-clustering."""
    counts, mapping = hungarian_match(labels, pred)
    return float(sum(counts[c, k] for c, k in mapping.items()) / np.asarray(labels).size)


def clustering_metrics(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of a clustering against ground-truth labels."""
    labels, pred = _check(labels, pred)
    return {
        "acc": cluster_accuracy(labels, pred),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "ari": float(adjusted_rand_score(labels, pred)),
    }


def mean_std(runs: list[dict[str, float]]) -> dict[str, float]:
    """``<metric>_mean`` and ``<metric>_std`` (population std) over repeated runs / seeds, as
    the papers report (mean +- std over 5 or 10 trainings)."""
    if not runs:
        raise ValueError("mean_std needs at least one run")
    keys = set(runs[0]).intersection(*runs[1:])
    out: dict[str, float] = {}
    for key in sorted(keys):
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[f"{key}_mean"], out[f"{key}_std"] = float(values.mean()), float(values.std())
    return out
