"""LSD-C and RotNet: each pairwise labelling against brute force, the BCE and composition
targets against hand-computed cases (LSD-C Eq. 1-8), the ramp-up, and the methods' steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlab.config import load_config
from clusterlab.eval.clustering import head_metrics
from clusterlab.trainers import DataMeta, build_method
from clusterlab.trainers.lsdc_losses import (
    Composition,
    consistency_loss,
    cosine_adjacency,
    knn_adjacency,
    l2_adjacency,
    mixup,
    pairwise_bce_loss,
    pseudo_label_scores,
    rampup_weight,
    ricap,
    sne_adjacency,
)
from clusterlab.trainers.optim import lr_factor
from clusterlab.trainers.rotnet import rotate_batch


@pytest.fixture()
def features():
    return torch.randn(12, 5, generator=torch.Generator().manual_seed(0))


def _sq(f, i, j):
    return float(((f[i] - f[j]) ** 2).sum())


def _brute(n, connected):
    return torch.tensor([[1.0 if i == j or connected(i, j) else 0.0 for j in range(n)] for i in range(n)])


def test_cosine_and_l2_adjacency_match_brute_force(features):
    f, n = features, len(features)
    cos = lambda i, j: float(f[i] @ f[j] / (f[i].norm() * f[j].norm()))  # noqa: E731
    assert torch.equal(cosine_adjacency(f, 0.3), _brute(n, lambda i, j: cos(i, j) > 0.3))
    assert torch.equal(l2_adjacency(f, 6.0), _brute(n, lambda i, j: _sq(f, i, j) < 6.0))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_adjacency_is_the_symmetric_knn_graph(features, k):
    f, n = features, len(features)
    knn = {i: set(sorted((j for j in range(n) if j != i), key=lambda j: _sq(f, i, j))[:k]) for i in range(n)}
    a = knn_adjacency(f, k)
    assert torch.equal(a, _brute(n, lambda i, j: j in knn[i] or i in knn[j]))
    assert torch.equal(a, a.t()) and bool((a.sum(1) >= k + 1).all())  # every sample has >= k neighbours
    with pytest.raises(ValueError, match="between 1 and the batch size"):
        knn_adjacency(f, n)


@pytest.mark.parametrize("temperature,threshold", [(1.0, 0.05), (2.0, 0.08), (0.7, 0.01)])
def test_sne_adjacency_matches_eq_1_and_2(features, temperature, threshold):
    f, n = features, len(features)

    def p(j, i):  # p_{j|i}, Eq. 1
        z = sum(math.exp(-_sq(f, k, i) / temperature ** 2) for k in range(n) if k != i)
        return math.exp(-_sq(f, j, i) / temperature ** 2) / z

    expected = _brute(n, lambda i, j: (p(j, i) + p(i, j)) / 2 > threshold)
    assert torch.equal(sne_adjacency(f, temperature, threshold), expected)
    # Eq. 2: the same test written with the harmonic mean of the partition functions.
    zs = [sum(math.exp(-_sq(f, k, i) / temperature ** 2) for k in range(n) if k != i) for i in range(n)]
    harmonic = _brute(n, lambda i, j: math.exp(-_sq(f, i, j) / temperature ** 2)
                      / (2 * zs[i] * zs[j] / (zs[i] + zs[j])) > threshold)
    assert torch.equal(expected, harmonic)


def test_pairwise_bce_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a = torch.eye(2)
    # P(i=j) = p p^T = [[1, .5], [.5, .5]]; BCE terms: -log 1, -log .5, -log .5, -log .5 -> mean 3 ln2 / 4
    assert float(pairwise_bce_loss(p, p, a)) == pytest.approx(3 * math.log(2) / 4, abs=1e-5)
    assert float(consistency_loss(p, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))) == pytest.approx(2 / 4)


def test_composition_targets_reproduce_fig_3():
    """LSD-C Fig. 3: composite j made of images (1, 5, 7, 2); image 1 is connected to 1 and 7,
    whose pieces cover 0.4 + 0.3 of the composite: target 0.7 (Eq. 6)."""
    n = 8
    a = torch.eye(n)
    a[1, 7] = a[7, 1] = 1.0
    perms = torch.arange(n).repeat(4, 1)
    perms[:, 0] = torch.tensor([1, 5, 7, 2])
    weights = torch.tensor([0.4, 0.2, 0.3, 0.1])[:, None].repeat(1, n)
    targets = Composition(torch.zeros(n, 3, 4, 4), perms, weights).targets(a)
    assert float(targets[1, 0]) == pytest.approx(0.7)
    assert float(targets[5, 0]) == pytest.approx(0.2) and float(targets[3, 0]) == 0.0
    assert torch.allclose(targets[:, 1:], a[:, 1:])  # the other composites are pure copies


def _released_ricap_bce(prob, prob_bar, adjacency, perms, weights):
    """Transcription of the released code (``cifar10_clustering.py`` with ``utils_algo``'s
    ``PairEnum`` and ``BCE_softlabels``): the RICAP target adaptation, then BCE over the
    enumerated pairs of the pure and the composite batch's probabilities."""

    def pair_enum(x):
        return x.repeat(x.size(0), 1), x.repeat(1, x.size(0)).view(-1, x.size(1))

    n = prob.size(0)
    target_tmp = adjacency.reshape(-1).clone()
    target = torch.zeros_like(target_tmp)
    for perm, w in zip(perms, weights):
        target += float(w[0]) * (target_tmp.view(n, -1)[:, perm]).reshape(-1)
    row, _ = pair_enum(prob)
    _, col = pair_enum(prob_bar)
    p = (row * col).sum(1)
    eps = 1e-7
    return (-(target * torch.log(p + eps) + (1.0 - target) * torch.log(1.0 - p + eps))).mean()


def test_released_composite_pairing_is_the_released_codes_loss():
    """``lsdc.composite_pairing=released`` scores pair (a, b) as p_b . p~_a against the target
    of (pure a, composite b), as the released code's PairEnum order does; ``eq6`` pairs pure i
    with composite j and j's target. Same inputs: the released value, and a different Eq. 6 one."""
    gen = torch.Generator().manual_seed(3)
    n = 8
    prob = torch.softmax(torch.randn(n, 4, generator=gen), 1)
    prob_bar = torch.softmax(torch.randn(n, 4, generator=gen), 1)
    a = knn_adjacency(torch.randn(n, 5, generator=gen), 2)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(4)])
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None].expand(4, n)
    targets = Composition(torch.zeros(n, 1, 4, 4), perms, weights).targets(a)
    released = _released_ricap_bce(prob, prob_bar, a, perms, weights)
    assert float(pairwise_bce_loss(prob_bar, prob, targets)) == pytest.approx(float(released), abs=1e-5)
    assert float(pairwise_bce_loss(prob, prob_bar, targets)) != pytest.approx(float(released), abs=1e-3)


def test_pseudo_label_scores_by_hand():
    """Pairs i != j of labelled images: (0, 1) same class, linked; (0, 2) different, linked;
    (1, 2) different, unlinked; image 3 unlabelled, its link ignored. Precision 1/2, recall 1/1."""
    a = torch.eye(4)
    for i, j in [(0, 1), (0, 2), (2, 3)]:
        a[i, j] = a[j, i] = 1.0
    scores = pseudo_label_scores(a, torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert float(scores["pseudo_label_precision"]) == pytest.approx(0.5)
    assert float(scores["pseudo_label_recall"]) == pytest.approx(1.0)
    none = pseudo_label_scores(torch.eye(2), torch.tensor([-1.0, -1.0]))
    assert float(none["pseudo_label_precision"]) == 0.0 and float(none["pseudo_label_recall"]) == 0.0


def test_composite_targets_stay_in_0_1_when_the_area_shares_round_above_1():
    """RICAP's four area shares at split (18, 25) of a 28 px MNIST image sum to 1 + 2^-23 in
    float32: a pair connected to all four pieces must still get target 1, and Eq. 6's loss a
    value, not binary_cross_entropy's refusal of a target above 1."""
    n, size, (w, h) = 4, 28, (18, 25)
    areas = [(w, h), (size - w, h), (w, size - h), (size - w, size - h)]
    weights = torch.tensor([a * b / size ** 2 for a, b in areas], dtype=torch.float32)[:, None].repeat(1, n)
    assert float(weights[0, 0] + weights[1, 0] + weights[2, 0] + weights[3, 0]) > 1.0  # the rounding guarded against
    composite = Composition(torch.zeros(n, 1, size, size), torch.arange(n).repeat(4, 1), weights)
    targets = composite.targets(torch.ones(n, n))
    assert float(targets.max()) == 1.0
    p = torch.full((n, 3), 1 / 3)
    assert torch.isfinite(pairwise_bce_loss(p, p, targets))


def _constant_images(n, size=16):
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).clone()


@pytest.mark.parametrize("seed", range(4))
def test_ricap_pieces_weigh_by_the_area_they_cover(seed):
    n = 6
    comp = ricap(_constant_images(n), 0.3, np.random.default_rng(seed))
    assert torch.allclose(comp.weights.sum(0), torch.ones(n))  # label mass kept
    for j in range(n):
        shares = torch.bincount(comp.images[j, 0].flatten().long(), minlength=n).float() / 256
        expected = torch.zeros(n).index_add_(0, comp.perms[:, j], comp.weights[:, j])
        assert torch.allclose(shares, expected, atol=1e-6)


def test_mixup_mixes_images_and_targets_with_the_same_weight():
    n = 5
    comp = mixup(_constant_images(n), 0.3, np.random.default_rng(0))
    assert torch.allclose(comp.weights.sum(0), torch.ones(n))
    lam = float(comp.weights[0, 0])
    assert torch.equal(comp.perms[0], torch.arange(n))
    for j in range(n):
        assert float(comp.images[j, 0, 0, 0]) == pytest.approx(lam * j + (1 - lam) * int(comp.perms[1, j]), abs=1e-5)
    targets = comp.targets(torch.eye(n))
    assert torch.allclose(targets.sum(0), torch.ones(n))  # each composite's target mass is 1


def test_rampup_follows_eq_8():
    assert rampup_weight(0, 100, 5) == pytest.approx(5 * math.exp(-5))
    assert rampup_weight(50, 100, 5) == pytest.approx(5 * math.exp(-1.25))
    assert rampup_weight(100, 100, 5) == 5 and rampup_weight(150, 100, 5) == 5
    assert rampup_weight(3, 0, 2) == 2  # no ramp-up


def test_multistep_schedule_divides_at_the_milestones():
    # RotNet (LSD-C supplementary Sec. 1): lr 0.1 divided by 5 at epochs 60, 120, 160 (10 steps / epoch).
    factors = [lr_factor(e * 10, 2000, 0, "multistep", 0.0, [600, 1200, 1600], 0.2) for e in (0, 59, 60, 130, 199)]
    assert factors == pytest.approx([1, 1, 0.2, 0.04, 0.008])


def test_rotate_batch_labels_each_quarter_turn():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rotated, labels = rotate_batch(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[3], torch.rot90(x[1], 1, dims=(1, 2)))
    assert torch.equal(rotated[4], x[0].flip(1).flip(2))  # 180 degrees


def _method(preset, *overrides):
    cfg = load_config(None, ["model.cnn_width=8", *overrides], preset=preset)
    return build_method(cfg, DataMeta(10, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


@pytest.mark.parametrize("overrides", [(), ("lsdc.composition=mixup",), ("lsdc.composition=none",),
                                       ("lsdc.label_space=predictions", "lsdc.labeling=cosine"),
                                       ("lsdc.labeling=sne", "lsdc.sne_threshold=0.01")])
def test_lsdc_step_trains_only_the_last_block_and_head(overrides):
    torch.manual_seed(0)
    method = _method("lsdc_digits", *overrides).train()
    frozen = [p for b in method._frozen for p in b.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(not m.training for b in method._frozen for m in b.modules())  # BatchNorm stats kept
    method.set_progress(2.5)
    out = method(method.make_views(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)))
    assert set(out["terms"]) == {"clustering", "consistency"}
    assert float(out["stats"]["rampup_weight"]) == pytest.approx(rampup_weight(2.5, 30, 5))
    method.total_loss(out["terms"]).backward()
    assert all(p.grad is None for p in frozen)
    assert method.head.weight.grad is not None and bool(torch.isfinite(method.head.weight.grad).all())


def test_rotnet_step_and_lsdc_eval_outputs():
    rotnet = _method("rotnet_digits")
    out = rotnet(rotnet.make_views(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)))
    assert float(out["terms"]["rotation"].detach()) == pytest.approx(math.log(4), abs=0.5)  # untrained: near chance
    lsdc = _method("lsdc_digits").eval()
    outputs = lsdc.eval_outputs(torch.randn(4, 3, 16, 16))
    assert outputs["probabilities"].shape == (4, 10)
    assert torch.allclose(outputs["probabilities"].sum(1), torch.ones(4))


def test_head_metrics_confident_accuracy_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.95, 0.05, 0], [0.6, 0.4, 0], [0, 0.97, 0.03], [0.5, 0.5, 0],
                      [0.05, 0, 0.95], [0.91, 0.09, 0]])
    m = head_metrics(probs, labels)
    # argmax = [0, 0, 1, 0, 2, 0]: Hungarian maps 0->0, 1->1, 2->2; confident rows 0, 2, 4, 5 -> 3 of 4 right.
    assert m["head_acc"] == pytest.approx(4 / 6)
    assert m["head_confident_share"] == pytest.approx(4 / 6) and m["head_confident_acc"] == pytest.approx(3 / 4)
    assert "head_confident_acc" not in head_metrics(np.full((6, 3), 1 / 3), labels)


def test_every_table4_column_is_a_config():
    """LSD-C Table 4: labelling (L2, cosine, kNN, SNE), prediction-space labelling, composition."""
    columns = [("lsdc.labeling=l2", "lsdc.l2_threshold=1.0"), ("lsdc.labeling=cosine", "lsdc.cosine_threshold=0.9"),
               ("lsdc.labeling=knn",), ("lsdc.labeling=sne", "lsdc.sne_threshold=0.01"),
               *[("lsdc.label_space=predictions", f"lsdc.labeling={kind}") for kind in ("cosine", "knn", "sne")],
               ("lsdc.composition=ricap",), ("lsdc.composition=mixup",), ("lsdc.composition=none",)]
    built = {tuple(sorted(load_config(None, ["data.root=/x", *column], preset="lsdc_cifar10").lsdc.model_dump().items()))
             for column in columns}
    # Nine distinct runs: the kNN column and the RICAP column are the same run (81.7 in both).
    assert len(built) == 9


def test_training_logs_the_pseudo_labels_precision_and_recall_per_epoch(tmp_path):
    """The loop reads LSD-C's pairwise labels against the class labels every step (a diagnostic):
    the epoch's values are the means of :func:`pseudo_label_scores`, strictly between 0 and 1 on
    digits, and they are not metrics a sweep can schedule on."""
    from clusterlab.methods import spec_for
    from clusterlab.platform.loop import LocalSession, fit

    cfg = load_config(None, ["epochs=1", "data.limit=300", "model.cnn_width=8", "batch_size=64"], preset="lsdc_digits")
    session = LocalSession(tmp_path)
    fit(cfg, session)
    epoch = session.history[-1]
    assert 0.0 < epoch["pseudo_label_precision"] < 1.0 and 0.0 < epoch["pseudo_label_recall"] < 1.0
    assert not {"pseudo_label_precision", "pseudo_label_recall"} & spec_for("lsdc").epoch_metrics()
