"""K-means initialisations fanned out as Ray tasks.

The n_init initialisations are split into chunks; each chunk is one Ray task running
:func:`~clusterlab.eval.kmeans.batched_kmeans` (all of its initialisations as one batched
computation). Each feature matrix is put in the object store once and shared, read-only and
without copies, by its tasks; each task asks Ray for the memory it allocates besides
(:func:`~clusterlab.eval.kmeans.task_memory`), so a node runs only as many as it holds.
The best inertia wins; every initialisation's inertia (and ACC, when labels are given) is
kept for the accuracy-vs-inertia view (MIX'EM Fig. 5).

Chunking is per device, not per initialisation: on GPUs one task per GPU (one batched call per
device beats many small tasks), on CPUs one task per CPU the cluster offers.

Without Ray initialised (a notebook, a script), every variant is one batched call in this
process, on this machine's GPU when it has one: the same result as the fan-out with one task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from clusterlab.eval.kmeans import KMeansResult, batched_kmeans, task_memory
from clusterlab.eval.metrics import cluster_accuracy


@dataclass
class FanoutResult:
    """Best solution of one feature variant plus per-initialisation inertia / ACC / iterations."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    inertias: np.ndarray
    accuracies: np.ndarray | None
    n_iters: np.ndarray

    @property
    def best(self) -> int:
        return int(np.argmin(self.inertias))


@ray.remote
def _kmeans_task(x: np.ndarray, k: int, n_init: int, max_iter: int, tol: float, seed: int,
                 device: str | None) -> KMeansResult:
    return batched_kmeans(x, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=device,
                          return_all_labels=True)


def _check_device(device: str | None) -> None:
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def local_device(device: str | None) -> str:
    """The device for work done in this process (feature extraction, the single MIX'EM-initialised
    K-means run, K-means without Ray): the one asked for, else CUDA when this machine has it."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def plan_chunks(n_init: int, tasks: int | None = None, device: str | None = None) -> tuple[list[int], bool]:
    """Split ``n_init`` over tasks -> (initialisations per task, whether each task takes a GPU).

    ``device`` None uses GPUs when the cluster has any; ``"cpu"`` / ``"cuda"`` force one or the
    other. ``tasks`` None: one task per GPU (on GPUs), else one per CPU in the cluster.
    """
    _check_device(device)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise ValueError("device 'cuda' asked for, but the Ray cluster has no GPU; use device 'cpu' or omit it")
    use_gpu = gpus > 0 and device != "cpu"
    if tasks is None:
        tasks = gpus if use_gpu else max(1, int(resources.get("CPU", 1)))
    tasks = max(1, min(tasks, n_init))
    sizes = [n_init // tasks + (1 if i < n_init % tasks else 0) for i in range(tasks)]
    return sizes, use_gpu


def kmeans_fanout(
    variants: dict[str, np.ndarray],
    k: int,
    n_init: int = 50,
    labels: np.ndarray | None = None,
    num_classes: int | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    tasks: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, FanoutResult]:
    """Cluster every feature variant (e.g. normalised / raw representation) with ``n_init``
    initialisations spread over Ray tasks, all variants in flight at once. With ``labels``,
    every initialisation's ACC (K = ``k``, C = ``num_classes``; None: read off the labels).
    When Ray is not initialised, each variant is one batched call in this process instead
    (``tasks`` is then unused)."""
    for name, x in variants.items():
        if not 2 <= k <= len(x):
            raise ValueError(f"k must be between 2 and the number of samples ({len(x)}) of {name!r}, got {k}")
    if not ray.is_initialized():
        return _kmeans_in_process(variants, k, n_init, labels, num_classes, max_iter, tol, seed, device, progress)
    sizes, use_gpu = plan_chunks(n_init, tasks, device)
    # The tasks ask for their own resources from the cluster: inside a Tune trial they must not
    # be captured by the trial's placement group, which is sized for the trial's driver only.
    options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    options["scheduling_strategy"] = "DEFAULT"
    device = "cuda" if use_gpu else "cpu"
    # Each task asks for the memory it will use (Ray then runs no more at once than a node
    # holds), capped at the largest node's, where one task at a time still runs.
    largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
    pending: dict[ray.ObjectRef, tuple[str, int]] = {}
    for name, x in variants.items():
        ref = ray.put(np.ascontiguousarray(x, dtype=np.float32))  # once per variant, shared by its tasks
        for chunk, size in enumerate(sizes):
            memory = min(task_memory(*x.shape, k, size), int(largest)) if largest else None
            # Distinct seeds per chunk: the chunks must not repeat each other's initialisations.
            task = _kmeans_task.options(**options, memory=memory).remote(ref, k, size, max_iter, tol,
                                                                         seed + 7919 * chunk, device)
            pending[task] = (name, chunk)
    parts: dict[str, dict[int, KMeansResult]] = {name: {} for name in variants}
    with tqdm(total=len(pending), desc=f"K-means ({n_init} inits x {len(variants)} variants)", unit="task",
              disable=not progress, leave=False) as bar:
        remaining = list(pending)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            name, chunk = pending[done[0]]
            parts[name][chunk] = ray.get(done[0])
            bar.update(1)
    return {name: _merge([chunks[i] for i in sorted(chunks)], k, labels, num_classes)
            for name, chunks in parts.items()}


def _kmeans_in_process(variants: dict[str, np.ndarray], k: int, n_init: int, labels: np.ndarray | None,
                       num_classes: int | None, max_iter: int, tol: float, seed: int, device: str | None,
                       progress: bool) -> dict[str, FanoutResult]:
    """Each variant as one batched call in this process, seeded as the fan-out's first chunk (so
    the fan-out's result with one task). Without Ray initialised (a notebook, a script), starting
    it would be a side effect the caller did not ask for, and costs more than small features'
    clustering."""
    _check_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this machine has no CUDA GPU; use device 'cpu' or omit it")
    local = local_device(device)
    return {name: _merge([batched_kmeans(x, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=local,
                                         return_all_labels=True)], k, labels, num_classes)
            for name, x in tqdm(variants.items(), desc=f"K-means ({n_init} inits, {local})", unit="variant",
                                disable=not progress, leave=False)}


def _merge(chunks: list[KMeansResult], k: int, labels: np.ndarray | None, num_classes: int | None) -> FanoutResult:
    inertias = np.concatenate([c.inertias for c in chunks])
    all_labels = np.concatenate([c.all_labels for c in chunks])
    best_chunk = min(chunks, key=lambda c: c.inertia)
    accuracies = None if labels is None else np.array([cluster_accuracy(labels, row, k, num_classes)
                                                       for row in all_labels])
    return FanoutResult(labels=best_chunk.labels, centroids=best_chunk.centroids, inertia=best_chunk.inertia,
                        inertias=inertias, accuracies=accuracies,
                        n_iters=np.concatenate([c.n_iters for c in chunks]))
