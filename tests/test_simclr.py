"""NT-Xent (MIX'EM Eq. 1-2) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlab.trainers.simclr import nt_xent_loss


def test_orthogonal_pairs_closed_form():
    # Views: v0=v2=(1,0), v1=v3=(0,1). For every view: sim to positive 1, to the two others 0.
    # l = -log(e^{1/t} / (e^{1/t} + 2 e^0)) = log(1 + 2 e^{-1/t}); Eq. 2 averages 4 equal terms.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-6)


def _eq1_eq2_by_loops(z_a: np.ndarray, z_b: np.ndarray, tau: float) -> float:
    views = np.concatenate([z_a, z_b])
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    n = len(z_a)

    def l(i: int, j: int) -> float:  # Eq. 1
        num = math.exp(views[i] @ views[j] / tau)
        den = sum(math.exp(views[i] @ views[k] / tau) for k in range(2 * n) if k != i)
        return -math.log(num / den)

    return sum(l(i, i + n) + l(i + n, i) for i in range(n)) / (2 * n)  # Eq. 2


def test_matches_equations_on_random_inputs():
    rng = np.random.default_rng(0)
    z_a, z_b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = nt_xent_loss(torch.tensor(z_a), torch.tensor(z_b), 0.2).item()
    assert got == pytest.approx(_eq1_eq2_by_loops(z_a, z_b, 0.2), rel=1e-5)


def test_scale_invariant_and_rejects_mismatched_shapes():
    z_a, z_b = torch.randn(4, 8), torch.randn(4, 8)
    assert nt_xent_loss(z_a, z_b, 0.5).item() == pytest.approx(nt_xent_loss(3 * z_a, 0.1 * z_b, 0.5).item(), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z_a, torch.randn(3, 8), 0.5)
