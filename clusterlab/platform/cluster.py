"""Storage locations and cluster pre-flight checks.

``storage_path`` is a local directory or a filesystem URI (``s3://``, ``gs://``, ``hdfs://``,
``file://``, ...; what ``pyarrow.fs.FileSystem.from_uri`` resolves, which is what Ray Train
and Tune use for ``RunConfig.storage_path``). A URI goes to Ray untouched; a local path is
made absolute. What the driver needs as local files (a checkpoint to evaluate, features,
the heatmap, a downloaded ``init_from``) lives under :func:`local_dir`: the storage directory
itself when it is local, else a local cache.

On a Ray cluster with more than one alive node, :func:`check_cluster` runs before any MLflow
run is created or any trial starts and refuses (``ConfigError``, exit code 2):

- a local ``storage_path`` that not every node sees: a marker file written by the driver must
  be readable, and the directory writable, from a task pinned to each node (which proves that
  it is one shared filesystem). ``CLUSTERLAB_SHARED_STORAGE=1`` skips the probe.
- a file-based MLflow store (``sqlite:``, ``file:``, a plain path): trials on other nodes
  cannot reach the file, and SQLite's file locking is not safe across hosts (network
  filesystems), so writes get lost. An ``http(s)://`` tracking server must answer from every
  node.
- a dataset that some node lacks: every node reads ``data.root`` from its own filesystem, so
  the same task checks the dataset's files there. The run fails once, here, naming the node
  and the path, instead of failing its workers ``max_failures`` times on that node.

A single-node cluster is not checked: its processes share the machine's filesystem, and
SQLite's locks (MLflow waits up to 20 s for them) serialise concurrent trials there.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from clusterlab.config import ConfigError
from clusterlab.redact import redact_uri

SHARED_STORAGE_ENV = "CLUSTERLAB_SHARED_STORAGE"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SERVER_HINT = ("start an MLflow tracking server that every node can reach, backed by a database (`docker compose "
               "-f docker/compose.yaml up`, or `mlflow server --backend-store-uri postgresql+psycopg2://USER@HOST/DB "
               "--artifacts-destination s3://BUCKET/mlflow --host 0.0.0.0 --port 5000`), then set "
               "CLUSTERLAB_TRACKING_URI=http://SERVER:5000 (or tracking.uri=http://SERVER:5000)")


# --------------------------------------------------------------------------- storage locations


def uri_scheme(location: str) -> str | None:
    """``s3`` for ``s3://bucket/x``; None for a plain path."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def is_uri(location: str) -> bool:
    return uri_scheme(location) is not None


def storage_location(storage_path: str | None) -> str:
    """The value for ``RunConfig(storage_path=...)``: a URI untouched, a local path (default
    ``./ray_results``) made absolute, since trials and workers run with another cwd."""
    value = storage_path or "ray_results"
    return value if is_uri(value) else str(Path(value).expanduser().absolute())


def local_path(location: str) -> Path | None:
    """The local directory a location names (a plain path or ``file://``), else None."""
    scheme = uri_scheme(location)
    if scheme is None:
        return Path(location)
    if scheme == "file":
        return Path(location[len("file://"):].split("?", 1)[0])
    return None


def local_dir(location: str) -> Path:
    """Where the driver keeps local files for runs stored at ``location``: the directory
    itself when it is a plain path, else a per-location cache under the temp directory."""
    if not is_uri(location):
        return Path(location)
    digest = hashlib.sha1(location.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "clusterlab-cache" / digest


def join(location: str, *parts: str) -> str:
    """``location`` / parts, keeping a URI's query string (``?endpoint_override=...``) at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def exists(location: str) -> bool:
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def download(uri: str, dest: Path) -> Path:
    """Copy the file or directory at ``uri`` to ``dest`` / its name; returns the local path."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return _copy_out(fs, path, dest)


def fetch_checkpoint(location: str, path: str, dest: Path) -> Path | None:
    """A checkpoint directory Ray stored under ``location`` (``path`` as Ray reports it: a local
    path, or the bucket path without its scheme) as a local directory, or None if it is gone."""
    if not is_uri(location):
        return Path(path) if Path(path).exists() else None
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    return _copy_out(fs, path, dest)


def _copy_out(fs: "pyarrow.fs.FileSystem", path: str, dest: Path) -> Path:
    import pyarrow.fs

    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{path} does not exist on {fs.type_name}")
    target = dest / PurePosixPath(path).name
    (target if info.type == pyarrow.fs.FileType.Directory else dest).mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(target), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return target


def upload(local: Path, uri: str) -> str:
    """Copy a local file or directory to ``uri`` (created); returns ``uri``."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path if local.is_dir() else str(PurePosixPath(path).parent), recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def share_init_from(location: str, checkpoint: Path, nodes: int) -> str:
    """Where training workers read an ``init_from`` checkpoint the driver resolved to the local
    ``checkpoint``: uploaded under the storage URI when storage is remote, copied into the
    (proven shared) storage directory on a multi-node cluster, else the local path itself."""
    through_pyarrow = is_uri(location)
    storage = local_path(location)
    if not through_pyarrow and (nodes <= 1 or (storage is not None and checkpoint.is_relative_to(storage.resolve()))):
        return str(checkpoint)
    # Same checkpoint (path and modification time) -> same target: uploaded once, however many runs.
    digest = hashlib.sha1(f"{checkpoint}:{checkpoint.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = join(location, "_init_from", digest, checkpoint.name)
    if through_pyarrow:
        return target if exists(target) else upload(checkpoint, target)
    import shutil

    if not Path(target).exists():
        copy = shutil.copytree if checkpoint.is_dir() else shutil.copy2
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        copy(checkpoint, target)
    return target


# --------------------------------------------------------------------------- cluster checks


@dataclass(frozen=True)
class NodeReport:
    """What a task pinned to one node found: None where all is well, else the problem."""

    node_id: str
    address: str
    storage_error: str | None = None
    tracking_error: str | None = None
    data_error: str | None = None


# (dataset name, data.root, splits the run reads): what every node must hold.
DatasetNeed = tuple[str, "str | None", tuple[str, ...]]


def is_file_store(tracking_uri: str) -> bool:
    """True for MLflow stores that are files on the driver's disk: ``sqlite:``, ``file:``, a path."""
    if tracking_uri.startswith("databricks"):
        return False
    return uri_scheme(tracking_uri) in (None, "file", "sqlite") or tracking_uri.startswith("sqlite:")


def tracking_problem(tracking_uri: str, node_count: int, reports: Sequence[NodeReport] = ()) -> str | None:
    """Why ``tracking_uri`` cannot serve a cluster of ``node_count`` nodes, or None."""
    if node_count <= 1:
        return None
    if is_file_store(tracking_uri):
        return (f"tracking.uri: {redact_uri(tracking_uri)} is a file-based MLflow store, and the Ray cluster has "
                f"{node_count} nodes: trials on other nodes cannot reach this file, and SQLite's file locking is not safe between "
                f"hosts (concurrent writers lose writes). To run on a cluster, {SERVER_HINT}.")
    unreachable = [r for r in reports if r.tracking_error]
    if unreachable:
        return (f"tracking.uri: the MLflow server {redact_uri(tracking_uri)} does not answer from "
                + "; ".join(f"node {r.node_id[:12]} ({r.address}): {r.tracking_error}" for r in unreachable)
                + ". Use an address every node can reach (not 127.0.0.1 / localhost on a real cluster) and check "
                  "the server's --host / --allowed-hosts.")
    return None


def storage_problem(location: str, node_count: int, reports: Sequence[NodeReport] = ()) -> str | None:
    """Why ``location`` cannot hold a cluster's checkpoints, or None (remote URIs always can)."""
    if node_count <= 1 or local_path(location) is None:
        return None
    unshared = [r for r in reports if r.storage_error]
    if not unshared:
        return None
    return (f"storage_path: {redact_uri(location)} is a local directory, and the Ray cluster has {node_count} nodes: "
            "Ray Train writes checkpoints there from every node and the driver reads them back, so it must be one filesystem "
            "shared by all nodes at the same path. It is not shared with "
            + "; ".join(f"node {r.node_id[:12]} ({r.address}): {r.storage_error}" for r in unshared)
            + ". Set storage_path to an s3:// or gs:// URI (MinIO and other S3-compatible stores: "
              "s3://BUCKET/PATH?endpoint_override=HOST:9000&scheme=http, credentials in AWS_ACCESS_KEY_ID / "
              "AWS_SECRET_ACCESS_KEY on every node) or to a shared mount (NFS, EFS, Filestore) present on every node; "
              f"if it is shared and the check is wrong, set {SHARED_STORAGE_ENV}=1.")


def data_problem(dataset: DatasetNeed, node_count: int, reports: Sequence[NodeReport]) -> str | None:
    """Why some nodes cannot train on ``dataset``, or None."""
    missing = [r for r in reports if r.data_error]
    if not missing:
        return None
    return (f"data.root: the dataset {dataset[0]!r} is missing on {len(missing)} of {node_count} nodes: "
            + "; ".join(f"node {r.node_id[:12]} ({r.address}): {r.data_error}" for r in missing)
            + ". Every node reads data.root from its own filesystem: copy the dataset to the same path on every "
              "node (or bake it into the image), or put data.root on a mount that all nodes share.")


def check_cluster(location: str | None, tracking_uri: str,
                  probe: Callable[[Path | None, str | None, DatasetNeed | None], list[NodeReport]] | None = None,
                  node_count: int | None = None, dataset: DatasetNeed | None = None) -> int:
    """Refuse a storage location, tracking store or dataset that a multi-node cluster cannot use.

    ``location`` None skips the storage check (jobs that store nothing), ``dataset`` None the
    data check. Returns the number of alive nodes. ``probe`` / ``node_count`` default to the
    connected Ray cluster's (tests pass their own).
    """
    if node_count is None:
        node_count = len(alive_nodes())
    if node_count <= 1:
        return node_count
    problem = tracking_problem(tracking_uri, node_count)  # needs no probe: refuse before the tasks
    if problem:
        raise ConfigError(problem)
    directory = local_path(location) if location is not None else None
    if directory is not None and os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes"):
        directory = None
    url = tracking_uri if uri_scheme(tracking_uri) in ("http", "https") else None
    needed = directory is not None or url or dataset is not None
    reports = (probe or probe_nodes)(directory, url, dataset) if needed else []
    problem = (storage_problem(location, node_count, reports) if directory is not None and location else None) \
        or tracking_problem(tracking_uri, node_count, reports) \
        or (data_problem(dataset, node_count, reports) if dataset is not None else None)
    if problem:
        raise ConfigError(problem)
    return node_count


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _probe_node(directory: str | None, marker: str, token: str, tracking_url: str | None,
                dataset: DatasetNeed | None = None) -> tuple[str | None, str | None, str | None]:
    """Runs on one node: is the driver's marker visible and the directory writable there, does
    the tracking server answer, are the dataset's files there? Returns (storage problem,
    tracking problem, data problem)."""
    storage_error = None
    if directory is not None:
        path = Path(directory) / marker
        try:
            seen = path.read_text()
        except OSError as exc:
            seen, storage_error = None, f"the file {path} the driver wrote is not there ({exc.strerror or exc})"
        if seen is not None and seen != token:
            storage_error = f"{path} holds another file than the driver wrote (a node-local directory of the same name)"
        if storage_error is None:
            probe = Path(directory) / f"{marker}.{uuid.uuid4().hex[:12]}"
            try:
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                storage_error = f"{directory} is not writable there ({exc.strerror or exc})"
    tracking_error = None
    if tracking_url is not None:
        try:
            urllib.request.urlopen(tracking_url.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # the server answered (authentication, a proxy's status): it is reachable
        except (urllib.error.URLError, OSError) as exc:
            tracking_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    data_error = None
    if dataset is not None:
        from clusterlab.data.datasets import DatasetNotFoundError, check_dataset

        try:
            check_dataset(*dataset)
        except DatasetNotFoundError as exc:
            data_error = str(exc)
    return storage_error, tracking_error, data_error


def probe_nodes(directory: Path | None, tracking_url: str | None, dataset: DatasetNeed | None = None,
                timeout_s: float = 120.0) -> list[NodeReport]:
    """One zero-CPU task pinned to each alive node runs :func:`_probe_node`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker, token = f".clusterlab-shared-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / marker).write_text(token)
    task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    nodes = alive_nodes()
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(None if directory is None else str(directory), marker, token, tracking_url, dataset) for n in nodes}
    try:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        reports = []
        for node in nodes:
            ref = refs[node["NodeID"]]
            if ref in ready:
                try:
                    storage_error, tracking_error, data_error = ray.get(ref)
                except Exception as exc:  # the task itself failed on that node
                    storage_error = tracking_error = data_error = f"the check failed there ({type(exc).__name__}: {exc})"
            else:
                storage_error = tracking_error = data_error = f"the check did not run there within {timeout_s:.0f} s"
                ray.cancel(ref, force=True)
            reports.append(NodeReport(node["NodeID"], node.get("NodeManagerAddress", "?"),
                                      storage_error if directory is not None else None,
                                      tracking_error if tracking_url is not None else None,
                                      data_error if dataset is not None else None))
        return reports
    finally:
        if directory is not None:
            (directory / marker).unlink(missing_ok=True)
