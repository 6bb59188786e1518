"""SimCLR (Chen et al. 2020) as reviewed in MIX'EM Sec. 3.1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import BatchAugment, Normalize
from clusterlab.models import ProjectionHead, build_backbone
from clusterlab.trainers.base import DataMeta, Method, register
from clusterlab.trainers.distributed import gather_rows


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, MIX'EM Eq. 1-2.

    ``z_a[i]`` and ``z_b[i]`` are the embeddings of two views of image i. With the 2N views
    stacked and sim(u, v) the cosine similarity,

        l(i, j) = -log( exp(sim(i, j)/tau) / sum_{k != i} exp(sim(i, k)/tau) )      (Eq. 1)
        L = 1/(2N) sum_i [ l(i, j) + l(j, i) ]                                        (Eq. 2)

    i.e. a (2N-1)-way cross-entropy per view whose target is its positive.

    Data-parallel: each worker passes its local rows; N is the **global** batch. The embeddings
    of every worker are gathered (:func:`~clusterlab.trainers.distributed.gather_rows`, with
    gradients flowing back), so the negatives come from the whole batch as in the SimCLR paper
    and the value is the single-process loss on every worker.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    z_a, z_b = gather_rows(z_a), gather_rows(z_b)
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # k != i
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


@register("simclr")
class SimCLR(Method):
    """Backbone f + projection head g, trained with NT-Xent on two augmented views."""

    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__(cfg, data)
        self.backbone, feat_dim = build_backbone(cfg.model, data.image_size)
        self.head = ProjectionHead(feat_dim, cfg.model.hidden_dim or feat_dim, cfg.model.embedding_dim)
        self.augment = BatchAugment(cfg.augment, data.image_size, data.mean, data.std)
        self.normalize = Normalize(data.mean, data.std)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images), self.augment(images)]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, views: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        n = views[0].shape[0]
        z = self.head(self.backbone(torch.cat(views)))
        return {"terms": {"contrast": nt_xent_loss(z[:n], z[n:], self.cfg.loss.temperature)}, "stats": {}}
