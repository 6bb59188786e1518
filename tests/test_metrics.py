"""Clustering metrics against brute force and scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterlab.eval.metrics import cluster_accuracy, clustering_metrics, hungarian_match


def _brute_force_acc(labels: np.ndarray, pred: np.ndarray, k: int) -> float:
    return max(np.mean(np.array(perm)[pred] == labels) for perm in itertools.permutations(range(k)))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_accuracy_equals_best_permutation(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=60)
    pred = np.where(rng.random(60) < 0.6, (labels + 2) % 5, rng.integers(0, 5, size=60))
    assert cluster_accuracy(labels, pred, 5, 5) == pytest.approx(_brute_force_acc(labels, pred, 5))


def test_permuted_perfect_clustering_scores_one():
    labels = np.repeat(np.arange(4), 5)
    m = clustering_metrics(labels, (labels + 1) % 4, 4, 4)
    assert m == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def _brute_force_capped_acc(labels: np.ndarray, pred: np.ndarray, k: int, c: int) -> float:
    """Best cluster -> class map in which each class takes at most ceil(k / c) clusters."""
    cap = -(-k // c)
    return max(np.mean(np.array(m)[pred] == labels) for m in itertools.product(range(c), repeat=k)
               if max(np.bincount(m, minlength=c)) <= cap)


@pytest.mark.parametrize("seed", range(3))
def test_over_clustering_is_many_to_one_with_capped_clusters_per_class(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=50)
    pred = np.where(rng.random(50) < 0.7, 2 * labels + rng.integers(0, 2, 50), rng.integers(0, 7, 50))  # 7 clusters
    assert cluster_accuracy(labels, pred, 7, 3) == pytest.approx(_brute_force_capped_acc(labels, pred, 7, 3))


def test_over_clustering_is_not_a_majority_vote():
    labels = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2, 3, 3])  # 4 clusters, 2 classes: a majority vote maps 0, 1, 2 -> 0 and scores 1.0
    assert cluster_accuracy(labels, pred, 4, 2) == pytest.approx(5 / 6)  # at most 2 clusters per class
    two_way = np.array([0, 0, 1, 1, 2, 3])  # each class split in two: both halves count
    assert cluster_accuracy(np.array([0, 0, 0, 0, 1, 1]), two_way, 4, 2) == pytest.approx(1.0)


def test_nmi_ari_equal_scikit_learn():
    rng = np.random.default_rng(1)
    labels, pred = rng.integers(0, 6, 100), rng.integers(0, 8, 100)
    m = clustering_metrics(labels, pred, 8, 6)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred))
    assert m["ari"] == pytest.approx(adjusted_rand_score(labels, pred))


def test_rejects_bad_shapes_and_unlabelled_samples():
    with pytest.raises(ValueError, match="equal length"):
        cluster_accuracy(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match=">= 0"):
        cluster_accuracy(np.array([-1, 0]), np.array([0, 0]), 2)


def test_k_equals_c_on_a_split_lacking_the_last_class_is_one_to_one():
    """K = C = 3, but the evaluated labels hold classes 0 and 1 only. Inferring C = 2 from the
    labels would allow ceil(3 / 2) = 2 clusters per class and score 6/6; with the explicit
    C = 3 the match is one-to-one: 0 -> 0 (2 hits), 2 -> 1 (2 hits), 1 -> 2 (no sample)."""
    labels = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(labels, pred, 3, 3) == pytest.approx(4 / 6)
    counts, mapping = hungarian_match(labels, pred, 3, 3)
    assert counts.shape == (3, 3) and sorted(mapping.values()) == [0, 1, 2]
    assert cluster_accuracy(labels, pred, 3, 3) == pytest.approx(_brute_force_acc(labels, pred, 3))
    assert cluster_accuracy(labels, pred, 3) == pytest.approx(1.0)  # C read off the labels: 2 classes
    assert clustering_metrics(labels, pred, 3, 3)["acc"] == pytest.approx(4 / 6)


def test_over_clustering_capacity_uses_the_explicit_k():
    """K = 6 clusters, C = 2 classes: up to ceil(6 / 2) = 3 clusters per class, although only
    clusters 0..3 are used (reading K = 4 off the predictions would cap at 2 and score 5/6)."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 1, 2, 3, 3, 3])
    assert cluster_accuracy(labels, pred, 6, 2) == pytest.approx(1.0)
    assert cluster_accuracy(labels, pred, 4, 2) == pytest.approx(5 / 6)
    counts, mapping = hungarian_match(labels, pred, 6, 2)
    assert counts.shape == (6, 2) and len(mapping) == 6  # every cluster, used or not, is assigned
    assert max(np.bincount(list(mapping.values()))) <= 3


def test_rejects_predictions_or_labels_out_of_range():
    labels, pred = np.array([0, 1, 2]), np.array([0, 1, 3])
    with pytest.raises(ValueError, match="prediction 3 is out of range for num_clusters=3"):
        cluster_accuracy(labels, pred, 3)
    with pytest.raises(ValueError, match="label 2 is out of range for num_classes=2"):
        hungarian_match(labels, np.array([0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match="num_clusters=3"):
        clustering_metrics(labels, pred, 3, 3)
    with pytest.raises(ValueError, match=">= 1"):
        cluster_accuracy(labels, np.array([0, 0, 0]), 0)
