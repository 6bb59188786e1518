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
from clusterlab.trainers.base import DataMeta, register
from clusterlab.trainers.distributed import gather_rows
from clusterlab.trainers.simclr import SimCLR, nt_xent_loss

_EPS = 1e-12


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last axis whose gradient stays finite at 0 (a one-member component
    sits exactly on its mean; ``torch.linalg.norm`` would back-propagate 0/0 = NaN there) and
    whose value is exactly 0 there (the released form's zero vectors sit on empty components' means)."""
    sq = (x * x).sum(-1)
    return torch.where(sq > 0, sq.clamp_min(_EPS * _EPS).sqrt(), torch.zeros_like(sq))


def comp_entropy_loss(p: torch.Tensor) -> torch.Tensor:
    """L_comp-ent, Eq. 4: the negative entropy of the batch-marginal component distribution.

    ``sum_m pbar_m log pbar_m`` with ``pbar_m = 1/N sum_i p_m^i``; minimising it spreads samples
    over components. A component with zero mass contributes 0 (0 log 0 := 0) with a finite
    gradient. Its minimum is ``-log M`` (uniform marginal). Data-parallel: pbar is the marginal
    of the **global** batch (every worker's rows gathered).
    """
    pbar = gather_rows(p).mean(dim=0)
    return (pbar * pbar.clamp_min(_EPS).log()).sum()


def inst_entropy_loss(p: torch.Tensor) -> torch.Tensor:
    """L_inst-ent, Eq. 5: ``1/N sum_i (1 - max_m p_m^i)``.

    Eq. 5 sums over the batch; we take the mean so that the weight l2 does not depend on the
    batch size. It pushes each sample's dominant coefficient towards one. A per-sample mean:
    data-parallel workers take it over their own rows, and DDP's gradient average makes it the
    global mean.
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
    """``(L_push, L_pull)``, the associative embedding loss of Eq. 6-8, over the rows given.

    E_m is the set of samples whose dominant component (:func:`dominant_component`) is m.

    ``form="paper"`` (default) follows Eq. 6-8 on the component embeddings:
        mu_m   = 1/|E_m| sum_{i in E_m} e_m^i                                   (Eq. 6)
        L_pull = 1/M sum_m sum_{i in E_m} ||e_m^i - mu_m||_2                    (Eq. 7)
        L_push = -1/M sum_m sum_{m' != m} ||mu_m - mu_m'||_2                    (Eq. 8)
    Eq. 8 is the distance to *maximise*; we return its negative so that minimising Eq. 9
    pushes the means apart. Note the paper's normalisation: pull sums over members (it grows
    with the batch size) and both divide by M, the number of components. A component with no
    members contributes nothing.

    ``form="released"`` is the released code's definition (``train.py``, ``mixem_loss``), for
    the rows of **one view**: the terms act on the mixed embedding ``z`` (N, D); one zero vector
    labelled m is appended per component m (so no E_m is empty), mu_m is the mean of E_m and
    its zero vector, and
        L_pull = 1/M sum_m mean_{i in E_m + zero} ||z_i - mu_m||
        L_push = -1/(M^2 - M) sum_{m != m'} ||mu_m - mu_m'||
    The released code computes them per view and sums the two views (see ``MixEM.forward``).

    Data-parallel: the memberships and means are those of the **global** batch (the
    assignments and member embeddings of every worker are gathered, with gradients).
    """
    m = p.shape[1]
    assign = dominant_component(p)
    if form == "paper":
        members = e[torch.arange(len(assign), device=e.device), assign]  # e_m^i for i in E_m, (N, D)
    elif form == "released":
        if z is None:
            raise ValueError("push_pull_losses(form='released') needs the mixed embedding z")
        members = z.float()
    else:
        raise ValueError(f"unknown form {form!r}; allowed: 'paper', 'released'")
    assign, members = gather_rows(assign), gather_rows(members)
    if form == "released":
        labels = torch.arange(m, device=assign.device)
        assign = torch.cat([assign, labels])
        members = torch.cat([members, members.new_zeros(m, members.shape[1])])
    onehot = F.one_hot(assign, m).to(members.dtype)  # (N, M)
    counts = onehot.sum(dim=0)  # (M,)
    nonempty = counts > 0
    mu = (onehot.t() @ members) / counts.clamp_min(1).unsqueeze(1)  # (M, D); empty rows stay 0
    member_dist = _safe_norm(members - mu[assign])  # (N,)
    pair_dist = _safe_norm(mu.unsqueeze(1) - mu.unsqueeze(0))  # (M, M)
    pair_mask = (nonempty.unsqueeze(1) & nonempty.unsqueeze(0)) & ~torch.eye(m, dtype=torch.bool, device=p.device)
    pair_sum = (pair_dist * pair_mask).sum()
    if form == "paper":
        return -pair_sum / m, member_dist.sum() / m
    per_component = (onehot.t() @ member_dist) / counts  # mean distance within each E_m + zero
    return -pair_sum / (m * m - m), per_component.sum() / m


def component_stats(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse diagnostics (Sec. 3.2) of the global batch: entropy of the marginal and the
    number of non-empty components."""
    p = gather_rows(p.detach())
    return {
        "component_entropy": -comp_entropy_loss(p),
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

    def __init__(self, cfg: ExperimentConfig, data: DataMeta) -> None:
        super().__init__(cfg, data)
        feat_dim = self.head.net[0].in_features
        hidden = cfg.model.hidden_dim or feat_dim
        del self.head  # replaced by the mixture (Eq. 3)
        self.num_components = cfg.mixem.num_components or data.num_classes
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
        opts = self.cfg.mixem
        p, e, z = self.mixture(self.backbone(torch.cat(views)))
        each_view = [slice(i * n, (i + 1) * n) for i in range(len(views))]
        # mixem.view_reduction: each auxiliary term over the rows of both views ("joint", the
        # paper's batch), or per view and summed over the views (the released code's weighting).
        aux_rows = each_view if opts.view_reduction == "sum" else [slice(None)]
        push_pull_rows = each_view if opts.push_pull_form == "released" else aux_rows
        push_pull = [push_pull_losses(p[r], e[r], opts.push_pull_form, z[r]) for r in push_pull_rows]
        terms = {
            "contrast": nt_xent_loss(z[:n], z[n:], self.cfg.loss.temperature),
            "comp_ent": sum(comp_entropy_loss(p[r]) for r in aux_rows),
            "inst_ent": sum(inst_entropy_loss(p[r]) for r in aux_rows),
            "push": sum(push for push, _ in push_pull),
            "pull": sum(pull for _, pull in push_pull),
        }
        return {"terms": terms, "stats": component_stats(p)}

    def eval_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        p, _, _ = self.mixture(h)
        return {"representation": h, "coefficients": p}
