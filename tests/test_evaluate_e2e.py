"""Evaluation fan-out through a real local Ray, and `clusterlab evaluate --features` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from clusterlab import cli
from clusterlab.eval.feature_files import write_features
from clusterlab.eval.linear_probe import linear_probe_accuracy
from clusterlab.eval.metrics import mean_std
from clusterlab.platform.fanout import kmeans_fanout

pytestmark = pytest.mark.ray


def _blobs(n=600, d=8, k=4, seed=0):
    x, y = make_blobs(n, d, centers=k, cluster_std=2.0, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def test_fanout_over_two_tasks_keeps_every_initialisation(ray_local):
    x, y = _blobs()
    out = kmeans_fanout({"a": x, "b": x * 3.0}, 4, n_init=6, labels=y, tasks=2, progress=False)
    for name, run in out.items():
        assert run.inertias.shape == (6,) and run.accuracies.shape == (6,) and run.n_iters.shape == (6,)
        assert run.inertia == pytest.approx(run.inertias.min())
        assert len(np.unique(run.inertias.round(3))) >= 1
    # Scaling the data scales every inertia by 9; the clustering itself is the same.
    assert out["b"].inertia == pytest.approx(9 * out["a"].inertia, rel=1e-3)
    assert out["a"].accuracies[out["a"].best] == pytest.approx(1.0)  # well-separated blobs


def test_fanout_tasks_ask_ray_for_the_memory_they_allocate(ray_local, monkeypatch):
    """So that Ray, not its OOM killer, limits how many run at once on a node (the 4608-d MNIST
    features of iic_vgg4 had K-means tasks OOM-killed before). The real tasks run; the options
    each is submitted with are recorded on the way."""
    from clusterlab.eval.kmeans import task_memory
    from clusterlab.platform import fanout

    submitted: list[dict] = []
    task = fanout._kmeans_task

    class Recorded:
        def options(self, **options):
            submitted.append(options)
            return task.options(**options)

    monkeypatch.setattr(fanout, "_kmeans_task", Recorded())
    x = np.random.default_rng(1).normal(size=(500, 7)).astype(np.float32)
    run = kmeans_fanout({"x": x}, 5, n_init=3, tasks=2, progress=False)["x"]
    assert run.inertias.shape == (3,)
    assert sorted(o["memory"] for o in submitted) == [task_memory(500, 7, 5, 1), task_memory(500, 7, 5, 2)]


def test_fanout_chunks_use_distinct_seeds(ray_local):
    x = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    run = kmeans_fanout({"x": x}, 8, n_init=4, tasks=2, progress=False)["x"]
    assert len(set(run.inertias.round(4).tolist())) > 2  # the two chunks did not repeat each other


def test_evaluate_features_cli_end_to_end(ray_local, tmp_path, capsys):
    x, y = _blobs()
    test = tmp_path / "test.parquet"
    write_features(test, [{"index": np.arange(len(x)), "label": y, "representation": x}])
    train_x, train_y = _blobs(seed=0)
    train = tmp_path / "train.parquet"
    write_features(train, [{"index": np.arange(len(train_x)), "label": train_y, "representation": train_x}])
    out_json, plots = tmp_path / "metrics.json", tmp_path / "plots"
    code = cli.main(["evaluate", "--features", str(test), "--train-features", str(train), "--n-init", "4",
                     "--tasks", "2", "--json", str(out_json), "--plots-dir", str(plots)])
    assert code == 0
    assert "K-means, L2-normalised representations" in capsys.readouterr().out
    metrics = json.loads(out_json.read_text())
    assert metrics["kmeans_raw_acc"] == pytest.approx(1.0)
    assert {"kmeans_norm_nmi", "kmeans_norm_ari", "kmeans_norm_inertia", "linear_probe_acc"} <= set(metrics)
    assert metrics["eval_images"] == len(y)  # a features file is evaluated whole
    assert {p.name for p in plots.iterdir()} == {"accuracy_vs_inertia.png", "confusion.png", "tsne.png"}


def test_evaluate_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["evaluate", "--features", str(tmp_path / "missing.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    x, y = _blobs(n=20)
    f = tmp_path / "small.parquet"
    write_features(f, [{"index": np.arange(20), "label": y, "representation": x}])
    assert cli.main(["evaluate", "--features", str(f), "--k", "50"]) == 2
    assert f"--k: 50 clusters cannot be formed from the 20 samples of {f}" in capsys.readouterr().err
    assert cli.main(["evaluate", "--features", str(f), "--k", "1"]) == 2
    unlabelled = tmp_path / "unlabelled.parquet"
    write_features(unlabelled, [{"index": np.arange(20), "label": np.full(20, -1), "representation": x}])
    assert cli.main(["evaluate", "--features", str(unlabelled)]) == 2
    assert f"{unlabelled}: 20 of 20 rows have no label (-1)" in capsys.readouterr().err
    one_class = tmp_path / "one_class.parquet"
    write_features(one_class, [{"index": np.arange(20), "label": np.full(20, 3), "representation": x}])
    assert cli.main(["evaluate", "--features", str(one_class)]) == 2
    assert "every row has the label 3; clustering metrics need at least two classes" in capsys.readouterr().err
    nan = tmp_path / "nan.parquet"
    bad = x.copy()
    bad[[2, 5, 7], 1] = np.nan
    bad[9, 0] = np.inf
    write_features(nan, [{"index": np.arange(20), "label": y, "representation": bad}])
    assert cli.main(["evaluate", "--features", str(nan), "--json", str(tmp_path / "m.json")]) == 2
    assert f"{nan}: column 'representation' has NaN or Inf in 4 of 20 rows" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_label_values_do_not_size_anything(ray_local, tmp_path):
    """Labels 0, 10^6, 2 * 10^6 from a foreign features file: scored as three classes (the
    confusion matrix and the Hungarian problem are 3 columns wide, not 2 * 10^6 + 1)."""
    x, y = _blobs(n=300, k=3)
    path = tmp_path / "sparse_labels.parquet"
    write_features(path, [{"index": np.arange(len(x)), "label": y * 1_000_000, "representation": x}])
    out_json = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--features", str(path), "--n-init", "3", "--json", str(out_json)]) == 0
    metrics = json.loads(out_json.read_text())
    assert metrics["kmeans_raw_acc"] == pytest.approx(1.0) and metrics["eval_images"] == len(x)


def test_linear_probe_and_mean_std():
    x, y = _blobs()
    assert linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:]) == pytest.approx(1.0)
    agg = mean_std([{"acc": 0.5, "nmi": 0.1}, {"acc": 0.7, "nmi": 0.3}])
    assert agg["acc_mean"] == pytest.approx(0.6) and agg["acc_std"] == pytest.approx(0.1)
