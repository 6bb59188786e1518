"""Real-data smoke test: the MNIST presets through Ray Train on the first images of the real
MNIST files (../shared/datasets), evaluated on IIC's VGG-4 net, landing in MLflow.

The full reproduction (LSD-C Table 2, all 70,000 images, several seeds) is not part of the
test suite: REPRODUCTIONS.md holds it, written by `clusterlab report`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli

pytestmark = pytest.mark.ray

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LIMIT = 1500  # the first 1,500 images of each split: 3,000 train+test images, 2,850 train after validation


@pytest.fixture()
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(f"the real MNIST is not at {MNIST_ROOT} (../shared/datasets beside the checkout)")
    return MNIST_ROOT


@pytest.mark.parametrize("preset, metrics", [
    ("lsdc_mnist", ("head_acc", "head_nmi", "kmeans_norm_acc", "pixels_acc")),
    ("simclr_mnist", ("kmeans_norm_acc", "kmeans_raw_acc", "pixels_acc")),
])
def test_an_mnist_preset_trains_one_epoch_and_lands_in_mlflow(ray_local, tracking_uri, tmp_path, mnist_root,
                                                              preset, metrics):
    code = cli.main(["train", "--preset", preset, "--data-root", str(mnist_root), f"data.limit={LIMIT}",
                     "epochs=1", "batch_size=256", "eval.kmeans_n_init=3", f"storage_path={tmp_path / 'ray'}",
                     "tracking.experiment=mnist-smoke", "--run-name", preset])
    assert code == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist-smoke").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "mnist" and run.data.params["model.backbone"] == "iic_vgg4"
    assert run.data.tags["clusterlab.eval_split"] == "all"
    assert run.data.metrics["eval_images"] == 2 * LIMIT  # train + test, every labelled image read
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    for key in metrics:
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    # K-means on these pixels is far above chance (0.1): the images and labels line up.
    assert run.data.metrics["pixels_acc"] > 0.4
