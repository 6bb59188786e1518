"""The baselines a user tries before installing a deep clustering platform: a neighbour
embedding of the images, then K-means in it.

- **UMAP + K-means** (McInnes et al. 2018; the recipe of N2D, McConville et al. 2020, who run
  it on autoencoder features): UMAP to 10 dimensions with ``min_dist = 0`` (N2D: dense,
  clusterable embeddings) and UMAP's default 15 neighbours, then K-means. On the raw pixels it
  is the bar a method must clear; on a run's representation it is a reading of what the
  representation holds beyond what K-means in its own space finds.
- **t-SNE + K-means** (van der Maaten & Hinton 2008; scikit-learn's Barnes-Hut TSNE to 2
  dimensions, perplexity 30), only on up to :data:`TSNE_MAX_IMAGES` images: scikit-learn's
  t-SNE does not finish in minutes on MNIST's 70,000 on a laptop.

Pixel baselines depend on the images, labels, K, seed and settings only, never on a run, so
:func:`pixel_baselines` caches them in a content-addressed JSON file (the SHA-256 of the pixels,
labels, settings and library versions names it) under ``$CLUSTERLAB_CACHE_DIR`` (default
``~/.cache/clusterlab``): every run on the same images reads them back instead of spending a
minute recomputing them. Pure NumPy / scikit-learn / umap-learn, no Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from clusterlab.eval.kmeans import batched_kmeans
from clusterlab.eval.metrics import clustering_metrics

Embedding = Literal["umap", "tsne"]
#: UMAP as in N2D (min_dist 0, 10-d for 10 classes) with UMAP's default 15 neighbours
UMAP_SETTINGS = {"n_components": 10, "n_neighbors": 15, "min_dist": 0.0}
#: scikit-learn's t-SNE defaults (Barnes-Hut, perplexity 30) to 2-d
TSNE_SETTINGS = {"n_components": 2, "perplexity": 30.0}
#: t-SNE runs on at most this many images (scikit-learn's takes about 5 s on 1,797 digits, far
#: more than minutes on 70,000 MNIST images on 2 cores)
TSNE_MAX_IMAGES = 10_000
#: the bump that invalidates every cached baseline when their definition changes
CACHE_VERSION = 1


def embed(x: np.ndarray, kind: Embedding, seed: int) -> np.ndarray:
    """The (N, d) embedding of the rows of ``x``: UMAP (:data:`UMAP_SETTINGS`) or t-SNE
    (:data:`TSNE_SETTINGS`), seeded (UMAP then runs single-threaded, so that it repeats)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "umap":
        import umap  # lazy: numba compiles on first use (about 15 s once per process)

        with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": the price of repeating
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(umap.UMAP(**UMAP_SETTINGS, random_state=seed).fit_transform(x), dtype=np.float32)
    if kind == "tsne":
        from sklearn.manifold import TSNE

        return np.asarray(TSNE(**TSNE_SETTINGS, random_state=seed).fit_transform(x), dtype=np.float32)
    raise ValueError(f"unknown embedding {kind!r}; use umap or tsne")


def embedding_kmeans(x: np.ndarray, labels: np.ndarray, kind: Embedding, k: int, num_classes: int | None,
                     n_init: int, seed: int) -> dict[str, float]:
    """K-means (best inertia of ``n_init`` k-means++ starts) in the :func:`embed` of ``x``,
    scored against ``labels``: ``acc``, ``nmi``, ``ari``."""
    embedding = embed(x, kind, seed)
    run = batched_kmeans(embedding, k, n_init=n_init, seed=seed, device="cpu")
    return clustering_metrics(labels, run.labels, k, num_classes)


def cache_dir() -> Path:
    """Where cached baselines live: ``$CLUSTERLAB_CACHE_DIR``, else ``~/.cache/clusterlab``."""
    return Path(os.environ.get("CLUSTERLAB_CACHE_DIR") or Path.home() / ".cache" / "clusterlab") / "baselines"


def pixel_baselines(pixels: np.ndarray, labels: np.ndarray, k: int, num_classes: int | None, *, n_init: int,
                    seed: int, progress: bool = True) -> dict[str, float]:
    """``pixels_umap_{acc,nmi,ari}`` and, on up to :data:`TSNE_MAX_IMAGES` images,
    ``pixels_tsne_{acc,nmi,ari}``: the embedding baselines on the raw pixels (uint8 images,
    scaled to [0, 1] as the K-means pixel baseline), read from the cache when these pixels,
    labels and settings were scored before, else computed (with a progress bar) and cached."""
    flat = pixels.reshape(len(pixels), -1)
    kinds: list[Embedding] = ["umap"] + (["tsne"] if len(flat) <= TSNE_MAX_IMAGES else [])
    settings = {"version": CACHE_VERSION, "k": k, "num_classes": num_classes, "n_init": n_init, "seed": seed,
                "umap": UMAP_SETTINGS, "tsne": TSNE_SETTINGS, "kinds": kinds,
                # another release may embed differently: its results are other baselines
                "versions": {name: version(name) for name in ("umap-learn", "scikit-learn")}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(flat).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    path = cache_dir() / f"{digest.hexdigest()}.json"
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        pass  # not cached yet (or a damaged file): compute, then write it anew
    x = flat.astype(np.float32) / 255.0
    metrics: dict[str, float] = {}
    for kind in tqdm(kinds, desc=f"pixel baselines ({len(x)} images)", unit="embedding", disable=not progress):
        scores = embedding_kmeans(x, labels, kind, k, num_classes, n_init, seed)
        metrics.update({f"pixels_{kind}_{m}": v for m, v in scores.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"settings": settings, "images": len(x), "metrics": metrics}, indent=2))
    partial.replace(path)  # atomic: a reader never sees half a file
    return metrics
