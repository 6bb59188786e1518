"""The Python API: features, in-process evaluation, sweep results and heatmaps from a notebook
or a script, with the functions the CLI runs.

``from clusterlab import load_features, evaluate_features, ...`` loads this module on first use
(``clusterlab/__init__.py``), so ``import clusterlab`` and the CLI stay free of torch, Ray and
MLflow. Nothing here starts Ray or writes to MLflow: :func:`evaluate_features` clusters in this
process unless the caller has initialised Ray, and :func:`draw_heatmap` only writes files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clusterlab.config import MAX_SEED
from clusterlab.eval.feature_files import read_features, write_features
from clusterlab.eval.kmeans import batched_kmeans
from clusterlab.platform import heatmap, tracking
from clusterlab.platform.evaluate import EvalResult
from clusterlab.platform.evaluate import evaluate_features as _evaluate_features
from clusterlab.redact import redact_uri
from clusterlab.search_space import LAMBDA_ALIASES

__all__ = ["batched_kmeans", "draw_heatmap", "evaluate_features", "load_features", "sweep_results", "write_features"]

RUN_FEATURES = "features/test.parquet"  # a run's test-split features, as platform.evaluate.log_evaluation logs them


def load_features(source: str | os.PathLike[str], tracking_uri: str | None = None) -> dict[str, np.ndarray]:
    """Features as numpy arrays, one per column of the features schema (README, "Evaluation"):
    ``label`` (N,) int64, ``representation`` (N, D) float32, and the optional columns present.

    Args:
        source: a Parquet features file (a path ending in ``.parquet``, or any existing file),
            else an MLflow run id, whose evaluated test split (the ``features/test.parquet``
            artifact every training run logs) is read.
        tracking_uri: the run's tracking store (default: ``$CLUSTERLAB_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` in the working directory).

    Raises:
        FileNotFoundError: a ``.parquet`` path that does not exist.
        ValueError: a file outside the schema, an unknown run id, a run without features.
    """
    path = Path(source)
    if path.suffix == ".parquet" or path.is_file():
        return read_features(path)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run_id = str(source)
    if not tracking.is_run_id(run_id):
        raise ValueError(f"source: {run_id!r} is neither a features file (.parquet) nor an MLflow run id "
                         "(32 hex digits)")
    client = tracking.connect(uri, existing=True)
    try:
        client.get_run(run_id)
    except Exception:  # MlflowException (no such run) or a malformed id
        raise ValueError(f"source: {run_id!r} is neither a features file (.parquet) nor a run in the tracking "
                         f"store {redact_uri(uri)}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, RUN_FEATURES, tmp)
        except Exception:  # MlflowException or a store error: the run has no features to read
            raise ValueError(f"source: run {run_id} has no {RUN_FEATURES!r} artifact (a run logs it when its "
                             "evaluation ends; evaluate it with `clusterlab evaluate --run-id`)") from None
        return read_features(local)


def _columns(features: Mapping[str, np.ndarray], argument: str) -> dict[str, np.ndarray]:
    """``features`` as arrays, refused (naming ``argument``) unless it holds ``label`` (N,) and
    ``representation`` (N, D) and every column has N rows."""
    if not isinstance(features, Mapping) or not {"label", "representation"} <= set(features):
        held = sorted(features) if isinstance(features, Mapping) else type(features).__name__
        raise ValueError(f"{argument}: expected a mapping of columns with at least 'label' (N,) and "
                         f"'representation' (N, D), as load_features returns; got {held}")
    columns = {}
    for name, values in features.items():
        try:
            columns[name] = np.asarray(values)
        except ValueError:  # numpy refuses rows of different lengths
            raise ValueError(f"{argument}: column {name!r} has rows of different lengths; every row of a column "
                             "must have the same shape") from None
    n = len(columns["label"])
    if (columns["label"].ndim != 1 or columns["representation"].ndim != 2
            or any(len(values) != n for values in columns.values())):
        shapes = {name: values.shape for name, values in columns.items()}
        raise ValueError(f"{argument}: 'label' must be (N,), 'representation' (N, D), every column N rows; got {shapes}")
    if columns["label"].dtype.kind not in "iu":
        raise ValueError(f"{argument}: 'label' must hold integer class ids, got dtype {columns['label'].dtype}; "
                         "map class names to 0..C-1 first (np.unique(labels, return_inverse=True)[1])")
    if columns["representation"].dtype.kind not in "fiu":
        raise ValueError(f"{argument}: 'representation' must be real numbers, got dtype "
                         f"{columns['representation'].dtype}")
    return columns


def _integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], else a ValueError naming the argument."""
    bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer {bounds}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: must be {bounds}, got {value}")
    return int(value)


def evaluate_features(
    features: Mapping[str, np.ndarray],
    k: int | None = None,
    *,
    n_init: int = 50,
    seed: int = 0,
    max_iter: int = 300,
    device: str | None = None,
    tasks: int | None = None,
    train: Mapping[str, np.ndarray] | None = None,
    umap: bool = False,
    plots: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Cluster and score features as ``clusterlab evaluate --features`` does, and return its
    :class:`~clusterlab.platform.evaluate.EvalResult`: ``metrics`` (``kmeans_norm_*`` on the
    L2-normalised representation, ``kmeans_raw_*``, ``maxcomp_*`` / ``kmeans_mixinit_*`` /
    ``head_*`` when those columns are present, ``linear_probe_acc`` with ``train``), ``kmeans``
    (every initialisation's inertia and ACC per reading) and, with ``plots``, ``figures``.

    K-means is :func:`batched_kmeans` with ``n_init`` initialisations: in this process when Ray
    is not initialised (on ``device``, default CUDA when this machine has it; the result of the
    CLI with ``--tasks 1``), as the Ray fan-out over the cluster's CPUs or GPUs (``tasks``) when
    the caller has initialised Ray. Labels are renumbered 0..C-1; ``k`` defaults to C.

    Args:
        features: columns as :func:`load_features` returns (at least ``label``, ``representation``).
        k: number of clusters, 2 <= k <= N (default: the number of classes).
        n_init, seed, max_iter: K-means initialisations, seed and Lloyd iterations.
        device: ``"cpu"`` or ``"cuda"`` (default: see above).
        tasks: Ray tasks per reading when Ray is initialised (default: one per CPU / GPU).
        train: the train split's columns, for the linear probe (fitted on train, scored on ``features``).
        umap: also ``umap_kmeans_*``: UMAP (10-d, N2D's settings) + K-means on the L2-normalised
            representation (:mod:`clusterlab.eval.baselines`; numba compiles for about 15 s once).
        plots: also draw the accuracy-vs-inertia, confusion and t-SNE figures.
        progress: show progress bars.
    """
    test = _columns(features, "features")
    train_columns = None if train is None else _columns(train, "train")
    if train_columns is not None and train_columns["representation"].shape[1] != test["representation"].shape[1]:
        raise ValueError(f"train: its representation has {train_columns['representation'].shape[1]} dimensions, "
                         f"the features' {test['representation'].shape[1]}: pass the train split of the same model")
    k = None if k is None else _integer("k", k, 2)
    n_init, max_iter = _integer("n_init", n_init, 1), _integer("max_iter", max_iter, 1)
    seed = _integer("seed", seed, 0, MAX_SEED)
    tasks = None if tasks is None else _integer("tasks", tasks, 1)
    return _evaluate_features(test, k, n_init=n_init, max_iter=max_iter, seed=seed, tasks=tasks, device=device,
                              train=train_columns, embedding_baselines=umap, plots=plots, progress=progress)


def sweep_results(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """A sweep's trial runs as a table, one row per child run, oldest first: ``run_id``,
    ``trial_id``, ``status`` (``FINISHED``, ``FAILED``, ...), one column per searched param
    (from the sweep's search space; values as numbers where they are), then one per metric
    (its latest value; NaN where the run has none). :func:`draw_heatmap` draws it.

    Args:
        experiment: the sweep's name (its MLflow experiment).
        tracking_uri: the tracking store (default: ``$CLUSTERLAB_TRACKING_URI``, else
            ``sqlite:///mlflow.db`` in the working directory).

    Raises:
        ValueError: no such experiment, or it has no trial runs.
    """
    client = tracking.connect(tracking.resolve_tracking_uri(tracking_uri), existing=True)
    return pd.DataFrame(heatmap.sweep_records(client, experiment))


def draw_heatmap(
    data: pd.DataFrame | Sequence[heatmap.Cell],
    path: str | os.PathLike[str],
    *,
    metric: str,
    x: str,
    y: str,
    facet: str | None = None,
    title: str = "",
) -> Path:
    """Write a heatmap of ``metric`` over ``x`` (across) and ``y`` (down), one panel per
    ``facet`` value, to ``path`` (PNG) and the same name with ``.csv``, as ``clusterlab
    heatmap`` draws it: a cell is the mean (and std) over the runs at that point; points whose
    runs all failed and grid points without a run are hatched and labelled, never drawn as 0.
    Nothing is logged to MLflow. Returns the PNG's path.

    Args:
        data: a table with one row per run (e.g. :func:`sweep_results`): columns ``x``, ``y``,
            ``facet``, ``metric``, and ``status`` when some runs did not finish (a row that is
            not FINISHED, or whose metric is NaN, is a failed run); or the cells of
            :func:`clusterlab.platform.heatmap.sweep_cells`.
        path: the PNG file to write.
        metric, x, y, facet: column names; ``lambda_1`` .. ``lambda_4`` name the loss weights
            when the table has no such column.
        title: the figure's title.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file name (the CSV is written beside it), got {str(path)!r}")
    if isinstance(data, pd.DataFrame):
        x, y, facet = (name if name is None or name in data.columns else LAMBDA_ALIASES.get(name, name)
                       for name in (x, y, facet))
        cells = heatmap.table_cells(data, x, y, facet, metric)
    else:
        cells = list(data)
        if not cells or not all(isinstance(c, heatmap.Cell) for c in cells):
            raise ValueError(f"data: expected a pandas DataFrame or a non-empty list of heatmap cells, got "
                             f"{type(data).__name__}")
    return heatmap.write_heatmap(cells, x, y, facet, metric, title, path)  # no client: nothing is logged
