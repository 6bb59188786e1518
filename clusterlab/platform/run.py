"""One run lifecycle for ``clusterlab train``, every Tune trial and the trials settled after ASHA.

::

    resolved config (config.resolve_raw; a sweep: its base + the searched values)
      -> check(cfg)                checks before Ray: storage, data, sizes, init_from  (once per command)
      -> connect(checked, address) Ray started or joined, resources, every node checked (once per command)
      -> open_run(...)             the MLflow run created or reopened -> RunContext (frozen)
      -> execute(ctx)              Ray Train with retries -> finish(ctx, checkpoint)
         finish(ctx, checkpoint)   log the checkpoint, evaluate, log -> end the run

:func:`execute` and :func:`finish` end the run however they leave: FINISHED, FAILED with a
``failure_reason``, or KILLED naming the signal (:func:`record_failure`). A sweep checks and
connects once for all its trials; each trial opens its own run and executes it, and a trial
ASHA stopped is finished from its last checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlab.config import ConfigError, ExperimentConfig
from clusterlab.platform import cluster, tracking
from clusterlab.platform.interrupts import as_interrupted
from clusterlab.platform.preflight import dataset_need, preflight
from clusterlab.platform.train import (
    TrainingFailed,
    TrainResult,
    check_cluster_resources,
    init_ray,
    resolve_init_from,
    run_trainer,
    storage_dir,
    storage_uri,
)
from clusterlab.redact import redact_text


@dataclass(frozen=True)
class CheckedConfig:
    """A config that passed the checks before Ray; ``cfg.init_from`` is a local path, and
    ``lineage`` holds what the user gave (a run id or URI), for the run's tags."""

    cfg: ExperimentConfig
    client: tracking.MlflowClient = field(compare=False)
    tracking_uri: str
    lineage: dict[str, str]


def check(cfg: ExperimentConfig) -> CheckedConfig:
    """Everything that can be checked before Ray starts: storage, data files and sizes, the
    method's data checks (:func:`~clusterlab.platform.preflight.preflight`), the tracking store,
    and ``init_from`` (downloaded and loaded; its backbone must match)."""
    preflight(cfg)
    client = tracking.client_for(cfg)
    lineage: dict[str, str] = {}
    if cfg.init_from:
        lineage = {"init_from": cfg.init_from}
        cfg = cfg.model_copy(update={"init_from": str(resolve_init_from(client, cfg, storage_dir(cfg)))})
    return CheckedConfig(cfg, client, tracking.resolve_tracking_uri(cfg.tracking.uri), lineage)


def connect(checked: CheckedConfig, address: str | None) -> CheckedConfig:
    """Start or join Ray, check its resources and every node (storage, tracking store, dataset),
    and put ``init_from`` where every worker reads it."""
    cfg = checked.cfg
    init_ray(address)
    check_cluster_resources(cfg)
    nodes = cluster.check_cluster(storage_uri(cfg), checked.tracking_uri, dataset=dataset_need(cfg))
    if cfg.init_from:
        cfg = cfg.model_copy(update={"init_from": cluster.share_init_from(storage_uri(cfg), Path(cfg.init_from), nodes)})
    return CheckedConfig(cfg, checked.client, checked.tracking_uri, checked.lineage)


@dataclass(frozen=True)
class RunContext:
    """One run, built once: its config (``run_name`` set), MLflow run and tracking store."""

    cfg: ExperimentConfig
    run_id: str
    tracking_uri: str
    client: tracking.MlflowClient = field(compare=False)

    @property
    def run_name(self) -> str:
        return str(self.cfg.run_name)


def open_run(cfg: ExperimentConfig, client: tracking.MlflowClient, tracking_uri: str,
             tags: dict[str, str] | None = None, display_name: str | None = None) -> tuple[RunContext, bool]:
    """Create the MLflow run of ``cfg.run_name``, or reopen the one an interrupted attempt left
    -> (context, resumed). A run name whose run finished, or another live process owns, is refused.
    ``display_name``: what the MLflow UI calls the run, when not its run name (a trial's values)."""
    try:
        run_id, resumed = tracking.start_run(client, cfg, str(cfg.run_name), extra_tags=tags,
                                             display_name=display_name)
    except ValueError as exc:
        raise ConfigError(f"run_name: {exc}") from None
    return RunContext(cfg, run_id, tracking_uri, client), resumed


@contextmanager
def _ending(ctx: RunContext) -> Iterator[None]:
    """End the run as the block leaves: FINISHED, KILLED on an interrupt, else FAILED; the
    failure's reason is tagged first."""
    try:
        yield
    except BaseException as exc:
        close_run(ctx.client, ctx.run_id, exc)
        raise
    close_run(ctx.client, ctx.run_id)


def close_run(client: tracking.MlflowClient, run_id: str, failure: BaseException | None = None) -> None:
    """End a run: FINISHED without ``failure``, KILLED when it is an interrupt, else FAILED,
    with the failure's reason tagged first (:func:`record_failure`)."""
    if failure is not None:
        record_failure(client, run_id, failure)
    status = "FINISHED" if failure is None else "KILLED" if isinstance(failure, KeyboardInterrupt) else "FAILED"
    tracking.end_run(client, run_id, status)


def execute(ctx: RunContext, evaluate: bool = True, progress: bool = True, callbacks: list[Any] | None = None,
            report: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train on Ray Train (retried from the latest checkpoint, :func:`run_trainer`), then log
    and evaluate the final checkpoint, and end the run. ``callbacks``: Ray Train callbacks (a
    trial's ``TuneReportCallback``); ``report``: called with the last epoch's and the
    evaluation's metrics before the run ends (a trial reports them to Tune)."""
    with _ending(ctx):
        checkpoint_dir, last_epoch = run_trainer(ctx.cfg, ctx.run_id, ctx.run_name, ctx.tracking_uri, callbacks)
        metrics = _log_and_evaluate(ctx, checkpoint_dir, evaluate, progress)
        if report is not None:
            report({**last_epoch, **metrics})
    return TrainResult(ctx.run_id, ctx.run_name, checkpoint_dir, metrics)


def finish(ctx: RunContext, checkpoint_dir: Path, progress: bool = False) -> dict[str, float]:
    """Log and evaluate a checkpoint trained earlier (a trial ASHA stopped), and end the run."""
    with _ending(ctx):
        return _log_and_evaluate(ctx, checkpoint_dir, True, progress)


def train(cfg: ExperimentConfig, address: str | None = None, evaluate: bool = True,
          progress: bool = True) -> TrainResult:
    """``clusterlab train``: check, connect, open the run, execute it."""
    cfg = cfg.model_copy(update={"run_name": cfg.resolved_run_name()})
    checked = check(cfg)
    tracking.check_run_name_free(checked.client, cfg, str(cfg.run_name))
    checked = connect(checked, address)
    ctx, resumed = open_run(checked.cfg, checked.client, checked.tracking_uri, checked.lineage)
    if resumed:
        print(f"resuming run {ctx.run_name!r} (MLflow run {ctx.run_id}) from its latest checkpoint", flush=True)
    return execute(ctx, evaluate, progress)


def _log_and_evaluate(ctx: RunContext, checkpoint_dir: Path, evaluate: bool, progress: bool) -> dict[str, float]:
    """Log the checkpoint to the run, evaluate it (features kept per checkpoint beside the run,
    reused if evaluation reruns) and log the evaluation. Returns the final metrics."""
    from clusterlab.platform.evaluate import evaluate_checkpoint, log_evaluation

    ctx.client.log_artifacts(ctx.run_id, str(checkpoint_dir), "checkpoint")
    if not evaluate:
        return {}
    features_dir = storage_dir(ctx.cfg) / ctx.run_name / "features" / checkpoint_dir.name
    evaluation = evaluate_checkpoint(checkpoint_dir, features_dir, progress=progress)
    log_evaluation(ctx.client, ctx.run_id, evaluation)
    return evaluation.metrics


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour / cursor codes


def record_failure(client: tracking.MlflowClient, run_id: str, exc: BaseException) -> None:
    """Tag ``failure_reason`` as ``<category>: <message>`` (category e.g. ``non-finite loss``,
    ``interrupted`` with the signal's name), plain text: Ray's error reprs carry terminal colour
    codes, which the MLflow UI shows raw."""
    if isinstance(exc, KeyboardInterrupt):
        interrupted = as_interrupted(exc)
        message = (f"interrupted: {interrupted.signal_name} received; the same command (a sweep: with --resume) "
                   "continues from the last checkpoint")
    else:
        reason = exc.reason if isinstance(exc, TrainingFailed) else type(exc).__name__
        message = f"{reason}: {exc}"
    message = ANSI_ESCAPE.sub("", message)[:4000]
    client.set_tag(run_id, tracking.FAILURE_TAG, redact_text(message))
