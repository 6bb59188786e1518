"""A real sweep under faults: Ray Tune over Ray Train on digits, checked in a real MLflow store.

The sweep runs as `clusterlab sweep` subprocesses (each with its own local Ray), so that it can
be interrupted like a user or a machine would do it:

1. Ctrl+C (SIGINT to the process group) after the first finished trial: Tune saves its state,
   runs end KILLED naming the signal, exit 130;
2. `--resume`, then SIGTERM mid-trial: the same, exit 143;
3. `--resume`, then the whole process group SIGKILLed mid-trial (a dead driver and its Ray);
   `clusterlab runs reconcile` marks the runs it left RUNNING as FAILED;
4. `--resume` again finishes the grid: one parent, one child per grid point, no step twice.

Two grid points have a loss weight of 1e38: their loss overflows at once, they fail with
failure_reason "non-finite loss", are not retried (max_failures=1 is set), and their heatmap
cells read "failed". Then the heatmap and batch re-evaluation, including one killed mid-way
and resumed, which must end with the same rows as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli

pytestmark = [pytest.mark.ray, pytest.mark.faults]

NAME = "grid-e2e"
EPOCHS = 3
SPACE = f"""\
name: {NAME}
base: mixem_digits
overrides: {{epochs: {EPOCHS}, batch_size: 128, model.cnn_width: 8, optim.warmup_epochs: 0, eval.kmeans_n_init: 2,
            eval.raw_pixels_baseline: false}}
search:
  lambda_3: {{grid: [0.0, 0.1]}}
  lambda_4: {{grid: [0.0, 1.0e+38]}}     # 1e38: the loss overflows in the first epoch
tune: {{metric: val_loss, mode: min, max_concurrent_trials: 1}}
resources: {{num_workers: 1, cpus_per_worker: 1, max_failures: 1}}
"""
NAN_WEIGHT = "1e+38"


def _sweep(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clusterlab.cli", "sweep", str(tmp_path / "space.yaml"),
                             f"storage_path={tmp_path / 'ray'}", *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(NAME)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _children(client: MlflowClient) -> list:
    return [r for r in _runs(client) if "mlflow.parentRunId" in r.data.tags]


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout_s: float = 400, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        time.sleep(poll_s)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep's driver and every process it started (Ray's head, the trial actors and
    Train workers, some of which Ray puts in process groups of their own), as a lost machine
    would, and wait until none of them is left."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"processes of the killed sweep are still alive: {alive}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.reliability("sweep: Ctrl+C, then SIGTERM mid-trial, then driver SIGKILLed, then --resume each time",
                         "Ctrl+C: exit 130, SIGTERM: exit 143, each time state saved, no run RUNNING, parent and "
                         "stopped trials KILLED naming the signal; after the kill `runs reconcile` marks the dead "
                         "runs FAILED; resume: trials = grid size, finished trials not re-run, parent reused, no "
                         "child run duplicated, every epoch step once")
@pytest.mark.reliability("NaN / Inf loss in one trial of a sweep (max_failures=1)",
                         "trial FAILED at epoch 1 with failure_reason 'non-finite loss', 1 attempt (not retried, "
                         "also not on --resume), other trials finish, heatmap cell 'failed' (not 0)")
@pytest.mark.reliability("batch re-evaluation killed mid-way and run again",
                         "same rows (metric values) as an uninterrupted re-evaluation with the same seed, each "
                         "eval metric logged once; a second run is a no-op; a broken checkpoint is skipped")
def test_grid_sweep_interrupted_killed_and_resumed(ray_local, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": uri}
    client = MlflowClient(uri)

    # 1. Ctrl+C after the first finished trial.
    first = _sweep(tmp_path, env)
    _wait_for(first, lambda: any(r.info.status == "FINISHED" for r in _children(client)), "a trial finished")
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl+C sends, to the whole process group
    _expect_interrupted(client, first, signal.SIGINT)
    (parent_id,) = [r.info.run_id for r in _runs(client) if r.data.tags.get("clusterlab.role") == "parent"]

    # Starting it again without --resume is refused: results are never overwritten.
    again = _sweep(tmp_path, env)
    assert again.wait(timeout=120) == 2
    assert "already exists" in again.stdout.read()

    def training() -> bool:
        # Mid-trial: an epoch logged and the run not ended, its final evaluation included (a
        # 3-epoch digits trial can train its epochs between two polls, but not its evaluation).
        return any(r.info.status == "RUNNING" and len(client.get_metric_history(r.info.run_id, "lr")) >= 1
                   for r in _children(client))

    # 2. Resume, then SIGTERM the command (`kill PID`, a scheduler's stop) while a trial trains.
    stopped = _sweep(tmp_path, env, "--resume")
    _wait_for(stopped, training, "a resumed trial was training")
    stopped.send_signal(signal.SIGTERM)
    _expect_interrupted(client, stopped, signal.SIGTERM)

    # 3. Resume, then kill everything mid-trial (an epoch logged, the trial not ended).
    resumed = _sweep(tmp_path, env, "--resume")
    _wait_for(resumed, training, "a resumed trial was training")
    finished = {r.info.run_id: _history(client, r.info.run_id, "val_loss")
                for r in _children(client) if r.info.status == "FINISHED"}
    _kill_group(resumed)
    running = {r.info.run_id for r in _runs(client) if r.info.status == "RUNNING"}
    assert parent_id in running and len(running) >= 2  # the parent and the trial the kill interrupted
    capsys.readouterr()
    assert cli.main(["runs", "reconcile", "--experiment", NAME, "--tracking-uri", uri]) == 0
    assert f"{len(running)} RUNNING runs: {len(running)} marked FAILED" in capsys.readouterr().out
    for run_id in running:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("process died: owner ")

    # 4. Resume to the end, as a retried job would: `--resume auto` finds the sweep and continues it.
    last = _sweep(tmp_path, env, "--resume", "auto")
    out = last.communicate(timeout=900)[0]
    assert last.returncode == 0, out[-3000:]
    assert f"--resume auto: sweep '{NAME}' exists; continuing it" in out
    assert "best trial" in out and "heatmap" in out and "4 trials, 2 failed" in out

    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get("clusterlab.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent_id]  # the parent is reused
    assert len(children) == 4  # exactly the grid, nothing run twice
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_trials"] == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent_id}
    # The UI names each trial by its searched values; the standard tags fill its Source column.
    for child in children:
        shown = re.fullmatch(r"push=(\S+) pull=(\S+) \[(\w+)\]", child.info.run_name)
        assert shown, child.info.run_name
        assert [float(shown[1]), float(shown[2])] == [float(child.data.params[f"loss.weights.{k}"])
                                                      for k in ("push", "pull")]
        assert shown[3] == child.data.tags["clusterlab.trial_id"]
        assert child.data.tags["mlflow.source.name"] == "clusterlab sweep"
        assert child.data.tags["git_commit"] == child.data.tags["mlflow.source.git.commit"] == \
            parents[0].data.tags["git_commit"]  # the sweep's commit, not whatever a trial found checked out
    assert parent.data.tags["mlflow.source.name"] == "clusterlab sweep" and "mlflow.user" in parent.data.tags
    grid = Counter((c.data.params["loss.weights.push"], c.data.params["loss.weights.pull"]) for c in children)
    assert grid == Counter({("0.0", "0.0"): 1, ("0.0", NAN_WEIGHT): 1, ("0.1", "0.0"): 1, ("0.1", NAN_WEIGHT): 1})
    for run_id, val_loss in finished.items():  # finished before the kill: not re-run, nothing added
        assert _history(client, run_id, "val_loss") == val_loss
    good = [c for c in children if c.data.params["loss.weights.pull"] != NAN_WEIGHT]
    for child in good:
        assert child.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "train_loss_push", "component_entropy"):
            steps = [step for step, _ in _history(client, child.info.run_id, key)]
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)  # no duplicated steps after the resumes
        assert {"kmeans_norm_acc", "kmeans_mixinit_acc", "maxcomp_acc"} <= set(child.data.metrics)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"checkpoint", "features", "config.yaml"}

    # The parent: search space, base config, the best trial by validation loss, the heatmap.
    parent_artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"search_space.yaml", "base_config.yaml", "heatmap"} <= parent_artifacts
    best = min(good, key=lambda c: c.data.metrics["val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])
    _check_nan_trials(client, children, tmp_path, uri)
    _check_reeval_resume(client, good, tmp_path, uri, env, capsys)


def _expect_interrupted(client: MlflowClient, proc: subprocess.Popen, signum: int) -> None:
    """Tune stopped the trials and saved its state: exit 128 + signal, the --resume line, no run
    left RUNNING, the parent and the stopped trials KILLED with the signal as failure_reason."""
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 128 + signum, out[-3000:]
    assert "--resume" in out
    runs = _runs(client)
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in runs)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert any(r.data.tags.get("clusterlab.role") == "parent" for r in killed)
    for run in killed:
        assert run.data.tags["failure_reason"].startswith(f"interrupted: {signal.Signals(signum).name} received")


def _check_nan_trials(client: MlflowClient, children: list, tmp_path: Path, uri: str) -> None:
    bad = [c for c in children if c.data.params["loss.weights.pull"] == NAN_WEIGHT]
    for child in bad:
        assert child.info.status == "FAILED"
        assert child.data.tags["failure_reason"].startswith("non-finite loss: ")
        assert "loss.weights" in child.data.tags["failure_reason"]
        assert child.data.tags["clusterlab.train_attempts"] == "1"
        assert client.get_metric_history(child.info.run_id, "lr") == []  # it stopped inside epoch 1
    # Heatmap: CSV cells equal the child runs' metric values; the NaN cells say failed.
    out_png = tmp_path / "hm.png"
    assert cli.main(["heatmap", "--experiment", NAME, "--x", "lambda_3", "--y", "lambda_4",
                     "--metric", "kmeans_mixinit_acc", "--out", str(out_png), "--tracking-uri", uri]) == 0
    assert out_png.stat().st_size > 0
    rows = list(csv.DictReader(out_png.with_suffix(".csv").open()))
    assert len(rows) == 4
    for row in rows:
        (child,) = [c for c in children if float(c.data.params["loss.weights.push"]) == float(row["loss.weights.push"])
                    and float(c.data.params["loss.weights.pull"]) == float(row["loss.weights.pull"])]
        if child in bad:
            assert row["status"] == "failed" and row["kmeans_mixinit_acc_mean"] == ""
        else:
            assert float(row["kmeans_mixinit_acc_mean"]) == pytest.approx(child.data.metrics["kmeans_mixinit_acc"])
            assert row["status"] == "ok" and row["n_runs"] == "1"


def _eval_metrics(client: MlflowClient, runs: list, version: str) -> dict[str, dict[str, list[float]]]:
    prefix = f"eval/{version}/"
    return {r.info.run_id: {k: [m.value for m in client.get_metric_history(r.info.run_id, k)]
                            for k in client.get_run(r.info.run_id).data.metrics if k.startswith(prefix)}
            for r in runs}


def _check_reeval_resume(client: MlflowClient, good: list, tmp_path: Path, uri: str, env: dict, capsys) -> None:
    # The reference: an uninterrupted re-evaluation of a copy of the store.
    shutil.copy(tmp_path / "mlflow.db", tmp_path / "reference.db")
    reference_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    assert cli.main(["reeval", "--experiment", NAME, "--n-init", "3", "--no-plots", "--tracking-uri",
                     reference_uri]) == 0
    expected = _eval_metrics(MlflowClient(reference_uri), good, "kC-n3-s0")
    assert all(len(v) == 1 for metrics in expected.values() for v in metrics.values()) and expected

    # Killed as soon as the first run has logged its metrics (its plots and done-tag still to come).
    proc = subprocess.Popen([sys.executable, "-m", "clusterlab.cli", "reeval", "--experiment", NAME, "--n-init", "3",
                             "--tracking-uri", uri], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for(proc, lambda: any(_eval_metrics(client, good, "kC-n3-s0").values()), "a run's metrics were logged",
              timeout_s=300, poll_s=0.25)
    _kill_group(proc)
    done_before = [r for r in good if "clusterlab.eval/kC-n3-s0" in client.get_run(r.info.run_id).data.tags]
    assert len(done_before) < len(good), "the re-evaluation finished before it could be interrupted"

    capsys.readouterr()
    assert cli.main(["reeval", "--experiment", NAME, "--n-init", "3", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"{len(good) - len(done_before)} evaluated, {len(done_before)} already evaluated" in out
    assert _eval_metrics(client, good, "kC-n3-s0") == expected  # same values, each logged once
    assert cli.main(["reeval", "--experiment", NAME, "--n-init", "3", "--no-plots", "--tracking-uri", uri]) == 0
    assert f"0 evaluated, {len(good)} already evaluated" in capsys.readouterr().out
    for child in good:
        history = client.get_metric_history(child.info.run_id, "eval/kC-n3-s0/kmeans_norm_acc")
        assert len(history) == 1 and not math.isnan(history[0].value)

    # A broken checkpoint is reported and skipped; the other runs are untouched.
    exp_id = client.get_experiment_by_name(NAME).experiment_id
    broken = client.create_run(exp_id, run_name="broken").info.run_id
    garbage = tmp_path / "garbage" / "checkpoint.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    client.log_artifact(broken, str(garbage), "checkpoint")
    client.set_terminated(broken, "FINISHED")
    assert cli.main(["reeval", "--experiment", NAME, "--n-init", "3", "--no-plots", "--tracking-uri", uri]) == 1
    out = capsys.readouterr().out
    assert f"0 evaluated, {len(good)} already evaluated, 1 failed" in out and "broken" in out
