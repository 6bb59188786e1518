"""The embedding baselines (eval/baselines.py): UMAP / t-SNE + K-means against the libraries'
own pipeline on the same images, the cache keyed by the images, and their rows in evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.manifold import TSNE

from clusterlab.eval import baselines
from clusterlab.eval.baselines import TSNE_SETTINGS, UMAP_SETTINGS, cache_dir, embedding_kmeans, pixel_baselines
from clusterlab.eval.metrics import clustering_metrics


@pytest.fixture(scope="module")
def digits():
    """400 of scikit-learn's digits as uint8 pixels (0..16 scaled to 0..255) and their labels."""
    x, y = load_digits(return_X_y=True)
    return (x[:400] * 255 / 16).round().astype(np.uint8).reshape(-1, 1, 8, 8), y[:400]


@pytest.mark.parametrize("kind", ["tsne", "umap"])
def test_embedding_kmeans_is_the_libraries_own_pipeline(digits, kind):
    """Our reading equals the embedding of scikit-learn's TSNE / umap-learn's UMAP with the same
    settings and seed, clustered by scikit-learn's KMeans: the same ACC / NMI / ARI."""
    import umap

    pixels, labels = digits
    x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    ours = embedding_kmeans(x, labels, kind, 10, 10, n_init=10, seed=0)
    embedding = (TSNE(**TSNE_SETTINGS, random_state=0) if kind == "tsne"
                 else umap.UMAP(**UMAP_SETTINGS, random_state=0)).fit_transform(x)
    theirs = clustering_metrics(labels, KMeans(10, n_init=10, random_state=0).fit_predict(embedding), 10, 10)
    assert ours == pytest.approx(theirs, abs=0.01)
    assert ours["acc"] > 0.7  # the embedding separates the digits (K-means on these pixels: about 0.8)


def test_pixel_baselines_are_cached_by_their_images(digits, monkeypatch, tmp_path):
    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path))
    pixels, labels = digits
    first = pixel_baselines(pixels, labels, 10, 10, n_init=5, seed=0, progress=False)
    assert set(first) == {f"pixels_{kind}_{m}" for kind in ("umap", "tsne") for m in ("acc", "nmi", "ari")}
    (cached,) = cache_dir().glob("*.json")
    record = json.loads(cached.read_text())
    record["metrics"]["pixels_umap_acc"] = 0.123  # what the cache holds is what the next call reads
    cached.write_text(json.dumps(record))
    assert pixel_baselines(pixels, labels, 10, 10, n_init=5, seed=0, progress=False)["pixels_umap_acc"] == 0.123
    monkeypatch.setattr(baselines, "TSNE_MAX_IMAGES", 100)  # t-SNE only on small sets; other images, other file
    other = pixel_baselines(pixels[:200], labels[:200], 10, 10, n_init=5, seed=0, progress=False)
    assert set(other) == {f"pixels_umap_{m}" for m in ("acc", "nmi", "ari")}
    assert len(list(cache_dir().glob("*.json"))) == 2


def test_evaluation_reports_the_baselines_beside_the_representation(digits):
    from clusterlab.platform.evaluate import evaluate_features

    pixels, labels = digits
    rng = np.random.default_rng(0)
    representation = np.eye(10, dtype=np.float32)[labels] + 0.3 * rng.standard_normal((len(labels), 10), np.float32)
    result = evaluate_features({"label": labels, "representation": representation}, 10, n_init=5, pixels=pixels,
                               pixels_kmeans=False, embedding_baselines=True, plots=False, progress=False)
    assert result.metrics["umap_kmeans_acc"] > 0.9  # UMAP + K-means on a representation that holds the classes
    assert {"pixels_umap_acc", "pixels_tsne_acc"} <= set(result.metrics) and "pixels_acc" not in result.metrics
