"""SIGINT and SIGTERM end every command the same way (clusterlab/platform/interrupts.py).

The unit tests send real signals to this process; the end-to-end test interrupts
`clusterlab train` subprocesses at each phase (start-up, training, evaluation) with each
signal and resumes them. The sweep phase is in tests/test_sweep_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from clusterlab.platform.interrupts import (
    Interrupted,
    around_ray_init,
    as_interrupted,
    call_off_main_thread,
    catch_signals,
    reclaim_signals,
    stop_tune_gracefully,
)
from clusterlab.trainers.checkpoint import read_checkpoint
from runs import DIGITS, descendants, registered_checkpoint, run_named


def _wait_for_signal() -> None:
    """A main thread busy in Python code, as a training driver waiting on Ray would be."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError("no signal arrived")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_each_signal_raises_interrupted_naming_it_and_the_handlers_are_restored(signum, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as caught, catch_signals():
        os.kill(os.getpid(), signum)
        _wait_for_signal()
    assert caught.value.signum == signum and caught.value.exit_code == code
    assert str(caught.value) == f"interrupted by {signal.Signals(signum).name}"
    assert isinstance(caught.value, KeyboardInterrupt)  # `except KeyboardInterrupt` code sees SIGTERM too
    assert {s: signal.getsignal(s) for s in before} == before


class _SignalledWhileCollected:
    """Python only reports an exception raised in ``__del__`` ("Exception ignored in ..."), as it
    does in the at-fork hook where a Ctrl+C landed while ``ray.init`` spawned its processes (CI)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for_signal()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the report is the point
@pytest.mark.parametrize("checkpoint", ["after ray.init", "after fit"])
def test_a_signal_swallowed_where_exceptions_are_only_reported_is_raised_at_the_next_checkpoint(checkpoint):
    with pytest.raises(Interrupted) as caught, catch_signals():
        _SignalledWhileCollected()  # collected at once: the handler's Interrupted is reported and dropped
        if checkpoint == "after ray.init":
            reclaim_signals()
        else:
            call_off_main_thread(lambda: None)
    assert caught.value.signum == signal.SIGINT
    with catch_signals():  # the next command starts clean
        reclaim_signals()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_inside_ray_init_is_delivered_again_until_it_interrupts():
    """What hung a command whose ray.init then blocked on a Ray killed by the same signal: the
    swallowed signal comes back to the main thread while it is still blocked inside."""
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler
    started = time.monotonic()
    with pytest.raises(Interrupted) as caught, catch_signals(), around_ray_init(interval_s=0.2):
        ray_utils.set_sigterm_handler(lambda signum, frame: None)  # ray.init's first step: kept out
        assert signal.getsignal(signal.SIGTERM).__name__ == "_raise_interrupted"  # ours stays
        _SignalledWhileCollected()  # the signal lands where its Interrupted is only reported
        time.sleep(30)  # blocked, as on a dead GCS: only a delivery again ends it
    assert caught.value.signum == signal.SIGINT and time.monotonic() - started < 10
    assert ray_utils.set_sigterm_handler is install  # Ray's own installer is back for everyone else


def test_a_plain_keyboard_interrupt_is_a_sigint():
    assert as_interrupted(KeyboardInterrupt()).exit_code == 130


def test_work_off_the_main_thread_returns_its_value_raises_its_error_and_stays_interruptible():
    assert call_off_main_thread(lambda: threading.current_thread().name) == "clusterlab-fit"
    with pytest.raises(ZeroDivisionError):
        call_off_main_thread(lambda: 1 / 0)
    release = threading.Event()
    with pytest.raises(Interrupted) as caught, catch_signals():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        call_off_main_thread(lambda: release.wait(10))  # stands for Ray Train's fit
    release.set()
    assert caught.value.signum == signal.SIGTERM


def test_a_sweep_stops_through_tunes_graceful_path_then_a_second_signal_stops_it_at_once():
    stop_requests = []  # Tune's fit installs its graceful-stop handler for SIGUSR1
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: stop_requests.append(signum))
    try:
        with catch_signals(), stop_tune_gracefully() as stopped_by:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # both signals take one path
            assert stopped_by() is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert stop_requests == [signal.SIGUSR1]
            assert stopped_by().signum == signal.SIGTERM
            with pytest.raises(Interrupted) as caught:
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for_signal()
            assert caught.value.signum == signal.SIGINT
        assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)


def test_a_sweep_signalled_before_tune_listens_is_interrupted_at_once():
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the default action would kill the process
    try:
        with pytest.raises(Interrupted), catch_signals(), stop_tune_gracefully():
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for_signal()
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)


def _started(proc: subprocess.Popen, name: str) -> bool:
    """Whether a process of the command runs ``name`` (short-lived ones may be gone or zombies)."""
    for child in descendants(proc.pid):
        try:
            if name in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def _interrupt(proc: subprocess.Popen, ready, signum: int, what: str) -> str:
    """Wait until ``ready()``, then send ``signum`` the way it comes in practice: SIGINT to the
    whole process group (a terminal's Ctrl+C), SIGTERM to the command alone (``kill PID``).
    Returns the output; asserts that no process the command started is left."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"not {what} in time"
        time.sleep(0.2)
    tree = descendants(proc.pid)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        out = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"{what}: processes left after {signal.Signals(signum).name}: {[p.cmdline() for p in alive]}"
    return out


@pytest.mark.ray
@pytest.mark.reliability("SIGINT / SIGTERM while starting Ray, while training, while evaluating, then the same command",
                         "exit 130 (SIGINT) / 143 (SIGTERM) at each phase, no process of the command left, run KILLED "
                         "with failure_reason naming the signal, registered checkpoints readable; the same command "
                         "resumes from the last checkpoint (every epoch step once) and ends FINISHED with the "
                         "interruption kept as clusterlab.resumed_after")
# One sequence in `make test`, the other in `make test-faults`: about 2 minutes each on 2 cores.
@pytest.mark.parametrize("signals", [("SIGINT", "SIGTERM", "SIGINT"),
                                     pytest.param(("SIGTERM", "SIGINT", "SIGTERM"), marks=pytest.mark.faults)],
                         ids=["int-term-int", "term-int-term"])
def test_an_interrupt_at_any_phase_ends_the_run_killed_and_the_same_command_resumes(tmp_path, signals):
    start_up, training, evaluation = (getattr(signal, s) for s in signals)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": uri}
    epochs = 3
    # Enough K-means restarts that evaluation lasts a few seconds after the checkpoint is logged.
    command = [sys.executable, "-m", "clusterlab.cli", "train", *DIGITS, f"epochs={epochs}", "batch_size=32",
               "eval.kmeans_n_init=1000", f"storage_path={tmp_path / 'ray'}", "tracking.experiment=interrupts",
               "--run-name", "stopped"]
    client = MlflowClient(uri)

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def expect_killed(proc: subprocess.Popen, out: str, signum: int) -> None:
        name = signal.Signals(signum).name
        assert proc.returncode == 128 + signum, out[-3000:]
        assert f"clusterlab: interrupted by {name}" in out
        run = run_named(client, "interrupts", "stopped")
        assert run.info.status == "KILLED"
        assert run.data.tags["failure_reason"].startswith(f"interrupted: {name} received")

    # 1. Start-up: Ray's own processes are being started (ray.init installs its SIGTERM handler).
    proc = start()
    out = _interrupt(proc, lambda: _started(proc, "gcs_server"),
                     start_up, "Ray starting")
    assert proc.returncode == 128 + start_up, out[-3000:]
    run = run_named(client, "interrupts", "stopped")
    assert run is None or run.info.status == "KILLED"  # the run is created once Ray is up

    # 2. Training: after a checkpoint is registered, during a later epoch.
    proc = start()
    out = _interrupt(proc, lambda: registered_checkpoint(tmp_path / "ray" / "stopped"), training, "a checkpoint")
    expect_killed(proc, out, training)
    epochs_done = read_checkpoint(tmp_path / "ray" / "stopped" / json.loads(
        (tmp_path / "ray" / "stopped" / "checkpoint_manager_snapshot.json").read_text()
    )["latest_checkpoint_result"]["checkpoint_dir_name"])["epochs_done"]
    assert 1 <= epochs_done <= epochs

    # 3. Evaluation: the resumed run has logged its final checkpoint and is clustering.
    proc = start()

    def evaluating() -> bool:
        run = run_named(client, "interrupts", "stopped")
        return run.info.status == "RUNNING" and any(a.path == "checkpoint" for a in client.list_artifacts(run.info.run_id))

    out = _interrupt(proc, evaluating, evaluation, "evaluation")
    expect_killed(proc, out, evaluation)
    assert "resuming run 'stopped'" in out

    # 4. The same command once more: nothing trained twice, evaluated, FINISHED.
    proc = start()
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out[-3000:]
    run = run_named(client, "interrupts", "stopped")
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags
    assert run.data.tags["clusterlab.resumed_after"].startswith(f"interrupted: {signals[2]} received")
    assert "kmeans_norm_acc" in run.data.metrics  # evaluated once more, in full
    for key in ("lr", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, epochs + 1))
    checkpoint = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path / "final")))
    assert read_checkpoint(checkpoint)["epochs_done"] == epochs
