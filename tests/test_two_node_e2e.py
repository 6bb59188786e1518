"""Live: a sweep submitted with `ray job submit` to a two-node Ray cluster, logging to an
`mlflow server` backed by PostgreSQL, read back trial by trial through the MLflow client.

Everything runs on this machine, on loopback, and is started here:

- a private PostgreSQL cluster (initdb + pg_ctl in a temp dir, as the `postgres` user when
  running as root); the test is skipped, loudly, only when none can be started (`.ci/run`
  installs the `postgresql` package with apt-get);
- `mlflow server --backend-store-uri postgresql+psycopg2://...` with proxied artifacts;
- a Ray head node and one worker node (`ray start --block`, distinct custom resources
  `head_node` / `worker_node`, their own ports and temp dir, so the session's `ray_local`
  instance and any other Ray on the machine are left alone).

The sweep's two trials each require one of the two custom resources
(`resources.custom_resources`), so one trains on each node; every child run records the Ray
node id of its training worker (`clusterlab.node_id`), which the test matches against the
cluster's nodes. A sweep against SQLite on the same cluster is refused before any run is
created. Everything started here is stopped at the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from glob import glob
from pathlib import Path
from typing import Callable, Iterator

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
# Token authentication (Ray 2.60's default) with a token of this cluster's own, so that neither
# ~/.ray/auth_token nor the environment's Ray settings change what the test does.
RAY_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once: nothing to drain at the end of a test
SHORT_TMP = "/tmp" if os.path.isdir("/tmp") else None
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is empty)"


def _skip_loudly(reason: str) -> None:
    message = f"two-node live test SKIPPED: {reason}"
    warnings.warn(message, UserWarning, stacklevel=2)  # shown in pytest's warnings summary even with -q
    print(message, file=sys.__stderr__, flush=True)
    pytest.skip(message)


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a live member (zombies, which a container's
    init may never reap, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stop_groups(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the process groups of processes we started (each in a session of its own), as
    `ray stop` would do to every Ray process of the machine; SIGKILL what is left after
    ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()
        if not any(_group_alive(proc.pid) for proc in procs):
            return
        time.sleep(0.5)
    print(f"[two-node e2e] still running {grace_s:.0f} s after SIGTERM, killed: "
          f"{[p.args[:3] for p in procs if _group_alive(p.pid)]}", flush=True)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A private PostgreSQL server on a free loopback port -> SQLAlchemy URI of database `mlflow`."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        _skip_loudly("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH); "
                     "install it with `apt-get install postgresql` (.ci/run does)")
    bindir = Path(initdb).parent
    user: dict[str, int] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _skip_loudly("running as root and there is no `postgres` user to run PostgreSQL as")
        user = {"user": pw.pw_uid, "group": pw.pw_gid}
    root = Path(tempfile.mkdtemp(prefix="clusterlab-pg-", dir=SHORT_TMP))  # the postgres user must reach it
    if user:
        os.chown(root, user["user"], user["group"])
    data, log, port = root / "data", root / "postgres.log", _free_port()

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **user)
        except (OSError, subprocess.TimeoutExpired) as exc:  # binary missing / not executable, hung
            return subprocess.CompletedProcess(list(args), -1, "", f"{type(exc).__name__}: {exc}")

    started = False
    try:
        out = run(str(bindir / "initdb"), "-D", str(data), "-U", "clusterlab", "--auth=trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        if out.returncode != 0:
            _skip_loudly(f"PostgreSQL could not be initialised: initdb exited {out.returncode}: {out.stderr[-1500:]}")
        out = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                  f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if out.returncode != 0:
            _skip_loudly(f"PostgreSQL could not be started: pg_ctl exited {out.returncode}: {out.stdout[-800:]} "
                         f"{_tail(log, 1500)}")
        started = True
        out = run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "clusterlab", "mlflow")
        assert out.returncode == 0, f"createdb failed: {out.stderr}"
        yield f"postgresql+psycopg2://clusterlab@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            out = run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
            pid_file = data / "postmaster.pid"
            if out.returncode != 0 and pid_file.exists():  # pg_ctl could not stop it: kill its postmaster
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend: str, work: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """Starts `mlflow server` -> (its URL, a function that waits until it is healthy)."""
    port = _free_port()
    log = work / "mlflow-server.log"
    exe = [str(BIN / "mlflow")] if (BIN / "mlflow").exists() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([*exe, "server", "--backend-store-uri", backend, "--artifacts-destination",
                                 str(work / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def wait_healthy() -> None:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow server exited {proc.returncode}:\n{_tail(log)}"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                return
            assert time.monotonic() < deadline, f"mlflow server not healthy after 120 s:\n{_tail(log)}"
            time.sleep(1)

    try:
        yield url, wait_healthy
    finally:
        _stop_groups([proc])


def _wait(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what}: the process exited {proc.returncode}:\n{_tail(log)}"
        with contextlib.suppress(OSError, KeyError, ValueError):
            if condition():
                return
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s:\n{_tail(log)}"
        time.sleep(0.5)


@contextlib.contextmanager
def two_node_ray() -> Iterator[str]:
    """Head (`head_node` resource) + worker (`worker_node`), 2 logical CPUs each -> dashboard URL."""
    temp = Path(tempfile.mkdtemp(prefix="cl2n-", dir=SHORT_TMP))  # short: Ray's socket paths live under it
    gcs, dashboard = _free_port(), _free_port()
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
              "--min-worker-port", "0", "--max-worker-port", "0"]  # random worker ports: two raylets, one host
    procs: list[subprocess.Popen] = []
    url = f"http://127.0.0.1:{dashboard}"

    def start(name: str, args: list[str]) -> None:
        with (temp / f"{name}.log").open("w") as out:
            procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *common], stdout=out,
                                          stderr=subprocess.STDOUT, env=RAY_ENV, start_new_session=True))

    def gcs_listening() -> bool:
        with socket.create_connection(("127.0.0.1", gcs), timeout=2):
            return True

    try:
        start("head", ["--head", "--port", str(gcs), "--temp-dir", str(temp), "--resources", '{"head_node": 1}',
                       "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(_free_port()),
                       "--ray-client-server-port", str(_free_port())])
        _wait(gcs_listening, procs[0], temp / "head.log", "ray head's GCS", 120)
        start("worker", ["--address", f"127.0.0.1:{gcs}", "--resources", '{"worker_node": 1}',
                         "--dashboard-agent-listen-port", str(_free_port())])
        _wait(lambda: len(_alive_nodes(url)) == 2, procs[1], temp / "worker.log", "two alive nodes", 180)
        yield url
    finally:
        _stop_groups(procs[::-1])  # worker node first, then the head
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


def _submit(dashboard: str, tracking_uri: str, space: Path, storage: Path, work: Path, timeout: float,
            submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of `clusterlab sweep`; with ``submission_id`` it returns once submitted."""
    runtime_env = {"env_vars": {"CLUSTERLAB_TRACKING_URI": tracking_uri}}
    no_wait = ["--no-wait", "--submission-id", submission_id] if submission_id else []
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--runtime-env-json", json.dumps(runtime_env),
         *no_wait, "--", sys.executable, "-m", "clusterlab.cli", "sweep", str(space), f"storage_path={storage}",
         "--address", "auto"],
        cwd=work, capture_output=True, text=True, timeout=timeout, env=RAY_ENV)


def _finished_job(dashboard: str, submission_id: str, timeout_s: float) -> tuple[str, str]:
    """(status, logs) of a submitted job once it has ended."""
    deadline = time.monotonic() + timeout_s
    while (status := _dashboard_get(dashboard, f"/api/jobs/{submission_id}")["status"]) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {submission_id} still {status} after {timeout_s:.0f} s"
        time.sleep(1)
    return status, _dashboard_get(dashboard, f"/api/jobs/{submission_id}/logs")["logs"]


def test_sweep_on_two_node_cluster_via_ray_job_submit_logs_every_trial_to_mlflow_on_postgres(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    t0 = time.monotonic()

    def stage(name: str) -> None:  # shown on failure (and with -s): where the time went
        print(f"[two-node e2e] {time.monotonic() - t0:6.1f} s  {name}", flush=True)

    with contextlib.ExitStack() as stack:
        stack.callback(stage, "everything stopped")
        backend = stack.enter_context(postgres())
        stage("postgres up")
        tracking_uri, wait_healthy = stack.enter_context(mlflow_server(backend, tmp_path))
        dashboard = stack.enter_context(two_node_ray())  # while the MLflow server starts
        wait_healthy()
        stage("mlflow server and two-node ray cluster up")
        nodes = _alive_nodes(dashboard)
        node_by_resource = {r: n["node_id"] for n in nodes for r in ("head_node", "worker_node")
                            if r in n["resources_total"]}
        assert len(nodes) == 2 and set(node_by_resource) == {"head_node", "worker_node"}, nodes
        assert node_by_resource["head_node"] != node_by_resource["worker_node"]

        # SQLite on a two-node cluster must be refused before any trial or MLflow run exists (it
        # runs beside the real sweep below; its experiment name lives in another store).
        sqlite = f"sqlite:///{tmp_path / 'refused.db'}"
        submitted = _submit(dashboard, sqlite, space, tmp_path / "ray-refused", tmp_path, 120, "sqlite-refused")
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

        # The sweep itself: storage on a path both nodes see (one machine), MLflow on the server.
        done = _submit(dashboard, tracking_uri, space, tmp_path / "ray", tmp_path, timeout=480)
        (tmp_path / "sweep-job.log").write_text(done.stdout + done.stderr)
        stage("sweep job done")
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert "succeeded" in done.stdout + done.stderr

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
        assert ran_on == node_by_resource
        assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
        stage("runs checked")
