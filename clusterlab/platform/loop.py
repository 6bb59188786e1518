"""The training loop: a plain function of a config and a :class:`TrainSession`.

Ray Train runs :func:`fit` in every worker through a :class:`RaySession`
(``clusterlab.platform.train``); unit tests run it in-process through :class:`LocalSession`
(world size 1), so the loop itself is tested without starting Ray.

Per step there is no host-device synchronisation: loss values are accumulated on the device
and read once per epoch. Data stay on the device as uint8 and are augmented there in batches.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from clusterlab.config import ExperimentConfig, PerformanceConfig
from clusterlab.data.datasets import build_splits
from clusterlab.eval.kmeans import batched_kmeans
from clusterlab.trainers import DataMeta, Method, build_method
from clusterlab.trainers.checkpoint import load_backbone, read_checkpoint, read_history, save_checkpoint
from clusterlab.trainers.distributed import to_global_batchnorm
from clusterlab.trainers.optim import build_optimizer, build_scheduler


log = logging.getLogger(__name__)

#: in a report's metrics: the checkpoint is one taken inside an epoch on a preemption notice, at
#: this step (its other metrics are the last finished epoch's); not an epoch's result
PREEMPTION_STEP_KEY = "preemption_checkpoint_step"


@dataclass(frozen=True)
class EpochProgress:
    """How far an epoch got when a preemption notice checkpointed it: the training steps done,
    the sums of their loss terms and stats, and the seconds spent, so that the restarted run
    continues that epoch at the next step and reports the epoch's means over all its steps."""

    step: int
    sums: dict[str, float]
    seconds: float
    lr: float  # at the epoch's first step, as the epoch's metrics report it


class PermanentTrainingError(RuntimeError):
    """A failure that retrying with the same settings would repeat: the platform never
    restarts a run for it (``resources.max_failures`` is for faults such as a lost worker)."""

    reason = "permanent failure"


class NonFiniteLossError(PermanentTrainingError):
    """A loss became NaN or Inf."""

    reason = "non-finite loss"


class TrainingOutOfMemoryError(PermanentTrainingError):
    """The device (CUDA) or host ran out of memory; the message names the settings to change."""

    reason = "out of memory"


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch raises OutOfMemoryError for CUDA; a failed host allocation is a plain RuntimeError
    # ("DefaultCPUAllocator: can't allocate memory"), numpy's a MemoryError.
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


class TrainSession(Protocol):
    """What the loop needs from its runner."""

    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and wrap for data parallelism (DDP) where world_size > 1."""

    def latest_checkpoint(self) -> Path | None:
        """Directory of the checkpoint to resume from, if any."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Publish one epoch's metrics (all ranks) and rank 0's checkpoint directory; with
        :data:`PREEMPTION_STEP_KEY` in ``metrics``, a checkpoint taken inside an epoch."""

    def preemption_notice(self) -> bool:
        """Whether a node of the run is about to be preempted (every rank asks at the same steps)."""


class LocalSession:
    """In-process, single-worker session: checkpoints go to ``directory/epoch_XXXX``."""

    world_rank = 0
    world_size = 1

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu") -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.history: list[dict[str, float]] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.directory.glob("epoch_*"))
        return found[-1] if found else None

    def preemption_notice(self) -> bool:
        return False  # one process on one machine: nothing preempts it in advance

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.history.append(metrics)
        if checkpoint_dir is not None:
            step = f"_step_{int(metrics[PREEMPTION_STEP_KEY]):06d}" if PREEMPTION_STEP_KEY in metrics else ""
            target = self.directory / f"epoch_{int(metrics['epoch']):04d}{step}"  # sorts between the epochs
            target.mkdir(parents=True, exist_ok=False)
            for f in checkpoint_dir.iterdir():
                f.replace(target / f.name)


def _shard_indices(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """(steps, batch_size // world) indices: the same global permutation on every rank, each
    rank taking its slice of every global batch; the incomplete last batch is dropped."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = n // batch_size
    perm = torch.randperm(n, generator=g)[: steps * batch_size].view(steps, world, batch_size // world)
    return perm[:, rank]


def _autocast(device: torch.device, perf: PerformanceConfig) -> Any:
    # bf16 autocast on GPUs by default; on CPUs it pays only on cores with bf16 units (1.9x on
    # the project's 2-core machine, BENCHMARKS.md), so there it is opt-in.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=perf.enabled("bf16", device.type))


def _run_epoch(method: Method, model: torch.nn.Module, images: torch.Tensor, batches: torch.Tensor,
               device: torch.device, optimizer: torch.optim.Optimizer | None, scheduler: Any,
               epoch: int, perf: PerformanceConfig, progress: EpochProgress | None = None,
               after_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
               labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One pass over ``batches`` (from ``progress.step`` on, continuing its sums, when a
    checkpoint taken inside the epoch is resumed); returns per-step means of the total loss
    (``loss``), each term (``loss_<term>``) and each stat, still on the device (no host sync).
    ``perf`` picks the fast paths (bf16 autocast, channels_last views); ``after_step(steps
    done, sums)`` is called after every training step. With the images' class ``labels``, the
    method's label diagnostics of each step are averaged too (read against the labels, never
    trained on)."""
    channels_last = perf.enabled("channels_last", device.type)
    sums: dict[str, torch.Tensor] = {name: torch.tensor(value, device=device)
                                     for name, value in (progress.sums if progress else {}).items()}
    for i in range(progress.step if progress else 0, len(batches)):
        idx = batches[i]
        if optimizer is not None:
            method.set_progress(epoch + i / len(batches))
        views = method.make_views(images[idx.to(device, non_blocking=True)])
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with _autocast(device, perf):
            out = model(views)
        total = method.total_loss(out["terms"])
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            method.after_optimizer_step()
        step = {"loss": total, **{f"loss_{k}": v for k, v in out["terms"].items()}, **out["stats"]}
        if labels is not None:
            step.update(method.label_diagnostics(out, labels[idx.to(device, non_blocking=True)]))
        for name, value in step.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
        if after_step is not None:
            after_step(i + 1, sums)
    return {name: value / len(batches) for name, value in sums.items()}


def _mean_over_workers(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Average device scalars across ranks and bring them to the host in one transfer."""
    names = sorted(values)
    stacked = torch.stack([values[n] for n in names])
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked = stacked / world
    return dict(zip(names, stacked.tolist()))


def _kmeans_centroids(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K-means++ seeded, a few restarts: a starting point for a method's centroids, not an evaluation."""
    return torch.from_numpy(batched_kmeans(x, k, n_init=3, seed=seed, device=x.device).centroids)


def fit(cfg: ExperimentConfig, session: TrainSession) -> None:
    """Train ``cfg.method`` for ``cfg.epochs`` epochs, resuming from the session's checkpoint.

    Raises :class:`NonFiniteLossError` or :class:`TrainingOutOfMemoryError`, which the
    platform does not retry; any other error may be retried from the latest checkpoint.
    """
    try:
        _fit(cfg, session)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        res = cfg.resources
        where = "GPU" if session.device.type == "cuda" else "host"
        raise TrainingOutOfMemoryError(
            f"out of {where} memory ({str(exc).splitlines()[0][:300]}); lower batch_size (now {cfg.batch_size}) or "
            f"the model (model.backbone={cfg.model.backbone}, model.cnn_width={cfg.model.cnn_width}), or run on "
            f"workers with more memory (resources.gpus_per_worker={res.gpus_per_worker}, "
            f"resources.num_workers={res.num_workers} to split the batch)") from None


def _fit(cfg: ExperimentConfig, session: TrainSession) -> None:
    device = session.device
    rank, world = session.world_rank, session.world_size
    torch.manual_seed(cfg.seed + rank)  # augmentation differs per rank; init is synced by DDP
    np.random.seed(cfg.seed + rank)

    splits = build_splits(cfg.data.name, cfg.data.root, cfg.data.protocol, cfg.data.val_fraction,
                          cfg.seed, cfg.data.image_size, cfg.data.limit)
    image_size = splits.train.images.shape[-1]
    meta = DataMeta(splits.num_classes, image_size, tuple(splits.mean), tuple(splits.std))
    train_images = torch.from_numpy(splits.train.images).to(device)
    val_images = torch.from_numpy(splits.val.images).to(device)
    if cfg.batch_size > len(splits.train):
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(splits.train)})")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = build_method(cfg, meta)
    method = method.to(device)  # before the optimiser: fused Adam needs its params on the GPU
    # Only for the method's label diagnostics (LSD-C's pseudo-label precision / recall), never a loss.
    train_labels = (torch.from_numpy(splits.train.labels).to(device)
                    if method.spec.label_diagnostics and (splits.train.labels >= 0).any() else None)
    perf = cfg.performance
    if perf.enabled("channels_last", device.type):
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, method.parameters(), fused=perf.enabled("fused_optimizer", device.type))
    steps_per_epoch = len(splits.train) // cfg.batch_size
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.epochs, steps_per_epoch)

    start_epoch = 0
    history: list[dict[str, float]] = []  # every epoch's metrics so far, carried in each checkpoint
    progress: EpochProgress | None = None  # how far a checkpoint taken inside an epoch got
    resume_dir = session.latest_checkpoint()
    if resume_dir is not None:
        state = read_checkpoint(resume_dir)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epochs_done"]
        history = read_history(resume_dir)
        progress = EpochProgress(**state["epoch_progress"]) if "epoch_progress" in state else None
    else:
        if cfg.init_from:
            load_backbone(method, read_checkpoint(cfg.init_from))
        method.initialise(train_images, partial(_kmeans_centroids, seed=cfg.seed))
    if world > 1 and cfg.model.sync_batchnorm is not False:
        # BatchNorm statistics of the global batch, so that N workers train what one does
        # (after initialise, whose forward passes need no collectives; parameters are shared,
        # so the optimiser and the checkpoint's keys are unaffected).
        to_global_batchnorm(method, device.type)
    model = session.prepare_model(method)  # after loading weights: DDP broadcasts rank 0's
    if perf.compile:  # the step's model part only: augmentation and the optimiser stay eager
        model = torch.compile(model, mode=None if perf.compile_mode == "default" else perf.compile_mode)
    torch.manual_seed(cfg.seed * 7919 + rank * 31 + start_epoch)  # resumed runs draw fresh augmentations

    # Validation loss (supplementary 1.3: it guides model selection) on fixed batches, so that
    # epochs are comparable; skipped when the validation split cannot fill one batch per rank.
    val_batch = min(cfg.batch_size, len(splits.val) // world * world)
    val_batches = (_shard_indices(len(splits.val), val_batch, 0, cfg.seed, rank, world)
                   if val_batch >= 2 * world else None)
    checkpoint = partial(_checkpoint, session, method=method, optimizer=optimizer, scheduler=scheduler, meta=meta)
    watch = _PreemptionWatch(session, cfg.resources.preemption_check_steps, checkpoint, history)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter() - (progress.seconds if progress else 0.0)
        model.train()
        batches = _shard_indices(len(splits.train), cfg.batch_size, epoch, cfg.seed, rank, world)
        lr = progress.lr if progress else optimizer.param_groups[0]["lr"]  # at the epoch's first step
        watch.start(epoch, t0, lr)
        train = _mean_over_workers(_run_epoch(method, model, train_images, batches, device, optimizer, scheduler,
                                              epoch, perf, progress, watch, train_labels), world)
        progress = None
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {"epoch": float(epoch + 1), "lr": lr, "epoch_seconds": seconds,
                                     "images_per_second": len(batches) * cfg.batch_size / seconds}
        metrics.update({f"train_{k}" if k.startswith("loss") else k: v for k, v in train.items()})
        if val_batches is not None:
            model.eval()
            with torch.no_grad():
                val = _run_epoch(method, model, val_images, val_batches, device, None, None, epoch, perf)
            metrics["val_loss"] = _mean_over_workers({"loss": val["loss"]}, world)["loss"]

        if not all(math.isfinite(v) for v in metrics.values()):
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            raise NonFiniteLossError(f"non-finite {bad} at epoch {epoch + 1}; lower optim.lr or the loss weights "
                                     "(loss.weights.*), or check the data")

        history.append(metrics)
        checkpoint(metrics, epochs_done=epoch + 1, history=history)
        if rank == 0:
            # A logger, not print: Ray Train tees print() to two streams in its workers.
            log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))


def _checkpoint(session: TrainSession, metrics: dict[str, float], *, method: Method,
                optimizer: torch.optim.Optimizer, scheduler: Any, meta: DataMeta, epochs_done: int,
                history: list[dict[str, float]], progress: EpochProgress | None = None) -> None:
    """Every rank reports ``metrics``; rank 0 writes the checkpoint and hands it over with them."""
    if session.world_rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, method=method, optimizer=optimizer, scheduler=scheduler, epochs_done=epochs_done,
                        meta=meta, history=history, epoch_progress=asdict(progress) if progress else None)
        session.report(metrics, Path(tmp))


class _PreemptionWatch:
    """Called after every training step: every ``every`` steps it asks the session whether a
    node of the run is about to be preempted (a collective: every rank asks at the same
    steps), and on the attempt's first notice checkpoints the epoch so far at once, so that the
    run Ray Train restarts loses at most ``every`` steps rather than the epoch (Ray 2.60's
    ``ray.train.get_preemption_info``). Training goes on until the node is gone."""

    def __init__(self, session: TrainSession, every: int, checkpoint: Callable[..., None],
                 history: list[dict[str, float]]) -> None:
        self.session, self.every, self.checkpoint, self.history = session, every, checkpoint, history
        self.saved = False
        self.epoch, self.t0, self.lr = 0, 0.0, 0.0

    def start(self, epoch: int, t0: float, lr: float) -> None:
        self.epoch, self.t0, self.lr = epoch, t0, lr

    def __call__(self, steps_done: int, sums: dict[str, torch.Tensor]) -> None:
        if self.saved or not self.every or steps_done % self.every or not self.session.preemption_notice():
            return
        self.saved = True
        # The workers' mean sums: every rank resumes from them, and the epoch's mean over workers
        # comes out as if nothing had happened.
        progress = EpochProgress(steps_done, _mean_over_workers(sums, self.session.world_size),
                                 time.perf_counter() - self.t0, self.lr)
        last = self.history[-1] if self.history else {"epoch": float(self.epoch)}
        log.warning("preemption notice: checkpointing epoch %d at step %d", self.epoch + 1, steps_done)
        self.checkpoint({**last, PREEMPTION_STEP_KEY: float(steps_done)}, epochs_done=self.epoch,
                        history=list(self.history), progress=progress)
