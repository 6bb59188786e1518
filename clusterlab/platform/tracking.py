"""MLflow glue: where runs go, how a run is created or resumed, what it records.

The driver creates (or, for a resumed run name, finds) the run before training starts and is
the only process that ends it. Training workers add per-epoch metrics to it with
``step = epoch`` through :func:`log_epoch`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from clusterlab.config import ExperimentConfig, flatten

TRACKING_URI_ENV = "CLUSTERLAB_TRACKING_URI"
RUN_NAME_TAG = "clusterlab.run_name"
SWEEP_TAG = "clusterlab.sweep"
ROLE_TAG = "clusterlab.role"  # "parent" on a sweep's parent run
TRIAL_TAG = "clusterlab.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow nests runs carrying this tag under the parent in its UI
NODE_TAG = "clusterlab.node_id"  # Ray node id of the rank-0 training worker (its latest start)
NODE_IP_TAG = "clusterlab.node_ip"


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else ``$CLUSTERLAB_TRACKING_URI``, else MLflow's default SQLite file
    in the working directory, made absolute so that Ray workers (other cwd) write to the
    same store."""
    uri = uri or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client_for(cfg: ExperimentConfig) -> MlflowClient:
    uri = resolve_tracking_uri(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


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


def find_run(client: MlflowClient, exp_id: str, run_name: str) -> str | None:
    """The run previously started under this clusterlab run name, if any."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return runs[0].info.run_id if runs else None


def find_sweep_parent(client: MlflowClient, exp_id: str, sweep: str) -> str | None:
    """The parent run of the sweep named ``sweep`` (experiment = sweep name), if it exists."""
    query = f"tags.`{ROLE_TAG}` = 'parent' and tags.`{SWEEP_TAG}` = '{sweep}'"
    runs = client.search_runs([exp_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(client: MlflowClient, cfg: ExperimentConfig, run_name: str,
              extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Create the run for ``run_name`` or reopen the one a previous attempt created.

    Returns ``(run_id, resumed)``. Params are logged once: MLflow params are immutable, so a
    resumed run with a different config is refused rather than half-overwritten, and so is a
    run name whose run already finished (its results are never reopened).
    """
    exp_id = experiment_id(client, cfg.tracking.experiment)
    params = flatten(cfg)
    existing = find_run(client, exp_id, run_name)
    if existing:
        previous = client.get_run(existing)
        if previous.info.status == "FINISHED":
            raise ValueError(
                f"run name {run_name!r} already finished (MLflow run {existing}); its results are kept as they "
                "are: choose another run_name, or --init-from it to continue training"
            )
        logged = previous.data.params
        changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            raise ValueError(
                f"run name {run_name!r} exists with a different config {changed} (logged, new); "
                "choose another run_name to start a new run"
            )
        client.update_run(existing, status="RUNNING")
        return existing, True
    tags = {
        RUN_NAME_TAG: run_name,
        "method": cfg.method,
        "dataset": cfg.data.name,
        "protocol": cfg.data.protocol,
        "git_commit": git_commit(),
        **(extra_tags or {}),
    }
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id, False


def log_epoch(client: MlflowClient, run_id: str, metrics: dict[str, float], epoch: int) -> None:
    """Per-epoch metrics with ``step = epoch`` (1-based: step k = after k epochs)."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"])


def log_final(client: MlflowClient, run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status=status)
