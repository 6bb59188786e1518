"""ExCB: self-distillation onto K learned centroids with explicit cluster balancing
(Maniadis Metaxas et al., ECCV 2024; ExCB supplementary Algorithms 1-2; pure parts in
``excb_losses``).

Student: backbone f_s, projector h_s, predictor g_s, centroid layer q_s. Teacher: f_t, h_t, q_t,
an exponential moving average of the student whose momentum follows a cosine schedule from
``excb.teacher_momentum`` to 1. The teacher's similarities of the G global views are balanced
by B with the running relative cluster sizes s (momentum ``excb.size_momentum``, updated from
the teacher's assignments, all-reduced across workers) and sharpened at t_t; the student's
projector and predictor similarities (t_s) of all G + L views are trained against them.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import BatchAugment
from clusterlab.models import ProjectionHead, build_backbone
from clusterlab.trainers.base import DataMeta, Method, register
from clusterlab.trainers.excb_losses import (
    balance,
    batch_cluster_sizes,
    boost_argmax,
    centroid_similarities,
    excb_loss,
    released_term_weights,
    update_cluster_sizes,
)


class _Encoder(nn.Module):
    """f, h and the centroids C: the parts the teacher mirrors."""

    def __init__(self, cfg: ExperimentConfig, image_size: int, num_clusters: int) -> None:
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.model, image_size)
        self.projector = ProjectionHead(feat_dim, cfg.model.hidden_dim or feat_dim, cfg.excb.projector_dim)
        self.centroids = nn.Parameter(torch.randn(num_clusters, cfg.excb.projector_dim))


@register("excb")
class ExCB(Method):
    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__(cfg, data)
        opts = cfg.excb
        self.num_clusters = opts.num_clusters or data.num_classes
        if opts.view_pairing == "released":  # one mean over every pair, unless loss.weights says otherwise
            self.weights = {**released_term_weights(opts.global_crops, opts.local_crops), **cfg.loss.weights}
        self.student = _Encoder(cfg, data.image_size, self.num_clusters)
        # The student's backbone is also the method's ``backbone``, so that its checkpoint keys
        # are ``backbone.*`` like every method's (another method can start from it).
        self.backbone = self.student.backbone
        self.predictor = ProjectionHead(opts.projector_dim, opts.projector_dim, opts.projector_dim)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("cluster_sizes", torch.full((self.num_clusters,), 1.0 / self.num_clusters))
        local_size = opts.local_size or max(4, data.image_size // 2)
        self.global_views = BatchAugment(cfg.augment.model_copy(update={"crop_scale": opts.global_scale}),
                                         data.image_size, data.mean, data.std)
        self.local_views = BatchAugment(cfg.augment.model_copy(update={"crop_scale": opts.local_scale}),
                                        local_size, data.mean, data.std)
        self._progress = 0.0

    def set_progress(self, epoch: float) -> None:
        self._progress = min(1.0, epoch / max(1, self.cfg.epochs))

    def teacher_momentum(self) -> float:
        """Cosine schedule from ``excb.teacher_momentum`` at the start to 1 at the end."""
        m0 = self.cfg.excb.teacher_momentum
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * self._progress) + 1.0) / 2.0

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        m = self.teacher_momentum()
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def initialise(self, images: torch.Tensor, cluster: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Seeds the student's and teacher's centroids with K-means on the initial projections
        h_s(f_s(x)) of up to ``excb.centroid_init_samples`` training images (``centroid_init =
        kmeans``, as the released code's ``init_centroids``). From random centroids nearly every
        projection of an untrained network lies nearest one or two of them: the teacher starts
        collapsed, and on small datasets the EMA teacher never leaves that state (measured on
        digits; see the excb_digits preset)."""
        opts = self.cfg.excb
        if opts.centroid_init != "kmeans":
            return
        n = min(len(images), opts.centroid_init_samples)
        if n < self.num_clusters:
            raise ValueError(f"excb.num_clusters ({self.num_clusters}) is larger than the {n} images "
                             "available for the K-means centroid initialisation")
        pick = torch.randperm(len(images), device=images.device)[:n]
        normalise = self.global_views.normalize
        # Batch statistics as in training (BatchNorm in training mode), in training-sized chunks.
        projections = torch.cat([F.normalize(self.student.projector(self.student.backbone(normalise(chunk))), dim=1)
                                 for chunk in images[pick].split(self.cfg.batch_size)])
        centroids = cluster(projections.float(), self.num_clusters).to(self.student.centroids)
        self.student.centroids.copy_(centroids)
        self.teacher.centroids.copy_(centroids)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        opts = self.cfg.excb
        return ([self.global_views(images) for _ in range(opts.global_crops)]
                + [self.local_views(images) for _ in range(opts.local_crops)])

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.backbone(x)

    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's representation and its centroid assignment probabilities (at t_t)."""
        h = self.teacher.backbone(x)
        z = centroid_similarities(self.teacher.projector(h), self.teacher.centroids, detach_centroids=True)
        return {"representation": h, "probabilities": torch.softmax(z / self.cfg.excb.teacher_temperature, dim=1)}

    def _teacher_targets(self, global_batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts = self.cfg.excb
        with torch.no_grad():
            z = centroid_similarities(self.teacher.projector(self.teacher.backbone(global_batch)),
                                      self.teacher.centroids, detach_centroids=True)
            z_b = balance(z, self.cluster_sizes, opts.balance_above) if opts.balancing else z
            if opts.boost_argmax:
                z_b = boost_argmax(z_b)
            assigned = (z if opts.s_from == "raw" else z_b).argmax(dim=1)
            sizes = batch_cluster_sizes(assigned, self.num_clusters)
            if self.training:
                self.cluster_sizes.copy_(update_cluster_sizes(self.cluster_sizes, sizes, opts.size_momentum))
            stats = {"empty_clusters": (sizes == 0).float().mean(),
                     "largest_cluster": sizes.max() * self.num_clusters}
            return torch.softmax(z_b / opts.teacher_temperature, dim=1), stats

    def forward(self, views: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        opts = self.cfg.excb
        g = opts.global_crops
        global_batch = torch.cat(views[:g])
        p_t, stats = self._teacher_targets(global_batch)

        c = self.student.centroids
        h_global = self.student.projector(self.student.backbone(global_batch))
        z_h = [centroid_similarities(h_global, c, detach_centroids=False)]
        z_g = [centroid_similarities(self.predictor(h_global), c, detach_centroids=True)]
        if opts.local_crops:
            h_local = self.student.projector(self.student.backbone(torch.cat(views[g:])))
            z_h.append(centroid_similarities(h_local, c, detach_centroids=True))
            z_g.append(centroid_similarities(self.predictor(h_local), c, detach_centroids=True))
        views_h = torch.cat(z_h).div(opts.student_temperature).log_softmax(dim=1).chunk(len(views))
        views_g = torch.cat(z_g).div(opts.student_temperature).log_softmax(dim=1).chunk(len(views))
        loss_h, loss_g = excb_loss(list(p_t.chunk(g)), list(views_h), list(views_g), opts.view_pairing)
        stats["teacher_momentum"] = torch.tensor(self.teacher_momentum(), device=p_t.device)
        return {"terms": {"projector": loss_h, "predictor": loss_g}, "stats": stats}
