"""The Python API (`from clusterlab import ...`): the README's example run as written, in-process
evaluation without Ray against scikit-learn, features read back from a run, a sweep's runs as a
DataFrame from a real SQLite store, heatmaps that log nothing, and bad input naming the argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from mlflow.tracking import MlflowClient
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterlab import cli, draw_heatmap, evaluate_features, load_features, sweep_results, write_features
from clusterlab.eval.features import l2_normalize
from clusterlab.platform.evaluate import EvalResult, log_evaluation
from clusterlab.platform.tracking import PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    """The one ```python block of the README's "## Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 1, "the Python API section holds exactly one python block"
    return blocks[0].split("```", 1)[0]


def _blobs(n: int = 400, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n, 6, centers=k, cluster_std=0.5, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def test_import_clusterlab_stays_cheap_and_lists_the_api():
    """Importing the package loads none of torch, Ray, MLflow; the API loads on first access."""
    probe = ("import sys, clusterlab\n"
             "heavy = sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)\n"
             "print(heavy, sorted(clusterlab.__all__), set(clusterlab.__all__) <= set(dir(clusterlab)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == ("[] ['__version__', 'batched_kmeans', 'draw_heatmap', 'evaluate_features', "
                           "'load_features', 'sweep_results', 'write_features'] True")
    import clusterlab
    from clusterlab import api

    assert sorted(api.__all__) == sorted(clusterlab.__all__[1:])
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        clusterlab.nope  # noqa: B018


def test_evaluate_features_without_ray_matches_scikit_learn():
    """In this process (Ray is not started by it): the same partition and inertia as scikit-learn."""
    x, y = _blobs()
    ray_before = ray.is_initialized()
    result = evaluate_features({"label": y, "representation": x}, n_init=10, device="cpu")
    assert ray.is_initialized() == ray_before  # the README example checks a fresh process stays without Ray
    for prefix, data in (("kmeans_raw", x), ("kmeans_norm", l2_normalize(x))):
        reference = KMeans(4, n_init=10, random_state=0).fit(data)
        assert result.metrics[f"{prefix}_acc"] == pytest.approx(1.0)
        assert result.metrics[f"{prefix}_nmi"] == pytest.approx(normalized_mutual_info_score(y, reference.labels_))
        assert result.metrics[f"{prefix}_ari"] == pytest.approx(adjusted_rand_score(y, reference.labels_))
        assert result.metrics[f"{prefix}_inertia"] == pytest.approx(reference.inertia_, rel=1e-4)
        assert result.kmeans[prefix].inertias.shape == (10,)
    assert result.figures == {}  # plots only when asked for


def test_evaluate_features_bad_input_names_the_argument():
    x, y = _blobs(n=20)
    with pytest.raises(ValueError, match="features: expected a mapping"):
        evaluate_features(x)
    with pytest.raises(ValueError, match=r"features: .*got \['label'\]"):
        evaluate_features({"label": y})
    with pytest.raises(ValueError, match="features: 'label' must be"):
        evaluate_features({"label": y[:10], "representation": x})
    with pytest.raises(ValueError, match="n_init: must be >= 1"):
        evaluate_features({"label": y, "representation": x}, n_init=0)
    with pytest.raises(ValueError, match="features: K must be between 2 and the number of samples"):
        evaluate_features({"label": y, "representation": x}, k=50)
    with pytest.raises(ValueError, match="train: expected a mapping"):
        evaluate_features({"label": y, "representation": x}, train=[1, 2])
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        evaluate_features({"label": y, "representation": x}, device="tpu")
    # Hardening round 3: each of these was a raw numpy / torch error.
    for kwargs, message in [({"k": 2.5}, r"k: expected an integer >= 2, got 2.5"),
                            ({"k": "3"}, r"k: expected an integer >= 2, got '3'"),
                            ({"n_init": 2.5}, r"n_init: expected an integer >= 1, got 2.5"),
                            ({"seed": -1}, r"seed: must be in 0..4294967295, got -1"),
                            ({"train": {"label": y, "representation": x[:, :1]}},
                             r"train: its representation has 1 dimensions, the features' 6")]:
        with pytest.raises(ValueError, match=message):
            evaluate_features({"label": y, "representation": x}, **kwargs)
    with pytest.raises(ValueError, match=r"'label' must hold integer class ids, got dtype <U1; map class names"):
        evaluate_features({"label": np.array(list("ab") * 10), "representation": x})
    with pytest.raises(ValueError, match="column 'representation' has rows of different lengths"):
        evaluate_features({"label": y[:2], "representation": [[1.0, 2.0], [3.0]]})


def test_load_features_from_a_file_and_from_a_run(tracking_uri, tmp_path, monkeypatch):
    """A run's features are the test split's Parquet file the platform logs when it evaluates
    (``log_evaluation``), read back by run id from the store at $CLUSTERLAB_TRACKING_URI."""
    monkeypatch.chdir(tmp_path)  # the store's artifacts go here
    x, y = _blobs(n=50)
    path = write_features(tmp_path / "test.parquet", [{"index": np.arange(50), "label": y, "representation": x}])
    from_file = load_features(str(path))
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("api")
    evaluated = client.create_run(exp).info.run_id
    log_evaluation(client, evaluated, EvalResult({"kmeans_norm_acc": 1.0}, feature_files={"test": path}))
    from_run = load_features(evaluated)
    for features in (from_file, from_run):
        assert sorted(features) == ["index", "label", "representation"]
        np.testing.assert_array_equal(features["label"], y)
        np.testing.assert_array_equal(features["representation"], x)

    bare = client.create_run(exp).info.run_id
    with pytest.raises(ValueError, match=f"source: run {bare} has no 'features/test.parquet' artifact"):
        load_features(bare, tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="source: 'nope' is neither a features file"):
        load_features("nope")
    with pytest.raises(FileNotFoundError, match="missing.parquet does not exist"):
        load_features(tmp_path / "missing.parquet")


SPACE = "base: mixem_digits\nsearch:\n  lambda_3: {grid: [0.0, 0.1]}\n  lambda_4: {grid: [0.0, 0.1]}\n"


def test_sweep_results_is_one_row_per_child_run_and_draws_a_heatmap_that_logs_nothing(tracking_uri, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("sw")
    parent = client.create_run(exp, tags={ROLE_TAG: "parent", SWEEP_TAG: "sw"}).info.run_id
    client.log_text(parent, SPACE, "search_space.yaml")
    accs = {}
    for trial, (push, pull, status) in enumerate([("0.0", "0.0", "FINISHED"), ("0.0", "0.1", "FINISHED"),
                                                  ("0.1", "0.0", "FINISHED"), ("0.1", "0.1", "FAILED")]):
        run = client.create_run(exp, tags={PARENT_TAG: parent, SWEEP_TAG: "sw", TRIAL_TAG: f"t{trial}"}).info.run_id
        for key, value in (("loss.weights.push", push), ("loss.weights.pull", pull), ("method", "mixem"),
                           ("optim.lr", "0.0005")):
            client.log_param(run, key, value)
        client.log_metric(run, "train_loss", 5.0 - trial)
        if status == "FINISHED":
            accs[(float(push), float(pull))] = 0.5 + 0.1 * trial
            client.log_metric(run, "kmeans_mixinit_acc", accs[(float(push), float(pull))])
        client.set_terminated(run, status)

    table = sweep_results("sw")
    assert list(table.columns) == ["run_id", "trial_id", "status", "loss.weights.push", "loss.weights.pull",
                                   "kmeans_mixinit_acc", "train_loss"]
    assert table["trial_id"].tolist() == ["t0", "t1", "t2", "t3"]
    assert table["status"].tolist() == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert table["loss.weights.push"].tolist() == [0.0, 0.0, 0.1, 0.1]  # numbers, not the params' strings
    assert table["kmeans_mixinit_acc"].iloc[:3].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert np.isnan(table["kmeans_mixinit_acc"].iloc[3])

    runs_before = len(client.search_runs([exp]))
    png = draw_heatmap(table, tmp_path / "sw.png", metric="kmeans_mixinit_acc", x="lambda_3", y="lambda_4")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = pd.read_csv(png.with_suffix(".csv"))
    for _, row in rows.iterrows():
        key = (row["loss.weights.push"], row["loss.weights.pull"])
        if key in accs:
            assert row["status"] == "ok" and row["kmeans_mixinit_acc_mean"] == pytest.approx(accs[key])
        else:
            assert row["status"] == "failed" and np.isnan(row["kmeans_mixinit_acc_mean"])
    assert len(client.search_runs([exp])) == runs_before
    assert [a.path for a in client.list_artifacts(parent)] == ["search_space.yaml"]  # no heatmap/ logged

    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        sweep_results("nope")


def test_sweep_results_without_a_search_space_lists_the_params_that_vary(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("seeds")
    for seed in (0, 1):
        run = client.create_run(exp).info.run_id
        client.log_param(run, "seed", str(seed))
        client.log_param(run, "method", "simclr")
        client.set_terminated(run, "FINISHED")
    assert list(sweep_results("seeds", tracking_uri=tracking_uri).columns) == ["run_id", "trial_id", "status", "seed"]


def test_draw_heatmap_bad_input_names_the_argument(tmp_path):
    table = pd.DataFrame({"a": [0.0, 1.0], "b": [0.0, 0.0], "acc": [0.5, 0.6]})
    with pytest.raises(ValueError, match="path: expected a .png"):
        draw_heatmap(table, tmp_path / "h.csv", metric="acc", x="a", y="b")
    with pytest.raises(ValueError, match="x: the table has no column 'c'"):
        draw_heatmap(table, tmp_path / "h.png", metric="acc", x="c", y="b")
    with pytest.raises(ValueError, match="metric: the table has no column 'nmi'"):
        draw_heatmap(table, tmp_path / "h.png", metric="nmi", x="a", y="b")
    with pytest.raises(ValueError, match="data: the table has no rows"):
        draw_heatmap(table.iloc[:0], tmp_path / "h.png", metric="acc", x="a", y="b")
    with pytest.raises(ValueError, match="data: expected a pandas DataFrame"):
        draw_heatmap({"a": [1]}, tmp_path / "h.png", metric="acc", x="a", y="b")
    assert not list(tmp_path.iterdir())


def test_readme_example_runs_without_ray_or_mlflow_and_matches_the_cli(tmp_path, request):
    """The README's example as written, in a fresh interpreter (so that no earlier test's Ray
    is around) in an empty directory, with the tracking store pointed there: it starts no Ray,
    writes no MLflow store, and its metrics are those of ``clusterlab evaluate --features``
    with one Ray task (the in-process K-means is the fan-out's first chunk)."""
    example = _readme_example()
    assert "n_init=10" in example and "seed=0" in example  # the CLI below is run with the same options
    report = ("\nimport json, sys\n"
              "json.dump({'metrics': result.metrics, 'png': str(png),\n"
              "           'ray': 'ray' in sys.modules and sys.modules['ray'].is_initialized()},\n"
              "          open('report.json', 'w'))\n")
    (tmp_path / "example.py").write_text(example + report)
    env = {"CLUSTERLAB_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    scores = {m: v for m, v in report["metrics"].items() if m.endswith(("_acc", "_nmi", "_ari"))}
    assert len(scores) == 6 and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "kmeans_norm_acc" in done.stdout  # the example prints its scores
    assert report["ray"] is False
    png = tmp_path / report["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".csv").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing was logged

    request.getfixturevalue("ray_local")  # the session's Ray, started only now
    out = tmp_path / "cli.json"
    features = next(tmp_path.glob("*.parquet"))
    assert cli.main(["evaluate", "--features", str(features), "--n-init", "10", "--seed", "0", "--tasks", "1",
                     "--no-plots", "--json", str(out)]) == 0
    from_cli = json.loads(out.read_text())
    for name, value in report["metrics"].items():
        assert from_cli[name] == pytest.approx(value, rel=1e-5), name
