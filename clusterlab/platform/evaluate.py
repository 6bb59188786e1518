"""Post-training evaluation: features -> Parquet -> K-means fan-out on Ray -> metrics + plots.

``evaluate_checkpoint`` extracts the test split's and the train split's features once into
Parquet files and reuses them on later evaluations, so a run can be re-evaluated without
touching the model again. It clusters the test split, or with ``eval.split: all`` the
labelled images of train + test together (LSD-C Sec. 4: "we train and test the methods on the
whole dataset"), read from the same two files; the linear probe always trains on train and
scores on test. ``evaluate_features`` works from features alone, including files produced
outside clusterlab, and without Ray (K-means then runs in this process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import Normalize
from clusterlab.data.datasets import load_split
from clusterlab.eval.baselines import embedding_kmeans, pixel_baselines
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
from clusterlab.platform.fanout import FanoutResult, kmeans_fanout, local_device
from clusterlab.trainers import DataMeta, Method
from clusterlab.trainers.checkpoint import method_from_checkpoint, read_checkpoint


EVAL_SPLIT_TAG = "clusterlab.eval_split"  # run tag: the images a checkpoint's evaluation scored (eval.split)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact file name -> figure
    kmeans: dict[str, FanoutResult] = field(default_factory=dict)  # metric prefix -> fan-out result
    feature_files: dict[str, Path] = field(default_factory=dict)  # split -> Parquet file
    split: str | None = None  # eval.split of a checkpoint's evaluation ("test" / "all"); None: given features

    @property
    def tags(self) -> dict[str, str]:
        """Run tags recording what was evaluated: :data:`EVAL_SPLIT_TAG` when the split is known."""
        return {} if self.split is None else {EVAL_SPLIT_TAG: self.split}


def check_evaluable(features: dict[str, np.ndarray], k: int | None, source: str = "features") -> None:
    """Refuse features that cannot be scored, naming the problem, before any work starts: rows
    without a label (-1), fewer than two classes, K outside [2, N], and NaN / Inf values (a
    diverged model's output), counted per column."""
    labels = features["label"]
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(f"{source}: {unlabelled} of {len(labels)} rows have no label (-1); clustering metrics need "
                         "labels: drop those rows or evaluate a labelled split")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{source}: every row has the label {int(labels[0]) if len(labels) else '-'}; clustering "
                         "metrics need at least two classes")
    if k is not None and not 2 <= k <= len(labels):
        raise ValueError(f"{source}: K must be between 2 and the number of samples ({len(labels)}), got {k}")
    for name, values in features.items():
        if values.dtype.kind == "f":
            bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
            if bad:
                raise ValueError(f"{source}: column {name!r} has NaN or Inf in {bad} of {len(values)} rows (did "
                                 "training diverge? check the run's train_loss); nothing was evaluated")


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
    probe_test: dict[str, np.ndarray] | None = None,
    num_classes: int | None = None,
    pixels: np.ndarray | None = None,
    pixels_kmeans: bool = True,
    embedding_baselines: bool = False,
    plots: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Cluster the evaluated features ``test`` (the test split, or train + test with
    ``eval.split: all``) into K = ``k`` clusters (default: the number of distinct labels) and
    score them against C = ``num_classes`` classes: the dataset's class count where it is known,
    so that a split lacking a class is still matched one-to-one when K = C; without it (features
    from elsewhere) the labels are renumbered 0..C-1 over the distinct labels present, so that
    nothing is sized by label values.

    Metrics: ``eval_images`` (how many images were clustered and scored),
    ``kmeans_norm_*`` (L2-normalised representation, MIX'EM Table 1 row 2),
    ``kmeans_raw_*``, ``pixels_*`` (when ``pixels`` are given and ``pixels_kmeans``), each ``acc/nmi/ari`` plus the
    best ``*_inertia``; with ``embedding_baselines``, ``umap_kmeans_*`` (UMAP + K-means on the
    L2-normalised representation) and, when ``pixels`` are given, ``pixels_umap_*`` /
    ``pixels_tsne_*`` (cached; :mod:`clusterlab.eval.baselines`); ``maxcomp_*`` / ``kmeans_mixinit_*`` when MIX'EM coefficients are
    present; ``head_*`` (argmax of the cluster head, confident-sample accuracy) when head
    probabilities are; ``linear_probe_acc`` when train features are given (fitted on ``train``,
    scored on ``probe_test``, default ``test``). ``device`` (``"cpu"`` /
    ``"cuda"``, default: GPUs when the Ray cluster has any) is where K-means runs: as Ray tasks
    when Ray is initialised, else in this process (default: CUDA when this machine has it).
    """
    check_evaluable(test, k)
    labels = test["label"]
    if num_classes is None:  # features from elsewhere: dense class ids, so nothing scales with label values
        classes, labels = np.unique(labels, return_inverse=True)
        num_classes = len(classes)
    k = k or len(np.unique(labels))
    normalized = test["representation_l2"] if "representation_l2" in test else l2_normalize(test["representation"])
    variants = {"kmeans_norm": normalized, "kmeans_raw": test["representation"]}
    if pixels is not None and pixels_kmeans:
        variants["pixels"] = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    result = EvalResult({"eval_images": float(len(labels))})
    result.kmeans = kmeans_fanout(variants, k, n_init=n_init, labels=labels, num_classes=num_classes,
                                  max_iter=max_iter, seed=seed, tasks=tasks, device=device, progress=progress)
    for prefix, run in result.kmeans.items():
        result.metrics.update({f"{prefix}_{m}": v
                               for m, v in clustering_metrics(labels, run.labels, k, num_classes).items()})
        result.metrics[f"{prefix}_inertia"] = run.inertia
    if embedding_baselines:
        result.metrics.update({f"umap_kmeans_{m}": v for m, v in
                               embedding_kmeans(normalized, labels, "umap", k, num_classes, n_init, seed).items()})
        if pixels is not None:
            result.metrics.update(pixel_baselines(pixels, labels, k, num_classes, n_init=n_init, seed=seed,
                                                  progress=progress))
    if "coefficients" in test:
        result.metrics.update(evaluate_mixture(normalized, test["coefficients"], labels, k, max_iter, seed,
                                               device=local_device(device), num_classes=num_classes))
    if "probabilities" in test:
        result.metrics.update(head_metrics(test["probabilities"], labels, num_classes=num_classes))
    if train is not None:
        probe_test = test if probe_test is None else probe_test
        result.metrics["linear_probe_acc"] = linear_probe_accuracy(train["representation"], train["label"],
                                                                   probe_test["representation"], probe_test["label"])
    if plots:
        norm = result.kmeans["kmeans_norm"]
        result.figures["accuracy_vs_inertia.png"] = accuracy_vs_inertia_figure(norm.inertias, norm.accuracies,
                                                                               norm.best)
        result.figures["confusion.png"] = confusion_figure(*hungarian_match(labels, norm.labels, k, num_classes),
                                                           num_classes)
        result.figures["tsne.png"] = tsne_figure(normalized, labels, seed=seed)
        if "probabilities" in test:
            result.figures["cluster_sizes.png"] = cluster_sizes_figure(
                relative_cluster_sizes(test["probabilities"].argmax(1), test["probabilities"].shape[1]))
        if "coefficients" in test:
            result.figures["component_usage.png"] = component_usage_figure(
                labels, test["coefficients"].argmax(1), test["coefficients"].shape[1])
    return result


def _extract_features(method: Method, meta: DataMeta, cfg: ExperimentConfig, split: str, out_dir: Path,
                      device: str, progress: bool) -> np.ndarray:
    """Write the split's features file unless it exists (streamed in row groups); its images."""
    images = load_split(cfg.data.name, cfg.data.root, split, meta.image_size, cfg.data.limit)
    path = out_dir / f"{split}.parquet"
    if not path.exists():
        method.to(device)
        write_features(path, iter_features(method.eval_outputs, images.images, images.labels,
                                           Normalize(meta.mean, meta.std), batch_size=cfg.eval.batch_size,
                                           device=device, progress=progress, desc=f"{split} features"))
    return images.images


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
    """Evaluate a checkpoint: features of the test and train splits to ``features_dir``
    (``test.parquet``, ``train.parquet``; reused when present), then :func:`evaluate_features`
    on the run's ``eval.split`` (the test split, or ``all``: train + test, LSD-C Sec. 4) with
    C = the dataset's number of classes, the raw-pixel baseline of the same images, and the
    linear probe (train -> test)."""
    method, cfg, meta = method_from_checkpoint(read_checkpoint(checkpoint_dir))
    features_dir = Path(features_dir)
    local = local_device(device)
    test_images = _extract_features(method, meta, cfg, "test", features_dir, local, progress)
    train_images = _extract_features(method, meta, cfg, "train", features_dir, local, progress)
    ev = cfg.eval
    pixels = None
    if ev.raw_pixels_baseline or ev.embedding_baselines:
        pixels = test_images if ev.split == "test" else np.concatenate([train_images, test_images])
    files = {split: features_dir / f"{split}.parquet" for split in ("train", "test")}
    if ev.split == "all":  # read once, train rows then test rows; the splits are views of it
        features = read_features([files["train"], files["test"]])
        n_train = len(train_images)
        train = {name: values[:n_train] for name, values in features.items()}
        test = {name: values[n_train:] for name, values in features.items()}
    else:
        train, test = read_features(files["train"]), read_features(files["test"])
        features = test
    result = evaluate_features(features, k or meta.num_classes,
                               n_init=n_init or ev.kmeans_n_init, max_iter=ev.kmeans_max_iter,
                               seed=cfg.seed if seed is None else seed, tasks=tasks, device=device, train=train,
                               probe_test=test, num_classes=meta.num_classes, pixels=pixels,
                               pixels_kmeans=ev.raw_pixels_baseline, embedding_baselines=ev.embedding_baselines,
                               plots=plots, progress=progress)
    result.feature_files = files
    result.split = ev.split
    return result


def log_evaluation(client: MlflowClient, run_id: str, result: EvalResult) -> None:
    """Final metrics (with the evaluated split as a tag), plots under ``plots/`` and the test
    features under ``features/``."""
    tracking.log_final(client, run_id, result.metrics, tags=result.tags)
    for name, figure in result.figures.items():
        client.log_figure(run_id, figure, f"plots/{name}")
    if "test" in result.feature_files:
        client.log_artifact(run_id, str(result.feature_files["test"]), "features")
