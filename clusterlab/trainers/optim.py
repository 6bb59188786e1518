"""Optimisers and the per-step learning-rate schedule (MIX'EM supplementary 1.1: cosine decay)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from clusterlab.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD with momentum. ``fused`` uses the single-kernel CUDA implementation."""
    params = [p for p in params if p.requires_grad]
    extra = {"fused": True} if fused else {}
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **extra)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
              milestone_steps: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up, then cosine decay to ``min_ratio``,
    a constant, or ``gamma`` applied at each milestone (RotNet / LSD-C step schedules)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestone_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in cfg.milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, cfg.min_lr / cfg.lr, milestones, cfg.gamma)
    )
