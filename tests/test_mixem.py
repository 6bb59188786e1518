"""MIX'EM loss terms (Eq. 4-8) against hand-computed values, gradients and degenerate batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlab.config import load_config
from clusterlab.eval.clustering import mixem_init_centroids
from clusterlab.trainers import build_method
from clusterlab.trainers.mixem import (
    comp_entropy_loss,
    component_stats,
    dominant_component,
    inst_entropy_loss,
    push_pull_losses,
)

P = torch.tensor([[0.7, 0.3], [0.1, 0.9]])


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


def test_push_pull_released_form_uses_the_mixed_embedding_and_means():
    p, e = _push_pull_case()
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    push, pull = push_pull_losses(p, e, form="released", z=z)
    # mu_0 = (0.5, 0.5), mu_1 = (3, 4); pull = mean over components of mean member distance
    assert pull.item() == pytest.approx((math.sqrt(0.5) + 0.0) / 2, abs=1e-5)
    assert push.item() == pytest.approx(-math.hypot(2.5, 3.5), abs=1e-5)
    with pytest.raises(ValueError, match="needs the mixed embedding"):
        push_pull_losses(p, e, form="released")


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
    assert push.item() == 0.0  # fewer than two non-empty components: nothing to push
    assert torch.isfinite(total) and torch.isfinite(e.grad).all() and torch.isfinite(logits.grad).all()
    assert component_stats(p)["nonempty_components"].item() == 1.0


def test_mixem_model_mixes_normalised_component_embeddings():
    cfg = load_config(None, ["method=mixem", "model.cnn_width=4", "model.embedding_dim=8"], preset="simclr_digits")
    method = build_method(cfg, 10, 16, (0.5,) * 3, (0.25,) * 3)
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
