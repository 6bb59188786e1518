"""MLflow glue: where runs go, how a run is created or resumed, what it records.

The driver creates (or, for a resumed run name, finds) the run before training starts and is
the only process that ends it; it tags the run with its owner (host, pid, process start
time) so that :func:`reconcile` can tell a run whose process died from one still at work.
Training workers add per-epoch metrics to it with ``step = epoch`` through an
:class:`EpochLogger`, which buffers them while the tracking store is unreachable and logs
each step at most once.
"""

from __future__ import annotations

import getpass
import logging
import os
import queue
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import psutil
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from clusterlab.config import ConfigError, ExperimentConfig, flatten, short_repr
from clusterlab.redact import redact_text, redact_uri

TRACKING_URI_ENV = "CLUSTERLAB_TRACKING_URI"
RUN_NAME_TAG = "clusterlab.run_name"
SWEEP_TAG = "clusterlab.sweep"
ROLE_TAG = "clusterlab.role"  # "parent" on a sweep's parent run
TRIAL_TAG = "clusterlab.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow nests runs carrying this tag under the parent in its UI
NODE_TAG = "clusterlab.node_id"  # Ray node id of the rank-0 training worker (its latest start)
NODE_IP_TAG = "clusterlab.node_ip"
GIT_COMMIT_TAG = mlflow_tags.MLFLOW_GIT_COMMIT  # MLflow's own, which its UI shows as Version
VERSION_TAG_PREFIX = "clusterlab.version."  # + package: the versions the training workers ran
HARDWARE_TAG = "clusterlab.hardware"  # "<workers> x <device>" of the latest start (clusterlab report shows it)
OWNER_TAG = "clusterlab.owner"  # "<host>/<pid>/<process start time>" of the process that ends the run
FAILURE_TAG = "failure_reason"
RESUMED_AFTER_TAG = "clusterlab.resumed_after"  # the failure_reason of the attempt a resumed run continues
HEARTBEAT_TAG = "clusterlab.heartbeat"  # unix seconds, refreshed by the owner while the run is open
LEASE_SECONDS = 120.0  # a run on another host whose heartbeat is older than this is taken as abandoned
CLAIM_SETTLE_SECONDS = 1.0  # how long a new owner waits before checking that its claim held
_leases: dict[str, threading.Event] = {}  # run id -> stops its heartbeat thread

log = logging.getLogger(__name__)

# MLflow prints "View run ... at: <tracking URI>/#/..." when a run against a tracking server
# ends, credentials in the URI included; end_run prints that line itself, redacted.
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else ``$CLUSTERLAB_TRACKING_URI``, else MLflow's default SQLite file
    in the working directory, made absolute so that Ray workers (other cwd) write to the
    same store."""
    uri = uri or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


#: The store kinds MLflow 3 tracks into: SQLAlchemy databases and a tracking server.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
#: DB-API module -> the package that installs it.
_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                    "pymysql": "pymysql", "pyodbc": "pyodbc"}
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_tracking_uri(uri: str) -> None:
    """Refuse, before anything starts or is written, a tracking URI MLflow cannot open, with
    what to write instead (MLflow's own errors come as tracebacks, or after minutes of
    retries for a SQLite path that is a directory): an unsupported scheme, a file store (MLflow
    3 keeps it in maintenance mode and refuses it), a database whose driver is not installed, a
    SQLite "database" that is a directory or another kind of file."""
    from urllib.parse import urlsplit

    shown = redact_uri(uri)
    where = f"tracking.uri / --tracking-uri / ${TRACKING_URI_ENV} ({shown!r})"
    scheme = urlsplit(uri).scheme.lower()
    kind = scheme.split("+", 1)[0]
    if kind in SERVER_SCHEMES:
        return
    if kind in ("", "file"):
        raise ConfigError(f"{where}: a path or file: URI is an MLflow file store, which MLflow 3 no longer opens; "
                          f"use a database, e.g. sqlite:///{Path.cwd() / 'mlflow.db'}, or a server's http(s):// URL")
    if kind not in DATABASE_SCHEMES:
        raise ConfigError(f"{where}: unsupported scheme {scheme!r}; use sqlite:///<path>, postgresql://, mysql://, "
                          f"mssql:// (optionally +driver) or a tracking server's http(s):// URL")
    if kind == "sqlite":
        _check_sqlite_file(uri, where)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ArgumentError as exc:
        raise ConfigError(f"{where}: not a database URL ({exc})") from None
    except (ImportError, NoSuchModuleError) as exc:
        package = _DRIVER_PACKAGES.get(getattr(exc, "name", None) or "", "its driver")
        raise ConfigError(f"{where}: the {scheme} database driver is not installed ({exc}); "
                          f"pip install {package}, or name another driver as {kind}+<driver>://") from None


def _sqlite_database(uri: str) -> Path:
    """The database file of a ``sqlite[+driver]:///<path>[?query]`` URI."""
    return Path(uri.split(":", 1)[1][len("///"):].split("?", 1)[0])


def _check_sqlite_file(uri: str, where: str) -> None:
    if not uri.split(":", 1)[1].startswith("///"):
        raise ConfigError(f"{where}: a SQLite URI is sqlite:///<relative path> or sqlite:////<absolute path>")
    database = _sqlite_database(uri)
    if database.name in ("", ":memory:"):
        raise ConfigError(f"{where}: name a database file, e.g. sqlite:///{Path.cwd() / 'mlflow.db'} "
                          f"(an in-memory store would lose every run)")
    if database.is_dir():
        raise ConfigError(f"{where}: {database} is a directory; name a database file in it, e.g. "
                          f"sqlite:///{database / 'mlflow.db'}")
    if database.is_file() and database.stat().st_size:
        with open(database, "rb") as f:
            if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                raise ConfigError(f"{where}: {database} exists and is not a SQLite database; name another file "
                                  f"(clusterlab never overwrites it)")


TRACKING_TIMEOUT_ENV = "CLUSTERLAB_TRACKING_TIMEOUT"
DEFAULT_TRACKING_TIMEOUT = 30.0


def check_reachable(uri: str, timeout: float | None = None) -> None:
    """Refuse, within ``timeout`` seconds (default ``$CLUSTERLAB_TRACKING_TIMEOUT`` or 30), a
    tracking server that does not answer its ``/health``: without this, MLflow's own retries
    leave a command silent for minutes before a traceback. Only the start of a command waits
    here; once running, logging keeps MLflow's and EpochLogger's retries for long outages.
    File stores (SQLite, paths) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests  # MLflow's own HTTP client library

    if timeout is None:
        try:
            timeout = float(os.environ.get(TRACKING_TIMEOUT_ENV, DEFAULT_TRACKING_TIMEOUT))
        except ValueError:
            raise ConfigError(f"{TRACKING_TIMEOUT_ENV}: expected seconds, got "
                              f"{os.environ[TRACKING_TIMEOUT_ENV]!r}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=min(5.0, max(timeout, 0.1)))
            if answer.ok:
                return
            problem = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"tracking.uri: the MLflow server {redact_uri(uri)} did not answer its /health within {timeout:.0f} s "
                f"({problem}); start it or fix tracking.uri / ${TRACKING_URI_ENV}, or set "
                f"{TRACKING_TIMEOUT_ENV}=<seconds> to wait longer for a server that is restarting")
        time.sleep(1.0)


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the form of an MLflow run id (32 lowercase hex digits)."""
    return re.fullmatch(r"[0-9a-f]{32}", text) is not None


def connect(uri: str, *, existing: bool = False) -> MlflowClient:
    """A client for a command's driver, after :func:`check_reachable`. A SQLite store is
    created (schema and migrations) under an exclusive file lock beside it: MLflow's creation
    is not safe when two commands open a new store at once (the second failed with
    "table _alembic_tmp_... already exists"). ``existing``: a command that only reads runs
    (report, heatmap, reeval, evaluate --run-id) is refused a SQLite file that does not exist,
    instead of leaving an empty store behind a typo; no command creates a missing directory."""
    check_tracking_uri(uri)
    check_reachable(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    import fcntl

    database = _sqlite_database(uri)
    where = f"--tracking-uri or ${TRACKING_URI_ENV}"
    if existing and not database.exists():
        raise ConfigError(f"tracking.uri: no MLflow store at {database} (nothing was ever logged there): pass the "
                          f"store that holds the runs ({where})")
    if not database.parent.is_dir():
        raise ConfigError(f"tracking.uri: the folder {database.parent} of the SQLite store does not exist: fix the "
                          f"path ({where}) or create the folder first")
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # creates or migrates the store, one process at a time
    return client


def client_for(cfg: ExperimentConfig) -> MlflowClient:
    uri = resolve_tracking_uri(cfg.tracking.uri)
    client = connect(uri)
    mlflow.set_tracking_uri(uri)
    return client


def source_tags(command: str) -> dict[str, str]:
    """MLflow's standard tags for a run ``clusterlab <command>`` starts, which fill the UI's
    User, Source and Version columns (MLflow's own fluent API sets the same ones)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {mlflow_tags.MLFLOW_USER: user, mlflow_tags.MLFLOW_SOURCE_NAME: f"clusterlab {command}",
            mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags[GIT_COMMIT_TAG] = commit
    return tags


def user_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """``tracking.tags`` and ``tracking.note`` (MLflow's run description) as run tags."""
    note = {mlflow_tags.MLFLOW_RUN_NOTE: cfg.tracking.note} if cfg.tracking.note else {}
    return {**cfg.tracking.tags, **note}


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float) -> Any:
    """MLflow's system-metrics monitor for this node, started: CPU, memory, disk, network and
    (with nvidia-ml-py) each GPU's utilisation and memory, logged to the run as
    ``system/<node IP>-<node id prefix>/<metric>`` every ``interval_s`` seconds; it stops when
    the run ends or at ``finish()``. Steps continue after a restarted attempt's."""
    import ray
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines (started, stopping, terminated) would sit between the epochs' progress lines.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    node = f"{ray.util.get_node_ip_address()}-{ray.get_runtime_context().get_node_id()[:6]}"
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _runs_named(client: MlflowClient, exp_id: str, run_name: str) -> list:
    """Every run started under this clusterlab run name, the first-created first (run names are
    SAFE_NAME, so the filter literal needs no escaping)."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def find_run(client: MlflowClient, exp_id: str, run_name: str) -> str | None:
    """The run previously started under this clusterlab run name, if any."""
    runs = _runs_named(client, exp_id, run_name)
    return runs[0].info.run_id if runs else None


def live_owner(run: Any) -> str | None:
    """The owner of a RUNNING run that is still at work, or None: another process alive on this
    host, or a process elsewhere whose heartbeat (:data:`HEARTBEAT_TAG`) is within the lease."""
    tag = run.data.tags.get(OWNER_TAG, "")
    if run.info.status != "RUNNING" or not tag or tag == owner():
        return None
    alive = _owner_alive(tag)
    if alive is None:
        try:
            alive = time.time() - float(run.data.tags.get(HEARTBEAT_TAG, "0")) < LEASE_SECONDS
        except ValueError:
            alive = False
    return tag if alive else None


def _refuse_live_owner(run: Any, run_name: str) -> None:
    """ValueError when ``run`` is held by a live process (:func:`live_owner`)."""
    holder = live_owner(run)
    if holder:
        raise ValueError(f"{run_name!r} is being run by {holder} (MLflow run {run.info.run_id}); wait for it to "
                         "end, or stop it and run `clusterlab runs reconcile`")


def check_run_name_free(client: MlflowClient, cfg: ExperimentConfig, run_name: str) -> None:
    """Refuse (ConfigError) a run name whose run is being run by a live process; called before
    Ray starts. :func:`start_run` checks again when it creates or claims the run."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    try:
        for run in _runs_named(client, exp.experiment_id, run_name) if exp else []:
            _refuse_live_owner(run, run_name)
    except ValueError as exc:
        raise ConfigError(f"run_name: {exc}") from None


def find_sweep_parent(client: MlflowClient, exp_id: str, sweep: str) -> str | None:
    """The parent run of the sweep named ``sweep`` (experiment = sweep name), if it exists."""
    query = f"tags.`{ROLE_TAG}` = 'parent' and tags.`{SWEEP_TAG}` = '{sweep}'"
    runs = client.search_runs([exp_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(client: MlflowClient, cfg: ExperimentConfig, run_name: str,
              extra_tags: dict[str, str] | None = None, display_name: str | None = None) -> tuple[str, bool]:
    """Create the run for ``run_name`` or reopen the one a previous attempt created.

    Returns ``(run_id, resumed)``. Params are logged once: MLflow params are immutable, so a
    resumed run with a different config is refused rather than half-overwritten, and so is a
    run name whose run already finished (its results are never reopened). The run carries
    MLflow's standard tags (:func:`source_tags`; ``extra_tags`` may override them) and the
    user's (:func:`user_tags`, updated on a resume). ``display_name``: the name the MLflow UI
    shows, when it is not ``run_name`` (a trial's searched values); ``run_name`` stays the
    :data:`RUN_NAME_TAG` by which the run is found again.
    """
    exp_id = experiment_id(client, cfg.tracking.experiment)
    params = flatten(cfg)
    existing = find_run(client, exp_id, run_name)
    if existing:
        previous = client.get_run(existing)
        _refuse_live_owner(previous, run_name)
        if previous.info.status == "FINISHED":
            raise ValueError(
                f"run name {run_name!r} already finished (MLflow run {existing}); its results are kept as they "
                "are: choose another run_name, or --init-from it to continue training"
            )
        logged = previous.data.params
        changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            shown = "; ".join(f"{k}: {short_repr(old)} logged, {short_repr(new)} now"
                              for k, (old, new) in list(changed.items())[:10])
            raise ValueError(
                f"run name {run_name!r} exists with a different config ({len(changed)} params differ: {shown}); "
                "choose another run_name to start a new run"
            )
        claim_run(client, existing)
        time.sleep(CLAIM_SETTLE_SECONDS)  # two claims at once: the last owner tag written wins
        holder = client.get_run(existing).data.tags.get(OWNER_TAG)
        if holder != owner():
            raise ValueError(f"{run_name!r} was claimed at the same time by {holder} (MLflow run {existing})")
        if user_tags(cfg):
            client.log_batch(existing, tags=[RunTag(k, v) for k, v in user_tags(cfg).items()])
        _hold(client, existing)
        return existing, True
    tags = {
        RUN_NAME_TAG: run_name,
        "method": cfg.method,
        "dataset": cfg.data.name,
        "protocol": cfg.data.protocol,
        OWNER_TAG: owner(),
        HEARTBEAT_TAG: f"{time.time():.0f}",
        **source_tags("train"),
        **user_tags(cfg),
        **{k: redact_uri(v) for k, v in (extra_tags or {}).items()},  # e.g. init_from, maybe a URI
    }
    # One commit per run: a trial's is its sweep's (the driver's), as in mlflow.source.git.commit.
    tags["git_commit"] = tags.get(GIT_COMMIT_TAG, "unknown")
    run = client.create_run(exp_id, run_name=display_name or run_name, tags=tags)
    run_id = run.info.run_id
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    time.sleep(CLAIM_SETTLE_SECONDS)  # two creations at once: the first-created run wins
    first = _runs_named(client, exp_id, run_name)[0]
    if first.info.run_id != run_id:
        client.delete_run(run_id)
        raise ValueError(f"{run_name!r} was started at the same time by {first.data.tags.get(OWNER_TAG)} "
                         f"(MLflow run {first.info.run_id})")
    _hold(client, run_id)
    return run_id, False


def owner() -> str:
    """This process, as recorded in :data:`OWNER_TAG`: the start time tells a reused pid apart."""
    return f"{socket.gethostname()}/{os.getpid()}/{psutil.Process().create_time():.2f}"


def claim_run(client: MlflowClient, run_id: str) -> None:
    """Mark ``run_id`` RUNNING and owned by this process (a resumed run changes hands). Why it
    stopped last time moves from ``failure_reason`` to ``clusterlab.resumed_after``, so that a
    resumed run that finishes carries no failure."""
    reason = client.get_run(run_id).data.tags.get(FAILURE_TAG)
    if reason is not None:
        client.set_tag(run_id, RESUMED_AFTER_TAG, reason)
        client.delete_tag(run_id, FAILURE_TAG)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, OWNER_TAG, owner())
    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")


def _hold(client: MlflowClient, run_id: str) -> None:
    """Refresh the run's heartbeat in the background until :func:`end_run`, so that a process
    on another host can tell that the run is at work (:func:`live_owner`)."""
    stop = threading.Event()
    _leases[run_id] = stop

    def beat() -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as exc:  # the store may be down for a while: the lease allows for missed beats
                log.debug("heartbeat of run %s not sent: %s", run_id, exc)

    threading.Thread(target=beat, name=f"clusterlab-lease-{run_id[:8]}", daemon=True).start()


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch request

# MLflow error codes that no retry can fix; anything else (connection refused, HTTP 5xx,
# "database is locked") is taken as transient.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_ALREADY_EXISTS"}


def _is_transient(exc: Exception) -> bool:
    return not (isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES)


class TrackingUnavailableError(RuntimeError):
    """Metrics could not be delivered to the tracking store in time."""


class EpochLogger:
    """Per-epoch metrics of one run with ``step = epoch``, sent by a background thread.

    Training never waits on the tracking store: a batch that fails with a transient error
    (server down, "database is locked") stays queued and is retried with backoff until it
    lands, in order; steps queued meanwhile go out together, up to MLflow's 1,000 metrics
    per request. Each step is logged at most once: steps the run already has (read once,
    from ``step_key``'s history, when the logger starts) are skipped, and a retried batch
    carries its original timestamps, which MLflow's stores deduplicate.
    """

    def __init__(self, client: MlflowClient, run_id: str, step_key: str, max_backoff_s: float = 30.0) -> None:
        self._client, self._run_id, self._max_backoff_s = client, run_id, max_backoff_s
        self._logged = {m.step for m in client.get_metric_history(run_id, step_key)}
        self._queue: queue.Queue[tuple[int, list[Metric]] | None] = queue.Queue()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._send_all, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def logged_steps(self) -> set[int]:
        return set(self._logged)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one step's metrics (the ``epoch`` entry itself is the step, not a metric)."""
        if self._error is not None:
            raise self._error
        now = int(time.time() * 1000)
        self._queue.put((step, [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]))

    def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every queued step to land; raise if some did not."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error
        if self._thread.is_alive():
            raise TrackingUnavailableError(
                f"{self._queue.qsize()} epochs of metrics for MLflow run {self._run_id} were not accepted by the "
                f"tracking store within {timeout_s:.0f} s; they are kept in the checkpoint's history.json and "
                "logged when the run resumes")

    def _next_batch(self, carried: tuple[int, list[Metric]] | None) -> tuple[list[tuple[int, list[Metric]]],
                                                                              tuple[int, list[Metric]] | None, bool]:
        """Queued steps not yet logged, starting with ``carried``, as many as fit one
        ``log_batch`` (a backlog after an outage drains in a few requests). Returns the batch,
        the step that did not fit (the next batch's first), and whether the queue was closed."""
        batch: list[tuple[int, list[Metric]]] = []
        steps: set[int] = set()
        size = 0
        item = carried if carried is not None else self._queue.get()
        while item is not None:
            step, metrics = item
            if step not in self._logged and step not in steps and metrics:
                if batch and size + len(metrics) > MAX_METRICS_PER_BATCH:
                    return batch, item, False
                batch.append(item)
                steps.add(step)
                size += len(metrics)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, None, False
        return batch, None, True

    def _send_all(self) -> None:
        carried, closed = None, False
        while not closed:
            batch, carried, closed = self._next_batch(carried)
            if not batch:
                continue
            metrics = [metric for _, step_metrics in batch for metric in step_metrics]
            delay, warned = 1.0, False
            while True:
                try:
                    self._client.log_batch(self._run_id, metrics=metrics)
                    break
                except Exception as exc:  # the store's errors have no common base class
                    if not _is_transient(exc):
                        self._error = exc
                        return
                    if not warned:
                        log.warning("tracking store unreachable (%s); epochs %d-%d stay queued and are retried",
                                    redact_text(str(exc).splitlines()[0])[:200], batch[0][0], batch[-1][0])
                        warned = True
                    time.sleep(delay)
                    delay = min(2 * delay, self._max_backoff_s)
            if warned:
                log.warning("tracking store reachable again; epochs %d-%d logged", batch[0][0], batch[-1][0])
            self._logged.update(step for step, _ in batch)


@dataclass(frozen=True)
class Reconciled:
    run_id: str
    run_name: str
    experiment: str
    action: str  # "marked FAILED" or why the run was left as it is


def _owner_alive(tag: str) -> bool | None:
    """True / False for an owner on this host; None when it ran elsewhere (or is unknown)."""
    try:
        host, pid, started = tag.split("/")
        if host != socket.gethostname():
            return None
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05
    except psutil.NoSuchProcess:
        return False
    except (ValueError, psutil.Error):
        return None


def reconcile(client: MlflowClient, experiments: list[str] | None = None, dry_run: bool = False) -> list[Reconciled]:
    """Close the RUNNING runs whose owning process died: they end FAILED with a
    ``failure_reason``. Runs owned on another host are reported, not touched. ``experiments``
    (default: all) must exist: a misspelt name is refused, not taken for "nothing to do"."""
    exps = ([client.get_experiment_by_name(n) for n in experiments] if experiments
            else client.search_experiments(max_results=10000))
    missing = [n for n, e in zip(experiments or [], exps) if e is None]
    if missing:
        raise ConfigError(f"--experiment: no MLflow experiment named {', '.join(map(repr, missing))} in "
                          f"{redact_uri(client.tracking_uri)}")
    outcomes = []
    for exp in exps:
        for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=10000):
            tag = run.data.tags.get(OWNER_TAG, "")
            name = run.data.tags.get(RUN_NAME_TAG, run.info.run_name or run.info.run_id)
            alive = _owner_alive(tag)
            if alive is None:
                action = f"left RUNNING: owner {tag or 'unknown'} is not on this host ({socket.gethostname()})"
            elif alive:
                action = "left RUNNING: its process is alive"
            else:
                action = "marked FAILED"
                if not dry_run:
                    client.set_tag(run.info.run_id, FAILURE_TAG,
                                   f"process died: owner {tag} is gone (clusterlab runs reconcile)")
                    end_run(client, run.info.run_id, "FAILED")
            outcomes.append(Reconciled(run.info.run_id, name, exp.name, action))
    return outcomes


def log_final(client: MlflowClient, run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    lease = _leases.pop(run_id, None)
    if lease is not None:
        lease.set()
    client.set_terminated(run_id, status=status)
    url = run_url(client, run_id)
    if url:
        print(f"🏃 View run at: {url}", flush=True)


def run_url(client: MlflowClient, run_id: str) -> str | None:
    """The run's page on an MLflow tracking server (what MLflow prints when a run ends, see
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT above), credentials masked; None for a local store,
    or when the server cannot say which experiment the run is in."""
    uri = client.tracking_uri
    if not uri.lower().startswith(("http://", "https://")):
        return None
    try:
        experiment = client.get_run(run_id).info.experiment_id
    except Exception:  # a link is not worth failing a run for (the server went away meanwhile)
        return None
    base = redact_uri(uri).split("?", 1)[0].rstrip("/")
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"
