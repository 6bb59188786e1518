"""EpochLogger against a real MLflow SQLite store: one point per step, whatever is queued."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from clusterlab.platform import tracking


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_each_step_is_logged_once_and_a_resumed_logger_skips_logged_steps(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("logger")).info.run_id
    wide = {f"m{i:03d}": float(i) for i in range(300)}  # 300 metrics: at most 3 steps fit one request

    first = tracking.EpochLogger(client, run_id, step_key="lr")
    for step in (1, 2, 2, 3):  # step 2 queued twice: still one point
        first.log(step, {"epoch": step, "lr": 0.1 * step, **wide})
    first.close(timeout_s=60)
    assert _steps(client, run_id, "lr") == [1, 2, 3]
    assert _steps(client, run_id, "m299") == [1, 2, 3]
    assert "epoch" not in client.get_run(run_id).data.metrics  # the step itself is not a metric

    # A restarted worker replays the checkpoint's history (steps 1..5): only 4 and 5 are new.
    resumed = tracking.EpochLogger(client, run_id, step_key="lr")
    assert resumed.logged_steps == {1, 2, 3}
    for step in range(1, 6):
        resumed.log(step, {"epoch": step, "lr": 1.0, **wide})
    resumed.close(timeout_s=60)
    assert _steps(client, run_id, "lr") == [1, 2, 3, 4, 5]
    first_values = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)][:3]
    assert first_values == pytest.approx([0.1, 0.2, 0.3])  # the first points are kept, not overwritten
