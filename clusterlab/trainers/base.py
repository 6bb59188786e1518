"""The method interface and registry."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, TypeVar

import torch
from torch import nn

from clusterlab.config import ExperimentConfig
from clusterlab.methods import MethodSpec, spec_for

METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class DataMeta:
    """What a method needs to know about its data: classes, image size and normalisation
    (stored in every checkpoint, so a model is rebuilt without the dataset)."""

    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


M = TypeVar("M", bound=type["Method"])


def register(name: str) -> Callable[[M], M]:
    """Class decorator adding a method to :data:`METHODS` under the name of its
    :class:`~clusterlab.methods.MethodSpec`, whose loss terms it computes."""

    def add(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name, cls.spec = name, spec_for(name)
        METHODS[name] = cls
        return cls

    return add


class Method(nn.Module):
    """One self-supervised method.

    ``forward`` is the training step's model part: it takes the views made by
    :meth:`make_views` and returns ``{"terms": {name: unweighted loss}, "stats": {name: value}}``.
    It is ``forward`` (not a separate method) so that DDP's gradient hooks see it.
    """

    name: ClassVar[str]
    #: its loss terms (``forward`` returns them, in logging order), default weights and epoch stats
    spec: ClassVar[MethodSpec]

    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        self.weights: dict[str, float] = {**self.spec.default_weights, **cfg.loss.weights}

    def set_progress(self, epoch: float) -> None:
        """Called by the training loop before each step with the fractional epoch, for
        schedules inside a method's loss (LSD-C's ramp-up, Eq. 8). Most methods ignore it."""

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimiser step (ExCB's EMA teacher update)."""

    def initialise(self, images: torch.Tensor, cluster: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Called once before the first epoch of a new run (after ``init_from``, not on resume),
        on every rank with the same uint8 training images (N, 3, H, W) on the device.
        ``cluster(x, k)`` returns K-means centroids (k, D) of x (N, D). Most methods ignore it;
        ExCB seeds its centroids from it."""

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (N, 3, H, W) batch on the device -> the method's normalised float views."""
        raise NotImplementedError

    def total_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the named terms (e.g. MIX'EM Eq. 9)."""
        return sum((self.weights[name] * terms[name] for name in self.spec.loss_terms if self.weights[name]),
                   torch.zeros((), device=next(iter(terms.values())).device))

    def label_diagnostics(self, out: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Readings of a training step's output ``out`` against the class ``labels`` of this
        worker's rows (negative: unknown), named in the spec's ``label_diagnostics`` and logged
        per epoch, to see why a method falls short; never part of a loss. Called only when the
        training split has labels. Most methods have none (LSD-C: its pseudo-labels' precision
        and recall)."""
        return {}

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation h = f(x) that evaluation clusters."""
        raise NotImplementedError

    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What evaluation extracts per image; methods add their own columns."""
        return {"representation": self.representation(x)}


def build_method(cfg: ExperimentConfig, data: DataMeta) -> Method:
    """The method ``cfg.method`` for ``data``; its implementation module is imported on first use."""
    if cfg.method not in METHODS:
        importlib.import_module(spec_for(cfg.method).implementation)
    return METHODS[cfg.method](cfg, data)
