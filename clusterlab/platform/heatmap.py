"""Loss-weight heatmaps from a sweep's MLflow child runs (MIX'EM supplementary Figs. 1-3).

A cell is one (facet, x, y) point of the grid. Its value is the mean of the metric over the
finished runs at that point (repeated seeds), with their std and count. A point whose runs all
failed is marked ``failed``, a grid point with no run ``missing``; neither is drawn as 0.
"""

from __future__ import annotations

import csv
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from clusterlab.config import ConfigError, parse_yaml
from clusterlab.eval.plots import heatmap_figure
from clusterlab.methods import spec_for
from clusterlab.platform.tracking import ROLE_TAG, TRIAL_TAG, find_sweep_parent
from clusterlab.search_space import LAMBDA_ALIASES


@dataclass(frozen=True)
class Cell:
    facet: Any
    x: Any
    y: Any
    mean: float
    std: float
    n: int
    status: str  # "ok", "failed" or "missing"


def _value(text: Any) -> Any:
    """Params are strings; grid values from YAML are numbers: compare both as floats."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _parent_grid(client: MlflowClient, parent_id: str | None) -> dict[str, list[Any]]:
    """The grid values per searched key from the parent run's search_space.yaml, if it has one."""
    if parent_id is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(parent_id, "search_space.yaml", tmp)).read_text()
        except Exception:  # no such artifact: the grid is whatever the runs cover
            return {}
    search = (parse_yaml(text) or {}).get("search") or {}
    return {LAMBDA_ALIASES.get(k, k): list((d or {}).get("grid") or []) for k, d in search.items()}


def headline_metric(runs: list[Any], experiment: str) -> str:
    """The headline metric of the method the runs trained (MIX'EM: K-means initialised by the
    mixture; LSD-C, ExCB: the cluster head; else K-means on the normalised representation)."""
    methods = {r.data.params.get("method") for r in runs} - {None}
    if len(methods) != 1:
        raise ConfigError(f"--metric: the runs of {experiment!r} trained {sorted(methods) or 'no known method'}; "
                          "name the metric to draw, e.g. --metric kmeans_norm_acc")
    return spec_for(methods.pop()).headline_metric


def sweep_runs(client: MlflowClient, experiment: str) -> tuple[list[Any], str | None]:
    """The trial runs of the experiment's sweep (every run but the parent) and the parent's
    run id (None when there is none)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no MLflow experiment named {experiment!r} in this tracking store")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=10000)
            if r.data.tags.get(ROLE_TAG) != "parent"]
    if not runs:
        raise ConfigError(f"--experiment: {experiment!r} has no trial runs yet")
    return runs, find_sweep_parent(client, exp.experiment_id, experiment)


def sweep_cells(client: MlflowClient, experiment: str, x: str, y: str, facet: str | None,
                metric: str | None = None) -> tuple[list[Cell], str | None, str]:
    """Every grid cell of the experiment's sweep, read from MLflow (the standalone ``clusterlab
    heatmap``) -> (cells, parent run id or None, the metric drawn: ``metric``, else the method's
    headline metric). The grid is the parent's ``search_space.yaml`` where there is one."""
    runs, parent_id = sweep_runs(client, experiment)
    metric = metric or headline_metric(runs, experiment)
    return grid_cells(runs, x, y, facet, metric, _parent_grid(client, parent_id), experiment), parent_id, metric


def sweep_records(client: MlflowClient, experiment: str) -> list[dict[str, Any]]:
    """One record per trial run of the experiment's sweep, oldest first: ``run_id``,
    ``trial_id``, ``status``, the searched params (the keys of the parent's search space;
    without one, the params whose values differ between the runs), numbers where they parse
    as numbers, then every metric's latest value (NaN where a run has none)."""
    runs, parent_id = sweep_runs(client, experiment)
    searched = list(_parent_grid(client, parent_id)) or sorted(
        key for key in {k for r in runs for k in r.data.params} if len({r.data.params.get(key) for r in runs}) > 1)
    metrics = sorted({m for r in runs for m in r.data.metrics})
    return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_TAG), "status": r.info.status,
             **{key: _value(r.data.params.get(key)) for key in searched},
             **{m: r.data.metrics.get(m, float("nan")) for m in metrics}}
            for r in sorted(runs, key=lambda r: r.info.start_time)]


def grid_cells(runs: list[Any], x: str, y: str, facet: str | None, metric: str, grid: dict[str, list[Any]],
               experiment: str) -> list[Cell]:
    """The cells of the (facet, x, y) grid: every value in ``grid`` (the searched values) or in
    the runs' params, each cell the mean and std of ``metric`` over its finished runs."""
    for flag, key in (("--x", x), ("--y", y), ("--facet", facet)):
        if key is not None and not any(key in r.data.params for r in runs):
            raise ConfigError(f"{flag}: no run of {experiment!r} has the param {key!r} (e.g. loss.weights.push, "
                              "or lambda_2..lambda_4)")
    if not any(metric in r.data.metrics for r in runs):
        available = sorted({m for r in runs for m in r.data.metrics if m.endswith(("_acc", "_nmi", "_ari", "loss"))})
        raise ConfigError(f"--metric: no run of {experiment!r} logged {metric!r}; available: {', '.join(available)}")

    return _cells([((_value(r.data.params.get(facet)) if facet else None, _value(r.data.params[x]),
                      _value(r.data.params[y])),
                     r.data.metrics[metric] if r.info.status == "FINISHED" and metric in r.data.metrics else None)
                    for r in runs], x, y, facet, grid)


def table_cells(table: Any, x: str, y: str, facet: str | None, metric: str) -> list[Cell]:
    """The cells of a table with one row per run (a pandas DataFrame, such as the one
    ``clusterlab.sweep_results`` returns):
    columns ``x``, ``y``, ``facet`` and ``metric``, and ``status`` when some runs did not
    finish. A row whose metric is missing (NaN) or whose status is not FINISHED is a failed run;
    the grid is the values the rows hold."""
    for argument, column in (("x", x), ("y", y), ("facet", facet), ("metric", metric)):
        if column is not None and column not in table.columns:
            raise ValueError(f"{argument}: the table has no column {column!r}; its columns: {list(table.columns)}")
    if len(table) == 0:
        raise ValueError("data: the table has no rows")
    points = []
    for row in table.to_dict("records"):
        value = row[metric]
        finished = row.get("status", "FINISHED") == "FINISHED" and value is not None and np.isfinite(value)
        points.append(((_value(row[facet]) if facet else None, _value(row[x]), _value(row[y])),
                       float(value) if finished else None))
    return _cells(points, x, y, facet, {})


def _cells(points: list[tuple[tuple[Any, Any, Any], float | None]], x: str, y: str, facet: str | None,
           grid: dict[str, list[Any]]) -> list[Cell]:
    """Cells from one point per run: its (facet, x, y) values and its metric, None for a run
    that did not finish with it. The axes are the values in ``grid`` and in the points."""
    groups: dict[tuple[Any, Any, Any], list[float | None]] = {}
    for key, value in points:
        groups.setdefault(key, []).append(value)

    def axis(i: int, name: str | None) -> list[Any]:
        values = {_value(v) for v in grid.get(name or "", [])}
        return sorted(values | {k[i] for k in groups}, key=lambda v: (str(type(v)), v))

    cells = []
    for f in (axis(0, facet) if facet else [None]):
        for yv in axis(2, y):
            for xv in axis(1, x):
                members = groups.get((f, xv, yv), [])
                values = [v for v in members if v is not None]
                if values:
                    cells.append(Cell(f, xv, yv, float(np.mean(values)), float(np.std(values)), len(values), "ok"))
                else:
                    cells.append(Cell(f, xv, yv, float("nan"), float("nan"), 0, "failed" if members else "missing"))
    return cells


def write_csv(cells: list[Cell], path: Path, x: str, y: str, facet: str | None, metric: str) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*([facet] if facet else []), x, y, f"{metric}_mean", f"{metric}_std", "n_runs", "status"])
        for c in cells:
            writer.writerow([*([c.facet] if facet else []), c.x, c.y,
                             "" if c.status != "ok" else repr(c.mean), "" if c.status != "ok" else repr(c.std),
                             c.n, c.status])


def check_axes(x: str, y: str, facet: str | None = None) -> tuple[str, str, str | None]:
    """The params on the axes (the paper's ``lambda_1`` .. ``lambda_4`` as param names),
    refused when one param is named on two axes."""
    x, y = LAMBDA_ALIASES.get(x, x), LAMBDA_ALIASES.get(y, y)
    facet = LAMBDA_ALIASES.get(facet, facet) if facet else None
    named = [name for name in (x, y, facet) if name]
    if len(set(named)) < len(named):
        raise ConfigError(f"heatmap: --x {x}, --y {y}" + (f", --facet {facet}" if facet else "")
                          + ": name a different param on each axis")
    return x, y, facet


def draw_heatmap(client: MlflowClient, experiment: str, x: str, y: str, facet: str | None = None,
                 metric: str | None = None, out: str | Path | None = None) -> Path:
    """``clusterlab heatmap``: the sweep's cells read from MLflow (:func:`sweep_cells`), drawn by
    :func:`write_heatmap`. ``x``/``y``/``facet`` are param names or the paper's ``lambda_1`` ..
    ``lambda_4``; ``metric`` defaults to the method's headline metric
    (:attr:`~clusterlab.methods.MethodSpec.headline_metric`)."""
    x, y, facet = check_axes(x, y, facet)
    cells, parent_id, metric = sweep_cells(client, experiment, x, y, facet, metric)
    return write_heatmap(cells, x, y, facet, metric, experiment, out, client, parent_id)


def write_heatmap(cells: list[Cell], x: str, y: str, facet: str | None, metric: str, experiment: str,
                  out: str | Path | None = None, client: MlflowClient | None = None,
                  parent_id: str | None = None) -> Path:
    """Heatmap PNG + CSV (same name, ``.csv``) of the cells; both are logged to the sweep's
    parent run when ``client`` and ``parent_id`` are given, else nothing is logged."""
    # The default file stays in the working directory whatever the experiment is called ("../x").
    out = Path(out or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{experiment}_{metric}_heatmap.png").lstrip("."))
    out.parent.mkdir(parents=True, exist_ok=True)
    names = {v: f"{k.replace('lambda_', 'λ')} ({v})" for k, v in LAMBDA_ALIASES.items()}
    figure = heatmap_figure(cells, names.get(x, x), names.get(y, y), names.get(facet, facet) if facet else None,
                            metric, title=experiment)
    figure.savefig(out, dpi=120)
    csv_path = out.with_suffix(".csv")
    write_csv(cells, csv_path, x, y, facet, metric)
    if client is not None and parent_id is not None:
        client.log_artifact(parent_id, str(out), "heatmap")
        client.log_artifact(parent_id, str(csv_path), "heatmap")
    return out
