"""The global batch inside a data-parallel step.

Ray Train runs one process per worker, each holding its slice of every global batch (rank r
holds rows ``r * n : (r + 1) * n`` of the global batch, ``n`` = batch_size / world size; see
``platform.loop._shard_indices``). A loss that depends on the batch as a whole (NT-Xent's
negatives, MIX'EM's marginal and component means, LSD-C's pairwise graph) must see every
worker's rows, or moving a run from 1 to N workers changes the objective. The helpers here make
that possible inside the pure loss functions:

- :func:`gather_rows` concatenates every rank's rows in rank order, i.e. the global batch in
  the single-process order, with gradients flowing back to each rank's own rows;
- :func:`local_rows` takes this rank's slice of a global tensor;
- :class:`GlobalBatchNorm` normalises with the statistics of the global batch.

Why the gradients come out exact: in DDP every rank r back-propagates its own loss L_r and
DDP averages the parameter gradients, so the optimised objective is (1/W) sum_r L_r. The
backward of :func:`gather_rows` (and of the statistics' all-reduce) sums, over the ranks, the
gradient that each rank's loss sends to a row, and hands it to the rank that computed the row.
A loss computed on the gathered global batch is the same on every rank, so the objective is the
single-process loss; a per-sample mean on local rows averages to the global mean. Without a
process group (or with one rank) every helper is the identity.

The collectives are written with the public ``torch.distributed`` calls (all_gather,
all_reduce) in two small autograd functions: ``torch.distributed.nn.functional`` is deprecated
in torch 2.14 and its replacements are private, and ``nn.SyncBatchNorm`` refuses CPU tensors,
so it cannot serve gloo (CPU) workers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every row: sum their gradients
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (equal row counts), concatenated in rank order: the global
    batch. Differentiable: each row's gradient, summed over the ranks that used it, reaches the
    rank that computed it. The identity without a process group."""
    if world()[1] == 1:
        return x
    return _GatherRows.apply(x)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global-batch tensor (the inverse of :func:`gather_rows`)."""
    rank, size = world()
    if size == 1:
        return x
    rows = x.shape[0] // size
    return x[rank * rows:(rank + 1) * rows]


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over the ranks (the identity without a process group)."""
    if world()[1] == 1:
        return x
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation with the mean and variance of the **global** batch in training (two
    passes, each one all-reduce: the mean, then the mean squared deviation, so the variance is
    as accurate as a single process's), and the running statistics in evaluation. With one
    process it is ``nn.BatchNorm{1,2}d``. Used for gloo (CPU) workers; CUDA workers use
    ``nn.SyncBatchNorm``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        local_count = x.new_full((1,), float(x.numel() // x.shape[1]))
        sums = sum_over_ranks(torch.cat([x.sum(dims), local_count]))  # one collective: sums and count
        mean, count = sums[:-1] / sums[-1], sums[-1].detach()
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = sum_over_ranks(centred.pow(2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def to_global_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm layer of ``module`` normalising over the global batch: ``nn.SyncBatchNorm``
    on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters and buffers are shared with the
    original layers (an optimiser built before keeps working; state-dict keys are unchanged).
    Returns the converted module (``module`` itself unless it is a BatchNorm layer)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, to_global_batchnorm(child, device_type))
    return module

