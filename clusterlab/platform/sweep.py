"""Sweeps: Ray Tune over Ray Train runs, one MLflow parent run per sweep, one child per trial.

Following Ray 2.60's pattern for tuning Train runs, each Tune trial runs
:func:`_trial_driver`, a plain function that creates (or, on resume, finds) the trial's MLflow
child run, launches the trial's ``TorchTrainer`` with Tune's ``TuneReportCallback``
(:class:`~clusterlab.platform.tune_adapters.EpochReportCallback`: Tune sees every epoch's
metrics and can stop a trial early), evaluates the final checkpoint with
the K-means fan-out and reports the evaluation to Tune once more.

Names are stable across ``--resume``: the Tune experiment is ``<storage>/<sweep name>``, a
trial's Train run is ``<sweep name>-<trial id>`` (Train continues it from its last checkpoint)
and its MLflow child run carries the trial id, so nothing is logged twice.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterlab.config import ConfigError, ExperimentConfig, build_config
from clusterlab.platform import cluster, tracking
from clusterlab.platform.interrupts import Interrupted, stop_tune_gracefully
from clusterlab.platform.loop import NonFiniteLossError, TrainingOutOfMemoryError
from clusterlab.platform.run import RunContext, check, close_run, connect, execute, finish, open_run
from clusterlab.platform.train import TrainingFailed, storage_dir, storage_uri
from clusterlab.platform.tracking import PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from clusterlab.redact import redact_text, redact_uri
from clusterlab.search_space import AshaScheduler, Domain, OptunaSearch, SearchSpace, SweepPlan, trial_config
from clusterlab.methods import spec_for

STRICT_METRIC_CHECKING = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
# failure_reason categories that a retry with the same settings would repeat.
PERMANENT_FAILURES = {NonFiniteLossError.reason, TrainingOutOfMemoryError.reason}


@dataclass(frozen=True)
class SweepResult:
    name: str
    experiment_id: str
    parent_run_id: str
    best_run_id: str | None
    best_params: dict[str, str]
    best_metrics: dict[str, float]
    trials: int
    failed: int
    heatmap: Path | None


def _tune_domain(domain: Domain) -> Any:
    from ray import tune

    value = getattr(domain, domain.kind)
    return {"grid": lambda: tune.grid_search(list(value)), "choice": lambda: tune.choice(list(value)),
            "uniform": lambda: tune.uniform(*value), "loguniform": lambda: tune.loguniform(*value),
            "randint": lambda: tune.randint(*value)}[domain.kind]()


def _trial_driver(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial (runs in a Tune actor): child run -> Train run -> evaluation -> report."""
    import ray.tune

    from clusterlab.platform.tune_adapters import EpochReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{sweep['name']}-{trial_id}"
    cfg = trial_config(sweep["base"], config["params"], f"trial {trial_id}").model_copy(update={"run_name": run_name})
    client = tracking.MlflowClient(sweep["tracking_uri"])
    previous = tracking.find_run(client, sweep["experiment_id"], run_name)
    if previous:
        run = client.get_run(previous)
        if run.info.status == "FINISHED":
            # Finished in MLflow before the sweep was interrupted: report it again, never re-run it.
            ray.tune.report(dict(run.data.metrics))
            return
        reason = run.data.tags.get(tracking.FAILURE_TAG, "")
        category = reason.split(":")[0]
        if run.info.status == "FAILED" and category in PERMANENT_FAILURES:
            # A resumed sweep does not repeat a failure that the same settings would repeat.
            raise TrainingFailed(category, f"not retried: {reason}", permanent=True)
    ctx, _ = open_run(cfg, client, sweep["tracking_uri"], tags={
        PARENT_TAG: sweep["parent_run_id"], SWEEP_TAG: sweep["name"], TRIAL_TAG: trial_id, **sweep["source_tags"],
        **({"init_from": sweep["init_from"]} if sweep.get("init_from") else {})},
        display_name=trial_display_name(config["params"], trial_id))
    # The run ends with execute, FINISHED only after the metrics reached Tune. A trial the
    # scheduler stops (its actor torn down mid-call) leaves the run open for _settle_trials to
    # close from Tune's own record of what happened.
    execute(ctx, progress=False, callbacks=[EpochReportCallback()], report=ray.tune.report)


def trial_display_name(params: dict[str, Any], trial_id: str) -> str:
    """A trial's name in the MLflow UI: its searched values, short keys where they are unique,
    then the trial id (``push=0.1 pull=0.5 [a1b2c_00003]``); numbers to 4 significant digits."""
    short = {key: key.rsplit(".", 1)[-1] for key in params}
    if len(set(short.values())) < len(short):
        short = {key: key for key in params}
    values = " ".join(f"{short[k]}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in params.items())
    return f"{values} [{trial_id}]" if values else trial_id


def _child_runs(client: tracking.MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)


def _settle_trials(client: tracking.MlflowClient, tracking_uri: str, experiment_id: str, parent_run_id: str,
                   base: dict[str, Any], results: Any) -> None:
    """Close the child runs their trials left open: a failed trial's run ends FAILED with the
    error as ``failure_reason``; a trial the scheduler stopped early never reached its own
    evaluation, so its last checkpoint is evaluated here and the run ends FINISHED."""
    open_runs = {r.data.tags.get(TRIAL_TAG): r for r in _child_runs(client, experiment_id, parent_run_id)
                 if r.info.status == "RUNNING"}
    base_cfg = build_config(base, "sweep base")
    for result in results:
        run = open_runs.get((result.metrics or {}).get("trial_id") or _trial_id(result.path))
        if run is None:
            continue
        checkpoint = (result.metrics or {}).get("checkpoint_path")
        run_name = run.data.tags[tracking.RUN_NAME_TAG]
        local = None
        if result.error is None and checkpoint:  # a local path, or a path on the storage URI's filesystem
            local = cluster.fetch_checkpoint(storage_uri(base_cfg), checkpoint, storage_dir(base_cfg) / run_name)
        if result.error is not None:  # the trial died before its driver could say why
            close_run(client, run.info.run_id, result.error)
        elif local is not None:
            cfg = trial_config(base, dict(result.config.get("params", {})), "stopped trial").model_copy(
                update={"run_name": run_name})
            epochs_done = int(result.metrics.get("epoch", 0))
            if epochs_done < cfg.epochs:
                client.set_tag(run.info.run_id, "clusterlab.stopped_early_at_epoch", str(epochs_done))
            finish(RunContext(cfg, run.info.run_id, tracking_uri, client), local)
        else:
            tracking.end_run(client, run.info.run_id, "KILLED")


def _trial_id(path: str | None) -> str | None:
    """Tune trial directories are named ``<trainable>_<trial id>_<index>_<params>_<time>``."""
    parts = Path(path or "").name.split("_")
    return "_".join(parts[3:5]) if len(parts) > 5 and parts[:3] == ["", "trial", "driver"] else None


def _best_run(children: list[Any], metric: str, mode: str) -> Any | None:
    scored = [r for r in children if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r.data.metrics[metric])


def heatmap_axes(space: SearchSpace) -> tuple[str, str, str | None] | None:
    """(x, y, facet) when the space is a grid over two or three loss weights (supplementary
    Figs. 1-3: panels per lambda_2, lambda_3 across, lambda_4 down), else None."""
    weights = sorted(k for k in space.grid_keys() if k.startswith("loss.weights."))
    order = {"loss.weights.inst_ent": 0, "loss.weights.push": 1, "loss.weights.pull": 2}
    weights.sort(key=lambda k: order.get(k, 3))
    if len(weights) == 2:
        return weights[0], weights[1], None
    if len(weights) == 3:
        return weights[1], weights[2], weights[0]
    return None


def heatmap_metric(method: str) -> str:
    """The clustering accuracy a loss-weight heatmap shows: the method's headline metric
    (MIX'EM Table 1 row 6 for MIX'EM, the cluster head for LSD-C and ExCB)."""
    return spec_for(method).headline_metric


def run_sweep(plan: SweepPlan, address: str | None = None, resume: str | None = None) -> SweepResult:
    """Run (or resume) a validated sweep (:func:`~clusterlab.search_space.plan_sweep`) on Ray
    Tune, record it in MLflow. ``resume``: None starts a new sweep (refused if the name exists),
    ``"yes"`` continues an interrupted one, ``"auto"`` continues it if it exists, else starts it."""
    space, text, name = plan.space, plan.text, plan.name
    base = copy.deepcopy(plan.base)
    base["storage_path"] = storage_uri(ExperimentConfig.model_validate(base))  # absolute: trials run elsewhere
    base_cfg = ExperimentConfig.model_validate(base)
    checked = check(base_cfg)
    client, tracking_uri = checked.client, checked.tracking_uri
    experiment_id = tracking.experiment_id(client, name)
    parent = tracking.find_sweep_parent(client, experiment_id, name)
    tune_dir = cluster.join(storage_uri(base_cfg), name)
    init_from = base_cfg.init_from

    import ray.tune

    resuming = _resume_or_start(resume, name, parent, tune_dir)
    # The driver's user and commit, for the parent and every trial (trials may run as another
    # user on other nodes, and start after the checkout moved on).
    source = tracking.source_tags("sweep")

    base["init_from"] = connect(checked, address).cfg.init_from  # where every trial's workers read it
    if parent is None:
        parent = client.create_run(experiment_id, run_name=name, tags={
            SWEEP_TAG: name, ROLE_TAG: "parent", "method": base_cfg.method, "dataset": base_cfg.data.name,
            "git_commit": source.get(tracking.GIT_COMMIT_TAG, "unknown"), tracking.OWNER_TAG: tracking.owner(),
            **source, **tracking.user_tags(base_cfg),
            **({"init_from": redact_uri(init_from)} if init_from else {})}).info.run_id
        client.log_text(parent, redact_text(text), "search_space.yaml")
        client.log_text(parent, base_cfg.to_yaml(), "base_config.yaml")
        client.log_param(parent, "trials", space.trial_count())
    else:
        # Runs the interrupted sweep left RUNNING (its driver killed) are closed first, so
        # the store never shows a dead trial as running; the trials reopen them as they resume.
        died = [r for r in tracking.reconcile(client, [name]) if r.action == "marked FAILED"]
        tracking.claim_run(client, parent)
        print(f"resuming sweep {name!r}: finished trials are kept, unfinished ones continue from their checkpoints"
              + (f" ({len(died)} runs whose process had died marked FAILED)" if died else ""), flush=True)

    sweep = {"name": name, "base": base, "experiment_id": experiment_id, "parent_run_id": parent,
             "tracking_uri": tracking_uri, "init_from": init_from, "source_tags": source}
    trainable = ray.tune.with_parameters(_trial_driver, sweep=sweep)
    try:
        if resuming:
            tuner = ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
        else:
            tuner = ray.tune.Tuner(trainable, param_space={"params": {k: _tune_domain(d) for k, d in space.search.items()}},
                                   tune_config=tune_config(space, base_cfg.method,
                                                           max_concurrent_trials(space, base_cfg,
                                                                                 ray.cluster_resources())),
                                   run_config=ray.tune.RunConfig(name=name, storage_path=storage_uri(base_cfg)))
        with stop_tune_gracefully() as stopped_by, final_metric_checking(space, base_cfg.method):
            results = tuner.fit()
        if len(results) < space.trial_count() or results.num_terminated + results.num_errors < len(results):
            # Tune stopped the trials on SIGINT / SIGTERM and saved its state (trials of a grid
            # are created lazily, so an interrupted sweep may hold fewer than planned).
            print(f"sweep {name!r} interrupted; its state is saved. Continue it with: {plan.resume_command()}",
                  flush=True)
            raise stopped_by() or Interrupted(signal.SIGINT)
        _settle_trials(client, tracking_uri, experiment_id, parent, base, results)
        outcome = _summarise(client, experiment_id, parent, space, name, base_cfg.method,
                             storage_dir(base_cfg) / f"{name}_heatmap.png", trials=len(results))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            for run in _child_runs(client, experiment_id, parent):  # their trials were stopped with the sweep
                if run.info.status == "RUNNING":
                    close_run(client, run.info.run_id, exc)
        close_run(client, parent, exc)
        raise
    close_run(client, parent)
    return outcome


def _resume_or_start(resume: str | None, name: str, parent: str | None, tune_dir: str) -> bool:
    """Whether to resume the sweep (``--resume``; with ``auto``: when it exists), refused when
    there is nothing to resume or, without ``--resume``, when the name is taken (ConfigError)."""
    import ray.tune

    exists = parent is not None or cluster.exists(tune_dir)
    if resume == "auto":
        resume = "yes" if exists else None
        print(f"--resume auto: sweep {name!r} " + ("exists; continuing it" if resume else "is new; starting it"),
              flush=True)
    if resume and (parent is None or not ray.tune.Tuner.can_restore(tune_dir)):
        raise ConfigError(f"--resume: no interrupted sweep named {name!r} (MLflow experiment {name!r}, Tune "
                          f"directory {tune_dir}); drop --resume to start it")
    if not resume and exists:
        raise ConfigError(f"--experiment: a sweep named {name!r} already exists (MLflow experiment {name!r} / "
                          f"{tune_dir}); its results are kept: pass --resume to continue it, or --experiment to start "
                          "a new one")
    return bool(resume)


def max_concurrent_trials(space: SearchSpace, cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """The space's limit, else as many trials as the cluster can hold at once: each trial is a
    Tune driver (1 CPU) plus its Train workers. Without a limit Tune would start every trial's
    driver and leave their Train runs waiting on each other for workers (Ray's Train + Tune guide)."""
    if space.tune.max_concurrent_trials:
        return space.tune.max_concurrent_trials
    res = cfg.resources
    fits = int(cluster.get("CPU", 1) // (res.num_workers * res.cpus_per_worker + 1))
    if res.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // (res.num_workers * res.gpus_per_worker)))
    return max(1, fits)


@contextmanager
def final_metric_checking(space: SearchSpace, method: str) -> Iterator[None]:
    """Let Tune accept epoch results without the search algorithm's metric while it runs, when
    that metric is a final one (Optuna on an evaluation ACC, :mod:`tune_adapters`): Tune's own
    check, ``TUNE_DISABLE_STRICT_METRIC_CHECKING``, would otherwise fail the first epoch."""
    final_only = (isinstance(space.tune.search_alg, OptunaSearch)
                  and space.tune.metric not in spec_for(method).epoch_metrics())
    if not final_only:
        yield
        return
    previous = os.environ.get(STRICT_METRIC_CHECKING)
    os.environ[STRICT_METRIC_CHECKING] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[STRICT_METRIC_CHECKING]
        else:
            os.environ[STRICT_METRIC_CHECKING] = previous


def tune_config(space: SearchSpace, method: str, concurrency: int) -> Any:
    """Tune's settings for the space: its scheduler, its search algorithm (limited to
    ``concurrency`` trials at once), and the metric Tune watches when it is reported every epoch."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    settings = space.tune
    per_epoch = settings.metric in spec_for(method).epoch_metrics()
    sched = settings.scheduler
    # stop_last_trials=False: a trial that survives every rung trains to the end and is evaluated
    # inside its own trial, rather than being stopped at max_t before its evaluation.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=sched.max_t, grace_period=sched.grace_period,
                               reduction_factor=sched.reduction_factor, stop_last_trials=False)
                 if isinstance(sched, AshaScheduler) else FIFOScheduler())
    # Tune checks every result for its metric: only a per-epoch metric can be given to it; a
    # final-only metric (an evaluation ACC) picks the best trial after the sweep instead, and
    # is what Optuna learns from at each trial's end. The concurrency limit goes to the search
    # algorithm itself: Tune ignores max_concurrent_trials when it is handed one.
    if isinstance(settings.search_alg, OptunaSearch):
        from ray.tune.search import ConcurrencyLimiter

        from clusterlab.platform.tune_adapters import FinalMetricOptunaSearch

        search_alg = ConcurrencyLimiter(FinalMetricOptunaSearch(metric=settings.metric, mode=settings.mode,
                                                                seed=settings.seed), max_concurrent=concurrency)
    else:
        search_alg = BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)
    return ray.tune.TuneConfig(metric=settings.metric if per_epoch else None,
                               mode=settings.mode if per_epoch else None, scheduler=scheduler,
                               num_samples=settings.num_samples, search_alg=search_alg)


def _summarise(client: tracking.MlflowClient, experiment_id: str, parent: str, space: SearchSpace, name: str,
               method: str, heatmap_out: Path, trials: int) -> SweepResult:
    """Best trial's params and metrics onto the parent run, and the heatmap for weight grids.
    ``trials``: how many Tune ran; every one without a FINISHED child run failed, including a
    trial that died before it could create its run."""
    from clusterlab.platform.heatmap import grid_cells, write_heatmap

    children = _child_runs(client, experiment_id, parent)
    best = _best_run(children, space.tune.metric, space.tune.mode)
    best_params: dict[str, str] = {}
    best_metrics: dict[str, float] = {}
    if best is not None:
        best_params = {k: best.data.params.get(k, "") for k in space.search}
        best_metrics = dict(best.data.metrics)
        tracking.log_final(client, parent, {f"best_{k}": v for k, v in best_metrics.items()},
                           tags={"best_run_id": best.info.run_id,
                                 **{f"best.{k}": v for k, v in best_params.items()}})
    heatmap = None
    axes = heatmap_axes(space)
    if axes is not None:  # the cells from the runs and grid at hand, not looked up again
        metric = heatmap_metric(method)
        grid = {key: space.search[key].grid or [] for key in space.grid_keys()}
        cells = grid_cells(children, *axes, metric, grid, name)
        heatmap = write_heatmap(cells, *axes, metric, name, heatmap_out, client, parent)
    failed = trials - sum(r.info.status == "FINISHED" for r in children)
    client.log_metric(parent, "failed_trials", failed)
    return SweepResult(name, experiment_id, parent, best.info.run_id if best else None, best_params, best_metrics,
                       trials, failed, heatmap)
