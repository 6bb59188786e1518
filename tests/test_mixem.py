"""MIX'EM loss terms (Eq. 4-8) against hand-computed values, gradients and degenerate batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlab.config import load_config
from clusterlab.eval.clustering import mixem_init_centroids
from clusterlab.trainers import DataMeta, build_method
from clusterlab.trainers.mixem import (
    comp_entropy_loss,
    component_stats,
    dominant_component,
    inst_entropy_loss,
    push_pull_losses,
)

P = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
META = DataMeta(10, 16, (0.5,) * 3, (0.25,) * 3)


def test_comp_entropy_eq4():
    # marginal (0.4, 0.6): 0.4 ln 0.4 + 0.6 ln 0.6
    assert comp_entropy_loss(P).item() == pytest.approx(0.4 * math.log(0.4) + 0.6 * math.log(0.6), rel=1e-6)
    # uniform marginal reaches the minimum -log M
    assert comp_entropy_loss(torch.eye(4)).item() == pytest.approx(-math.log(4), rel=1e-6)


def test_comp_entropy_safe_with_zero_mass_component():
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    loss = comp_entropy_loss(p)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    assert torch.isfinite(p.grad).all()


def test_inst_entropy_eq5_is_the_batch_mean():
    assert inst_entropy_loss(P).item() == pytest.approx(((1 - 0.7) + (1 - 0.9)) / 2, rel=1e-6)
    assert inst_entropy_loss(torch.eye(3)).item() == pytest.approx(0.0)


def test_dominant_component_is_the_argmax():
    # Eq. 6 prints argmin; the dominant component is the argmax.
    assert dominant_component(P).tolist() == [0, 1]


def _push_pull_case():
    # N=3, M=2, D=2. Samples 0,1 -> component 0, sample 2 -> component 1.
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    e = torch.zeros(3, 2, 2)
    e[0, 0] = torch.tensor([1.0, 0.0])
    e[1, 0] = torch.tensor([0.0, 1.0])
    e[2, 1] = torch.tensor([0.6, 0.8])
    e[0, 1] = e[1, 1] = e[2, 0] = torch.tensor([-1.0, 0.0])  # non-member embeddings must not matter
    return p, e


def test_push_pull_paper_form_eq6_to_8():
    p, e = _push_pull_case()
    push, pull = push_pull_losses(p, e)
    # mu_0 = (0.5, 0.5), mu_1 = (0.6, 0.8)
    # pull = 1/M * (|(0.5,-0.5)| + |(-0.5,0.5)| + 0) = sqrt(0.5)
    assert pull.item() == pytest.approx(math.sqrt(0.5), abs=1e-5)
    # push = -1/M * 2 |mu_0 - mu_1| = -|(-0.1,-0.3)| = -sqrt(0.1)
    assert push.item() == pytest.approx(-math.sqrt(0.1), abs=1e-5)


def _released_push_pull(z: torch.Tensor, assign: torch.Tensor, m: int) -> tuple[float, float]:
    """The released code's push/pull for one view (train.py, mixem_loss), transcribed with
    loops: one zero vector labelled c appended per component c, mean member distance per
    component summed and divided by M, push over the M^2 - M ordered pairs of means."""
    x = torch.cat([z, torch.zeros(m, z.shape[1])]).double()
    y = torch.cat([assign, torch.arange(m)])
    means = [x[y == c].mean(0) for c in range(m)]
    pull = sum(float((x[y == c] - means[c]).norm(dim=1).mean()) for c in range(m)) / m
    push = -sum(float((means[a] - means[b]).norm()) for a in range(m) for b in range(m) if a != b) / (m * m - m)
    return push, pull


def test_push_pull_released_form_by_hand():
    p, e = _push_pull_case()
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    push, pull = push_pull_losses(p, e, form="released", z=z)
    # zero vectors appended: E_0 + 0 = {(1,0), (0,1), (0,0)}, mu_0 = (1/3, 1/3);
    # E_1 + 0 = {(3,4), (0,0)}, mu_1 = (1.5, 2)
    pull_0 = (2 * math.sqrt(5) / 3 + math.sqrt(2) / 3) / 3
    assert pull.item() == pytest.approx((pull_0 + 2.5) / 2, abs=1e-5)
    assert push.item() == pytest.approx(-2 * math.hypot(1.5 - 1 / 3, 2 - 1 / 3) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="needs the mixed embedding"):
        push_pull_losses(p, e, form="released")


def test_mixem_released_push_pull_sums_the_views_as_the_released_code():
    """MixEM.forward with push_pull_form=released: per view, zero vectors appended, summed
    over the two views, against the loop transcription of the released code."""
    torch.manual_seed(0)
    cfg = load_config(None, ["method=mixem", "model.cnn_width=4", "model.embedding_dim=8", "mixem.num_components=4",
                             "mixem.push_pull_form=released"], preset="simclr_digits")
    method = build_method(cfg, META)
    views = [torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)]
    method.eval()  # BatchNorm on running statistics: the same z whether views pass alone or together
    terms = method(views)["terms"]
    push, pull = 0.0, 0.0
    for view in views:
        p, _, z = method.mixture(method.backbone(view))
        v_push, v_pull = _released_push_pull(z.detach(), dominant_component(p), 4)
        push, pull = push + v_push, pull + v_pull
    assert terms["push"].item() == pytest.approx(push, rel=1e-5)
    assert terms["pull"].item() == pytest.approx(pull, rel=1e-5)


def test_view_reduction_sum_is_the_released_per_view_weighting():
    """mixem.view_reduction=sum: comp-ent and inst-ent per view, summed (released ent1 + ent2,
    pimax over both views); joint: over the 2N rows (Eq. 4-5 on the batch)."""
    torch.manual_seed(0)
    overrides = ["method=mixem", "model.cnn_width=4", "model.embedding_dim=8", "mixem.num_components=4"]
    views = [torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)]
    joint = build_method(load_config(None, overrides, preset="simclr_digits"), META)
    summed = build_method(load_config(None, overrides + ["mixem.view_reduction=sum"], preset="simclr_digits"), META)
    summed.load_state_dict(joint.state_dict())
    joint.eval(), summed.eval()  # BatchNorm on running statistics: the same p for one view or two
    with torch.no_grad():
        p_views = [joint.mixture(joint.backbone(v))[0] for v in views]
    t_sum, t_joint = summed(views)["terms"], joint(views)["terms"]
    expected_ent = sum(float((q.mean(0) * q.mean(0).log()).sum()) for q in p_views)
    expected_inst = sum(float((1 - q.max(1).values).mean()) for q in p_views)
    assert t_sum["comp_ent"].item() == pytest.approx(expected_ent, rel=1e-5)
    assert t_sum["inst_ent"].item() == pytest.approx(expected_inst, rel=1e-5)
    both = torch.cat(p_views)
    assert t_joint["comp_ent"].item() == pytest.approx(float((both.mean(0) * both.mean(0).log()).sum()), rel=1e-5)
    assert t_joint["inst_ent"].item() == pytest.approx(expected_inst / 2, rel=1e-5)
    assert t_sum["contrast"].item() == pytest.approx(t_joint["contrast"].item(), rel=1e-6)  # NT-Xent unchanged


def test_gradients_reach_the_gate_through_entropies_only():
    logits = torch.randn(6, 3, requires_grad=True)
    e = torch.randn(6, 3, 4, requires_grad=True)
    p = torch.softmax(logits, dim=1)
    push, pull = push_pull_losses(p, e)
    (push + pull).backward()
    assert logits.grad is None  # the dominant-component assignment is detached
    assert e.grad is not None and e.grad.abs().sum() > 0
    (comp_entropy_loss(torch.softmax(logits, 1)) + inst_entropy_loss(torch.softmax(logits, 1))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["paper", "released"])
def test_no_nan_with_empty_components_and_batch_of_two(form):
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [4.0, 0, 0, 0, 0]], requires_grad=True)  # 4 of 5 empty
    e = torch.nn.functional.normalize(torch.randn(2, 5, 3), dim=2).requires_grad_()
    p = torch.softmax(logits, 1)
    z = torch.einsum("nm,nmd->nd", p, e)
    push, pull = push_pull_losses(p, e, form=form, z=z)
    total = comp_entropy_loss(p) + inst_entropy_loss(p) + push + pull
    total.backward()
    if form == "paper":
        assert push.item() == 0.0  # fewer than two non-empty components: nothing to push
    assert torch.isfinite(total) and torch.isfinite(e.grad).all() and torch.isfinite(logits.grad).all()
    assert component_stats(p)["nonempty_components"].item() == 1.0


def test_mixem_model_mixes_normalised_component_embeddings():
    cfg = load_config(None, ["method=mixem", "model.cnn_width=4", "model.embedding_dim=8"], preset="simclr_digits")
    method = build_method(cfg, META)
    assert method.num_components == 10  # M defaults to the number of classes
    h = method.backbone(torch.randn(5, 3, 16, 16))
    p, e, z = method.mixture(h)
    assert p.shape == (5, 10) and e.shape == (5, 10, 8) and z.shape == (5, 8)
    torch.testing.assert_close(e.norm(dim=2), torch.ones(5, 10))
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    assert set(out["terms"]) == {"contrast", "comp_ent", "inst_ent", "push", "pull"}
    assert set(out["stats"]) == {"component_entropy", "nonempty_components"}


def test_mixem_init_uses_the_most_populated_components():
    x = np.array([[0.0, 0], [0, 2], [10, 10], [10, 12], [10, 14], [50, 50]])
    component = np.array([3, 3, 1, 1, 1, 0])
    centroids = mixem_init_centroids(x, component, k=2, seed=0)
    np.testing.assert_allclose(centroids, [[10, 12], [0, 1]])  # components 1 (3 members), 3 (2)
    padded = mixem_init_centroids(x, component, k=4, seed=0)  # 3 non-empty < K: one sample added
    assert padded.shape == (4, 2) and any((padded[3] == row).all() for row in x)
