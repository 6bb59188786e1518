"""LSD-C (Rebuffi et al.): a linear head + softmax on a (RotNet-)pretrained backbone, trained
with pairwise pseudo-labels from the feature space (Sec. 3; pure parts in ``lsdc_losses``).

Per step, with x the un-augmented batch, x' its augmented version and x~ a composite of x'
(RICAP / MixUp / none), each over the global batch when several workers train (every worker
labels, composes and scores the whole batch; see ``lsdc_losses``):

    A        = pairwise labels of the detached features f = Phi(x)       (Sec. 3.2, Eq. 1-2)
    L_clus   = BCE(p_i . p~_j, sum_m w_m A[i, sigma_m(j)])                (Eq. 3-6)
    L_cons   = w(t) / (K N) sum_i ||p_i - p'_i||^2                        (Eq. 8)
    L_tot    = L_clus + L_cons                                            (Eq. 7)

``lsdc.label_space = predictions`` labels on the head's logits instead (Table 4 ablation).
The first ``lsdc.train_from_block - 1`` macro-blocks are frozen, weights and BatchNorm
statistics (supplementary Sec. 1: RotNet's early filters are kept).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clusterlab.config import ExperimentConfig
from clusterlab.data.augment import BatchAugment, Normalize
from clusterlab.models import build_backbone, macro_blocks
from clusterlab.trainers.base import DataMeta, Method, register
from clusterlab.trainers.distributed import gather_rows, local_rows, world
from clusterlab.trainers.lsdc_losses import (
    Composition,
    consistency_loss,
    mixup,
    pairwise_adjacency,
    pairwise_bce_loss,
    pseudo_label_scores,
    rampup_weight,
    ricap,
)


@register("lsdc")
class LSDC(Method):
    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__(cfg, data)
        self.backbone, feat_dim = build_backbone(cfg.model, data.image_size)
        self.num_clusters = cfg.lsdc.num_clusters or data.num_classes
        self.head = nn.Linear(feat_dim, self.num_clusters)
        self.augment = BatchAugment(cfg.augment, data.image_size, data.mean, data.std)
        self.normalize = Normalize(data.mean, data.std)
        self._frozen = macro_blocks(self.backbone)[: cfg.lsdc.train_from_block - 1]
        for block in self._frozen:
            block.requires_grad_(False)
        self._epoch = 0.0
        # Composition draws (RICAP / MixUp), alike on every worker: each composes the global batch.
        self._rng_epoch = 0
        self._rng = np.random.default_rng([cfg.seed, 0])

    def train(self, mode: bool = True) -> "LSDC":
        super().train(mode)
        for block in self._frozen:  # frozen blocks keep their pretrained BatchNorm statistics
            block.eval()
        return self

    def set_progress(self, epoch: float) -> None:
        self._epoch = epoch
        if int(epoch) != self._rng_epoch:  # compositions reproducible per epoch, also on resume
            self._rng_epoch = int(epoch)
            self._rng = np.random.default_rng([self.cfg.seed, self._rng_epoch])

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.normalize(images), self.augment(images)]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        return {"representation": h, "probabilities": torch.softmax(self.head(h).float(), dim=1)}

    def _compose(self, images: torch.Tensor) -> Composition | None:
        """The composite of the global batch (every worker's ``images`` gathered; without
        gradients, they are inputs), or None without composition (then Eq. 5 pairs p with p')."""
        opts = self.cfg.lsdc
        if opts.composition == "ricap":
            return ricap(gather_rows(images), opts.composition_beta, self._rng)
        if opts.composition == "mixup":
            return mixup(gather_rows(images), opts.composition_beta, self._rng)
        return None

    def forward(self, views: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        opts = self.cfg.lsdc
        clean, augmented = views
        n = clean.shape[0]
        composite = self._compose(augmented)
        inputs = [clean, augmented] + ([local_rows(composite.images)] if composite is not None else [])
        features = self.backbone(torch.cat(inputs))
        logits = self.head(features).float()
        p, p_aug = torch.softmax(logits[:n], 1), torch.softmax(logits[n:2 * n], 1)
        source = features[:n] if opts.label_space == "features" else logits[:n]
        global_n = n * world()[1]
        adjacency = pairwise_adjacency(source.detach(), opts.labeling, k=min(opts.k, global_n - 1),
                                       threshold=opts.threshold, temperature=opts.sne_temperature)
        if composite is None:
            clustering = pairwise_bce_loss(p, p_aug, adjacency)
        else:
            p_composite = torch.softmax(logits[2 * n:], 1)
            # released: PairEnum scores pair (a, b) as p_b . p~_a against target (pure a, composite b)
            scored = (p, p_composite) if opts.composite_pairing == "eq6" else (p_composite, p)
            clustering = pairwise_bce_loss(*scored, composite.targets(adjacency))
        weight = rampup_weight(self._epoch, opts.rampup_length, opts.rampup_lambda)
        terms = {"clustering": clustering, "consistency": weight * consistency_loss(p, p_aug)}
        stats = {"rampup_weight": torch.tensor(weight, device=p.device), "adjacency_density": adjacency.mean()}
        return {"terms": terms, "stats": stats, "diagnostics": {"adjacency": adjacency}}

    def label_diagnostics(self, out: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Precision and recall of the step's pairwise pseudo-labels (the global batch's
        adjacency A, Sec. 3.2) against the class labels, over the pairs i != j of labelled images."""
        return pseudo_label_scores(out["diagnostics"]["adjacency"], gather_rows(labels.float()))
