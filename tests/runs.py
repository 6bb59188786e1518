"""Helpers for tests that run ``clusterlab`` commands as subprocesses and read back what they left."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

# A quick SimCLR run on the bundled digits.
DIGITS = ["--preset", "simclr_digits", "optim.warmup_epochs=0", "eval.kmeans_n_init=2",
          "eval.raw_pixels_baseline=false", "eval.embedding_baselines=false"]


def run_named(client: MlflowClient, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`clusterlab.run_name` = '{run_name}'")
    return runs[0] if runs else None


def registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a checkpoint of the run. A report
    the controller had not yet registered when the worker died is not resumed from (the run
    then restarts from the checkpoint before it), so the kill waits for this."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def descendants(pid: int) -> list[psutil.Process]:
    """Every process ``pid`` started, Ray's included (its head processes are children of the
    driver, its workers children of the raylet)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
