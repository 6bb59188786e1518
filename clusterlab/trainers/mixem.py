"""MIX'EM: a mixture of embeddings inside contrastive learning (Varamesh & Tuytelaars, ACCV 2020).

The projection head g of SimCLR is replaced by M parallel heads g_m (same structure as g) and
a gating head g_p with softmax (Eq. 3). Each component embedding e_m = g_m(h) is
L2-normalised, the mixed embedding z = sum_m p_m e_m feeds NT-Xent (Eq. 1-2), and four terms
keep the mixture from collapsing and make it semantic (Eq. 4-8). The total loss is Eq. 9:

    L = L_contrast + l1 L_comp-ent + l2 L_inst-ent + l3 L_push + l4 L_pull

The loss functions below are pure functions of tensors: p is the (N, M) matrix of mixture
coefficients (rows sum to one) and e the (N, M, D) component embeddings.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clusterlab.config import ExperimentConfig
from clusterlab.trainers.base import register
from clusterlab.trainers.simclr import SimCLR, nt_xent_loss

_EPS = 1e-12


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last axis whose gradient stays finite at 0 (a one-member component
    sits exactly on its mean; ``torch.linalg.norm`` would back-propagate 0/0 = NaN there)."""
    return (x * x).sum(-1).clamp_min(_EPS).sqrt()


def comp_entropy_loss(p: torch.Tensor) -> torch.Tensor:
    """L_comp-ent, Eq. 4: the negative entropy of the batch-marginal component distribution.

    ``sum_m pbar_m log pbar_m`` with ``pbar_m = 1/N sum_i p_m^i``; minimising it spreads samples
    over components. A component with zero mass contributes 0 (0 log 0 := 0) with a finite
    gradient. Its minimum is ``-log M`` (uniform marginal).
    """
    pbar = p.mean(dim=0)
    return (pbar * pbar.clamp_min(_EPS).log()).sum()


def inst_entropy_loss(p: torch.Tensor) -> torch.Tensor:
    """L_inst-ent, Eq. 5: ``1/N sum_i (1 - max_m p_m^i)``.

    Eq. 5 sums over the batch; we take the mean so that the weight l2 does not depend on the
    batch size. It pushes each sample's dominant coefficient towards one.
    """
    return (1.0 - p.max(dim=1).values).mean()


def dominant_component(p: torch.Tensor) -> torch.Tensor:
    """Index of each sample's dominant component: the **argmax** of the detached coefficients.

    Eq. 6 prints argmin; the text ("the dominant mixture component") and the released code use
    the argmax. No gradient flows through this assignment.
    """
    return p.detach().argmax(dim=1)


def push_pull_losses(
    p: torch.Tensor,
    e: torch.Tensor,
    form: Literal["paper", "released"] = "paper",
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_push, L_pull)``, the associative embedding loss of Eq. 6-8.

    E_m is the set of samples whose dominant component (:func:`dominant_component`) is m.

    ``form="paper"`` (default) follows Eq. 6-8 on the component embeddings:
        mu_m   = 1/|E_m| sum_{i in E_m} e_m^i                                   (Eq. 6)
        L_pull = 1/M sum_m sum_{i in E_m} ||e_m^i - mu_m||_2                    (Eq. 7)
        L_push = -1/M sum_m sum_{m' != m} ||mu_m - mu_m'||_2                    (Eq. 8)
    Eq. 8 is the distance to *maximise*; we return its negative so that minimising Eq. 9
    pushes the means apart. Note the paper's normalisation: pull sums over members (it grows
    with the batch size) and both divide by M, the number of components.

    ``form="released"`` follows the released code's placement: the terms act on the mixed
    embedding ``z`` (N, D) with per-component means mu_m = mean of z over E_m. Its
    normalisation is ours, chosen to be independent of batch size and M: averages instead of
    sums, L_pull = mean over non-empty m of (mean over E_m of ||z_i - mu_m||) and
    L_push = -mean over ordered pairs of non-empty m != m' of ||mu_m - mu_m'||.

    Components with no members contribute nothing to either term in both forms: no NaN, no
    division by zero, zero loss when fewer than two components are non-empty (push) or none
    is (pull).
    """
    n, m = p.shape
    assign = dominant_component(p)
    onehot = F.one_hot(assign, m).to(e.dtype)  # (N, M)
    counts = onehot.sum(dim=0)  # (M,)
    nonempty = counts > 0
    if form == "paper":
        members = e[torch.arange(n, device=e.device), assign]  # e_m^i for i in E_m, (N, D)
    elif form == "released":
        if z is None:
            raise ValueError("push_pull_losses(form='released') needs the mixed embedding z")
        members = z
    else:
        raise ValueError(f"unknown form {form!r}; allowed: 'paper', 'released'")
    mu = (onehot.t() @ members) / counts.clamp_min(1).unsqueeze(1)  # (M, D); empty rows stay 0
    member_dist = _safe_norm(members - mu[assign])  # (N,)
    pair_dist = _safe_norm(mu.unsqueeze(1) - mu.unsqueeze(0))  # (M, M)
    pair_mask = (nonempty.unsqueeze(1) & nonempty.unsqueeze(0)) & ~torch.eye(m, dtype=torch.bool, device=p.device)
    pair_sum = (pair_dist * pair_mask).sum()
    if form == "paper":
        return -pair_sum / m, member_dist.sum() / m
    per_component = (onehot.t() @ member_dist) / counts.clamp_min(1)  # mean distance within each E_m
    pull = per_component.sum() / nonempty.sum().clamp_min(1)
    push = -pair_sum / pair_mask.sum().clamp_min(1)
    return push, pull


def component_stats(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse diagnostics (Sec. 3.2): entropy of the marginal and non-empty components."""
    return {
        "component_entropy": -comp_entropy_loss(p.detach()),
        "nonempty_components": torch.bincount(dominant_component(p), minlength=p.shape[1]).gt(0).sum().float(),
    }


class ParallelHeads(nn.Module):
    """M projection heads g_m (Linear -> ReLU -> Linear, as g), evaluated as one batched einsum."""

    def __init__(self, num_heads: int, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_heads, in_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_heads, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden_dim, out_dim))
        self.b2 = nn.Parameter(torch.zeros(num_heads, out_dim))
        for w in (self.w1, self.w2):  # nn.Linear's default init, per head
            bound = 1.0 / w.shape[1] ** 0.5
            nn.init.uniform_(w, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, M, out)."""
        hidden = torch.relu(torch.einsum("ni,mih->nmh", h, self.w1) + self.b1)
        return torch.einsum("nmh,mho->nmo", hidden, self.w2) + self.b2


@register("mixem")
class MixEM(SimCLR):
    """SimCLR with the mixture-of-embeddings head (Eq. 3) and the loss of Eq. 9."""

    loss_terms = ("contrast", "comp_ent", "inst_ent", "push", "pull")
    epoch_stats = ("component_entropy", "nonempty_components")
    #: supplementary Table 1, STL10 row (l1..l4); L_contrast is unweighted in Eq. 9
    default_weights = {"contrast": 1.0, "comp_ent": 1.0, "inst_ent": 0.1, "push": 0.05, "pull": 0.1}

    def __init__(self, cfg: ExperimentConfig, num_classes: int, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__(cfg, num_classes, image_size, mean, std)
        feat_dim = self.head.net[0].in_features
        hidden = cfg.model.hidden_dim or feat_dim
        del self.head  # replaced by the mixture (Eq. 3)
        self.num_components = cfg.mixem.num_components or num_classes
        self.heads = ParallelHeads(self.num_components, feat_dim, hidden, cfg.model.embedding_dim)
        self.gate = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, self.num_components))

    def mixture(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, e, z)``: coefficients (N, M), normalised component embeddings (N, M, D), mix (N, D)."""
        p = torch.softmax(self.gate(h).float(), dim=1)
        e = F.normalize(self.heads(h).float(), dim=2)
        z = torch.einsum("nm,nmd->nd", p, e)
        return p, e, z

    def forward(self, views: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        n = views[0].shape[0]
        p, e, z = self.mixture(self.backbone(torch.cat(views)))
        push, pull = push_pull_losses(p, e, self.cfg.mixem.push_pull_form, z)
        terms = {
            "contrast": nt_xent_loss(z[:n], z[n:], self.cfg.loss.temperature),
            "comp_ent": comp_entropy_loss(p),
            "inst_ent": inst_entropy_loss(p),
            "push": push,
            "pull": pull,
        }
        return {"terms": terms, "stats": component_stats(p)}

    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        p, _, _ = self.mixture(h)
        return {"representation": h, "coefficients": p}
