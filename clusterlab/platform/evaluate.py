"""Evaluate a training checkpoint: features of the test split -> K-means -> ACC / NMI / ARI."""

from __future__ import annotations

from pathlib import Path

from clusterlab.data.augment import Normalize
from clusterlab.data.datasets import load_split
from clusterlab.eval.clustering import evaluate_raw_pixels, evaluate_representations
from clusterlab.eval.features import extract_features
from clusterlab.trainers.checkpoint import method_from_checkpoint, read_checkpoint


def evaluate_checkpoint(checkpoint_dir: str | Path, progress: bool = True) -> dict[str, float]:
    """Cluster the test split's representations (K = number of classes).

    Reports K-means on L2-normalised (``kmeans_norm_*``) and raw (``kmeans_raw_*``)
    representations, and on raw pixels (``pixels_*``) as the baseline.
    """
    method, cfg, meta = method_from_checkpoint(read_checkpoint(checkpoint_dir))
    test = load_split(cfg.data.name, cfg.data.root, "test", meta.image_size)
    features = extract_features(method.eval_outputs, test.images, Normalize(meta.mean, meta.std),
                                batch_size=cfg.eval.batch_size, progress=progress)
    k, ev = meta.num_classes, cfg.eval
    if progress:
        print(f"K-means (K={k}, best of {ev.kmeans_n_init} inits) on {len(test)} test representations", flush=True)
    metrics = evaluate_representations(features["representation"], test.labels, k, ev.kmeans_n_init,
                                       ev.kmeans_max_iter, cfg.seed)
    if ev.raw_pixels_baseline:
        metrics.update(evaluate_raw_pixels(test.images, test.labels, k, ev.kmeans_n_init, ev.kmeans_max_iter, cfg.seed))
    return metrics
