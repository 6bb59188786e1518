"""A real sweep: Ray Tune over Ray Train on digits, interrupted with Ctrl+C, resumed, and
checked in a real MLflow store; then its heatmap and a batch re-evaluation.

The sweep runs as a `clusterlab sweep` subprocess (its own local Ray) so that it can be
interrupted like a user would: SIGINT, which Tune answers by saving its state.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli

pytestmark = pytest.mark.ray

SPACE = """\
name: grid-e2e
base: mixem_digits
overrides: {epochs: 2, batch_size: 128, model.cnn_width: 8, optim.warmup_epochs: 0, eval.kmeans_n_init: 2,
            eval.raw_pixels_baseline: false}
search:
  lambda_3: {grid: [0.0, 0.1]}
  lambda_4: {grid: [0.0, 0.1]}
tune: {metric: val_loss, mode: min, max_concurrent_trials: 1}
resources: {num_workers: 1, cpus_per_worker: 1}
"""


def _sweep(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clusterlab.cli", "sweep", str(tmp_path / "space.yaml"),
                             f"storage_path={tmp_path / 'ray'}", *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_grid_sweep_interrupted_resumed_heatmap_and_reeval(ray_local, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": uri}
    client = MlflowClient(uri)

    first = _sweep(tmp_path, env)
    deadline = time.monotonic() + 400
    while not any(r.info.status == "FINISHED" for r in _children(client, "grid-e2e")):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(2)
    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the trials
    out = first.communicate(timeout=180)[0]
    assert first.returncode == 130, out[-3000:]
    assert "--resume" in out
    finished_before = {r.info.run_id for r in _children(client, "grid-e2e") if r.info.status == "FINISHED"}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in _children(client, "grid-e2e"))  # none left RUNNING

    # Starting it again without --resume is refused: results are never overwritten.
    again = _sweep(tmp_path, env)
    assert again.wait(timeout=120) == 2
    assert "already exists" in again.stdout.read()

    resumed = _sweep(tmp_path, env, "--resume")
    out = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "best trial" in out and "heatmap" in out

    exp = client.get_experiment_by_name("grid-e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clusterlab.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4  # exactly the grid, nothing run twice
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert finished_before <= {c.info.run_id for c in children}
    grid = Counter((c.data.params["loss.weights.push"], c.data.params["loss.weights.pull"]) for c in children)
    assert grid == Counter({("0.0", "0.0"): 1, ("0.0", "0.1"): 1, ("0.1", "0.0"): 1, ("0.1", "0.1"): 1})
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "train_loss_push", "component_entropy"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [1, 2], (key, steps)  # no duplicated steps after the resume
        assert {"kmeans_norm_acc", "kmeans_mixinit_acc", "maxcomp_acc"} <= set(child.data.metrics)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"checkpoint", "features", "config.yaml"}

    # The parent: search space, base config, the best trial by validation loss, the heatmap.
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.yaml", "base_config.yaml", "heatmap"} <= parent_artifacts
    best = min(children, key=lambda c: c.data.metrics["val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])

    # Heatmap CSV cells equal the child runs' metric values.
    out_png = tmp_path / "hm.png"
    assert cli.main(["heatmap", "--experiment", "grid-e2e", "--x", "lambda_3", "--y", "lambda_4",
                     "--metric", "kmeans_mixinit_acc", "--out", str(out_png), "--tracking-uri", uri]) == 0
    assert out_png.stat().st_size > 0
    rows = list(csv.DictReader(out_png.with_suffix(".csv").open()))
    assert len(rows) == 4
    for row in rows:
        (child,) = [c for c in children if float(c.data.params["loss.weights.push"]) == float(row["loss.weights.push"])
                    and float(c.data.params["loss.weights.pull"]) == float(row["loss.weights.pull"])]
        assert float(row["kmeans_mixinit_acc_mean"]) == pytest.approx(child.data.metrics["kmeans_mixinit_acc"])
        assert row["status"] == "ok" and row["n_runs"] == "1"

    # Batch re-evaluation: logs once per run; the second time is a no-op.
    capsys.readouterr()
    assert cli.main(["reeval", "--experiment", "grid-e2e", "--n-init", "3", "--no-plots", "--tracking-uri", uri]) == 0
    assert "4 evaluated" in capsys.readouterr().out
    assert cli.main(["reeval", "--experiment", "grid-e2e", "--n-init", "3", "--no-plots", "--tracking-uri", uri]) == 0
    assert "0 evaluated, 4 already evaluated" in capsys.readouterr().out
    for child in children:
        history = client.get_metric_history(child.info.run_id, "eval/kC-n3-s0/kmeans_norm_acc")
        assert len(history) == 1 and not math.isnan(history[0].value)

    # A broken checkpoint is reported and skipped; the other runs are untouched.
    broken = client.create_run(exp.experiment_id, run_name="broken").info.run_id
    garbage = tmp_path / "garbage" / "checkpoint.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    client.log_artifact(broken, str(garbage), "checkpoint")
    client.set_terminated(broken, "FINISHED")
    assert cli.main(["reeval", "--experiment", "grid-e2e", "--n-init", "3", "--no-plots", "--tracking-uri", uri]) == 1
    out = capsys.readouterr().out
    assert "0 evaluated, 4 already evaluated, 1 failed" in out and "broken" in out
