"""ExCB's pure parts (Maniadis Metaxas et al., ECCV 2024; spec: ExCB supplementary Sec. 2 and
Algorithms 1-2): the balancing operator B, the running relative cluster sizes s, the
centroid layer's similarities and the multi-view loss.

Choices where the supplementary is silent or inconsistent (each an option of ``ExcbConfig``):

- B for s > 1/K: ``linear`` (default) falls linearly from z at s = 1/K to exactly -1 at s = 1,
  as Sec. 2 and its Fig. 2 state; ``inverse`` is Algorithm 1's (1 + z) / (sK) - 1, which only
  approaches -1 at s = 1 as K grows.
- B for s < 1/K is linear in s, from z at s = 1/K to 1 at s = 0 (the "linear" row of
  supplementary Table 1).
- z^B is clamped to [-1, 1] (a no-op for cosine similarities; guards rounding).
- The released code's boost of the arg-max entry (x1.01 on the balanced arg-max, then clamp to
  [-1, 1]) is off by default (``boost_argmax``): the supplementary does not describe it.
- s is updated from the teacher's assignments after B (``s_from = balanced``, as the released
  code does); ``raw`` uses the assignments before B (Algorithm 1's ``batch_labels =
  z_t.argmax``). Measured on digits (K = 30, 40 epochs): with ``raw`` an empty cluster's s stays
  near 0, so B lifts its similarity to 1 for every sample alike, the targets lose their
  information and the teacher collapses into one cluster (93% empty); with ``balanced`` the
  clusters B fills count as filled, and 3% stay empty (47% without B).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def balance(z: torch.Tensor, s: torch.Tensor, above: str = "linear") -> torch.Tensor:
    """B(z; s) for similarities z (..., K) in [-1, 1] and relative cluster sizes s (K,), sum 1.

    With u = 1 + z in [0, 2] and K clusters:
      s <= 1/K:  u^B = u + (2 - u)(1 - sK)                      (u^B = 2, z^B = 1 at s = 0)
      s >  1/K:  u^B = u (1 - (s - 1/K) / (1 - 1/K))   linear   (z^B = -1 at s = 1)
                 u^B = u / (sK)                        inverse  (Algorithm 1)
    and z^B = u^B - 1, clamped to [-1, 1]. B(z; 1/K) = z.
    """
    k = s.shape[-1]
    sk = s * k
    u = 1.0 + z
    below = u + (2.0 - u) * (1.0 - sk).clamp_min(0.0)
    if above == "linear":
        over = u * (1.0 - ((s - 1.0 / k) / (1.0 - 1.0 / k)).clamp_min(0.0))
    elif above == "inverse":
        over = u / sk.clamp_min(1.0)
    else:
        raise ValueError(f"unknown balancing for s > 1/K: {above!r}; use linear or inverse")
    return (torch.where(sk <= 1.0, below, over) - 1.0).clamp(-1.0, 1.0)


def boost_argmax(z_balanced: torch.Tensor, factor: float = 1.01) -> torch.Tensor:
    """Released-code option (ExCB's engine/criterion.py, ``ClusteringLoss.centering``, "boosting
    choices"): after balancing, each sample's arg-max entry of the *balanced* similarities is
    multiplied by 1.01 (``bt = 1 + 0.01 one_hot(argmax)``), then everything is clamped to
    [-1, 1]. A negative arg-max moves away from 1 (x1.01 makes it more negative); a value above
    1/1.01 clamps at 1."""
    boost = torch.ones_like(z_balanced).scatter(-1, z_balanced.argmax(dim=-1, keepdim=True), factor)
    return (z_balanced * boost).clamp(-1.0, 1.0)


def batch_cluster_sizes(assignments: torch.Tensor, k: int) -> torch.Tensor:
    """Relative cluster sizes of one batch of hard assignments, summed over every worker when
    running distributed (all-reduce), so each rank applies the same update: (K,), sum 1."""
    counts = torch.bincount(assignments.flatten(), minlength=k).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts / counts.sum().clamp_min(1.0)


def update_cluster_sizes(s: torch.Tensor, batch_sizes: torch.Tensor, momentum: float) -> torch.Tensor:
    """s <- m s + (1 - m) s_batch (the running relative size vector of ExCB)."""
    return momentum * s + (1.0 - momentum) * batch_sizes


def centroid_similarities(x: torch.Tensor, centroids: torch.Tensor, detach_centroids: bool) -> torch.Tensor:
    """Algorithm 2: cosine similarity of L2-normalised inputs (B, D) with L2-normalised
    centroids (K, D); ``detach_centroids`` stops the centroid gradient (local crops and the
    predictor path of Algorithm 1)."""
    c = centroids.detach() if detach_centroids else centroids
    return F.normalize(x.float(), dim=-1) @ F.normalize(c.float(), dim=-1).t()


def excb_loss(teacher_probs: list[torch.Tensor], student_proj_logp: list[torch.Tensor],
              student_pred_logp: list[torch.Tensor], pairing: str = "algorithm1") -> tuple[torch.Tensor, torch.Tensor]:
    """The loss terms as cross-entropies H(p_t, p_s) = -sum p_t log p_s, each averaged over the
    batch, its (teacher view, student view) pairs and the G teacher views.

    ``teacher_probs``: G global views; student lists: the G global views first, then the L
    local ones. ``pairing``:

    - ``algorithm1`` (Algorithm 1): the projector term pairs each teacher view with every
      *other* view, local ones included (G (G + L - 1) pairs), the predictor term with every
      view including its own (G (G + L)).
    - ``released`` (the released code's ``Trainer.unroll_batch`` matches): the projector term
      pairs each teacher view with the *other global* views only (G (G - 1) pairs; the local
      crops' projector outputs get no loss), the predictor term as above.

    Returns (loss_h, loss_g). Algorithm 1's total is 0.5 loss_h + 0.5 loss_g; the released code
    takes one mean over all the pairs of both terms, i.e. :func:`released_term_weights`.
    """
    g, views = len(teacher_probs), len(student_proj_logp)
    projector_views = {"algorithm1": views, "released": g}.get(pairing)
    if projector_views is None:
        raise ValueError(f"unknown ExCB view pairing {pairing!r}; use algorithm1 or released")

    def h(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        return -(p * logp).sum(dim=1).mean()

    loss_h = sum(h(teacher_probs[v], student_proj_logp[w]) for v in range(g) for w in range(projector_views) if w != v)
    loss_g = sum(h(teacher_probs[v], student_pred_logp[w]) for v in range(g) for w in range(views))
    return loss_h / (g * (projector_views - 1)), loss_g / (g * views)


def released_term_weights(global_crops: int, local_crops: int) -> dict[str, float]:
    """The weights of (projector, predictor) that make the weighted sum of the ``released``
    terms the released code's one mean over all G (G - 1) + G (G + L) pairs: each term's share
    of the pairs (G = 2, L = 0: 1/3 and 2/3)."""
    n_h = global_crops * (global_crops - 1)
    n_g = global_crops * (global_crops + local_crops)
    return {"projector": n_h / (n_h + n_g), "predictor": n_g / (n_h + n_g)}
