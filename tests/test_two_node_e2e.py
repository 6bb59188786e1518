"""Live: jobs submitted with `ray job submit` to a two-node Ray cluster, logging to an
`mlflow server` backed by PostgreSQL, read back through the MLflow client.

Everything runs on this machine, on loopback, and is started here, once for the module
(fixture ``live``):

- a private PostgreSQL cluster and `mlflow server` on it (tests/servers.py); the tests are
  skipped, loudly, only when PostgreSQL cannot be started (`.ci/run` installs the
  `postgresql` package with apt-get);
- a Ray head node and one worker node (`ray start --block`, distinct custom resources
  `head_node` / `worker_node`, their own ports and temp dir, so the session's `ray_local`
  instance and any other Ray on the machine are left alone). Each node runs with a HOME of
  its own (``home-head`` / ``home-worker``): the processes Ray starts on a node (the job
  driver on the head, tasks and workers on either) inherit it, so ``~`` in a path names a
  different directory on each node, as on two machines.

A sweep's two trials each require one of the two custom resources
(`resources.custom_resources`), so one trains on each node; every child run records the Ray
node id of its training worker (`clusterlab.node_id`), which the test matches against the
cluster's nodes. A sweep against SQLite on the same cluster is refused before any run is
created. A training run whose dataset (``data.root=~/datasets``) exists under the head's HOME
only is refused once, by the pre-flight check on every node, naming the worker node and the
missing path, before any MLflow run or training attempt. Everything started here is stopped at
the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from mlflow.tracking import MlflowClient

import servers
from servers import BIN, SHORT_TMP, free_port, stop_groups, tail
from runs import run_named
from test_datasets import write_cifar10

# `make test-faults` runs this module (Makefile: the two-node cluster is left out of `make test`).
pytestmark = [pytest.mark.ray, pytest.mark.faults]

# Token authentication (Ray 2.60's default) with a token of this cluster's own, so that neither
# ~/.ray/auth_token nor the environment's Ray settings change what the test does.
RAY_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once: nothing to drain at the end of a test
SWEEP = "two-node-e2e"
SPACE = f"""\
name: {SWEEP}
base: simclr_digits
overrides: {{epochs: 1, batch_size: 128, model.cnn_width: 8, optim.warmup_epochs: 0, eval.kmeans_n_init: 2,
            eval.raw_pixels_baseline: false}}
search:
  resources.custom_resources: {{grid: [{{head_node: 1}}, {{worker_node: 1}}]}}   # one trial per node
tune: {{metric: val_loss, mode: min, max_concurrent_trials: 2}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
"""


def _wait(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what}: the process exited {proc.returncode}:\n{tail(log)}"
        with contextlib.suppress(OSError, KeyError, ValueError):
            if condition():
                return
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s:\n{tail(log)}"
        time.sleep(0.5)


@contextlib.contextmanager
def two_node_ray(homes: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """Head (`head_node` resource, HOME ``homes["head"]``) + worker (`worker_node`, HOME
    ``homes["worker"]``), 2 logical CPUs each -> (dashboard URL, GCS address)."""
    temp = Path(tempfile.mkdtemp(prefix="cl2n-", dir=SHORT_TMP))  # short: Ray's socket paths live under it
    gcs, dashboard = free_port(), free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
              "--min-worker-port", "0", "--max-worker-port", "0"]  # random worker ports: two raylets, one host
    procs: list[subprocess.Popen] = []
    url = f"http://127.0.0.1:{dashboard}"

    def start(name: str, args: list[str]) -> None:
        homes[name].mkdir(parents=True, exist_ok=True)
        with (temp / f"{name}.log").open("w") as out:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *common], stdout=out,
                                          stderr=subprocess.STDOUT, env={**RAY_ENV, "HOME": str(homes[name])},
                                          start_new_session=True))

    def gcs_listening() -> bool:
        with socket.create_connection(("127.0.0.1", gcs), timeout=2):
            return True

    try:
        start("head", ["--head", "--port", str(gcs), "--temp-dir", str(temp), "--resources", '{"head_node": 1}',
                       "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
                       "--ray-client-server-port", str(free_port())])
        _wait(gcs_listening, procs[0], temp / "head.log", "ray head's GCS", 120)
        start("worker", ["--address", f"127.0.0.1:{gcs}", "--resources", '{"worker_node": 1}',
                         "--dashboard-agent-listen-port", str(free_port())])
        _wait(lambda: len(_alive_nodes(url)) == 2, procs[1], temp / "worker.log", "two alive nodes", 180)
        yield url, f"127.0.0.1:{gcs}"
    finally:
        stop_groups(procs[::-1])  # worker node first, then the head
        # Anything of this cluster that left its process group: its command line names our temp dir.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError, ValueError):
                if str(temp) in cmdline.read_bytes().decode(errors="replace"):
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _dashboard_get(dashboard: str, path: str) -> dict:
    request = urllib.request.Request(f"{dashboard}{path}",
                                     headers={"Authorization": f"Bearer {RAY_ENV['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _alive_nodes(dashboard: str) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API (node_id, resources_total, ...)."""
    nodes = _dashboard_get(dashboard, "/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


def _submit(dashboard: str, tracking_uri: str, command: list[str], work: Path, timeout: float,
            submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of `clusterlab <command>`; with ``submission_id`` it returns once submitted.
    No ``--address``: the job must find its cluster through the RAY_ADDRESS Ray gives it (were it
    ignored, the sweep would train on a private Ray on one node and the node checks would fail)."""
    runtime_env = {"env_vars": {"CLUSTERLAB_TRACKING_URI": tracking_uri}}
    no_wait = ["--no-wait", "--submission-id", submission_id] if submission_id else []
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--runtime-env-json", json.dumps(runtime_env),
         *no_wait, "--", sys.executable, "-m", "clusterlab.cli", *command],
        cwd=work, capture_output=True, text=True, timeout=timeout, env=RAY_ENV)


def _finished_job(dashboard: str, submission_id: str, timeout_s: float) -> tuple[str, str]:
    """(status, logs) of a submitted job once it has ended."""
    deadline = time.monotonic() + timeout_s
    while (status := _dashboard_get(dashboard, f"/api/jobs/{submission_id}")["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {submission_id} still {status} after {timeout_s:.0f} s"
        time.sleep(1)
    return status, _dashboard_get(dashboard, f"/api/jobs/{submission_id}/logs")["logs"]


@dataclass(frozen=True)
class Live:
    tracking_uri: str
    dashboard: str
    gcs: str  # the GCS address, for `ray drain-node`
    homes: dict[str, Path]  # the HOME of each node's Ray processes, by "head" / "worker"
    node_by_resource: dict[str, str]  # "head_node" / "worker_node" -> Ray node id
    ip_by_node: dict[str, str]  # Ray node id -> the node's IP as Ray reports it


def _stage(t0: float, name: str) -> None:  # shown on failure (and with -s): where the time went
    print(f"[two-node e2e] {time.monotonic() - t0:6.1f} s  {name}", flush=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    """PostgreSQL, `mlflow server` on it and the two-node Ray cluster, for this module's tests."""
    work, t0 = tmp_path_factory.mktemp("two-node"), time.monotonic()
    homes = {"head": work / "home-head", "worker": work / "home-worker"}
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(_stage, t0, "everything stopped")
            backend = stack.enter_context(servers.postgres())
            _stage(t0, "postgres up")
            server = stack.enter_context(servers.mlflow_server(backend, work))
            dashboard, gcs = stack.enter_context(two_node_ray(homes))  # while the MLflow server starts
            server.wait_healthy()
            _stage(t0, "mlflow server and two-node ray cluster up")
            nodes = _alive_nodes(dashboard)
            node_by_resource = {r: n["node_id"] for n in nodes for r in ("head_node", "worker_node")
                                if r in n["resources_total"]}
            assert len(nodes) == 2 and set(node_by_resource) == {"head_node", "worker_node"}, nodes
            assert node_by_resource["head_node"] != node_by_resource["worker_node"]
            yield Live(server.url, dashboard, gcs, homes, node_by_resource,
                       {n["node_id"]: n["node_ip"] for n in nodes})
    except servers.Unavailable as exc:
        servers.skip_loudly("two-node live test", str(exc))


def test_sweep_on_two_node_cluster_via_ray_job_submit_logs_every_trial_to_mlflow_on_postgres(live, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    t0 = time.monotonic()
    dashboard, tracking_uri = live.dashboard, live.tracking_uri

    # SQLite on a two-node cluster must be refused before any trial or MLflow run exists (it
    # runs beside the real sweep below; its experiment name lives in another store).
    sqlite = f"sqlite:///{tmp_path / 'refused.db'}"
    submitted = _submit(dashboard, sqlite, ["sweep", str(space), f"storage_path={tmp_path / 'ray-refused'}"],
                        tmp_path, 120, "sqlite-refused")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    # The sweep itself: storage on a path both nodes see (one machine), MLflow on the server;
    # submitted as a retried RayJob submits it, with --resume auto (a new sweep: started).
    done = _submit(dashboard, tracking_uri, ["sweep", str(space), f"storage_path={tmp_path / 'ray'}", "--resume",
                                             "auto"], tmp_path, timeout=480)
    (tmp_path / "sweep-job.log").write_text(done.stdout + done.stderr)
    _stage(t0, "sweep job done")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout + done.stderr
    assert f"--resume auto: sweep '{SWEEP}' is new; starting it" in done.stdout + done.stderr

    status, logs = _finished_job(dashboard, "sqlite-refused", 120)
    assert status == "FAILED" and "exit code 2" in _dashboard_get(dashboard, "/api/jobs/sqlite-refused")[
        "message"], logs[-3000:]
    assert "clusterlab: error: tracking.uri:" in logs and "CLUSTERLAB_TRACKING_URI=http://" in logs, logs[-3000:]
    assert "2 nodes" in logs
    if (tmp_path / "refused.db").exists():
        refused = MlflowClient(sqlite)
        assert refused.search_runs([e.experiment_id for e in refused.search_experiments()]) == []

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(SWEEP)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_id for r in runs if r.info.status != "FINISHED"], \
        [(r.info.run_name, r.info.status) for r in runs]  # nothing left RUNNING, nothing failed
    (parent,) = [r for r in runs if r.data.tags.get("clusterlab.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    ran_on = {}
    for child in children:
        (resource,) = [k.rsplit(".", 1)[1] for k in child.data.params
                       if k.startswith("resources.custom_resources.")]
        ran_on[resource] = child.data.tags["clusterlab.node_id"]
        for key in ("train_loss", "val_loss", "lr"):
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == [1], (child.info.run_name, key, history)
        assert {"kmeans_norm_acc", "kmeans_norm_nmi", "kmeans_raw_acc"} <= set(child.data.metrics), \
            sorted(child.data.metrics)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"checkpoint", "features",
                                                                               "config.yaml"}
    # Each trial trained on the node that holds the custom resource it asked for: both nodes.
    assert ran_on == live.node_by_resource
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    _stage(t0, "runs checked")


@pytest.mark.reliability("dataset missing on one node",
                         "`clusterlab train data.root=~/datasets resources.max_failures=3` via `ray job submit` on a "
                         "two-node cluster whose worker node's HOME lacks the dataset: job FAILED with exit code 2, "
                         "one data.root error naming the worker node (id, IP) and its missing paths, printed once, "
                         "no MLflow run, no training attempt")
def test_dataset_missing_on_one_node_fails_once_before_training(live, tmp_path):
    t0 = time.monotonic()
    # The dataset exists under the head node's HOME only; the driver (on the head) finds it.
    write_cifar10(live.homes["head"] / "datasets", n_test=12)
    worker_root = live.homes["worker"] / "datasets" / "cifar-10-batches-py"
    assert not worker_root.exists()
    experiment = "missing-on-one-node"
    command = ["train", "data.name=cifar10", "data.root=~/datasets", "resources.max_failures=3", "epochs=1",
               "batch_size=8", "model.cnn_width=8", "resources.num_workers=1", "resources.cpus_per_worker=1",
               f"tracking.experiment={experiment}", f"storage_path={tmp_path / 'ray'}", "--run-name", "missing-data"]
    submitted = _submit(live.dashboard, live.tracking_uri, command, tmp_path, 120, "missing-data")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status, logs = _finished_job(live.dashboard, "missing-data", 300)
    job = _dashboard_get(live.dashboard, "/api/jobs/missing-data")
    (tmp_path / "job.log").write_text(logs)
    _stage(t0, f"job {status} after {(job['end_time'] - job['start_time']) / 1000:.1f} s")

    assert status == "FAILED" and "exit code 2" in job["message"], (job["message"], logs[-3000:])
    assert job["end_time"] - job["start_time"] < 120_000, "the refusal took longer than a driver start and a probe"
    # One refusal, from the pre-flight check on every node, naming the worker node and its paths
    # (its tasks expand ~ to the worker's HOME; the head's, where the files are, is fine).
    assert logs.count("clusterlab: error: ") == 1, logs[-5000:]
    assert logs.count("data.root: the dataset 'cifar10' is missing on 1 of 2 nodes: ") == 1, logs[-5000:]
    worker, head = live.node_by_resource["worker_node"], live.node_by_resource["head_node"]
    assert f"node {worker[:12]} ({live.ip_by_node[worker]}): dataset 'cifar10' not found" in logs, logs[-5000:]
    assert f"node {head[:12]}" not in logs, logs[-5000:]
    for name in ("batches.meta", "data_batch_1", "data_batch_5", "test_batch"):
        assert str(worker_root / name) in logs, (name, logs[-5000:])
    assert str(live.homes["head"]) not in logs, logs[-5000:]
    # Nothing started: no MLflow run (not even the experiment), no training attempt, no retry.
    client = MlflowClient(live.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is None or client.search_runs([exp.experiment_id]) == []
    for sign in ("restarting from its latest checkpoint", "max_failures=3)", "Traceback", "RayTrainWorker"):
        assert sign not in logs, (sign, logs[-5000:])


@pytest.mark.reliability("a spot node's preemption notice (ray drain-node, reason PREEMPTION) mid-training",
                         "the run's workers on that node checkpoint the epoch so far at once (tag "
                         "clusterlab.preemption_checkpoint: epoch, step), training goes on, the job SUCCEEDED, "
                         "the run FINISHED with every epoch step once")
def test_a_preemption_notice_checkpoints_inside_the_epoch_and_training_goes_on(live, tmp_path):
    """Last in this module: it leaves the worker node draining (refusing new work) until the
    cluster stops. The drain is what a cloud's reclaim notice does through Ray's autoscaler;
    the node is not killed here (Ray Train would restart the run from the checkpoint)."""
    t0 = time.monotonic()
    experiment, run_name = "preemption-notice", "spot-worker"
    command = ["train", "--preset", "simclr_digits", "epochs=40", "batch_size=64", "model.cnn_width=8",
               "optim.warmup_epochs=0", "eval.kmeans_n_init=2", "eval.raw_pixels_baseline=false",
               "resources.custom_resources={worker_node: 1}", "resources.preemption_check_steps=2",
               f"tracking.experiment={experiment}", f"storage_path={tmp_path / 'ray'}", "--run-name", run_name]
    submitted = _submit(live.dashboard, live.tracking_uri, command, tmp_path, 120, "preemption-notice")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    client = MlflowClient(live.tracking_uri)

    def training_on_the_worker() -> bool:
        run = run_named(client, experiment, run_name)
        return run is not None and len(client.get_metric_history(run.info.run_id, "lr")) >= 2

    deadline = time.monotonic() + 300
    while not training_on_the_worker():
        status = _dashboard_get(live.dashboard, "/api/jobs/preemption-notice")["status"]
        assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, status
        time.sleep(1)
    run = run_named(client, experiment, run_name)
    worker = live.node_by_resource["worker_node"]
    assert run.data.tags["clusterlab.node_id"] == worker
    drained = subprocess.run([str(BIN / "ray"), "drain-node", "--address", live.gcs, "--node-id", worker,
                              "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                              "--deadline-remaining-seconds", "3600"],
                             capture_output=True, text=True, timeout=60, env=RAY_ENV)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    _stage(t0, "worker node drained (preemption)")

    status, logs = _finished_job(live.dashboard, "preemption-notice", 600)
    (tmp_path / "job.log").write_text(logs)
    _stage(t0, f"job {status}")
    assert status == "SUCCEEDED", logs[-5000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"epoch \d+ step \d+", run.data.tags.get("clusterlab.preemption_checkpoint", "")), \
        (run.data.tags, logs[-5000:])
    assert "preemption notice: checkpointing epoch" in logs
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(range(1, 41))
