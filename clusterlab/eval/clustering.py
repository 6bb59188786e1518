"""K-means clustering of representations, scored against labels."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from clusterlab.eval.features import l2_normalize
from clusterlab.eval.metrics import clustering_metrics


def kmeans_labels(x: np.ndarray, k: int, n_init: int, max_iter: int, seed: int,
                  init: np.ndarray | None = None) -> np.ndarray:
    """Best of ``n_init`` k-means++ runs by inertia, or one run from the given ``init``
    centroids; each run to convergence (tol 1e-4 or ``max_iter``; no 10-iteration cap as in
    the MIX'EM release)."""
    if k > len(x):
        raise ValueError(f"cannot form {k} clusters from {len(x)} samples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if init is not None:
        km = KMeans(n_clusters=k, init=init.astype(np.float32), n_init=1, max_iter=max_iter, tol=1e-4)
    else:
        km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=1e-4, random_state=seed)
    return km.fit_predict(x)


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


def evaluate_mixture(representation: np.ndarray, coefficients: np.ndarray, labels: np.ndarray, k: int,
                     max_iter: int, seed: int) -> dict[str, float]:
    """MIX'EM's two extra readings (Table 1): ``maxcomp_*`` (cluster = dominant component,
    "Max Comp") and ``kmeans_mixinit_*`` (one K-means run on the L2-normalised representations
    initialised by :func:`mixem_init_centroids`)."""
    component = coefficients.argmax(axis=1)
    x = l2_normalize(representation)
    pred = kmeans_labels(x, k, 1, max_iter, seed, init=mixem_init_centroids(x, component, k, seed))
    out = {f"maxcomp_{m}": v for m, v in clustering_metrics(labels, component).items()}
    out.update({f"kmeans_mixinit_{m}": v for m, v in clustering_metrics(labels, pred).items()})
    out["eval_nonempty_components"] = float(len(np.unique(component)))
    return out
