"""LSD-C's pure parts (Rebuffi et al., "LSD-C: Linearly Separable Deep Clusters"): pairwise
labelling of a mini-batch (Sec. 3.2, Eq. 1-2), the pairwise BCE clustering loss (Eq. 3-5),
data composition with RICAP / MixUp and its mixed pairwise targets (Eq. 6), the MSE
consistency loss and its ramp-up (Eq. 7-8).

Every adjacency matrix is (N, N), symmetric, float 0/1, with ones on the diagonal (a sample
is in its own cluster, and p_i . p'_i is pushed to 1 like any other connected pair).

Data-parallel: the graph is that of the **global** batch. :func:`pairwise_adjacency` and
:func:`pairwise_bce_loss` take each worker's local rows and gather every worker's (N is the
global batch size, the targets are global), and the compositions are drawn over the global
batch from a generator that every worker seeds alike, so N workers optimise what one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clusterlab.trainers.distributed import gather_rows


def _with_self_loops(a: torch.Tensor) -> torch.Tensor:
    a = a.float()
    a.fill_diagonal_(1.0)
    return a


def _sq_distances(f: torch.Tensor) -> torch.Tensor:
    return torch.cdist(f.float(), f.float()).pow(2)


def cosine_adjacency(f: torch.Tensor, threshold: float) -> torch.Tensor:
    """A_ij = [cos(f_i, f_j) > tau] (Sec. 3.2, "Cosine and L2 similarity")."""
    fn = F.normalize(f.float(), dim=1)
    return _with_self_loops(fn @ fn.t() > threshold)


def l2_adjacency(f: torch.Tensor, threshold: float) -> torch.Tensor:
    """A_ij = [||f_i - f_j||^2 < tau] (Sec. 3.2)."""
    return _with_self_loops(_sq_distances(f) < threshold)


def knn_adjacency(f: torch.Tensor, k: int) -> torch.Tensor:
    """i and j connected when j is among the k nearest neighbours of i (Euclidean, the sample
    itself excluded) or i among those of j: the symmetric kNN graph of Sec. 3.2."""
    n = f.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the batch size - 1 ({n - 1}), got {k}")
    d = _sq_distances(f)
    d.fill_diagonal_(float("inf"))
    neighbours = d.topk(k, dim=1, largest=False).indices
    a = torch.zeros(n, n, device=f.device).scatter_(1, neighbours, 1.0)
    return _with_self_loops((a + a.t()) > 0)


def sne_adjacency(f: torch.Tensor, temperature: float, threshold: float) -> torch.Tensor:
    """Symmetric SNE with one shared variance (Eq. 1-2):

        p_{j|i} = exp(-||f_j - f_i||^2 / T^2) / Z_i,   Z_i = sum_{k != i} exp(-||f_k - f_i||^2 / T^2)
        A_ij = [(p_{j|i} + p_{i|j}) / 2 > tau] = [exp(-||f_j - f_i||^2 / T^2) / H(Z_i, Z_j) > tau]

    with H the harmonic mean. Computed with log-sum-exp, so tiny temperatures do not underflow.
    """
    logits = -_sq_distances(f) / temperature ** 2
    logits.fill_diagonal_(float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log p_{j|i}, rows i
    p = log_p.exp()
    return _with_self_loops((p + p.t()) / 2 > threshold)


def pairwise_adjacency(f: torch.Tensor, kind: str, *, k: int = 20, threshold: float = 0.9,
                       temperature: float = 1.0) -> torch.Tensor:
    """The global batch's (N, N) adjacency from this worker's rows of the features ``f``
    (detached; every worker's rows gathered). Dispatches on the labelling kind (``knn``,
    ``cosine``, ``l2``, ``sne``)."""
    f = gather_rows(f.detach())
    if kind == "knn":
        return knn_adjacency(f, k)
    if kind == "cosine":
        return cosine_adjacency(f, threshold)
    if kind == "l2":
        return l2_adjacency(f, threshold)
    if kind == "sne":
        return sne_adjacency(f, temperature, threshold)
    raise ValueError(f"unknown pairwise labelling {kind!r}; use knn, cosine, l2 or sne")


def pseudo_label_scores(adjacency: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """How the pairwise pseudo-labels ``adjacency`` (N, N) agree with the class ``labels`` (N,;
    negative: unknown), over the pairs i != j of labelled images: ``pseudo_label_precision``,
    the share of connected pairs that are of one class, and ``pseudo_label_recall``, the share
    of same-class pairs that are connected. A diagnostic of why the clustering falls short,
    read against the labels: it never enters the loss. 0 where the batch has no such pair."""
    known = labels >= 0
    pairs = known[:, None] & known[None, :]
    pairs.fill_diagonal_(False)
    same = (labels[:, None] == labels[None, :]) & pairs
    linked = (adjacency > 0.5) & pairs
    hits = (linked & same).sum().float()
    return {"pseudo_label_precision": hits / linked.sum().clamp_min(1),
            "pseudo_label_recall": hits / same.sum().clamp_min(1)}


def pairwise_bce_loss(p: torch.Tensor, q: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Eq. 5 (and Eq. 6 with mixed targets): binary cross-entropy between P(i = j) = p_i . q_j
    (Eq. 4) and the pairwise target, averaged over the N x N pairs (the paper sums; the mean
    keeps the loss scale independent of the batch size). ``p`` and ``q`` are this worker's rows
    (gathered here, with gradients); ``target`` is over the global batch, as
    :func:`pairwise_adjacency` and :meth:`Composition.targets` return it."""
    same = (gather_rows(p).float() @ gather_rows(q).float().t()).clamp(eps, 1.0 - eps)
    return F.binary_cross_entropy(same, target.float())


def consistency_loss(p: torch.Tensor, p_aug: torch.Tensor) -> torch.Tensor:
    """Eq. 8 without its weight: 1/(K N) sum_i ||p_i - p'_i||^2."""
    return (p.float() - p_aug.float()).pow(2).mean()


def rampup_weight(t: float, length: float, scale: float) -> float:
    """w(t) = lambda exp(-5 (1 - t/T)^2) for t < T, lambda after (Eq. 8; t and T in epochs)."""
    if length <= 0 or t >= length:
        return scale
    return scale * math.exp(-5.0 * (1.0 - t / length) ** 2)


@dataclass
class Composition:
    """A composite batch and where its pieces came from: image j is made of
    ``images[perms[m][j]]`` with area share ``weights[m]`` (per image: ``weights`` is (M, N))."""

    images: torch.Tensor
    perms: torch.Tensor  # (M, N) long
    weights: torch.Tensor  # (M, N) float, columns sum to 1

    def targets(self, adjacency: torch.Tensor) -> torch.Tensor:
        """Pairwise targets between pure image i and composite image j (Eq. 6):
        sum_m w_m(j) A[i, perm_m(j)], in [0, 1]. The area shares sum to 1 only up to float32
        rounding: at 28 px (MNIST) 7 of the 841 RICAP split points, at 96 px (STL-10) 129 of
        9,409, sum to 1 + 2^-23, which binary_cross_entropy refuses as a target; hence the clamp."""
        return sum(adjacency[:, perm] * w[None, :] for perm, w in zip(self.perms, self.weights)).clamp_(0.0, 1.0)


def ricap(images: torch.Tensor, beta: float, rng: np.random.Generator) -> Composition:
    """RICAP (Takahashi et al.): four crops from four permutations of the batch patched into
    one image. The split point (w, h) is drawn from Beta(beta, beta) per batch (LSD-C
    supplementary Sec. 1), each crop from a random position of its source image; the pieces
    weigh by area. Every draw comes from ``rng``: workers that seed it alike compose the global
    batch alike."""
    n, _, height, width = images.shape
    w = int(round(rng.beta(beta, beta) * width))
    h = int(round(rng.beta(beta, beta) * height))
    sizes = [(w, h), (width - w, h), (w, height - h), (width - w, height - h)]
    corners = [(0, 0), (w, 0), (0, h), (w, h)]
    out = torch.empty_like(images)
    perms, weights = [], []
    for (cw, ch), (x0, y0) in zip(sizes, corners):
        perm = torch.from_numpy(rng.permutation(n)).to(images.device)
        perms.append(perm)
        weights.append(torch.full((n,), cw * ch / (width * height), device=images.device))
        if cw == 0 or ch == 0:
            continue
        sx, sy = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
        out[:, :, y0:y0 + ch, x0:x0 + cw] = images[perm, :, sy:sy + ch, sx:sx + cw]
    return Composition(out, torch.stack(perms), torch.stack(weights))


def mixup(images: torch.Tensor, beta: float, rng: np.random.Generator) -> Composition:
    """MixUp (Zhang et al.) with lambda ~ Beta(beta, beta) per batch (Beta(0.3, 0.3) works
    better than Beta(1, 1) for LSD-C, supplementary Sec. 1): x~ = lam x + (1 - lam) x[perm].
    Every draw comes from ``rng`` (see :func:`ricap`)."""
    n = images.shape[0]
    lam = float(rng.beta(beta, beta))
    perm = torch.from_numpy(rng.permutation(n)).to(images.device)
    identity = torch.arange(n, device=images.device)
    mixed = lam * images + (1.0 - lam) * images[perm]
    weights = torch.stack([torch.full((n,), lam, device=images.device), torch.full((n,), 1.0 - lam, device=images.device)])
    return Composition(mixed, torch.stack([identity, perm]), weights)
