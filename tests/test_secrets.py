"""Credentials in URIs are used, never logged: not in MLflow (params, tags, artifacts, the store's
files), not in the storage directory (checkpoints included), not on stdout / stderr."""

from __future__ import annotations

import shutil
import uuid
import zipfile
from pathlib import Path

import pytest

from clusterlab.config import ConfigError, flatten, load_config
from clusterlab.platform import cluster
from clusterlab.redact import redact_text, redact_uri, redact_values

# --------------------------------------------------------------------------- redact_uri


@pytest.mark.parametrize("uri, shown", [
    # userinfo
    ("http://user:password@host:5000", "http://user:***@host:5000"),
    ("https://alice:p%40ss@mlflow.example.com/prefix", "https://alice:***@mlflow.example.com/prefix"),
    ("https://ghp_token123@github.com/org/repo", "https://***@github.com/org/repo"),
    ("s3://AKIAKEY:SECRET@bucket/runs", "s3://AKIAKEY:***@bucket/runs"),
    ("s3://AKIAKEY:ab/cd+ef@bucket/runs", "s3://AKIAKEY:***@bucket/runs"),  # unencoded '/' in the secret
    ("postgresql+psycopg2://mlflow:pw@db-host:5432/mlflow", "postgresql+psycopg2://mlflow:***@db-host:5432/mlflow"),
    ("http://user:@host", "http://user:***@host"),
    # credential-like query parameters (case-insensitive), others untouched and in order
    ("s3://bucket/x?access_key=AK&secret_key=SK&endpoint_override=minio:9000&scheme=http",
     "s3://bucket/x?access_key=***&secret_key=***&endpoint_override=minio:9000&scheme=http"),
    ("s3://bucket/x?endpoint_override=minio:9000&session_token=T&region=eu-west-1",
     "s3://bucket/x?endpoint_override=minio:9000&session_token=***&region=eu-west-1"),
    ("https://h/o?X-Amz-Credential=C&X-Amz-Signature=S&X-Amz-Security-Token=T&X-Amz-Date=20240101",
     "https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&X-Amz-Date=20240101"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=abc%2Fdef&se=2030",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=2030"),
    ("http://h/?PASSWORD=x&Token=y&KEY=z&signature=w&keep=1",
     "http://h/?PASSWORD=***&Token=***&KEY=***&signature=***&keep=1"),
    ("gs://b/p?aws_secret_access_key=x#frag", "gs://b/p?aws_secret_access_key=***#frag"),
    ("s3://K:S@bucket/x?secret_key=Q&scheme=http", "s3://K:***@bucket/x?secret_key=***&scheme=http"),
    # nothing to hide: unchanged, byte for byte
    ("s3://bucket/x?endpoint_override=minio:9000&scheme=http", None),
    ("http://127.0.0.1:5000", None),
    ("http://[::1]:5000/users/a@b", None),
    ("sqlite:////tmp/mlflow.db", None),
    ("sqlite:///mlflow.db", None),
    ("file:///srv/ray", None),
    ("s3://bucket/a@b/x", None),
    ("http://h/?flag&key", None),  # parameters without a value
    ("/local/path?secret_key=x", None),  # not a URI
    ("user:password@host", None),
    ("", None),
    ("mlflow-artifacts:/1/abc/artifacts", None),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == (uri if shown is None else shown)
    assert redact_uri(redact_uri(uri)) == redact_uri(uri)  # idempotent


def test_redact_text_and_values():
    message = ("API request to http://alice:pw@127.0.0.1:5000/api/2.0/mlflow/runs/get failed; "
               "storage 's3://b/x?secret_key=SK&scheme=http', ok")
    assert redact_text(message) == ("API request to http://alice:***@127.0.0.1:5000/api/2.0/mlflow/runs/get failed; "
                                    "storage 's3://b/x?secret_key=***&scheme=http', ok")
    assert redact_text("no uri here: user:pw") == "no uri here: user:pw"
    raw = {"a": ["http://u:p@h", 3, None], "b": {"c": "s3://b?token=t"}, "d": 1.5}
    assert redact_values(raw) == {"a": ["http://u:***@h", 3, None], "b": {"c": "s3://b?token=***"}, "d": 1.5}
    assert raw["a"][0] == "http://u:p@h"  # a copy


def test_params_and_yaml_of_a_config_carry_no_credentials():
    storage = "s3://AK:SK-SECRET@bucket/r?session_token=TOK-SECRET&endpoint_override=m:9000"
    cfg = load_config(None, ["tracking.uri=http://alice:S3CRET@mlflow:5000", f"storage_path={storage}",
                             "init_from=s3://bucket/ckpt?secret_key=INIT-SECRET"], preset="simclr_digits")
    assert cfg.tracking.uri == "http://alice:S3CRET@mlflow:5000"  # the run uses the real URI
    flat = flatten(cfg)
    assert flat["tracking.uri"] == "http://alice:***@mlflow:5000"
    assert flat["storage_path"] == "s3://AK:***@bucket/r?session_token=***&endpoint_override=m:9000"
    assert flat["init_from"] == "s3://bucket/ckpt?secret_key=***"
    text = cfg.to_yaml()
    for secret in ("S3CRET", "SK-SECRET", "TOK-SECRET", "INIT-SECRET"):
        assert secret not in text and secret not in str(flat)
    assert "endpoint_override=m:9000" in text


def test_cluster_refusals_show_no_credentials():
    problem = cluster.tracking_problem("sqlite:////tmp/x.db?token=DB-TOKEN", 2) or ""
    assert "DB-TOKEN" not in problem and "sqlite:////tmp/x.db?token=***" in problem
    reports = [cluster.NodeReport("n" * 20, "10.0.0.2", tracking_error="URLError: refused")]
    problem = cluster.tracking_problem("http://alice:PW@10.0.0.1:5000", 2, reports) or ""
    assert "alice:***@10.0.0.1:5000" in problem and "PW" not in problem
    reports = [cluster.NodeReport("n" * 20, "10.0.0.2", storage_error="not there")]
    problem = cluster.storage_problem("file:///srv/ray?secret_key=STORE-SECRET", 2, reports) or ""
    assert "file:///srv/ray?secret_key=***" in problem and "STORE-SECRET" not in problem


def test_cli_errors_show_no_credentials(capsys, monkeypatch):
    from clusterlab import cli

    def refuse(cfg, address=None):
        raise ConfigError(f"storage_path: {cfg.storage_path} is not shared")

    monkeypatch.setattr("clusterlab.platform.run.train", refuse)
    assert cli.main(["train", "--preset", "simclr_digits", "storage_path=s3://K:CLI-SECRET@b/x"]) == 2
    err = capsys.readouterr().err
    assert "s3://K:***@b/x is not shared" in err and "CLI-SECRET" not in err
    assert cli.main(["train", "--preset", "simclr_digits", "--dry-run",
                     "tracking.uri=http://u:DRY-SECRET@h:5000"]) == 0
    out = capsys.readouterr().out
    assert "uri: http://u:***@h:5000" in out and "DRY-SECRET" not in out


def test_mlflow_prints_no_run_url_with_credentials(tmp_path, capfd):
    """MLflow's own "View run ... at: <tracking URI>" (RestStore only) is switched off; end_run
    prints clusterlab's, redacted. The URL of a local store is None."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from clusterlab.platform import tracking

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    client = tracking.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(tracking.experiment_id(client, "x")).info.run_id
    assert tracking.run_url(client, run) is None
    tracking.end_run(client, run, "FINISHED")
    assert "View run" not in capfd.readouterr().out


# --------------------------------------------------------------------------- end to end

PASSWORD = "S3CRET-PASSWORD-7f3e9a"
QUERY_SECRETS = ("QSECRET-KEY-41c2d8", "QTOKEN-SESSION-9b7e05")


def _secrets_in(data: bytes, secrets: tuple[str, ...]) -> list[str]:
    return [s for s in secrets if s.encode() in data or s.encode("utf-16-le") in data]


def _scan_tree(root: Path, secrets: tuple[str, ...]) -> tuple[list[str], int]:
    """Files under ``root`` holding a secret (raw bytes, zip members such as a torch
    checkpoint's, Parquet key-value metadata), and how many files were read."""
    found, count = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        count += 1
        data = path.read_bytes()
        hits = _secrets_in(data, secrets)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    hits += _secrets_in(zf.read(member), secrets)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_metadata(path).metadata or {}
            hits += _secrets_in(b"".join(k + v for k, v in meta.items()), secrets)
        found += [f"{path}: {hit}" for hit in hits]
    return found, count


@pytest.fixture()
def sqlite_tracking_server(tmp_path):
    import servers

    with servers.mlflow_server(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", tmp_path / "server") as server:
        server.wait_healthy()
        yield server


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_credentials_in_uris_reach_no_store_log_or_artifact(ray_local, sqlite_tracking_server, tmp_path, capfd,
                                                            monkeypatch):
    """``clusterlab train`` against a tracking server whose URI carries ``user:password@`` (a
    server without auth ignores basic-auth credentials) and a ``file://`` storage URI carrying
    ``secret_key`` / ``session_token`` query parameters (pyarrow accepts and ignores them): the
    run uses both, and no secret appears in the tracking store, its artifacts, the storage
    directory or the output."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from clusterlab import cli

    server = sqlite_tracking_server
    port = server.url.rsplit(":", 1)[1]
    secret_uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
    bucket = tmp_path / "bucket"
    storage = f"file://{bucket}?secret_key={QUERY_SECRETS[0]}&session_token={QUERY_SECRETS[1]}"
    secrets = (PASSWORD, *QUERY_SECRETS)
    monkeypatch.delenv("CLUSTERLAB_TRACKING_URI", raising=False)
    cache = cluster.local_dir(storage)  # the driver's local copies of what Ray stored under the URI
    run_name = f"secret-{uuid.uuid4().hex[:8]}"
    try:
        code = cli.main([
            "train", "--preset", "simclr_digits", "epochs=1", "batch_size=128", "model.cnn_width=8",
            "eval.kmeans_n_init=2", "optim.warmup_epochs=0", f"storage_path={storage}",
            f"tracking.uri={secret_uri}", "tracking.experiment=secrets", "--run-name", run_name])
        assert code == 0
        out, err = capfd.readouterr()
        assert not _secrets_in((out + err).encode(), secrets), (out + err)[-3000:]
        assert f"View run at: http://alice:***@127.0.0.1:{port}/#/experiments/" in out

        client = MlflowClient(server.url)  # no credentials needed: the server has no auth
        exp = client.get_experiment_by_name("secrets")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and "kmeans_norm_acc" in run.data.metrics
        # The run used the real URIs, and records them masked.
        assert run.data.params["tracking.uri"] == f"http://alice:***@127.0.0.1:{port}"
        assert run.data.params["storage_path"] == f"file://{bucket}?secret_key=***&session_token=***"
        assert list((bucket / run_name).glob("checkpoint_*/checkpoint.pt"))

        # Everything the store holds, through its API ...
        shown = []
        for e in client.search_experiments(view_type=ViewType.ALL):
            shown += [e.name, e.artifact_location, *e.tags.values()]
            for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=1000):
                shown += [r.info.run_name or "", r.info.artifact_uri, *r.data.params.items(), *r.data.tags.items(),
                          *r.data.metrics]
        assert not _secrets_in(repr(shown).encode(), secrets), shown
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
        assert (downloaded / "checkpoint" / "checkpoint.pt").is_file() and (downloaded / "config.yaml").is_file()
        assert "secret_key=***" in (downloaded / "config.yaml").read_text()
        # ... and as files: the downloaded artifacts, the server's database, artifact store and
        # log, the storage directory (Ray's files, checkpoints) and the driver's local cache.
        total = 0
        for root in (downloaded, tmp_path / "server", bucket, cache):
            found, count = _scan_tree(root, secrets)
            assert not found, found
            total += count
        assert total > 20  # the scan read the files it was meant to
        assert "secret_key=***" in next(bucket.glob(f"{run_name}/checkpoint_*/config.yaml")).read_text()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
