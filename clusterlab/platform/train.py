"""The Ray Train side of a run, and the checks before it (the lifecycle is ``platform/run.py``).

- :func:`resolve_init_from`: ``init_from`` found and checked before Ray starts (the data and
  storage checks are ``platform/preflight.py``); :func:`init_ray`, :func:`check_cluster_resources`;
- :func:`run_trainer`: a ``TorchTrainer`` runs :func:`clusterlab.platform.loop.fit` on N workers
  (gloo on CPU, NCCL on GPU) through :func:`train_loop_per_worker`; rank 0 logs each epoch to
  MLflow (:class:`RaySession`) and hands Ray the epoch's checkpoint.

Failures: a run whose workers fail (a worker killed, a node lost) is restarted from its latest
checkpoint up to ``resources.max_failures`` times by calling Ray Train again under the same
name; a :class:`~clusterlab.platform.loop.PermanentTrainingError` (NaN loss, out of memory)
is never retried. Every failure leaves a ``failure_reason`` tag on the run.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import platform
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterlab.config import ConfigError, ExperimentConfig, build_config
from clusterlab.environment import package_versions
from clusterlab.platform import cluster, tracking
from clusterlab.platform.interrupts import Interrupted, around_ray_init, call_off_main_thread, reclaim_signals
from clusterlab.platform.loop import PREEMPTION_STEP_KEY, PermanentTrainingError, fit
from clusterlab.redact import redact_text, redact_values
from clusterlab.trainers.checkpoint import read_checkpoint, read_history

log = logging.getLogger(__name__)

# How long a finished (or failing) worker waits for queued metrics to reach the tracking store.
METRICS_FLUSH_TIMEOUT_S = 900.0
ATTEMPTS_TAG = "clusterlab.train_attempts"
RESUMED_TAG = "clusterlab.resumed_from_epoch"
PREEMPTION_TAG = "clusterlab.preemption_checkpoint"  # where the last preemption notice checkpointed


class TrainingFailed(RuntimeError):
    """A training run that ended in error; ``reason`` is the failure_reason tag's category."""

    def __init__(self, reason: str, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.reason, self.permanent = reason, permanent

    def __reduce__(self) -> tuple[Any, ...]:  # Ray copies and pickles a trial's error
        return type(self), (self.reason, str(self), self.permanent)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    run_name: str
    checkpoint_dir: Path
    metrics: dict[str, float]


def hardware_description(device: torch.device, world_size: int) -> str:
    """The run's :data:`tracking.HARDWARE_TAG` as rank 0 sees it: ``"<world size> x <device>"``,
    e.g. ``"2 x NVIDIA H200"`` (:func:`torch.cuda.get_device_name`) or ``"1 x CPU (AMD EPYC, 2 of
    2 cores)"`` (the threads this worker computes with, of the machine's logical CPUs). The CPU
    model is /proc/cpuinfo's ``model name`` where there is one, else :func:`platform.processor`.
    REPRODUCTIONS.md reports it beside each measured number (LSD-C Table 2 and the others)."""
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or "unknown model"
    return f"{world_size} x CPU ({model}, {torch.get_num_threads()} of {os.cpu_count()} cores)"


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every report (metrics and checkpoint path) at INFO under a logger
    named by its source file, outside ``ray.train``, so ``LoggingConfig`` does not reach it;
    the worker's own epoch line says the same in one line."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RaySession:
    """:class:`~clusterlab.platform.loop.TrainSession` inside a Ray Train worker."""

    def __init__(self, run_id: str, tracking_uri: str, cfg: ExperimentConfig) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        _quiet_report_lines()
        self.device = ray.train.torch.get_device()
        # Ray starts workers with OMP_NUM_THREADS=1; use the CPUs this worker reserved.
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
        self._run_id = run_id
        self._client = tracking.MlflowClient(tracking_uri) if self.world_rank == 0 else None
        self._metrics: tracking.EpochLogger | None = None
        if self._client is not None:  # where the run trains (a restarted worker group may move)
            import ray

            tracking.log_final(self._client, run_id, {}, tags={
                tracking.NODE_TAG: ray.get_runtime_context().get_node_id(),
                tracking.NODE_IP_TAG: ray.util.get_node_ip_address(),
                tracking.HARDWARE_TAG: hardware_description(self.device, self.world_size),
                # what this attempt trains with, where it trains (a node image may differ from the lock)
                **{f"{tracking.VERSION_TAG_PREFIX}{name}": version for name, version in package_versions().items()}})
            self._metrics = tracking.EpochLogger(self._client, run_id, step_key="lr")  # lr: logged every epoch
        # One monitor per node (its first worker): utilisation is what packing workers and
        # trials onto nodes is judged by.
        self._system_metrics = (tracking.start_system_metrics(run_id, tracking_uri, cfg.tracking.system_metrics_interval_s)
                                if cfg.tracking.system_metrics and ctx.get_local_rank() == 0 else None)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        local = Path(ckpt.to_directory(tempfile.mkdtemp(prefix="clusterlab-resume-")))
        if self._metrics is not None:
            # Epochs whose metrics died with the previous attempt (in its queue, or between
            # the checkpoint and MLflow) are logged from the checkpoint's own history.
            history = read_history(local)
            for epoch_metrics in history:
                self._metrics.log(int(epoch_metrics["epoch"]), epoch_metrics)
            self._client.set_tag(self._run_id, RESUMED_TAG, str(len(history)))
        return local

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if PREEMPTION_STEP_KEY in metrics:  # not an epoch's metrics: a note on the run, if it can be made
            if self._client is not None:
                try:
                    self._client.set_tag(self._run_id, PREEMPTION_TAG, f"epoch {int(metrics['epoch']) + 1} "
                                         f"step {int(metrics[PREEMPTION_STEP_KEY])}")
                except Exception as exc:  # the store is down: the checkpoint matters, the note does not
                    log.warning("could not tag the preemption checkpoint: %s", exc)
        elif self._metrics is not None:
            self._metrics.log(int(metrics["epoch"]), metrics)

    def preemption_notice(self) -> bool:
        import ray.train

        return ray.train.get_preemption_info() is not None

    def close(self, timeout_s: float) -> None:
        """Deliver the queued metrics (training ends only when MLflow has every epoch), and the
        last system-metric samples."""
        if self._system_metrics is not None:
            self._system_metrics.finish()
        if self._metrics is not None:
            self._metrics.close(timeout_s)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the validated config and run the plain loop."""
    cfg = build_config(loop_config["config"], source="train_loop_config")
    if cfg.init_from and cluster.is_uri(cfg.init_from):  # published under a storage URI by the driver
        local = cluster.download(cfg.init_from, Path(tempfile.mkdtemp(prefix="clusterlab-init-from-")))
        cfg = cfg.model_copy(update={"init_from": str(local)})
    # The checkpoint records this config (checkpoint.pt, config.yaml): no credentials in it. The
    # worker needs none of its URIs: Ray has storage_path, loop_config the tracking URI.
    cfg = build_config(redact_values(cfg.model_dump(mode="json")), source="train_loop_config")
    session = RaySession(loop_config["run_id"], loop_config["tracking_uri"], cfg)
    try:
        fit(cfg, session)
    except BaseException:
        try:  # keep what was measured, but never let the tracking store mask the training error
            session.close(timeout_s=30.0)
        except Exception:
            pass
        raise
    session.close(METRICS_FLUSH_TIMEOUT_S)


def resolve_init_from(client: tracking.MlflowClient, cfg: ExperimentConfig, storage: Path) -> Path:
    """Turn ``init_from`` (a checkpoint path or URI, or an MLflow run id) into a checked local path.

    A run's ``checkpoint`` artifact, or a checkpoint under a URI, is downloaded under ``storage``
    (the local storage directory, see :func:`storage_dir`); :func:`cluster.share_init_from`
    then puts it where every worker can read it. The checkpoint must load and have this run's
    backbone, or the run is refused before training starts.
    """
    value = str(cfg.init_from)
    path = Path(value).expanduser()
    if cluster.is_uri(value):
        try:
            path = cluster.download(value, storage / "init_from" / hashlib.sha1(value.encode()).hexdigest()[:12])
        except (OSError, ValueError) as exc:  # pyarrow raises OSError subclasses, ValueError for bad URIs
            raise ConfigError(f"init_from: cannot read {value} ({exc})") from None
    elif not path.exists():
        if not tracking.is_run_id(value):
            raise ConfigError(f"init_from: {value!r} is neither an existing checkpoint path nor an MLflow run id")
        target = storage / "init_from" / value
        created = [d for d in (target, *target.parents) if not d.exists()]
        target.mkdir(parents=True, exist_ok=True)
        try:
            path = Path(client.download_artifacts(value, "checkpoint", str(target)))
        except Exception as exc:  # MlflowException or a store error: both mean "not usable"
            if created:  # a mistyped run id leaves no folder behind: remove the outermost one it made
                shutil.rmtree(created[-1], ignore_errors=True)
            raise ConfigError(f"init_from: MLflow run {value} has no usable 'checkpoint' artifact ({exc})") from None
    try:
        state = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"init_from: {exc}") from None
    trained, wanted = state["config"]["model"], cfg.model.model_dump(mode="json")
    mismatched = [k for k in ("backbone", "stem", "cnn_width") if trained.get(k) != wanted[k]]
    if mismatched:
        raise ConfigError(
            "init_from: the checkpoint's backbone differs in "
            + ", ".join(f"model.{k} ({trained.get(k)!r} there, {wanted[k]!r} here)" for k in mismatched)
        )
    return path.resolve()


RAY_ADDRESS_PROBE_TIMEOUT_S = 5.0
_RAY_ADDRESS_FORMS = "local, auto, HOST:PORT (the head's GCS port, 6379) or ray://HOST:PORT (Ray Client, 10001)"


def check_ray_address(address: str, source: str) -> None:
    """Refuse at once a Ray address that is malformed or where nothing answers (a TCP connect
    within 5 s): Ray's own client retries a dead ``ray://`` address for about 40 s and a dead
    GCS address without end before its traceback."""
    import socket
    from urllib.parse import urlsplit

    if address in ("local", "auto"):
        return
    where = f"{source} ({address!r})"
    client = address.startswith("ray://")
    try:
        parts = urlsplit(address if client else f"//{address}")
        host, port = parts.hostname, parts.port or (10001 if client else None)
    except ValueError:
        host = port = None
    if not host or port is None or (parts.scheme not in ("", "ray")) or parts.path not in ("", "/"):
        raise ConfigError(f"{where}: not a Ray address; use {_RAY_ADDRESS_FORMS}")
    try:
        socket.create_connection((host, port), timeout=RAY_ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{where}: nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__}); "
                          f"start the cluster (ray start --head), fix the address, or unset RAY_ADDRESS / "
                          f"pass --address local for a private local Ray") from None


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``, else at ``$RAY_ADDRESS`` (Ray's convention; a Ray
    job's entrypoint gets its cluster's address there, so a job submitted without
    ``--address`` still trains on that cluster), else start a private local Ray.
    ``address="local"`` always starts a private one. A bad address is refused first
    (:func:`check_ray_address`)."""
    import ray

    if ray.is_initialized():
        return
    source = "--address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    check_ray_address(address, source)
    try:
        with around_ray_init():  # a signal lost in ray.init's at-fork hooks comes again
            if address != "local":
                ray.init(address=address, log_to_driver=True)
            else:
                # More logical CPUs than cores: on 2 cores Train's placement groups otherwise starve
                # and hang (DESIGN.md, measured).
                ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), log_to_driver=True)
    except SystemExit:  # ray.init's own SIGTERM handler (installed outside catch_signals)
        raise Interrupted(signal.SIGTERM) from None
    except ConnectionError as exc:  # e.g. `auto` with no cluster on this machine
        raise ConfigError(f"{source} ({address!r}): {exc}; use {_RAY_ADDRESS_FORMS}") from None
    finally:
        reclaim_signals()  # ours again, and a signal swallowed during ray.init raised


def check_cluster_resources(cfg: ExperimentConfig) -> None:
    import ray

    res = cfg.resources
    available = ray.cluster_resources()
    need_gpu = res.num_workers * res.gpus_per_worker
    if need_gpu > available.get("GPU", 0):
        raise ConfigError(
            f"resources.gpus_per_worker: {res.num_workers} workers x {res.gpus_per_worker} GPU need {need_gpu} "
            f"GPUs but the Ray cluster has {available.get('GPU', 0)}; set resources.gpus_per_worker=0 to train on CPU"
        )
    need_cpu = res.num_workers * res.cpus_per_worker
    if need_cpu > available.get("CPU", 0):
        raise ConfigError(
            f"resources: {res.num_workers} workers x {res.cpus_per_worker} CPU need {need_cpu} CPUs but the Ray "
            f"cluster has {available.get('CPU', 0)}; lower resources.num_workers or resources.cpus_per_worker"
        )
    for name, amount in res.custom_resources.items():
        if res.num_workers * amount > available.get(name, 0):
            raise ConfigError(
                f"resources.custom_resources: {res.num_workers} workers x {amount} {name!r} need "
                f"{res.num_workers * amount} but the Ray cluster has {available.get(name, 0)} (nodes offer custom "
                f"resources with `ray start --resources '{{\"{name}\": N}}'`)"
            )


def storage_uri(cfg: ExperimentConfig) -> str:
    """``storage_path`` for Ray: a filesystem URI untouched, a local path made absolute."""
    return cluster.storage_location(cfg.storage_path)


def storage_dir(cfg: ExperimentConfig) -> Path:
    """The local directory for the driver's files (features, downloads, heatmaps): the storage
    directory itself, or a local cache when ``storage_path`` is a URI."""
    return cluster.local_dir(storage_uri(cfg))


def classify_failure(exc: Exception, run_name: str) -> TrainingFailed:
    """Ray Train's error -> :class:`TrainingFailed`: permanent when any worker raised a
    :class:`PermanentTrainingError`, else retryable (a worker died, a node was lost)."""
    import ray.train

    causes = list(exc.worker_failures.values()) if isinstance(exc, ray.train.WorkerGroupError) else [exc]
    for cause in causes:
        if isinstance(cause, PermanentTrainingError):
            return TrainingFailed(cause.reason, f"training run {run_name!r}: {cause}", permanent=True)
    first = causes[0] if causes else exc
    return TrainingFailed(type(first).__name__, f"training run {run_name!r} failed: {str(first)[:2000]}",
                          permanent=False)


def run_trainer(cfg: ExperimentConfig, run_id: str, run_name: str, tracking_uri: str,
                callbacks: list[Any] | None = None) -> tuple[Path, dict[str, float]]:
    """Fit the TorchTrainer -> (local directory of the final checkpoint, last epoch's metrics).

    A failed attempt is retried from the latest checkpoint up to ``resources.max_failures``
    times unless it is permanent; the attempt count is tagged on the run. ``callbacks`` are
    Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``). Raises
    :class:`TrainingFailed`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    res = cfg.resources
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {}),
                 **res.custom_resources}

    def attempt() -> Any:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": tracking_uri},
            scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=run_name,  # the same name again: Ray Train continues from the latest checkpoint
                storage_path=storage_uri(cfg),
                # Retries of failures are decided here, not by Ray Train, which would also retry a
                # NaN loss. A node preemption Ray Train is told of in advance (the cloud's drain
                # notice) is its own to retry, from the latest checkpoint, without counting
                # against resources.max_failures.
                failure_config=ray.train.FailureConfig(max_failures=0, max_preemption_failures=-1),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # Ray Train's INFO lines (two per report) would bury the per-epoch progress line.
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                callbacks=callbacks,
            ),
        )
        return call_off_main_thread(trainer.fit)  # keeps Ray Train's SIGINT handler out (interrupts.py)

    client = tracking.MlflowClient(tracking_uri)
    retries = float("inf") if res.max_failures == -1 else res.max_failures
    for attempts in itertools.count(1):
        client.set_tag(run_id, ATTEMPTS_TAG, str(attempts))
        try:
            result = attempt()
            break
        except KeyboardInterrupt:
            # Stop the Train workers before the run is marked KILLED: the controller and its
            # workers belong to this driver, so they end with its connection (on a cluster too).
            ray.shutdown()
            raise
        except ray.train.TrainingFailedError as exc:
            failure = classify_failure(exc, run_name)
            if failure.permanent or attempts > retries:
                raise failure from None
            print(f"training run {run_name!r} failed ({redact_text(str(failure))}); restarting from its latest "
                  f"checkpoint (retry {attempts} of resources.max_failures={res.max_failures})", flush=True)
    if result.checkpoint is None:
        raise TrainingFailed("no checkpoint", f"training run {run_name!r} produced no checkpoint", permanent=True)
    if not cluster.is_uri(storage_uri(cfg)):
        return Path(result.checkpoint.path), dict(result.metrics or {})
    # Stored under a URI: evaluation and MLflow read a local copy, in the checkpoint's own name.
    local = storage_dir(cfg) / run_name / Path(result.checkpoint.path).name
    result.checkpoint.to_directory(str(local))
    return local, dict(result.metrics or {})
