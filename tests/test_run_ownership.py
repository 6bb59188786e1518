"""One live owner per run: a run whose owner is at work is never started a second time, two
commands started together settle on one run, and a new SQLite store survives being opened by
several commands at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli
from clusterlab.config import load_config
from clusterlab.platform import tracking

CLUSTERLAB = [sys.executable, "-m", "clusterlab.cli"]


def _cfg(experiment: str = "owners"):
    return load_config(None, [f"tracking.experiment={experiment}"], preset="simclr_digits")


def test_a_run_held_by_a_live_process_here_is_refused_before_ray(tracking_uri, tmp_path, monkeypatch, capsys):
    from clusterlab.platform import run as run_module

    client = tracking.connect(tracking_uri)
    run_id, _ = tracking.start_run(client, _cfg(), "held")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        tag = f"{os.uname().nodename}/{holder.pid}/{psutil.Process(holder.pid).create_time():.2f}"
        client.set_tag(run_id, tracking.OWNER_TAG, tag)
        monkeypatch.setattr(run_module, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
        code = cli.main(["train", "--preset", "simclr_digits", "tracking.experiment=owners", "--run-name", "held",
                         f"storage_path={tmp_path / 'ray'}"])
        assert code == 2
        assert f"run_name: 'held' is being run by {tag} (MLflow run {run_id})" in capsys.readouterr().err
        assert client.get_run(run_id).data.tags[tracking.OWNER_TAG] == tag  # not taken over
    finally:
        holder.kill()
        holder.wait()
    # Its process gone, the run is resumable again (the same run, now owned by this process).
    assert tracking.start_run(client, _cfg(), "held") == (run_id, True)
    assert client.get_run(run_id).data.tags[tracking.OWNER_TAG] == tracking.owner()


@pytest.mark.parametrize("age,refused", [(10, True), (10 * tracking.LEASE_SECONDS, False)])
def test_a_run_on_another_host_is_held_while_its_heartbeat_is_fresh(tracking_uri, age, refused):
    client = tracking.connect(tracking_uri)
    run_id, _ = tracking.start_run(client, _cfg(), "remote")
    tracking.end_run(client, run_id, "KILLED")  # stops this process's heartbeat
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, tracking.OWNER_TAG, "elsewhere/4242/1.00")
    client.set_tag(run_id, tracking.HEARTBEAT_TAG, f"{time.time() - age:.0f}")
    if refused:
        with pytest.raises(ValueError, match="is being run by elsewhere/4242/1.00"):
            tracking.start_run(client, _cfg(), "remote")
    else:  # the lease ran out: the owner is taken to be gone
        assert tracking.start_run(client, _cfg(), "remote") == (run_id, True)


def test_a_new_sqlite_store_opened_by_four_commands_at_once(tmp_path):
    # What `train` / `sweep` do first, in four processes at once (the commands themselves then start Ray).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opens = f"from clusterlab.platform import tracking; tracking.connect({uri!r})"
    procs = [subprocess.Popen([sys.executable, "-c", opens], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert MlflowClient(uri).search_experiments()  # the store is there and readable


@pytest.mark.faults
@pytest.mark.reliability("two `clusterlab train --run-name same` started together",
                         "one trains (exit 0), the other exits 2 naming the owner; one MLflow run with that name, "
                         "every epoch step once")
def test_two_trainings_of_one_run_name_started_together(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, tracking.TRACKING_URI_ENV: uri}
    tracking.connect(uri)  # the store exists already (its concurrent creation is tested above)
    name = f"same-{uuid.uuid4().hex[:8]}"
    argv = [*CLUSTERLAB, "train", "--preset", "simclr_digits", "epochs=2", "optim.warmup_epochs=0", "batch_size=128", "model.cnn_width=8",
            "eval.kmeans_n_init=2", "eval.raw_pixels_baseline=false", "tracking.experiment=together",
            f"storage_path={tmp_path / 'ray'}", "--run-name", name]
    procs = [subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)]
    assert f"{name!r} " in loser and ("being run by" in loser or "at the same time by" in loser), loser
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("together").experiment_id
    (run,) = client.search_runs([exp_id], filter_string=f"tags.`clusterlab.run_name` = '{name}'")
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert Path(tmp_path / "ray" / name).is_dir()
