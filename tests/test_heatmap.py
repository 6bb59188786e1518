"""Heatmap cells from a real MLflow store: mean / std over seeds, failed and missing cells."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli
from clusterlab.platform.heatmap import sweep_cells

SPACE = "base: mixem_digits\nsearch:\n  lambda_2: {grid: [0.01, 0.1]}\n  lambda_3: {grid: [0.0, 0.1]}\n" \
        "  lambda_4: {grid: [0.0, 0.1]}\n  seed: {grid: [0, 1]}\n"


@pytest.fixture()
def sweep_store(tracking_uri):
    """A sweep-shaped experiment: a parent with its search space, and children per cell."""
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("hm")
    parent = client.create_run(exp, tags={"clusterlab.role": "parent", "clusterlab.sweep": "hm"}).info.run_id
    client.log_text(parent, SPACE, "search_space.yaml")
    rng = np.random.default_rng(0)
    values = {}
    for l2 in ("0.01", "0.1"):
        for l3 in ("0.0", "0.1"):
            for l4 in ("0.0", "0.1"):
                if (l2, l3, l4) == ("0.1", "0.1", "0.1"):
                    continue  # missing: never ran
                for seed in ("0", "1"):
                    run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
                    for key, v in (("loss.weights.inst_ent", l2), ("loss.weights.push", l3),
                                   ("loss.weights.pull", l4), ("seed", seed), ("method", "mixem")):
                        client.log_param(run, key, v)
                    if (l2, l3, l4) == ("0.01", "0.1", "0.0"):
                        client.set_terminated(run, "FAILED")  # failed: both seeds
                        continue
                    acc = float(rng.uniform(0.2, 0.9))
                    values.setdefault((float(l2), float(l3), float(l4)), []).append(acc)
                    client.log_metric(run, "kmeans_mixinit_acc", acc)
                    client.set_terminated(run, "FINISHED")
    return client, values


def test_cells_average_seeds_and_mark_failed_and_missing(sweep_store):
    client, values = sweep_store
    cells, parent, metric = sweep_cells(client, "hm", "loss.weights.push", "loss.weights.pull",
                                        "loss.weights.inst_ent")
    assert metric == "kmeans_mixinit_acc"  # MIX'EM's headline (Table 1 row 6) when none is named
    assert parent is not None and len(cells) == 8
    by_key = {(c.facet, c.x, c.y): c for c in cells}
    for key, accs in values.items():
        cell = by_key[key]
        assert cell.status == "ok" and cell.n == 2
        assert cell.mean == pytest.approx(np.mean(accs)) and cell.std == pytest.approx(np.std(accs))
    assert by_key[(0.01, 0.1, 0.0)].status == "failed"
    assert by_key[(0.1, 0.1, 0.1)].status == "missing"  # from the parent's grid, though no run exists


def test_heatmap_cli_writes_png_csv_and_logs_to_parent(sweep_store, tmp_path):
    client, values = sweep_store
    out = tmp_path / "fig.png"
    assert cli.main(["heatmap", "--experiment", "hm", "--x", "lambda_3", "--y", "lambda_4", "--facet", "lambda_2",
                     "--metric", "kmeans_mixinit_acc", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert {r["status"] for r in rows} == {"ok", "failed", "missing"}
    for r in rows:
        if r["status"] == "ok":
            key = (float(r["loss.weights.inst_ent"]), float(r["loss.weights.push"]), float(r["loss.weights.pull"]))
            assert float(r["kmeans_mixinit_acc_mean"]) == pytest.approx(np.mean(values[key]))
        else:
            assert r["kmeans_mixinit_acc_mean"] == ""  # never a 0 that could be read as a result
    (parent,) = client.search_runs([client.get_experiment_by_name("hm").experiment_id],
                                   filter_string="tags.`clusterlab.role` = 'parent'")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "heatmap")} == {"heatmap/fig.png", "heatmap/fig.csv"}


def test_heatmap_bad_input_names_the_flag(sweep_store, capsys):
    assert cli.main(["heatmap", "--experiment", "nope", "--x", "lambda_3", "--y", "lambda_4"]) == 2
    assert "--experiment" in capsys.readouterr().err
    assert cli.main(["heatmap", "--experiment", "hm", "--x", "optim.lrr", "--y", "lambda_4",
                     "--metric", "kmeans_mixinit_acc"]) == 2
    assert "--x" in capsys.readouterr().err
    assert cli.main(["heatmap", "--experiment", "hm", "--x", "lambda_3", "--y", "lambda_4", "--metric", "acc"]) == 2
    assert "kmeans_mixinit_acc" in capsys.readouterr().err


def test_figures_are_not_kept_alive_by_pyplot():
    """Sweeps and re-evaluations draw many figures: none may accumulate in pyplot's registry."""
    import matplotlib.pyplot as plt

    from clusterlab.eval import plots

    before = len(plt.get_fignums())
    for _ in range(25):
        plots.cluster_sizes_figure(np.array([2.0, 1.0, 0.0, 1.0]))
        plots.accuracy_vs_inertia_figure(np.array([3.0, 2.0]), np.array([0.5, 0.6]), 1)
    assert len(plt.get_fignums()) == before


def test_heatmap_default_file_stays_in_the_working_directory(sweep_store, tmp_path, monkeypatch):
    """An experiment called ../../escape names a file here, not two directories up."""
    client, _ = sweep_store
    exp = client.get_experiment_by_name("hm")
    client.rename_experiment(exp.experiment_id, "../../escape")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`clusterlab.role` = 'parent'")
    client.set_tag(parent.info.run_id, "clusterlab.sweep", "../../escape")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert cli.main(["heatmap", "--experiment", "../../escape", "--x", "lambda_3", "--y", "lambda_4",
                     "--facet", "lambda_2"]) == 0  # the method's headline metric names the file
    assert sorted(p.name for p in work.iterdir()) == ["_.._escape_kmeans_mixinit_acc_heatmap.csv",
                                                     "_.._escape_kmeans_mixinit_acc_heatmap.png"]
    assert not list(tmp_path.glob("*escape*")) and [p.name for p in (tmp_path / "a").iterdir()] == ["b"]


def test_without_metric_runs_of_mixed_or_unknown_methods_ask_for_one(sweep_store, capsys):
    client, _ = sweep_store
    exp = client.get_experiment_by_name("hm")
    other = client.create_run(exp.experiment_id).info.run_id
    client.log_param(other, "method", "lsdc")
    assert cli.main(["heatmap", "--experiment", "hm", "--x", "lambda_3", "--y", "lambda_4"]) == 2
    assert "trained ['lsdc', 'mixem']; name the metric to draw, e.g. --metric" in capsys.readouterr().err


def test_a_sweep_draws_from_the_runs_and_grid_it_holds_as_the_standalone_command_reads_them(sweep_store):
    """The sweep passes its children and grid (no second lookup); the cells are the same."""
    from clusterlab.platform.heatmap import grid_cells

    client, _ = sweep_store
    axes = ("loss.weights.push", "loss.weights.pull", "loss.weights.inst_ent")
    read, parent, metric = sweep_cells(client, "hm", *axes)
    children = [r for r in client.search_runs([client.get_experiment_by_name("hm").experiment_id])
                if r.info.run_id != parent]
    grid = {"loss.weights.inst_ent": [0.01, 0.1], "loss.weights.push": [0.0, 0.1], "loss.weights.pull": [0.0, 0.1]}
    held = grid_cells(children, *axes, metric, grid, "hm")
    assert [(c.facet, c.x, c.y, c.n, c.status) for c in held] == [(c.facet, c.x, c.y, c.n, c.status) for c in read]
    assert [c.mean for c in held if c.status == "ok"] == [c.mean for c in read if c.status == "ok"]


def test_a_sweeps_failed_trials_include_those_that_never_created_a_run(sweep_store, tmp_path):
    """16 trials ran (the grid): 12 children FINISHED, 2 FAILED, and the 2 of the missing cell
    died before creating their runs (a worker that could not start): 4 failed, not 2."""
    from clusterlab.platform.sweep import _summarise
    from clusterlab.search_space import load_search_space

    client, _ = sweep_store
    (tmp_path / "space.yaml").write_text(SPACE)
    space, _, _ = load_search_space(tmp_path / "space.yaml")
    exp = client.get_experiment_by_name("hm").experiment_id
    (parent,) = [r.info.run_id for r in client.search_runs([exp]) if r.data.tags.get("clusterlab.role") == "parent"]
    result = _summarise(client, exp, parent, space, "hm", "mixem", tmp_path / "hm.png", trials=16)
    assert (result.trials, result.failed) == (16, 4)
    assert client.get_run(parent).data.metrics["failed_trials"] == 4
