"""Storage locations and the multi-node refusals of ``clusterlab.platform.cluster``, without a
Ray cluster: node counts and per-node probe results are given by the test."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from clusterlab.config import ConfigError, load_config
from clusterlab.platform import cluster
from clusterlab.platform.cluster import NodeReport, check_cluster


def _no_probe(directory, url, dataset):
    raise AssertionError("no node should be probed here")


@pytest.mark.parametrize("value", ["s3://bucket/runs", "gs://bucket/a/b",
                                   "s3://bucket/runs?endpoint_override=minio:9000&scheme=http", "file:///srv/ray"])
def test_uris_reach_ray_untouched(value):
    assert cluster.storage_location(value) == value


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cluster.storage_location(None) == str(tmp_path / "ray_results")
    assert cluster.storage_location("runs") == str(tmp_path / "runs")
    assert cluster.local_dir(str(tmp_path / "runs")) == tmp_path / "runs"


def test_join_keeps_the_query_string_last():
    uri = "s3://bucket/runs?endpoint_override=minio:9000&scheme=http"
    assert cluster.join(uri, "sweep", "x") == "s3://bucket/runs/sweep/x?endpoint_override=minio:9000&scheme=http"
    assert cluster.join("/srv/ray", "sweep") == "/srv/ray/sweep"


def test_uri_storage_keeps_driver_files_in_a_local_cache():
    a, b = cluster.local_dir("s3://bucket/a"), cluster.local_dir("s3://bucket/b")
    assert a != b and "clusterlab-cache" in str(a)
    assert cluster.local_path("s3://bucket/a") is None
    assert cluster.local_path("file:///srv/ray") == Path("/srv/ray")


@pytest.mark.parametrize("uri, file_based", [
    ("sqlite:////tmp/mlflow.db", True), ("sqlite:///mlflow.db", True), ("file:///tmp/mlruns", True),
    ("mlruns", True), ("/tmp/mlruns", True), ("http://mlflow:5000", False), ("https://mlflow.example.org", False),
    ("postgresql+psycopg2://u@db/mlflow", False), ("databricks", False), ("databricks://profile", False)])
def test_file_based_tracking_stores(uri, file_based):
    assert cluster.is_file_store(uri) is file_based


def test_single_node_is_not_checked():
    # SQLite and a node-local directory are fine on one node (the local test sweeps rely on it).
    assert check_cluster("/tmp/ray", "sqlite:////tmp/mlflow.db", probe=_no_probe, node_count=1) == 1


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_multi_node_refuses_a_file_based_tracking_store_before_probing(uri):
    with pytest.raises(ConfigError) as exc:
        check_cluster("s3://bucket/runs", uri, probe=_no_probe, node_count=2)
    message = str(exc.value)
    assert message.startswith("tracking.uri:") and uri in message
    assert "CLUSTERLAB_TRACKING_URI=http://" in message and "mlflow server" in message and "2 nodes" in message


def test_multi_node_refuses_storage_a_node_does_not_share(tmp_path):
    calls = []

    def probe(directory, url, dataset):
        calls.append((directory, url))
        return [NodeReport("a" * 56, "10.0.0.1"),
                NodeReport("b" * 56, "10.0.0.2", storage_error="the file .clusterlab-shared-x is not there")]

    with pytest.raises(ConfigError) as exc:
        check_cluster(str(tmp_path), "http://mlflow:5000", probe=probe, node_count=2)
    message = str(exc.value)
    assert message.startswith("storage_path:") and str(tmp_path) in message
    assert "10.0.0.2" in message and "10.0.0.1" not in message
    assert "s3://" in message and "endpoint_override" in message and cluster.SHARED_STORAGE_ENV in message
    assert calls == [(tmp_path, "http://mlflow:5000")]


def test_shared_storage_passes_and_the_env_var_skips_the_storage_probe(tmp_path, monkeypatch):
    ok = lambda directory, url, dataset: [NodeReport("a", "h1"), NodeReport("b", "h2")]  # noqa: E731
    assert check_cluster(str(tmp_path), "http://mlflow:5000", probe=ok, node_count=2) == 2
    monkeypatch.setenv(cluster.SHARED_STORAGE_ENV, "1")
    seen = []
    check_cluster(str(tmp_path), "postgresql+psycopg2://u@db/mlflow",
                  probe=lambda d, u, data: seen.append((d, u)) or [], node_count=2)
    assert seen == []  # nothing left to probe: storage declared shared, tracking not HTTP


def test_remote_storage_is_not_probed_but_the_tracking_server_must_answer_everywhere():
    seen = []

    def probe(directory, url, dataset):
        seen.append((directory, url))
        return [NodeReport("a" * 56, "10.0.0.1"), NodeReport("b" * 56, "10.0.0.2", tracking_error="URLError: refused")]

    with pytest.raises(ConfigError) as exc:
        check_cluster("s3://bucket/runs", "http://127.0.0.1:5000", probe=probe, node_count=2)
    assert str(exc.value).startswith("tracking.uri:") and "10.0.0.2" in str(exc.value)
    assert seen == [(None, "http://127.0.0.1:5000")]


def test_probe_task_body_sees_markers_and_servers(tmp_path):
    (tmp_path / "m").write_text("token")
    assert cluster._probe_node(str(tmp_path), "m", "token", None) == (None, None, None)
    assert list(tmp_path.iterdir()) == [tmp_path / "m"]  # its own write test is cleaned up
    assert "another file" in cluster._probe_node(str(tmp_path), "m", "other", None)[0]
    assert "is not there" in cluster._probe_node(str(tmp_path / "elsewhere"), "m", "token", None)[0]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage_error, tracking_error, _ = cluster._probe_node(None, "m", "token", f"http://127.0.0.1:{port}")
    assert storage_error is None and tracking_error
    # The dataset check names the missing path (here: CIFAR-10 under an empty root).
    *_, data_error = cluster._probe_node(None, "m", "token", None, ("cifar10", str(tmp_path), ("train", "test")))
    assert str(tmp_path / "cifar-10-batches-py") in data_error
    assert cluster._probe_node(None, "m", "token", None, ("digits", None, ("train", "test")))[2] is None


def test_a_dataset_missing_on_one_node_fails_once_naming_the_node(tmp_path):
    calls = []

    def probe(directory, url, dataset):
        calls.append(dataset)
        return [NodeReport("a" * 56, "10.0.0.1"),
                NodeReport("b" * 56, "10.0.0.2", data_error=f"missing {tmp_path}/cifar-10-batches-py/data_batch_1")]

    need = ("cifar10", str(tmp_path), ("train", "test"))
    with pytest.raises(ConfigError) as exc:
        check_cluster("s3://bucket/runs", "http://mlflow:5000", probe=probe, node_count=2, dataset=need)
    message = str(exc.value)
    assert message.startswith("data.root:") and "1 of 2 nodes" in message and "10.0.0.2" in message
    assert "10.0.0.1" not in message and f"{tmp_path}/cifar-10-batches-py/data_batch_1" in message
    assert calls == [need]  # one probe per node, once: no worker ever started


def test_init_from_is_shared_where_workers_can_read_it(tmp_path):
    ckpt = tmp_path / "elsewhere" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"weights")
    storage = tmp_path / "storage"
    assert cluster.share_init_from(str(storage), ckpt, nodes=1) == str(ckpt)  # one node: read in place
    shared = Path(cluster.share_init_from(str(storage), ckpt, nodes=2))
    assert shared.is_relative_to(storage) and (shared / "checkpoint.pt").read_bytes() == b"weights"
    # A storage URI: uploaded once, read back by the workers through the same URI.
    uri = cluster.share_init_from(f"file://{tmp_path / 'bucket'}", ckpt, nodes=1)
    assert uri.startswith("file://") and cluster.exists(uri)
    assert cluster.share_init_from(f"file://{tmp_path / 'bucket'}", ckpt, nodes=1) == uri
    back = cluster.download(uri, tmp_path / "worker")
    assert (back / "checkpoint.pt").read_bytes() == b"weights"


def test_checkpoints_under_a_uri_are_fetched_to_a_local_directory(tmp_path):
    stored = tmp_path / "bucket" / "run" / "checkpoint_000001"
    stored.mkdir(parents=True)
    (stored / "checkpoint.pt").write_bytes(b"x")
    location = f"file://{tmp_path / 'bucket'}"
    local = cluster.fetch_checkpoint(location, str(stored), tmp_path / "cache")
    assert local == tmp_path / "cache" / "checkpoint_000001" and (local / "checkpoint.pt").read_bytes() == b"x"
    assert cluster.fetch_checkpoint(location, str(tmp_path / "bucket" / "gone"), tmp_path / "cache") is None
    assert cluster.fetch_checkpoint(str(tmp_path / "bucket"), str(stored), tmp_path / "unused") == stored


def test_custom_resources_are_validated():
    cfg = load_config(None, ["resources.custom_resources={worker_node: 1}"], preset="simclr_digits")
    assert cfg.resources.custom_resources == {"worker_node": 1.0}
    for bad, field in (("{CPU: 1}", "CPU"), ("{worker_node: 0}", "worker_node")):
        with pytest.raises(ConfigError, match=f"resources.custom_resources.*{field}"):
            load_config(None, [f"resources.custom_resources={bad}"], preset="simclr_digits")


@pytest.mark.ray
def test_probe_runs_a_task_on_every_node(ray_local, tmp_path):
    (report,) = cluster.probe_nodes(tmp_path / "storage", None)
    assert report.storage_error is None and report.tracking_error is None
    assert list((tmp_path / "storage").iterdir()) == []  # the marker is removed again


@pytest.mark.ray
def test_train_and_init_from_with_a_storage_uri(ray_local, tracking_uri, tmp_path):
    """A ``file://`` URI takes the same path as ``s3://``: Ray writes through pyarrow, the driver
    evaluates a local copy, and an ``init_from`` is published under the URI for the workers."""
    import uuid

    from mlflow.tracking import MlflowClient

    from clusterlab import cli
    from clusterlab.platform.run import train

    bucket = tmp_path / "bucket"
    common = ["--preset", "simclr_digits", "epochs=1", "batch_size=128", "optim.warmup_epochs=0", "model.cnn_width=8",
              "eval.kmeans_n_init=2", "eval.raw_pixels_baseline=false", f"storage_path=file://{bucket}",
              "tracking.experiment=uri-storage"]
    first, second = (f"uri-{uuid.uuid4().hex[:8]}" for _ in range(2))
    assert cli.main(["train", *common, "--run-name", first]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("uri-storage").experiment_id])
    assert run.info.status == "FINISHED" and "kmeans_norm_acc" in run.data.metrics
    assert run.data.tags["clusterlab.node_id"] == ray_local.get_runtime_context().get_node_id()
    assert list((bucket / first).glob("checkpoint_*/checkpoint.pt"))  # Ray wrote under the URI
    assert {"checkpoint", "features"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # Stage two from the MLflow run: downloaded by the driver, published under the URI, read by the
    # worker from there (evaluation is what the first run checked already).
    train(load_config(None, [*common[2:], f"run_name={second}", f"init_from={run.info.run_id}"],
                      preset="simclr_digits"), evaluate=False, progress=False)
    published = list((bucket / "_init_from").glob("*/checkpoint/checkpoint.pt"))
    assert len(published) == 1
    (child,) = client.search_runs([run.info.experiment_id], filter_string=f"tags.`clusterlab.run_name` = '{second}'")
    assert child.info.status == "FINISHED" and child.data.tags["init_from"] == run.info.run_id
    assert child.data.params["init_from"].startswith("file://") and child.data.params["init_from"].endswith("checkpoint")
