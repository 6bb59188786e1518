"""Clustering metrics against brute force and scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterlab.eval.metrics import cluster_accuracy, clustering_metrics


def _brute_force_acc(labels: np.ndarray, pred: np.ndarray, k: int) -> float:
    return max(np.mean(np.array(perm)[pred] == labels) for perm in itertools.permutations(range(k)))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_accuracy_equals_best_permutation(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=60)
    pred = np.where(rng.random(60) < 0.6, (labels + 2) % 5, rng.integers(0, 5, size=60))
    assert cluster_accuracy(labels, pred) == pytest.approx(_brute_force_acc(labels, pred, 5))


def test_permuted_perfect_clustering_scores_one():
    labels = np.repeat(np.arange(4), 5)
    m = clustering_metrics(labels, (labels + 1) % 4)
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
    assert cluster_accuracy(labels, pred) == pytest.approx(_brute_force_capped_acc(labels, pred, 7, 3))


def test_over_clustering_is_not_a_majority_vote():
    labels = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2, 3, 3])  # 4 clusters, 2 classes: a majority vote maps 0, 1, 2 -> 0 and scores 1.0
    assert cluster_accuracy(labels, pred) == pytest.approx(5 / 6)  # at most 2 clusters per class
    two_way = np.array([0, 0, 1, 1, 2, 3])  # each class split in two: both halves count
    assert cluster_accuracy(np.array([0, 0, 0, 0, 1, 1]), two_way) == pytest.approx(1.0)


def test_nmi_ari_equal_scikit_learn():
    rng = np.random.default_rng(1)
    labels, pred = rng.integers(0, 6, 100), rng.integers(0, 8, 100)
    m = clustering_metrics(labels, pred)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred))
    assert m["ari"] == pytest.approx(adjusted_rand_score(labels, pred))


def test_rejects_bad_shapes_and_unlabelled_samples():
    with pytest.raises(ValueError, match="equal length"):
        cluster_accuracy(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match=">= 0"):
        cluster_accuracy(np.array([-1, 0]), np.array([0, 0]))
