"""Clustering metrics as the papers report them (MIX'EM Sec. 4: Hungarian ACC, NMI, ARI)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _check(labels: np.ndarray, pred: np.ndarray, num_clusters: int,
           num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated int64 ``labels`` and ``pred`` plus the number of classes C (``num_classes``, or
    ``labels.max() + 1`` when it is not known)."""
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if labels.shape != pred.shape or labels.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-D of equal length, got {labels.shape} and {pred.shape}")
    if labels.size == 0:
        raise ValueError("cannot score an empty evaluation split")
    if labels.min() < 0 or pred.min() < 0:
        raise ValueError("labels and predictions must be >= 0 (drop unlabelled samples first)")
    if num_clusters < 1 or (num_classes is not None and num_classes < 1):
        raise ValueError(f"num_clusters and num_classes must be >= 1, got {num_clusters} and {num_classes}")
    if pred.max() >= num_clusters:
        raise ValueError(f"prediction {int(pred.max())} is out of range for num_clusters={num_clusters} "
                         f"(cluster ids must be 0..{num_clusters - 1})")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={num_classes} "
                         f"(class ids must be 0..{num_classes - 1})")
    return labels, pred, num_classes


def hungarian_match(labels: np.ndarray, pred: np.ndarray, num_clusters: int,
                    num_classes: int | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """Contingency table (``num_clusters`` x ``num_classes``) and the cluster -> class mapping
    that maximises the matched count, by the Hungarian method (scipy ``linear_sum_assignment``).

    K = ``num_clusters`` and C = ``num_classes`` are given, not read off the data: an
    evaluation split that lacks the highest class (or a clustering that leaves the highest
    cluster empty) must not change how the clusters are matched. ``num_classes`` None means
    ``labels.max() + 1``; pass the dataset's class count where it is known. A prediction
    >= K or a label >= C is refused with ``ValueError``.

    With at most as many clusters as classes the mapping is one-to-one (the papers' ACC).
    With more clusters than classes (over-clustering) it is many-to-one *by the assignment*:
    every cluster is assigned to a class and each class receives at most ceil(K / C) clusters
    (each class column is repeated that many times in the assignment problem). Unlike a
    majority vote, which lets one class absorb any number of clusters and so rewards
    over-clustering, the cap keeps the reading close to the balanced one-to-one ACC.
    """
    labels, pred, num_classes = _check(labels, pred, num_clusters, num_classes)
    counts = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    capacity = -(-num_clusters // num_classes)  # ceil(K / C); 1 when K <= C
    rows, cols = linear_sum_assignment(np.tile(counts, (1, capacity)), maximize=True)
    return counts, dict(zip(rows.tolist(), (cols % num_classes).tolist()))


def cluster_accuracy(labels: np.ndarray, pred: np.ndarray, num_clusters: int,
                     num_classes: int | None = None) -> float:
    """Share of samples whose cluster is mapped to their class by :func:`hungarian_match`
    (K = ``num_clusters``, C = ``num_classes``): one-to-one when K <= C, capacity-limited
    many-to-one when over-clustering."""
    counts, mapping = hungarian_match(labels, pred, num_clusters, num_classes)
    return float(sum(counts[c, k] for c, k in mapping.items()) / np.asarray(labels).size)


def clustering_metrics(labels: np.ndarray, pred: np.ndarray, num_clusters: int,
                       num_classes: int | None = None) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of a clustering into ``num_clusters`` clusters against
    ground-truth labels of ``num_classes`` classes (see :func:`hungarian_match`)."""
    labels, pred, num_classes = _check(labels, pred, num_clusters, num_classes)
    return {
        "acc": cluster_accuracy(labels, pred, num_clusters, num_classes),
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
