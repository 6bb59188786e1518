"""Tune's OptunaSearch for metrics that arrive only when a trial ends.

A trial reports its per-epoch metrics while it trains and its evaluation (K-means ACC, the
cluster head's ACC) once, at the end. Tune's ``OptunaSearch.on_trial_result`` reads the
metric from every result and raises ``KeyError`` on an epoch's result without it; this
subclass passes on only the results that carry the metric, so Optuna learns from per-epoch
values when the metric is one (and can prune on them) and from the final result otherwise.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class FinalMetricOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
