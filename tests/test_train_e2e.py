"""End to end through real Ray Train and a real MLflow SQLite store."""

from __future__ import annotations

import getpass
import json
import uuid

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from clusterlab import cli
from clusterlab.environment import package_versions

pytestmark = pytest.mark.ray


def test_train_on_digits_lands_in_mlflow(ray_local, tracking_uri, tmp_path, capsys):
    run_name = f"e2e-{uuid.uuid4().hex[:8]}"  # Train V2 resumes a repeated name: keep it unique
    code = cli.main([
        "train", "--preset", "simclr_digits", "epochs=2", "batch_size=128", "eval.kmeans_n_init=3",
        "optim.warmup_epochs=0", "model.cnn_width=8",
        f"storage_path={tmp_path / 'ray'}", "--experiment", "e2e", "--run-name", run_name,
        "--tag", "team=vision", "--note", "two epochs, **narrow** CNN", "tracking.system_metrics_interval_s=1",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("K-means, L2-normalised representations", "UMAP + K-means, L2-normalised repr.",
                "UMAP (10-d) + K-means on raw pixels", "t-SNE (2-d) + K-means on raw pixels"):
        assert row in printed, row

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_name
    assert run.data.tags["method"] == "simclr" and run.data.tags["dataset"] == "digits"
    assert run.data.tags["protocol"] == "train+test" and run.data.tags["git_commit"]
    # MLflow's standard tags fill the UI's User / Source / Version columns; the user's own tags.
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "clusterlab train" and tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] != "unknown"
    assert tags["team"] == "vision" and tags["mlflow.note.content"] == "two epochs, **narrow** CNN"
    assert not {k for k in run.data.params if k.startswith(("tracking.tags", "tracking.note"))}
    versions = package_versions()  # what the worker trained with: this environment's
    assert {k.removeprefix("clusterlab.version."): v for k, v in tags.items()
            if k.startswith("clusterlab.version.")} == versions
    assert versions["torch"] == torch.__version__.split("+")[0] and versions["mlflow"] == mlflow.__version__
    # System metrics of the worker's node, sampled every second while it trained.
    node = f"{tags['clusterlab.node_ip']}-{tags['clusterlab.node_id'][:6]}"
    assert {f"system/{node}/cpu_utilization_percentage", f"system/{node}/system_memory_usage_megabytes"} <= set(
        run.data.metrics), sorted(k for k in run.data.metrics if k.startswith("system/"))
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["epochs"] == "2"
    for key in ("train_loss", "train_loss_contrast", "val_loss", "lr", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in ("kmeans_norm_acc", "kmeans_norm_nmi", "kmeans_norm_ari", "kmeans_raw_acc", "pixels_acc",
                "umap_kmeans_acc", "pixels_umap_acc", "pixels_tsne_acc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    assert run.data.metrics["kmeans_norm_acc"] > 0.15  # well above chance (0.1) even after 2 epochs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {
        "checkpoint/checkpoint.pt", "checkpoint/config.yaml", "checkpoint/history.json"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/accuracy_vs_inertia.png", "plots/confusion.png", "plots/tsne.png"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "features")] == ["features/test.parquet"]
    assert run.data.metrics["kmeans_norm_inertia"] > 0 and 0.0 <= run.data.metrics["linear_probe_acc"] <= 1.0

    # Re-evaluation from the run id: the checkpoint artifact is downloaded, and the metrics are
    # logged under the evaluation version, beside (never over) the training-time ones.
    out_json = tmp_path / "reeval.json"
    assert cli.main(["evaluate", "--run-id", run.info.run_id, "--n-init", "4", "--k", "12",
                     "--json", str(out_json)]) == 0
    assert f"logged to MLflow run {run.info.run_id} as eval/k12-n4-s0/" in capsys.readouterr().out
    assert len(client.get_metric_history(run.info.run_id, "kmeans_norm_acc")) == 1
    (value,) = client.get_metric_history(run.info.run_id, "eval/k12-n4-s0/kmeans_norm_acc")
    assert value.value == pytest.approx(json.loads(out_json.read_text())["kmeans_norm_acc"])
    assert "eval/k12-n4-s0/plots/confusion.png" in {
        a.path for a in client.list_artifacts(run.info.run_id, "eval/k12-n4-s0/plots")}


def test_bad_input_exits_2_before_ray_and_mlflow(tracking_uri, tmp_path, capsys):
    code = cli.main(["train", "--preset", "simclr_digits", "batch_size=100000", "tracking.experiment=bad"])
    assert code == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "larger than the training set" in err
    missing = cli.main(["train", "data.name=cifar10", f"--data-root={tmp_path}"])
    assert missing == 2
    assert str(tmp_path / "cifar-10-batches-py") in capsys.readouterr().err
    assert MlflowClient(tracking_uri).get_experiment_by_name("bad") is None


def test_mixem_stage_two_from_an_mlflow_run(ray_local, tracking_uri, tmp_path):
    common = ["optim.warmup_epochs=0", "model.cnn_width=8", "eval.kmeans_n_init=2", "batch_size=128",
              f"storage_path={tmp_path / 'ray'}", "tracking.experiment=two-stage"]
    base = f"base-{uuid.uuid4().hex[:8]}"
    assert cli.main(["train", "--preset", "simclr_digits", "epochs=1", *common, "--run-name", base]) == 0
    client = MlflowClient(tracking_uri)
    exp_id = client.get_experiment_by_name("two-stage").experiment_id
    (base_run,) = client.search_runs([exp_id])

    stage2 = f"mixem-{uuid.uuid4().hex[:8]}"
    # Two workers: DDP over gloo, metrics all-reduced across ranks; both ask Ray Train for a
    # preemption notice every 3 steps (a collective call, answered "none" here).
    assert cli.main(["train", "--preset", "mixem_digits", "epochs=2", "resources.num_workers=2", *common,
                     "resources.preemption_check_steps=3", "--run-name", stage2,
                     "--init-from", base_run.info.run_id]) == 0
    (run,) = client.search_runs([exp_id], filter_string=f"tags.`clusterlab.run_name` = '{stage2}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["init_from"] == base_run.info.run_id and run.data.tags["method"] == "mixem"
    for key in ("train_loss_comp_ent", "train_loss_inst_ent", "train_loss_push", "train_loss_pull",
                "component_entropy", "nonempty_components"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in ("maxcomp_acc", "kmeans_mixinit_acc", "kmeans_norm_acc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert "clusterlab.preemption_checkpoint" not in run.data.tags  # no notice, no mid-epoch checkpoint
    assert "plots/component_usage.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}


def test_init_from_garbage_is_refused_before_training(tracking_uri, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["train", "--preset", "mixem_digits", "--init-from", str(bad)]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "mixem_digits", "--init-from", "no-such-thing"]) == 2
    assert "neither an existing checkpoint path nor an MLflow run id" in capsys.readouterr().err


def test_finished_run_name_is_never_reopened(tracking_uri, tmp_path):
    from clusterlab.config import load_config
    from clusterlab.platform import tracking

    cfg = load_config(None, ["tracking.experiment=reopen"], preset="simclr_digits")
    client = tracking.client_for(cfg)
    run_id, resumed = tracking.start_run(client, cfg, "same-name")
    assert not resumed
    assert tracking.start_run(client, cfg, "same-name") == (run_id, True)  # died while RUNNING: resume
    changed = load_config(None, ["tracking.experiment=reopen", "optim.lr=1e-3"], preset="simclr_digits")
    with pytest.raises(ValueError, match="different config"):
        tracking.start_run(client, changed, "same-name")
    tracking.end_run(client, run_id, "FINISHED")
    with pytest.raises(ValueError, match="already finished"):
        tracking.start_run(client, cfg, "same-name")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_rotnet_then_lsdc_through_ray(ray_local, tracking_uri, tmp_path):
    """LSD-C's two stages on digits: RotNet pretraining, then LSD-C from its MLflow run."""
    common = ["model.cnn_width=8", "eval.kmeans_n_init=2", "batch_size=128", f"storage_path={tmp_path / 'ray'}",
              "tracking.experiment=lsdc", "eval.raw_pixels_baseline=false"]
    rot = f"rot-{uuid.uuid4().hex[:8]}"
    assert cli.main(["train", "--preset", "rotnet_digits", "epochs=2", *common, "--run-name", rot]) == 0
    client = MlflowClient(tracking_uri)
    exp_id = client.get_experiment_by_name("lsdc").experiment_id
    (rot_run,) = client.search_runs([exp_id])
    assert [m.step for m in client.get_metric_history(rot_run.info.run_id, "rotation_acc")] == [1, 2]

    lsdc = f"lsdc-{uuid.uuid4().hex[:8]}"
    assert cli.main(["train", "--preset", "lsdc_digits", "epochs=2", *common, "--run-name", lsdc,
                     "--init-from", rot_run.info.run_id]) == 0
    (run,) = client.search_runs([exp_id], filter_string=f"tags.`clusterlab.run_name` = '{lsdc}'")
    assert run.info.status == "FINISHED" and run.data.tags["init_from"] == rot_run.info.run_id
    for key in ("train_loss_clustering", "train_loss_consistency", "rampup_weight", "adjacency_density"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in ("head_acc", "head_nmi", "head_ari", "head_confident_share", "kmeans_norm_acc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    # The ramp-up (T = 30 epochs) is logged as the mean weight of each epoch's steps: increasing.
    weights = [m.value for m in client.get_metric_history(run.info.run_id, "rampup_weight")]
    assert weights[0] < weights[1] < 5.0


def test_excb_with_two_workers_through_ray(ray_local, tracking_uri, tmp_path):
    """ExCB through Ray Train with two DDP workers (gloo): s is all-reduced, so both ranks
    balance alike; the cluster-size readings (supplementary Fig. 1) land in MLflow."""
    name = f"excb-{uuid.uuid4().hex[:8]}"
    assert cli.main(["train", "--preset", "excb_digits", "epochs=2", "optim.warmup_epochs=1", "model.cnn_width=8",
                     "excb.num_clusters=20",
                     "resources.num_workers=2", "eval.kmeans_n_init=2", "eval.raw_pixels_baseline=false",
                     f"storage_path={tmp_path / 'ray'}", "tracking.experiment=excb", "--run-name", name]) == 0
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("excb").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["resources.num_workers"] == "2"
    for key in ("train_loss_projector", "train_loss_predictor", "teacher_momentum", "empty_clusters",
                "largest_cluster", "val_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    momenta = [m.value for m in client.get_metric_history(run.info.run_id, "teacher_momentum")]
    assert 0.99 <= momenta[0] < momenta[1] < 1.0  # cosine schedule from excb.teacher_momentum towards 1
    for key in ("head_acc", "head_nmi", "head_empty_clusters", "kmeans_norm_acc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    assert run.data.metrics["head_largest_relative_size"] >= 1.0  # relative size N_c K / N: at least 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/cluster_sizes.png" in artifacts
