"""`eval.split`: a checkpoint evaluated on the test split or on the whole dataset (train + test,
LSD-C Sec. 4), in-process: K-means runs here instead of as Ray tasks, everything else is the
real evaluation path."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clusterlab.config import load_config
from clusterlab.data.datasets import load_split
from clusterlab.eval.kmeans import batched_kmeans
from clusterlab.platform import evaluate as evaluate_module
from clusterlab.platform.evaluate import EVAL_SPLIT_TAG, evaluate_checkpoint, log_evaluation
from clusterlab.platform.fanout import FanoutResult, _merge
from clusterlab.platform.loop import LocalSession, fit

FAST = ["epochs=1", "batch_size=128", "data.val_fraction=0.1", "optim.warmup_epochs=0", "model.cnn_width=8",
        "eval.kmeans_n_init=2", "eval.kmeans_max_iter=20", "eval.batch_size=256"]


def _local_fanout(variants: dict[str, np.ndarray], k: int, n_init: int = 50, labels: np.ndarray | None = None,
                  num_classes: int | None = None, max_iter: int = 300, seed: int = 0,
                  **_: object) -> dict[str, FanoutResult]:
    """:func:`~clusterlab.platform.fanout.kmeans_fanout` in this process, one chunk per variant."""
    return {name: _merge([batched_kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed, device="cpu",
                                         return_all_labels=True)], k, labels, num_classes)
            for name, x in variants.items()}


def _checkpoint(directory, split: str):
    session = LocalSession(directory)
    fit(load_config(None, [*FAST, f"eval.split={split}"], preset="simclr_digits"), session)
    return session.latest_checkpoint()


def test_split_all_evaluates_train_plus_test_from_the_two_feature_files(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "kmeans_fanout", _local_fanout)
    n_train, n_test = len(load_split("digits", None, "train")), len(load_split("digits", None, "test"))
    features = tmp_path / "features"

    on_test = evaluate_checkpoint(_checkpoint(tmp_path / "a", "test"), features, plots=False, progress=False)
    assert on_test.split == "test" and on_test.metrics["eval_images"] == n_test

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    # The whole-dataset evaluation reads the two files already there (the same features, as
    # the directory is shared here): no third extraction, and the same linear probe.
    monkeypatch.setattr(evaluate_module, "write_features", no_extraction)
    on_all = evaluate_checkpoint(_checkpoint(tmp_path / "b", "all"), features, plots=False, progress=False)
    assert on_all.split == "all" and on_all.metrics["eval_images"] == n_train + n_test
    assert sorted(p.name for p in features.iterdir()) == ["test.parquet", "train.parquet"]
    assert on_all.metrics["linear_probe_acc"] == pytest.approx(on_test.metrics["linear_probe_acc"])  # train -> test
    for prefix in ("kmeans_norm", "kmeans_raw", "pixels"):  # pixels: train + test images too
        assert len(on_all.kmeans[prefix].labels) == n_train + n_test
        assert 0.0 <= on_all.metrics[f"{prefix}_acc"] <= 1.0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("split")).info.run_id
    log_evaluation(client, run_id, on_all)
    run = client.get_run(run_id).data
    assert run.tags[EVAL_SPLIT_TAG] == "all" and run.metrics["eval_images"] == n_train + n_test
