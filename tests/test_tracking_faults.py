"""Live: per-epoch metrics of concurrent Ray Tune trials through :class:`EpochLogger` to a real
`mlflow server` on a private PostgreSQL (tests/servers.py), with and without the server
crashing mid-sweep.

Each trial is a Ray Tune function trainable that creates its own MLflow run on the server,
logs ``STEPS`` steps of several metrics through ``tracking.EpochLogger``, waits for them in
``close()`` and reports to Tune what it saw (how many steps were still queued at worst, how
long ``close`` waited, the warnings it logged). The test then reads every metric history
back from the server. In the outage test the server's process group is SIGKILLed while the
trials log, left down for ``OUTAGE_S``, and started again on the same port and database.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from glob import glob
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import servers

pytestmark = [pytest.mark.faults, pytest.mark.ray]

TRIALS, STEPS = 8, 200
KEYS = ("train_loss", "val_loss", "lr", "progress")  # logged every step; "progress" = the step itself
OUTAGE_S = 30.0
FORBIDDEN = ("database is locked", "IntegrityError")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real `mlflow server` on a private PostgreSQL, for this module's tests: 2 uvicorn workers,
    as docker/compose.yaml deploys it (two processes writing to the database at once)."""
    try:
        with servers.postgres() as backend:
            server = servers.MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server"), workers=2)
            server.start()
            try:
                server.wait_healthy()
                yield server
            finally:
                server.stop()
    except servers.Unavailable as exc:
        servers.skip_loudly("tracking-server fault test", str(exc))


def _log_steps(config: dict) -> None:
    """A Tune trial: its own MLflow run, STEPS steps through EpochLogger at a steady pace."""
    import ray.tune

    from clusterlab.platform import tracking

    seen: list[str] = []  # every WARNING+ record of this trial process (the logger's, urllib3's retries)

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.created:.3f} {record.levelname} {record.name}: {record.getMessage()[:300]}")

    handler = Keep(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        client = MlflowClient(config["uri"])
        run_id = client.create_run(config["experiment_id"], run_name=f"trial-{config['trial']}").info.run_id
        logger = tracking.EpochLogger(client, run_id, step_key="train_loss")
        start, backlog = time.time(), []
        for step in range(1, config["steps"] + 1):
            logger.log(step, {"epoch": step, "train_loss": 1.0 / step, "val_loss": 2.0 / step,
                              "lr": 1e-3 * (1 + step % 7), "progress": float(step)})
            backlog.append(step - len(logger.logged_steps))  # steps queued, not yet accepted by the store
            time.sleep(max(0.0, start + step * config["pace_s"] - time.time()))
        logged_at = time.time()
        logger.close(timeout_s=config["close_timeout_s"])
        closed_at = time.time()
    finally:
        logging.getLogger().removeHandler(handler)
    Path(config["out"], f"trial-{config['trial']}.json").write_text(json.dumps({"warnings": seen}))
    ray.tune.report({"run_id": run_id, "pid": os.getpid(), "started_at": start, "logged_at": logged_at,
                     "closed_at": closed_at, "close_wait_s": closed_at - logged_at, "max_backlog": max(backlog),
                     "logged_steps": len(logger.logged_steps), "warnings": len(seen)})


def _sweep(uri: str, experiment_id: str, out: Path, pace_s: float):
    """The trials, all at once, on the session's local Ray (``ray_local``) -> Tune's ResultGrid."""
    import ray.cloudpickle
    import ray.tune

    # Ray workers cannot import this test module (tests/ is on pytest's sys.path only): ship the trainable by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out.mkdir(parents=True, exist_ok=True)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_log_steps, {"CPU": 0.25}),
        param_space={"trial": ray.tune.grid_search(list(range(TRIALS))), "uri": uri, "experiment_id": experiment_id,
                     "steps": STEPS, "pace_s": pace_s, "close_timeout_s": 300.0, "out": str(out)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=TRIALS),
        run_config=ray.tune.RunConfig(name=out.name, storage_path=str(out.parent / "ray"), verbose=0),
    )
    return tuner.fit()


def _check_trials(results, out: Path) -> list[dict]:
    """Every trial TERMINATED without error; nothing forbidden in its warnings or its output."""
    assert results.num_errors == 0, [str(r.error)[-2000:] for r in results if r.error]
    assert results.num_terminated == TRIALS and len(results) == TRIALS
    reports = [{**r.metrics, "trial": r.config["trial"]} for r in results]
    assert all(r["logged_steps"] == STEPS for r in reports), [r["logged_steps"] for r in reports]
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_logs_dir_path())
    for report in reports:
        seen = json.loads(Path(out, f"trial-{report['trial']}.json").read_text())["warnings"]
        files = glob(str(logs / f"worker-*-{report['pid']}.*"))
        assert files, f"no Ray worker log of trial pid {report['pid']} under {logs}"
        text = "\n".join(seen) + "".join(Path(f).read_text(errors="replace") for f in files)
        for bad in FORBIDDEN:
            assert bad not in text, f"{bad!r} in trial {report['trial']}'s output:\n{text[-3000:]}"
    return reports


def _check_histories(client: MlflowClient, experiment_id: str, reports: list[dict]) -> dict[str, list]:
    """Every run has every key at steps 1..STEPS, each once -> the histories, by run id."""
    runs = client.search_runs([experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in reports)
    histories, totals = {}, dict.fromkeys(KEYS, 0)
    for run in runs:
        assert "epoch" not in run.data.metrics  # the step itself is not a metric
        assert set(run.data.metrics) == set(KEYS), sorted(run.data.metrics)
        for key in KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            steps = sorted(m.step for m in history)
            assert steps == list(range(1, STEPS + 1)), (run.info.run_name, key, len(steps),
                                                        sorted({s for s in steps if steps.count(s) > 1})[:10],
                                                        sorted(set(range(1, STEPS + 1)) - set(steps))[:10])
            totals[key] += len(history)
            if key == "progress":
                assert all(m.value == m.step for m in history)
                histories[run.info.run_id] = history
    assert totals == dict.fromkeys(KEYS, TRIALS * STEPS), totals
    return histories


@pytest.mark.reliability("8 trials x 200 steps logged concurrently to the tracking server",
                         "8 Ray Tune trials at once, each its own MLflow run on `mlflow server` + PostgreSQL, "
                         "EpochLogger as fast as it goes: all TERMINATED, every key exactly steps 1..200 once "
                         "(8 x 200 points per key), no 'database is locked' / IntegrityError in trial output or "
                         "server log")
def test_concurrent_trials_log_every_step_exactly_once(ray_local, tracking_server, tmp_path):
    client = MlflowClient(tracking_server.url)
    experiment_id = client.create_experiment("concurrent-logging")
    server_log_before = len(tracking_server.log_text())
    results = _sweep(tracking_server.url, experiment_id, tmp_path / "concurrent", pace_s=0.0)
    reports = _check_trials(results, tmp_path / "concurrent")
    _check_histories(client, experiment_id, reports)
    server_log = tracking_server.log_text()[server_log_before:]
    for bad in FORBIDDEN:
        assert bad not in server_log, server_log[-3000:]
    # Nothing had to be retried: no 5xx (deadlock, lock timeout) and no dropped connection under load.
    warnings = [json.loads(Path(tmp_path / "concurrent", f"trial-{t}.json").read_text())["warnings"]
                for t in range(TRIALS)]
    retried = [line for w in warnings for line in w if "Retrying" in line or "unreachable" in line]
    assert not retried, retried[:10]
    took = max(r["closed_at"] for r in reports) - min(r["started_at"] for r in reports)
    print(f"[concurrent] logging took {took:.1f} s for {TRIALS} x {STEPS} steps; max backlog "
          f"{max(r['max_backlog'] for r in reports)} steps; warnings {sum(r['warnings'] for r in reports)}")


@pytest.mark.reliability(f"tracking server stopped {OUTAGE_S:.0f} s during 8 concurrent trials",
                         "`mlflow server` (PostgreSQL) SIGKILLed while 8 Ray Tune trials log 200 steps each through "
                         "EpochLogger, restarted on the same port and store 30 s later: all trials TERMINATED, "
                         "every key exactly steps 1..200 once, the steps queued during the outage landed after the "
                         "restart, no 'database is locked' / IntegrityError")
def test_tracking_server_outage_fails_no_trial_and_loses_no_step(ray_local, tracking_server, tmp_path):
    client = MlflowClient(tracking_server.url)
    experiment_id = client.create_experiment("tracking-outage")
    server_log_before = len(tracking_server.log_text())
    outage: dict = {}

    def crash_and_restart() -> None:
        try:
            deadline = time.monotonic() + 180
            while True:  # every trial has its run and is well into its steps: then crash the server
                runs = client.search_runs([experiment_id], max_results=100)
                progress = [r.data.metrics.get("progress", 0) for r in runs]
                # Late enough that the backlog to drain after the restart is short, early enough
                # that no trial (they start a few seconds apart) is done logging.
                if len(runs) == TRIALS and min(progress) >= 20 and (min(progress) >= 80 or max(progress) >= 140):
                    break
                assert time.monotonic() < deadline, f"trials not all logging after 180 s: {progress}"
                time.sleep(0.5)
            outage["progress"] = progress
            outage["stopped"] = time.time()
            tracking_server.kill()
            assert not tracking_server.healthy()
            time.sleep(OUTAGE_S)
            outage["restarting"] = time.time()
            tracking_server.start()
            tracking_server.wait_healthy()
            outage["back"] = time.time()
        except BaseException as exc:  # re-raised by the test
            outage["error"] = exc

    controller = threading.Thread(target=crash_and_restart, name="outage", daemon=True)
    controller.start()
    t0 = time.time()
    results = _sweep(tracking_server.url, experiment_id, tmp_path / "outage", pace_s=0.15)
    controller.join(timeout=120)
    assert not controller.is_alive(), "the outage controller hung"
    if "error" in outage:
        raise outage["error"]
    reports = _check_trials(results, tmp_path / "outage")
    histories = _check_histories(client, experiment_id, reports)

    # The outage overlapped the logging: every trial was still logging when the server died
    # (and had logged steps before it), and steps queued while it was down landed after it came back.
    stopped, restarting, back = outage["stopped"], outage["restarting"], outage["back"]
    assert restarting - stopped >= OUTAGE_S
    assert max(outage["progress"]) < STEPS, outage["progress"]
    during = {}
    for report in reports:
        assert report["started_at"] < stopped < report["logged_at"], (report, stopped)
        assert report["closed_at"] > back  # close() waited for the server to come back
        stamps = [m.timestamp / 1000 for m in histories[report["run_id"]]]
        before = sum(s < stopped for s in stamps)
        # Queued while no server process existed: these points can only have landed after the restart.
        during[report["trial"]] = sum(stopped <= s < restarting for s in stamps)
        assert before >= 20 and during[report["trial"]] > 0, (before, during)
    server_log = tracking_server.log_text()[server_log_before:]
    for bad in FORBIDDEN:
        assert bad not in server_log, server_log[-3000:]
    warnings = [json.loads(Path(tmp_path / "outage", f"trial-{t}.json").read_text())["warnings"]
                for t in range(TRIALS)]
    waits = sorted(r["close_wait_s"] for r in reports)
    print(f"[outage] server down {restarting - stopped:.1f} s, unreachable {back - stopped:.1f} s "
          f"(killed {stopped - t0:.1f} s after the sweep started, progress then {sorted(outage['progress'])}); "
          f"steps queued while down per trial {sorted(during.values())}; max backlog per trial "
          f"{sorted(r['max_backlog'] for r in reports)}; close() waited {waits[0]:.1f}-{waits[-1]:.1f} s, last trial "
          f"done {max(r['closed_at'] for r in reports) - back:.1f} s after the server was back; warnings per trial "
          f"{[len(w) for w in warnings]}, of them EpochLogger's "
          f"{[sum('clusterlab.platform.tracking' in line for line in w) for w in warnings]}")
    print("[outage] trial 0's warnings:\n  " + "\n  ".join(warnings[0][:12]))
