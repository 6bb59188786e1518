"""Evaluate a training checkpoint: features of the test split -> clustering -> metrics + plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from clusterlab.data.augment import Normalize
from clusterlab.data.datasets import load_split
from clusterlab.eval.clustering import evaluate_mixture, evaluate_raw_pixels, evaluate_representations
from clusterlab.eval.features import extract_features
from clusterlab.eval.plots import component_usage_figure
from clusterlab.trainers.checkpoint import method_from_checkpoint, read_checkpoint


@dataclass
class EvalResult:
    metrics: dict[str, float]
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact file name -> figure


def evaluate_checkpoint(checkpoint_dir: str | Path, progress: bool = True) -> EvalResult:
    """Cluster the test split (K = number of classes).

    Always: K-means on L2-normalised (``kmeans_norm_*``) and raw (``kmeans_raw_*``)
    representations, best of ``eval.kmeans_n_init`` by inertia; K-means on raw pixels
    (``pixels_*``) as the baseline. Methods with mixture coefficients (MIX'EM) add Max Comp
    (``maxcomp_*``), MIX'EM-initialised K-means (``kmeans_mixinit_*``) and the component
    usage plot.
    """
    method, cfg, meta = method_from_checkpoint(read_checkpoint(checkpoint_dir))
    test = load_split(cfg.data.name, cfg.data.root, "test", meta.image_size)
    features = extract_features(method.eval_outputs, test.images, Normalize(meta.mean, meta.std),
                                batch_size=cfg.eval.batch_size, progress=progress)
    k, ev = meta.num_classes, cfg.eval
    if progress:
        print(f"K-means (K={k}, best of {ev.kmeans_n_init} inits) on {len(test)} test representations", flush=True)
    result = EvalResult(evaluate_representations(features["representation"], test.labels, k, ev.kmeans_n_init,
                                                 ev.kmeans_max_iter, cfg.seed))
    if "coefficients" in features:
        coefficients = features["coefficients"]
        result.metrics.update(evaluate_mixture(features["representation"], coefficients, test.labels, k,
                                               ev.kmeans_max_iter, cfg.seed))
        result.figures["component_usage.png"] = component_usage_figure(
            test.labels, coefficients.argmax(axis=1), coefficients.shape[1])
    if ev.raw_pixels_baseline:
        result.metrics.update(evaluate_raw_pixels(test.images, test.labels, k, ev.kmeans_n_init,
                                                  ev.kmeans_max_iter, cfg.seed))
    return result
