"""Batch re-evaluation: every finished run of an experiment, evaluated again as Ray tasks.

Each run is one Ray task (a GPU task when the cluster has GPUs) that downloads the run's
checkpoint, extracts features and runs the K-means fan-out, then logs the metrics to the run
under an evaluation-version prefix, ``eval/<version>/<metric>``, where the version spells out
the evaluation options (``k10-n50-s0``: K, initialisations, seed). The images scored are the
run's own ``eval.split`` (from the checkpoint's config: the test split, or ``all`` = train +
test, LSD-C Sec. 4), recorded in the version tag with ``eval/<version>/eval_images``. Plots go
under ``eval/<version>/plots/``. Nothing the run already holds is overwritten.

A run whose tag ``clusterlab.eval/<version>`` is set was already evaluated with these options
and is skipped: re-running the same job is a no-op, and an interrupted job continues with the
runs it had not reached. A broken checkpoint fails its own task only; it is reported and the
other runs go on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm.auto import tqdm

from clusterlab.config import ConfigError
from clusterlab.platform import cluster, tracking
from clusterlab.platform.evaluate import EvalResult, evaluate_checkpoint
from clusterlab.platform.tracking import ROLE_TAG
from clusterlab.platform.train import init_ray

EVAL_TAG_PREFIX = "clusterlab.eval/"


@dataclass(frozen=True)
class EvalOptions:
    n_init: int = 50
    k: int | None = None  # None: the number of classes
    seed: int = 0
    plots: bool = True

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 2:
            raise ConfigError(f"--k must be >= 2, got {self.k}")
        if self.n_init < 1:
            raise ConfigError(f"--n-init must be >= 1, got {self.n_init}")

    @property
    def version(self) -> str:
        return f"k{self.k or 'C'}-n{self.n_init}-s{self.seed}"


@dataclass(frozen=True)
class ReevalOutcome:
    run_id: str
    run_name: str
    status: str  # "evaluated", "already evaluated", "failed: <reason>"
    metrics: dict[str, float]


def log_versioned(client: tracking.MlflowClient, run_id: str, result: EvalResult, options: EvalOptions) -> None:
    """Metrics as ``eval/<version>/<name>``, plots under ``eval/<version>/plots/``, then the
    tag that marks the run as done for this version (last, so a crash re-does the run).
    Metrics an interrupted attempt already logged are not logged again: the evaluation is
    seeded, so they hold the same values, and a second point would duplicate them."""
    prefix = f"eval/{options.version}"
    logged = client.get_run(run_id).data.metrics
    tracking.log_final(client, run_id, {f"{prefix}/{k}": v for k, v in result.metrics.items()
                                        if f"{prefix}/{k}" not in logged})
    for name, figure in result.figures.items():
        client.log_figure(run_id, figure, f"{prefix}/plots/{name}")
    client.set_tag(run_id, EVAL_TAG_PREFIX + options.version,
                   json.dumps({"n_init": options.n_init, "k": options.k, "seed": options.seed, "split": result.split,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def check_run(client: tracking.MlflowClient, run_id: str) -> None:
    """Refuse an unknown run id before anything starts (ConfigError naming it)."""
    try:
        client.get_run(run_id)
    except Exception:  # MlflowException (no such run) or a malformed id
        raise ConfigError(f"--run-id: no MLflow run {run_id!r} in this tracking store; list runs with "
                          "`clusterlab ui` or pass the id shown by `clusterlab train`") from None


def evaluate_run(client: tracking.MlflowClient, run_id: str, options: EvalOptions, device: str | None = None,
                 tasks: int | None = None, progress: bool = False) -> EvalResult:
    """Download ``run_id``'s checkpoint, evaluate it on its config's ``eval.split`` and log the
    result under the version prefix."""
    work = Path(tempfile.mkdtemp(prefix=f"clusterlab-reeval-{run_id[:8]}-"))
    try:
        try:
            checkpoint = Path(client.download_artifacts(run_id, "checkpoint", str(work)))
        except Exception as exc:  # MlflowException or a store error: both mean "not usable"
            raise ValueError(f"run {run_id} has no usable 'checkpoint' artifact ({exc})") from None
        result = evaluate_checkpoint(checkpoint, work / "features", n_init=options.n_init, k=options.k,
                                     tasks=tasks, device=device, seed=options.seed, plots=options.plots,
                                     progress=progress)
        log_versioned(client, run_id, result, options)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


@ray.remote(num_cpus=1)
def _reeval_task(tracking_uri: str, run_id: str, options: EvalOptions, device: str | None) -> dict[str, float]:
    return evaluate_run(tracking.MlflowClient(tracking_uri), run_id, options, device).metrics


def reevaluate_experiment(
    tracking_uri: str,
    experiment: str,
    options: EvalOptions,
    filter_string: str | None = None,
    device: str | None = None,
    progress: bool = True,
    address: str | None = None,
) -> list[ReevalOutcome]:
    """Re-evaluate every finished run with a checkpoint in ``experiment`` (matching
    ``filter_string``, MLflow search syntax) as parallel Ray tasks on the cluster at
    ``address`` (default: a local Ray), started only once there is a run to evaluate."""
    client = tracking.connect(tracking_uri, existing=True)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no MLflow experiment named {experiment!r} in {tracking_uri}")
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    try:
        runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=10000)
    except Exception as exc:  # MlflowException: the filter does not parse (refused before Ray starts)
        raise ConfigError(f"--filter: {exc}") from None
    runs = [r for r in runs if r.data.tags.get(ROLE_TAG) != "parent"]
    if not runs:
        matching = f" matching --filter {filter_string!r}" if filter_string else ""
        raise ConfigError(f"--experiment {experiment!r}: no FINISHED run{matching} to re-evaluate"
                          + ("; check the filter's keys (params.<key>, tags.<key>, metrics.<key>)"
                             if filter_string else ""))
    outcomes: list[ReevalOutcome] = []
    todo = []
    for r in runs:
        name = r.data.tags.get(tracking.RUN_NAME_TAG, r.info.run_name or r.info.run_id)
        if EVAL_TAG_PREFIX + options.version in r.data.tags:
            prefix = f"eval/{options.version}/"
            done = {k[len(prefix):]: v for k, v in r.data.metrics.items() if k.startswith(prefix)}
            outcomes.append(ReevalOutcome(r.info.run_id, name, "already evaluated", done))
        else:
            todo.append((r.info.run_id, name))
    if not todo:  # everything already evaluated: no cluster needed
        return outcomes
    init_ray(address)
    cluster.check_cluster(None, tracking_uri)  # tasks on other nodes log to the store too
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and device != "cpu"
    task_resources = {"num_gpus": 1} if use_gpu else {}
    pending = {_reeval_task.options(**task_resources).remote(tracking_uri, run_id, options,
                                                             "cuda" if use_gpu else "cpu"): (run_id, name)
               for run_id, name in todo}
    with tqdm(total=len(pending), desc=f"re-evaluating {experiment} ({options.version})", unit="run",
              disable=not progress) as bar:
        remaining = list(pending)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            run_id, name = pending[done[0]]
            try:
                outcomes.append(ReevalOutcome(run_id, name, "evaluated", ray.get(done[0])))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                outcomes.append(ReevalOutcome(run_id, name, f"failed: {type(cause).__name__}: {str(cause)[:300]}", {}))
            bar.update(1)
    return outcomes
