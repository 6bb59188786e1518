"""A run means the same on 1 or N workers: every method's loss and gradients with the global
batch split over 1, 2 and 3 gloo processes (DDP, global BatchNorm) against one process on the
whole batch.

One fixed global batch of images and one fixed set of augmented views (made once, here) are
split into the workers' slices exactly as ``platform.loop._shard_indices`` splits a global
batch: rank r holds rows ``r * n : (r + 1) * n`` of every view. Each worker computes the
method's step on its slice inside ``DistributedDataParallel``; the loss terms averaged over the
workers (what the training loop reports) and every parameter gradient after DDP's averaging
must equal the single-process computation (relative error < 1e-5). Before the losses gathered
the global batch, NT-Xent, MIX'EM's comp-ent / push / pull and LSD-C's graph all differed here
(the issue's table: NT-Xent 6.33 on one worker vs 5.64 on two).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from clusterlab.config import load_config
from clusterlab.trainers import DataMeta, build_method
from clusterlab.trainers.distributed import local_rows, to_global_batchnorm

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 workers
IMAGE = 16
SMALL = ["model.cnn_width=4", "model.embedding_dim=8", "seed=3"]

#: case -> (preset, overrides); every method, both MIX'EM push/pull forms, both LSD-C compositions
CASES: dict[str, tuple[str, list[str]]] = {
    "simclr": ("simclr_digits", []),
    "mixem_paper": ("mixem_digits", ["mixem.num_components=4", "loss.weights.push=0.05", "loss.weights.pull=0.1"]),
    "mixem_released": ("mixem_digits", ["mixem.num_components=4", "loss.weights.push=0.05", "loss.weights.pull=0.1",
                                        "mixem.push_pull_form=released", "mixem.view_reduction=sum"]),
    "lsdc_ricap": ("lsdc_digits", ["lsdc.k=3", "lsdc.train_from_block=2"]),
    "lsdc_mixup_cosine": ("lsdc_digits", ["lsdc.composition=mixup", "lsdc.labeling=cosine",
                                          "lsdc.cosine_threshold=0.5", "lsdc.label_space=predictions"]),
    "rotnet": ("rotnet_digits", []),
    "excb": ("excb_digits", ["excb.num_clusters=6", "excb.projector_dim=8"]),
}


def _method(case: str) -> torch.nn.Module:
    preset, overrides = CASES[case]
    torch.manual_seed(0)  # the same initial weights in every process
    method = build_method(load_config(None, SMALL + overrides, preset=preset), DataMeta(10, IMAGE, (0.5,) * 3, (0.25,) * 3))
    method.set_progress(0.5)  # LSD-C's ramp-up weight > 0
    # float64 weights and views: the comparison then measures the objective, not float32's
    # summation order (threads, reduction trees), which alone moves small gradients by ~1e-5.
    return method.double().train()


def _fixed_views() -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)
    views = {}
    for case in CASES:
        torch.manual_seed(1)
        views[case] = [v.detach().double() for v in _method(case).make_views(images)]
    return views


def _step(method: torch.nn.Module, model: torch.nn.Module, views: list[torch.Tensor]) -> dict[str, object]:
    """One training step's loss terms, statistics and parameter gradients."""
    out = model(views)
    total = method.total_loss(out["terms"])
    total.backward()
    values = {"loss": total, **{f"loss_{k}": v for k, v in out["terms"].items()}, **out["stats"]}
    return {"values": {k: v.detach().float() for k, v in values.items()},
            "grads": {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}}


def _worker(rank: int, world: int, init_file: str, views: dict[str, list[torch.Tensor]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for case, case_views in views.items():
        method = _method(case)
        to_global_batchnorm(method, "cpu")
        step = _step(method, DistributedDataParallel(method), [local_rows(v) for v in case_views])
        names = sorted(step["values"])
        reported = torch.stack([step["values"][n] for n in names])
        dist.all_reduce(reported)  # the loop's per-epoch mean over workers
        step["values"] = dict(zip(names, (reported / world).tolist()))
        results[case] = step
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fixed_views() -> dict[str, list[torch.Tensor]]:
    return _fixed_views()


@pytest.fixture(scope="module")
def single_process(fixed_views) -> dict[str, dict[str, object]]:
    results = {}
    for case, views in fixed_views.items():
        method = _method(case)
        step = _step(method, method, views)
        step["values"] = {k: float(v) for k, v in step["values"].items()}
        results[case] = step
    return results


@pytest.fixture(scope="module", params=[1, 2, 3])
def distributed(request, fixed_views) -> tuple[int, dict[str, dict[str, object]]]:
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.pt"
        mp.spawn(_worker, args=(world, str(Path(tmp) / "init"), fixed_views, str(out)), nprocs=world)
        return world, torch.load(out)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.norm())
    return float((got - expected).norm()) / scale if scale > 0 else float(got.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_the_single_process_on_the_global_batch(case, single_process, distributed):
    world, results = distributed
    got, expected = results[case], single_process[case]
    assert set(got["values"]) == set(expected["values"])
    for name, value in expected["values"].items():
        assert got["values"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{name} on {world} workers"
    assert set(got["grads"]) == set(expected["grads"])
    assert expected["grads"], "the step trains some parameters"
    for name, grad in expected["grads"].items():
        assert _relative_error(got["grads"][name], grad) < 1e-5, f"gradient of {name} on {world} workers"
