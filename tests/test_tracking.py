"""tracking.py against a real MLflow SQLite store: EpochLogger logs one point per step whatever
is queued; reconcile closes exactly the runs whose owning process is gone."""

from __future__ import annotations

import socket
import subprocess
import sys

import psutil
import pytest
from mlflow.tracking import MlflowClient

from clusterlab.config import ConfigError
from clusterlab.platform import tracking


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_each_step_is_logged_once_and_a_resumed_logger_skips_logged_steps(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("logger")).info.run_id
    wide = {f"m{i:03d}": float(i) for i in range(300)}  # 300 metrics: at most 3 steps fit one request

    first = tracking.EpochLogger(client, run_id, step_key="lr")
    for step in (1, 2, 2, 3):  # step 2 queued twice: still one point
        first.log(step, {"epoch": step, "lr": 0.1 * step, **wide})
    first.close(timeout_s=60)
    assert _steps(client, run_id, "lr") == [1, 2, 3]
    assert _steps(client, run_id, "m299") == [1, 2, 3]
    assert "epoch" not in client.get_run(run_id).data.metrics  # the step itself is not a metric

    # A restarted worker replays the checkpoint's history (steps 1..5): only 4 and 5 are new.
    resumed = tracking.EpochLogger(client, run_id, step_key="lr")
    assert resumed.logged_steps == {1, 2, 3}
    for step in range(1, 6):
        resumed.log(step, {"epoch": step, "lr": 1.0, **wide})
    resumed.close(timeout_s=60)
    assert _steps(client, run_id, "lr") == [1, 2, 3, 4, 5]
    first_values = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)][:3]
    assert first_values == pytest.approx([0.1, 0.2, 0.3])  # the first points are kept, not overwritten


def test_reconcile_fails_only_runs_whose_owner_process_is_gone(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("reconcile")
    gone = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead_owner = f"{socket.gethostname()}/{gone.pid}/{psutil.Process(gone.pid).create_time():.2f}"
    gone.communicate()  # it exits once its stdin closes
    owners = {"dead": dead_owner, "alive": tracking.owner(), "elsewhere": "other-host/123/1.00"}
    runs = {name: client.create_run(exp_id, run_name=name, tags={tracking.OWNER_TAG: tag}).info.run_id
            for name, tag in owners.items()}
    finished = client.create_run(exp_id, tags={tracking.OWNER_TAG: dead_owner}).info.run_id
    client.set_terminated(finished, "FINISHED")

    preview = {o.run_id: o.action for o in tracking.reconcile(client, ["reconcile"], dry_run=True)}
    assert preview[runs["dead"]] == "marked FAILED" and client.get_run(runs["dead"]).info.status == "RUNNING"
    outcomes = {o.run_id: o.action for o in tracking.reconcile(client, ["reconcile"])}
    assert set(outcomes) == set(runs.values())  # only RUNNING runs are looked at
    assert outcomes[runs["alive"]] == "left RUNNING: its process is alive"
    assert outcomes[runs["elsewhere"]].startswith("left RUNNING: owner other-host/123/1.00 is not on this host")
    dead = client.get_run(runs["dead"])
    assert dead.info.status == "FAILED" and dead.data.tags["failure_reason"].startswith(f"process died: owner {dead_owner}")
    assert client.get_run(runs["alive"]).info.status == client.get_run(runs["elsewhere"]).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"
    with pytest.raises(ConfigError, match="--experiment: no MLflow experiment named 'typo'"):
        tracking.reconcile(client, ["typo"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_refused_naming_it(monkeypatch, tmp_path, capsys):
    """Without the probe, MLflow's retries kept `clusterlab train` silent for ~4.5 minutes."""
    from clusterlab import cli
    from clusterlab.platform import run as run_module

    monkeypatch.setenv("CLUSTERLAB_TRACKING_TIMEOUT", "2")
    monkeypatch.setattr(run_module, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    uri = f"http://alice:pw@127.0.0.1:{_free_port()}"
    code = cli.main(["train", "--preset", "simclr_digits", f"tracking.uri={uri}", f"storage_path={tmp_path / 'ray'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tracking.uri: the MLflow server http://alice:***@127.0.0.1:" in err and "did not answer" in err
    assert "CLUSTERLAB_TRACKING_TIMEOUT" in err and "pw@" not in err
    assert not (tmp_path / "ray").exists()
    for argv in (["heatmap", "--experiment", "x", "--x", "lambda_3", "--y", "lambda_4"],
                 ["reeval", "--experiment", "x"], ["evaluate", "--run-id", "0" * 32]):
        assert cli.main([*argv, "--tracking-uri", uri]) == 2, argv
        assert "did not answer its /health within 2 s" in capsys.readouterr().err


def test_failure_reason_is_plain_text(tracking_uri):
    """Ray's ActorDiedError repr is full of colour codes; the tag keeps only the text."""
    from clusterlab.platform.run import record_failure

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("ansi")).info.run_id
    record_failure(client, run_id, RuntimeError("\x1b[36mray::RayTrainWorker\x1b[39m died \x1b[1;31m(OOM)\x1b[0m"))
    assert client.get_run(run_id).data.tags["failure_reason"] == "RuntimeError: ray::RayTrainWorker died (OOM)"
