"""Two of Ray Tune's integration classes, adapted to what a clusterlab trial reports.

A trial reports its per-epoch metrics while it trains, its evaluation (K-means ACC, the
cluster head's ACC) once at the end, and, on a preemption notice, a checkpoint taken inside
an epoch (:data:`~clusterlab.platform.loop.PREEMPTION_STEP_KEY`), which is not an epoch's
result.

- :class:`FinalMetricOptunaSearch`: Tune's ``OptunaSearch.on_trial_result`` reads the metric
  from every result and raises ``KeyError`` on an epoch's result without it; this one passes
  on only the results that carry it, so Optuna learns from per-epoch values when the metric is
  one (and can prune on them) and from the final result otherwise.
- :class:`EpochReportCallback`: Ray Train's ``TuneReportCallback``, except that a checkpoint
  taken inside an epoch stays Ray Train's (to restart from) and never reaches Tune, whose
  schedulers and metric checks expect one result per epoch.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from clusterlab.platform.loop import PREEMPTION_STEP_KEY


class FinalMetricOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class EpochReportCallback(TuneReportCallback):
    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if PREEMPTION_STEP_KEY not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)
