"""Post-training evaluation: features -> Parquet -> K-means fan-out on Ray -> metrics + plots.

``evaluate_checkpoint`` extracts the test split's (and, for the linear probe, the train
split's) features once into Parquet files and reuses them on later evaluations, so a run can
be re-evaluated without touching the model again. ``evaluate_features`` works from features
alone, including files produced outside clusterlab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import Normalize
from clusterlab.data.datasets import load_split
from clusterlab.eval.clustering import evaluate_mixture, head_metrics, relative_cluster_sizes
from clusterlab.eval.feature_files import read_features, write_features
from clusterlab.eval.features import iter_features, l2_normalize
from clusterlab.eval.linear_probe import linear_probe_accuracy
from clusterlab.eval.metrics import clustering_metrics, hungarian_match
from clusterlab.eval.plots import (
    accuracy_vs_inertia_figure,
    cluster_sizes_figure,
    component_usage_figure,
    confusion_figure,
    tsne_figure,
)
from clusterlab.platform import tracking
from clusterlab.platform.fanout import FanoutResult, kmeans_fanout
from clusterlab.trainers import Method
from clusterlab.trainers.checkpoint import DataMeta, method_from_checkpoint, read_checkpoint


@dataclass
class EvalResult:
    metrics: dict[str, float]
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact file name -> figure
    kmeans: dict[str, FanoutResult] = field(default_factory=dict)  # metric prefix -> fan-out result
    feature_files: dict[str, Path] = field(default_factory=dict)  # split -> Parquet file


def evaluate_features(
    test: dict[str, np.ndarray],
    k: int | None = None,
    *,
    n_init: int = 50,
    max_iter: int = 300,
    seed: int = 0,
    tasks: int | None = None,
    device: str | None = None,
    train: dict[str, np.ndarray] | None = None,
    pixels: np.ndarray | None = None,
    plots: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Cluster test features (K = ``k`` or the number of classes in the labels).

    Metrics: ``kmeans_norm_*`` (L2-normalised representation, MIX'EM Table 1 row 2),
    ``kmeans_raw_*``, ``pixels_*`` (when ``pixels`` are given), each ``acc/nmi/ari`` plus the
    best ``*_inertia``; ``maxcomp_*`` / ``kmeans_mixinit_*`` when MIX'EM coefficients are
    present; ``head_*`` (argmax of the cluster head, confident-sample accuracy) when head
    probabilities are; ``linear_probe_acc`` when train features are given. ``device`` (``"cpu"`` /
    ``"cuda"``, default: GPUs when the Ray cluster has any) is where K-means runs.
    """
    labels = test["label"]
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} test rows have no label (-1); metrics need a labelled split")
    k = k or len(np.unique(labels))
    if not 2 <= k <= len(labels):
        raise ValueError(f"K must be between 2 and the number of samples ({len(labels)}), got {k}")
    normalized = test["representation_l2"] if "representation_l2" in test else l2_normalize(test["representation"])
    variants = {"kmeans_norm": normalized, "kmeans_raw": test["representation"]}
    if pixels is not None:
        variants["pixels"] = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    result = EvalResult({})
    result.kmeans = kmeans_fanout(variants, k, n_init=n_init, labels=labels, max_iter=max_iter, seed=seed,
                                  tasks=tasks, device=device, progress=progress)
    for prefix, run in result.kmeans.items():
        result.metrics.update({f"{prefix}_{m}": v for m, v in clustering_metrics(labels, run.labels).items()})
        result.metrics[f"{prefix}_inertia"] = run.inertia
    if "coefficients" in test:
        result.metrics.update(evaluate_mixture(normalized, test["coefficients"], labels, k, max_iter, seed,
                                               device=_local_device(device)))
    if "probabilities" in test:
        result.metrics.update(head_metrics(test["probabilities"], labels))
    if train is not None:
        result.metrics["linear_probe_acc"] = linear_probe_accuracy(train["representation"], train["label"],
                                                                   test["representation"], labels)
    if plots:
        norm = result.kmeans["kmeans_norm"]
        num_classes = int(labels.max()) + 1
        result.figures["accuracy_vs_inertia.png"] = accuracy_vs_inertia_figure(norm.inertias, norm.accuracies,
                                                                               norm.best)
        result.figures["confusion.png"] = confusion_figure(*hungarian_match(labels, norm.labels), num_classes)
        result.figures["tsne.png"] = tsne_figure(normalized, labels, seed=seed)
        if "probabilities" in test:
            result.figures["cluster_sizes.png"] = cluster_sizes_figure(
                relative_cluster_sizes(test["probabilities"].argmax(1), test["probabilities"].shape[1]))
        if "coefficients" in test:
            result.figures["component_usage.png"] = component_usage_figure(
                labels, test["coefficients"].argmax(1), test["coefficients"].shape[1])
    return result


def _local_device(device: str | None) -> str:
    """The device for work done in this process (feature extraction, the single MIX'EM-initialised
    K-means run): the one asked for, else CUDA when this machine has it."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _features_for_split(method: Method, meta: DataMeta, cfg: ExperimentConfig, split: str, out_dir: Path,
                        device: str, progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read the split's features file if it exists, else extract it (streamed in row groups)."""
    images = load_split(cfg.data.name, cfg.data.root, split, meta.image_size)
    path = out_dir / f"{split}.parquet"
    if not path.exists():
        method.to(device)
        write_features(path, iter_features(method.eval_outputs, images.images, images.labels,
                                           Normalize(meta.mean, meta.std), batch_size=cfg.eval.batch_size,
                                           device=device, progress=progress, desc=f"{split} features"))
    return read_features(path), images.images


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    features_dir: str | Path,
    *,
    n_init: int | None = None,
    k: int | None = None,
    tasks: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    plots: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint: features of the test (and train) split to ``features_dir``
    (``test.parquet``, ``train.parquet``; reused when present), then :func:`evaluate_features`
    with the raw-pixel baseline and the linear probe."""
    method, cfg, meta = method_from_checkpoint(read_checkpoint(checkpoint_dir))
    features_dir = Path(features_dir)
    local = _local_device(device)
    test, test_images = _features_for_split(method, meta, cfg, "test", features_dir, local, progress)
    train, _ = _features_for_split(method, meta, cfg, "train", features_dir, local, progress)
    ev = cfg.eval
    result = evaluate_features(test, k or meta.num_classes, n_init=n_init or ev.kmeans_n_init,
                               max_iter=ev.kmeans_max_iter, seed=cfg.seed if seed is None else seed, tasks=tasks,
                               device=device, train=train, pixels=test_images if ev.raw_pixels_baseline else None,
                               plots=plots, progress=progress)
    result.feature_files = {s: features_dir / f"{s}.parquet" for s in ("test", "train")}
    return result


def log_evaluation(client: MlflowClient, run_id: str, result: EvalResult) -> None:
    """Final metrics, plots under ``plots/`` and the test features under ``features/``."""
    tracking.log_final(client, run_id, result.metrics)
    for name, figure in result.figures.items():
        client.log_figure(run_id, figure, f"plots/{name}")
    if "test" in result.feature_files:
        client.log_artifact(run_id, str(result.feature_files["test"]), "features")
