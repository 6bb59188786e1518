"""Faults injected into real runs: a training worker SIGKILLed mid-epoch, a host out of
memory, processes killed while writing checkpoints and feature files.

Each test is a row of RELIABILITY.md (tests/reliability_report.py). The sweep-level faults
(driver killed, Ctrl+C and SIGTERM, NaN trial, interrupted re-evaluation) are in tests/test_sweep_e2e.py,
the tracking-server outage in tests/test_tracking_faults.py, bad input in
tests/test_invalid_input.py, interrupts of a single run in tests/test_interrupts.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli
from clusterlab.eval.feature_files import read_features
from clusterlab.trainers.checkpoint import read_checkpoint, read_history
from runs import DIGITS, registered_checkpoint, run_named

pytestmark = [pytest.mark.faults]

@pytest.mark.ray
@pytest.mark.reliability("training worker SIGKILLed mid-epoch (max_failures=1)",
                         "run restarted once from its last checkpoint, final checkpoint at the configured epoch, "
                         "every epoch step in MLflow exactly once, run FINISHED")
def test_a_killed_worker_resumes_from_its_last_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": uri}
    epochs = 4
    proc = subprocess.Popen(
        [sys.executable, "-m", "clusterlab.cli", "train", *DIGITS, f"epochs={epochs}", "batch_size=32",
         "resources.max_failures=1", f"storage_path={tmp_path / 'ray'}", "tracking.experiment=faults",
         "--run-name", "killed-worker"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = MlflowClient(uri)
    try:
        deadline = time.monotonic() + 240
        while True:  # wait until Ray Train has registered a checkpoint, then kill during the next epoch
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            run = run_named(client, "faults", "killed-worker")
            if run is not None and registered_checkpoint(tmp_path / "ray" / "killed-worker"):
                break
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in workers]
        time.sleep(0.3)
        workers[0].send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "restarting from its latest checkpoint (retry 1 of resources.max_failures=1)" in out

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["clusterlab.train_attempts"] == "2"
    assert 1 <= int(run.data.tags["clusterlab.resumed_from_epoch"]) < epochs  # resumed, not restarted
    for key in ("lr", "train_loss", "val_loss", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    checkpoint = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path / "final")))
    assert read_checkpoint(checkpoint)["epochs_done"] == epochs
    assert [h["epoch"] for h in read_history(checkpoint)] == list(range(1, epochs + 1))


@pytest.mark.ray
@pytest.mark.reliability("host out of memory in a training worker (max_failures=2)",
                         "run FAILED at once (1 attempt, not retried), failure_reason 'out of memory' naming "
                         "batch_size and the model size to change, exit code 1")
def test_out_of_memory_is_reported_and_not_retried(ray_local, tracking_uri, tmp_path, capsys):
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1: the huge allocation would succeed and wake the OOM killer instead")
    # A 200,000-channel CNN asks for terabytes for one conv weight: a real failed host allocation.
    code = cli.main(["train", *DIGITS, "epochs=1", "batch_size=64", "model.cnn_width=200000",
                     "resources.max_failures=2", f"storage_path={tmp_path / 'ray'}", "tracking.experiment=oom",
                     "--run-name", "oom"])
    assert code == 1
    err = capsys.readouterr().err
    assert "out of host memory" in err and "batch_size" in err and "model.cnn_width=200000" in err
    run = run_named(MlflowClient(tracking_uri), "oom", "oom")
    assert run.info.status == "FAILED"
    assert run.data.tags["clusterlab.train_attempts"] == "1"
    assert run.data.tags["failure_reason"].startswith("out of memory: ")


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from clusterlab.config import load_config
    from clusterlab.trainers import DataMeta, build_method
    from clusterlab.trainers.checkpoint import save_checkpoint
    from clusterlab.trainers.optim import build_optimizer, build_scheduler
    from clusterlab.eval.feature_files import write_features

    target = sys.argv[2]
    if sys.argv[1] == "checkpoint":
        cfg = load_config(None, ["model.cnn_width=96"], preset="simclr_digits")
        meta = DataMeta(10, 16, (0.5,) * 3, (0.25,) * 3)
        method = build_method(cfg, meta)
        optimizer = build_optimizer(cfg.optim, method.parameters())
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.epochs, 10)
        for epoch in range(1, 10_000):
            history = [{"epoch": float(e), "lr": 0.1} for e in range(1, epoch + 1)]
            save_checkpoint(target, method=method, optimizer=optimizer, scheduler=scheduler, epochs_done=epoch,
                            meta=meta, history=history)
            print(epoch, flush=True)
    else:
        rng = np.random.default_rng(0)
        print("writing", flush=True)
        write_features(target, ({"index": np.arange(i * 2_000, (i + 1) * 2_000),
                                 "representation": rng.standard_normal((2_000, 512)).astype(np.float32),
                                 "label": np.zeros(2_000, dtype=np.int64)} for i in range(50)))
        print("done", flush=True)
""")


def _kill_after_lines(tmp_path: Path, kind: str, target: Path, lines: int, delay_s: float) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True)
    seen = [proc.stdout.readline().strip() for _ in range(lines)]
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen + [line.strip() for line in proc.stdout.read().splitlines()]


@pytest.mark.reliability("process SIGKILLed while writing a checkpoint / a features file",
                         "previous checkpoint (weights, history, config) still readable after kills at 3 offsets; "
                         "a killed features write leaves no file under its name, and a rerun writes it")
def test_a_kill_during_a_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "ckpt"
    for delay_s in (0.0, 0.05, 0.13):  # different moments within the next write
        written = _kill_after_lines(tmp_path, "checkpoint", target, lines=2, delay_s=delay_s)
        last = int(written[-1])
        state = read_checkpoint(target)  # never half a file
        assert state["epochs_done"] in (last, last + 1)
        history = read_history(target)
        assert len(history) in (last, last + 1) and history[-1]["epoch"] == len(history)
        assert "simclr" in (target / "config.yaml").read_text()

    features = tmp_path / "features" / "test.parquet"
    assert _kill_after_lines(tmp_path, "features", features, lines=1, delay_s=0.3) == ["writing"]
    assert not features.exists()  # only the temporary file can be half-written
    subprocess.run([sys.executable, "-c", WRITER, "features", str(features)], check=True, capture_output=True)
    assert read_features(features)["representation"].shape == (100_000, 512)

