"""Clustering readings beyond plain K-means: MIX'EM's dominant component and K-means
initialised from it (MIX'EM Table 1 rows 3-7, Sec. 5.1), and a clustering head's argmax with
its confident-sample accuracy (LSD-C)."""

from __future__ import annotations

import numpy as np

from clusterlab.eval.kmeans import batched_kmeans
from clusterlab.eval.metrics import clustering_metrics, hungarian_match


def mixem_init_centroids(x: np.ndarray, component: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K-means initialisation from the mixture (MIX'EM Sec. 5.1): the mean representation of
    the samples of each dominant component.

    With more components than clusters the K most populated components are used. With fewer
    non-empty components than K, the remaining centroids are distinct random samples (seeded).
    """
    ids, counts = np.unique(component, return_counts=True)
    chosen = ids[np.argsort(-counts, kind="stable")[:k]]
    centroids = [x[component == c].mean(axis=0) for c in chosen]
    if len(centroids) < k:
        rng = np.random.default_rng(seed)
        extra = rng.choice(len(x), size=k - len(centroids), replace=False)
        centroids.extend(x[extra])
    return np.stack(centroids)


def evaluate_mixture(normalized: np.ndarray, coefficients: np.ndarray, labels: np.ndarray, k: int,
                     max_iter: int, seed: int, device: str | None = None,
                     num_classes: int | None = None) -> dict[str, float]:
    """MIX'EM's two extra readings (Table 1): ``maxcomp_*`` (cluster = dominant component,
    "Max Comp"; as many clusters as mixture components) and ``kmeans_mixinit_*`` (one K-means
    run with ``k`` clusters to convergence on the ``normalized`` (L2-normalised)
    representations, initialised by :func:`mixem_init_centroids`; no 10-iteration cap).
    ``num_classes``: C for the Hungarian ACC (None: read off the labels)."""
    component = coefficients.argmax(axis=1)
    run = batched_kmeans(normalized, k, init=mixem_init_centroids(normalized, component, k, seed),
                         max_iter=max_iter, seed=seed, device=device)
    out = {f"maxcomp_{m}": v
           for m, v in clustering_metrics(labels, component, coefficients.shape[1], num_classes).items()}
    out.update({f"kmeans_mixinit_{m}": v for m, v in clustering_metrics(labels, run.labels, k, num_classes).items()})
    out["kmeans_mixinit_inertia"] = run.inertia
    out["eval_nonempty_components"] = float(len(np.unique(component)))
    return out


def head_metrics(probabilities: np.ndarray, labels: np.ndarray, confidence: float = 0.9,
                 num_classes: int | None = None) -> dict[str, float]:
    """Readings of a clustering head (LSD-C Sec. 4): ``head_{acc,nmi,ari}`` of cluster = argmax,
    and the confident-sample accuracy of the LSD-C supplementary Sec. 2: ``head_confident_acc``
    on the samples whose top probability exceeds ``confidence`` (0.9 in the paper; the
    cluster -> class map is the Hungarian one of all samples) and ``head_confident_share``, the
    share of samples kept. ``head_confident_acc`` is absent when no sample is that confident.
    ``head_empty_clusters`` / ``head_largest_relative_size``: the cluster-size distribution of
    ExCB supplementary Fig. 1 (relative size N_c K / N; 1 is balanced). K is the number of head
    outputs; ``num_classes``: C for the Hungarian ACC (None: read off the labels)."""
    pred = probabilities.argmax(axis=1)
    out = {f"head_{m}": v for m, v in clustering_metrics(labels, pred, probabilities.shape[1], num_classes).items()}
    sizes = relative_cluster_sizes(pred, probabilities.shape[1])
    out["head_empty_clusters"] = float((sizes == 0).mean())
    out["head_largest_relative_size"] = float(sizes.max())
    confident = probabilities.max(axis=1) > confidence
    out["head_confident_share"] = float(confident.mean())
    if confident.any():
        _, mapping = hungarian_match(labels, pred, probabilities.shape[1], num_classes)
        mapped = np.array([mapping[c] for c in pred[confident]])
        out["head_confident_acc"] = float((mapped == labels[confident]).mean())
    return out


def relative_cluster_sizes(assignments: np.ndarray, k: int) -> np.ndarray:
    """N_c K / N for each of the K clusters (ExCB supplementary Fig. 1): 1 is balanced, 0 empty."""
    return np.bincount(assignments, minlength=k) * k / max(1, len(assignments))
