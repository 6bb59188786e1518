"""batched_kmeans against scikit-learn's Lloyd K-means."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from clusterlab.eval.kmeans import batched_kmeans


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(1500, 12, centers=6, cluster_std=3.0, random_state=0)
    return x.astype(np.float32), y


@pytest.mark.parametrize("trial", range(4))
def test_given_initialisation_matches_scikit_learn_lloyd(blobs, trial):
    x, _ = blobs
    init = x[np.random.default_rng(trial).choice(len(x), 6, replace=False)]
    sk = KMeans(6, init=init, n_init=1, max_iter=300, tol=1e-4, algorithm="lloyd").fit(x)
    ours = batched_kmeans(x, 6, init=init)
    np.testing.assert_array_equal(ours.labels, sk.labels_)
    assert ours.inertia == pytest.approx(sk.inertia_, rel=1e-4)
    assert ours.n_iters.tolist() == [sk.n_iter_]
    np.testing.assert_allclose(ours.centroids, sk.cluster_centers_, rtol=1e-4, atol=1e-3)


def test_batched_initialisations_each_match_their_own_sklearn_run(blobs):
    x, _ = blobs
    inits = np.stack([x[np.random.default_rng(s).choice(len(x), 6, replace=False)] for s in range(5)])
    ours = batched_kmeans(x, 6, init=inits, return_all_labels=True)
    for b in range(5):
        sk = KMeans(6, init=inits[b], n_init=1, algorithm="lloyd").fit(x)
        np.testing.assert_array_equal(ours.all_labels[b], sk.labels_)
        assert ours.inertias[b] == pytest.approx(sk.inertia_, rel=1e-4)
    assert ours.inertia == pytest.approx(ours.inertias.min())
    np.testing.assert_array_equal(ours.labels, ours.all_labels[ours.inertias.argmin()])


def test_kmeans_plus_plus_best_of_many_is_as_good_as_scikit_learn():
    x = np.random.default_rng(1).normal(size=(1200, 16)).astype(np.float32)  # no clear structure
    sk = KMeans(12, n_init=20, random_state=0).fit(x)
    ours = batched_kmeans(x, 12, n_init=20, seed=0)
    assert ours.inertias.shape == (20,) and ours.n_iters.shape == (20,)
    assert ours.inertia <= sk.inertia_ * 1.005


def test_random_init_seeded_and_converges(blobs):
    x, y = blobs
    a = batched_kmeans(x, 6, n_init=8, init="random", seed=3)
    b = batched_kmeans(x, 6, n_init=8, init="random", seed=3)
    np.testing.assert_array_equal(a.inertias, b.inertias)
    assert (a.n_iters < 300).all()


def test_empty_cluster_is_relocated_not_nan():
    x = np.concatenate([np.zeros((20, 2)), np.ones((20, 2)) * 10]).astype(np.float32)
    x += np.random.default_rng(0).normal(scale=0.1, size=x.shape).astype(np.float32)
    init = np.array([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]])  # the third centroid starts empty
    run = batched_kmeans(x, 3, init=init)
    assert np.isfinite(run.centroids).all() and len(np.unique(run.labels)) == 3


@pytest.mark.parametrize(("k", "match"), [(1, "between 2"), (10_000, "between 2")])
def test_rejects_bad_k(blobs, k, match):
    with pytest.raises(ValueError, match=match):
        batched_kmeans(blobs[0], k)


def test_a_read_only_input_is_clustered_in_place_of_a_copy_and_never_written(blobs):
    """Ray hands each K-means task the features zero-copy, read-only, from its object store: they
    are clustered as they are (the centred copy is the task's only (N, D) allocation), with the
    same result as a writable copy, and the caller's array is left unchanged."""
    import warnings

    x, _ = blobs
    shared = x.copy()
    shared.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would mean a wrapped write risk
        ours = batched_kmeans(shared, 6, n_init=3, seed=1)
    reference = batched_kmeans(x.copy(), 6, n_init=3, seed=1)
    np.testing.assert_array_equal(ours.labels, reference.labels)
    assert ours.inertia == reference.inertia
    np.testing.assert_array_equal(shared, x)


@pytest.mark.parametrize("n, d, k, n_init", [(40000, 1024, 10, 2), (20000, 256, 50, 8), (60000, 64, 10, 10)])
def test_the_memory_a_fanout_task_asks_ray_for_covers_what_it_allocates(n, d, k, n_init):
    """Measured in a fresh single-threaded process: the peak of anonymous memory (RssAnon,
    sampled while it runs) that a batched_kmeans call adds on read-only data, as a Ray task
    sees it, is within task_memory, and task_memory is not more than twice that (it must not
    hold back tasks that would fit). Anonymous memory, because under memory pressure the file
    pages of torch's libraries leave RSS and come back during the call; glibc's mmap threshold is
    fixed so that freed arrays leave at once (with its adaptive one the peak varies by a third)."""
    import os
    import subprocess
    import sys

    script = f"""
import threading, time, numpy as np, torch
from clusterlab.eval.kmeans import batched_kmeans, task_memory
torch.set_num_threads(1)
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
x = np.random.default_rng(0).standard_normal(({n}, {d}), dtype=np.float32)
x.flags.writeable = False
batched_kmeans(x[:500], 10, n_init=1, seed=0)  # kernels and allocator warmed up
before, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0002)
sampler = threading.Thread(target=sample)
sampler.start()
batched_kmeans(x, {k}, n_init={n_init}, seed=0, max_iter=5)
done.set()
sampler.join()
print(peak[0] - before, task_memory({n}, {d}, {k}, {n_init}))
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    used, asked = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                          check=True, env=env).stdout.split())
    assert used <= asked <= 2 * used, (used, asked)
