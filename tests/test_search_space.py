"""Search-space files: the shipped ones load, bad ones fail naming the field, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterlab import cli
from clusterlab.config import ConfigError
from clusterlab.platform.sweep import heatmap_axes
from clusterlab.search_space import find_search_space, grid_points, load_search_space, plan_sweep, trial_config

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
# MIX'EM supplementary Table 1: (lambda_2, lambda_3, lambda_4) per dataset, lambda_1 = 1.
TABLE1 = {"stl10": (0.1, 0.05, 0.1), "cifar10": (0.1, 0.0, 0.05), "cifar100_20": (0.01, 0.05, 0.0)}


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_load_and_validate(path):
    space, base, _ = load_search_space(path, ["data.root=/nonexistent"])
    assert space.search and trial_config(base, {k: d.probe_values()[0] for k, d in space.search.items()})


@pytest.mark.parametrize("dataset", sorted(TABLE1))
def test_loss_weight_grids_contain_every_table1_setting(dataset):
    space, base, _ = load_search_space(SPACES / f"mixem_loss_weights_{dataset}.yaml", ["data.root=/x"])
    points = {(p["loss.weights.inst_ent"], p["loss.weights.push"], p["loss.weights.pull"]) for p in grid_points(space)}
    assert set(TABLE1.values()) <= points
    assert trial_config(base, {}).loss.weights["comp_ent"] == 1.0
    assert heatmap_axes(space) == ("loss.weights.push", "loss.weights.pull", "loss.weights.inst_ent")


@pytest.mark.parametrize("dataset,centre", [("stl10", 1e-4), ("cifar10", 5e-4), ("cifar100_20", 5e-4)])
def test_lr_spaces_span_a_factor_five_around_the_paper_value(dataset, centre):
    space, _, _ = load_search_space(SPACES / f"mixem_lr_{dataset}.yaml", ["data.root=/x"])
    low, high = space.search["optim.lr"].loguniform
    assert low == pytest.approx(centre / 5) and high == pytest.approx(centre * 5)
    assert space.tune.scheduler.name == "asha" and space.tune.metric == "val_loss"


def _space(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body,message", [
    ("base: simclr_digits\nsearch: {optim.lrr: {grid: [1, 2]}}\n", "search.optim.lrr"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: []}}\n", "grid is empty"),
    ("base: simclr_digits\nsearch: {optim.lr: {loguniform: [0, 1e-3]}}\n", "loguniform needs low > 0"),
    ("base: simclr_digits\nsearch: {optim.lr: {uniform: [1e-3, 1e-4]}}\n", "low < high"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3], choice: [1]}}\n", "exactly one of"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [-1.0]}}\n", "search.optim.lr"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}}\n"
     "tune: {scheduler: {name: asha, max_t: 5, grace_period: 10}}\n", "grace_period (10) must be <= max_t (5)"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}}\ntune: {metric: component_entropy}\n",
     "does not produce 'component_entropy'"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}}\n"
     "tune: {metric: kmeans_norm_acc, scheduler: {name: asha, max_t: 5}}\n", "ASHA needs a metric reported every epoch"),
    ("base: no_such_preset\nsearch: {optim.lr: {grid: [1e-3]}}\n", "neither a preset"),
    ("base: simclr_digits\nsearch: {}\n", "at least 1 item"),
    ("base: simclr_digits\nserch: {optim.lr: {grid: [1e-3]}}\n", "unknown key; allowed keys here: name, base"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}}\ntune: {mode: up}\n", "tune.mode"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}}\ntune: {scheduler: {name: pbt}}\n",
     "pbt is not supported: population-based training changes a trial's hyperparameters while it trains"),
    ("base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3, 1e-4]}}\ntune: {search_alg: {name: optuna}}\n",
     "search.optim.lr: optuna proposes every value itself"),
    ("base: simclr_digits\nsearch: {optim.lr: {choice: [1e-3]}}\ntune: {search_alg: {name: hyperopt}}\n",
     "tune.search_alg"),
])
def test_invalid_spaces_name_the_field(tmp_path, body, message):
    with pytest.raises(ConfigError) as info:
        load_search_space(_space(tmp_path, body))
    assert message in str(info.value)


def test_mixem_metric_is_accepted_only_for_mixem(tmp_path):
    body = "base: {base}\nsearch: {{optim.lr: {{grid: [1e-3]}}}}\ntune: {{metric: nonempty_components, mode: max}}\n"
    load_search_space(_space(tmp_path, body.format(base="mixem_digits")))
    with pytest.raises(ConfigError, match="does not produce"):
        load_search_space(_space(tmp_path, body.format(base="simclr_digits")))


def test_base_may_be_a_config_file_relative_to_the_space(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: simclr_digits\nepochs: 3\n")
    space, base, _ = load_search_space(_space(tmp_path, "base: base.yaml\nsearch: {seed: {grid: [0, 1]}}\n"))
    assert trial_config(base, {"seed": 1}).epochs == 3 and space.trial_count() == 2


def test_sweep_cli_rejects_a_bad_space_before_anything_starts(tracking_uri, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    path = _space(tmp_path, "base: simclr_digits\nsearch: {optim.lr: {loguniform: [-1, 1]}}\n")
    assert cli.main(["sweep", str(path), f"storage_path={tmp_path / 'ray'}"]) == 2
    assert "loguniform needs low > 0" in capsys.readouterr().err
    assert MlflowClient(tracking_uri).get_experiment_by_name("space") is None
    assert not (tmp_path / "ray").exists()


def test_default_concurrency_fits_driver_plus_workers_in_the_cluster(tmp_path):
    from clusterlab.platform.sweep import max_concurrent_trials

    body = "base: simclr_digits\nsearch: {{optim.lr: {{grid: [1e-3]}}}}\nresources: {res}\n{tune}"
    space, base, _ = load_search_space(_space(tmp_path, body.format(res="{num_workers: 2, cpus_per_worker: 2}",
                                                                    tune="")))
    cfg = trial_config(base, {})
    assert max_concurrent_trials(space, cfg, {"CPU": 16}) == 3  # 16 // (2 x 2 + 1 driver)
    assert max_concurrent_trials(space, cfg, {"CPU": 4}) == 1
    space, base, _ = load_search_space(_space(tmp_path, body.format(
        res="{num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.5}", tune="")))
    assert max_concurrent_trials(space, trial_config(base, {}), {"CPU": 64, "GPU": 2}) == 4  # fractional GPUs
    space, base, _ = load_search_space(_space(tmp_path, body.format(res="{num_workers: 1}",
                                                                    tune="tune: {max_concurrent_trials: 7}")))
    assert max_concurrent_trials(space, trial_config(base, {}), {"CPU": 2}) == 7  # the space's own limit wins


@pytest.mark.parametrize("name", ["it's", "../up", ".hidden", "a b"])
def test_sweep_names_that_would_break_filters_or_paths_are_refused(name, tracking_uri, capsys):
    assert cli.main(["sweep", "search_spaces/mixem_loss_weights_digits.yaml", "--experiment", name]) == 2
    assert f"sweep name {name!r}: use letters, digits" in capsys.readouterr().err


def test_a_searched_mixup_composition_gets_lsdc_mixup_weight_decay(tmp_path):
    """LSD-C supplementary Sec. 1 (MixUp needs weight decay 1e-4) holds for sweep trials too,
    unless the space sets the weight decay itself."""
    path = tmp_path / "space.yaml"
    path.write_text("base: lsdc_digits\nsearch:\n  lsdc.composition: {grid: [ricap, mixup]}\n")
    _, base, _ = load_search_space(path)
    assert trial_config(base, {"lsdc.composition": "mixup"}).optim.weight_decay == pytest.approx(1e-4)
    assert trial_config(base, {"lsdc.composition": "ricap"}).optim.weight_decay == pytest.approx(5e-4)
    path.write_text("base: lsdc_digits\noverrides: {optim.weight_decay: 3e-4}\n"
                    "search:\n  lsdc.composition: {grid: [ricap, mixup]}\n")
    _, base, _ = load_search_space(path)
    assert trial_config(base, {"lsdc.composition": "mixup"}).optim.weight_decay == pytest.approx(3e-4)


def test_optuna_learns_from_a_metric_only_the_trials_last_result_carries(ray_local, tmp_path):
    """A real Tune run with the sweep's Tune settings and search_alg optuna: epochs report
    val_loss only, the evaluation's ACC comes with the last result (as in a trial). Tune's own
    OptunaSearch raises on the epochs' results; every trial must complete and Optuna must have
    been told each trial's ACC, at most 2 trials in flight."""
    import optuna
    from ray import tune

    from clusterlab.platform.sweep import final_metric_checking, tune_config

    space, _, _ = load_search_space(_space(tmp_path, (
        "base: simclr_digits\nsearch: {optim.lr: {uniform: [0.01, 1.0]}}\n"
        "tune: {metric: kmeans_norm_acc, mode: max, num_samples: 6, seed: 3, search_alg: {name: optuna}}\n")))
    settings = tune_config(space, "simclr", concurrency=2)
    assert settings.search_alg.max_concurrent == 2

    def trial(config):
        lr = config["params"]["optim.lr"]
        for epoch in (1, 2):
            tune.report({"epoch": epoch, "val_loss": 1.0 + lr})
        tune.report({"epoch": 2, "kmeans_norm_acc": 1.0 - abs(lr - 0.3)})

    tuner = tune.Tuner(trial, param_space={"params": {"optim.lr": tune.uniform(0.01, 1.0)}}, tune_config=settings,
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    with final_metric_checking(space, "simclr"):
        results = tuner.fit()
    assert len(results) == 6 and results.num_errors == 0
    study = settings.search_alg.searcher._ot_study
    told = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert told == sorted(r.metrics["kmeans_norm_acc"] for r in results)


@pytest.mark.parametrize("given", ["search_spaces/mixem_loss_weights_digits.yaml", "mixem_loss_weights_digits.yaml",
                                   "mixem_loss_weights_digits"])
def test_a_shipped_space_is_found_by_name_from_any_directory(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the README's tour may be run from anywhere
    assert find_search_space(given) == SPACES / "mixem_loss_weights_digits.yaml"


def test_an_unknown_space_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="search space nope.yaml does not exist; shipped ones .*simclr_lr_digits"):
        find_search_space("nope.yaml")
    (tmp_path / "mine.yaml").write_text("x: 1\n")
    assert find_search_space("mine.yaml") == Path("mine.yaml")  # a file of the user's own comes first


def test_a_relative_data_root_is_fixed_where_the_sweep_is_planned(tmp_path, monkeypatch):
    # Trials validate the base again in their Tune actor's working directory, where a relative
    # root named another folder (found sweeping lsdc_mnist_cpu with --data-root ../shared/datasets).
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(SPACES / "simclr_lr_digits.yaml", ["data.root=some/data"])
    monkeypatch.chdir("/")
    assert trial_config(plan.base, {"optim.lr": 0.1}).data.root == tmp_path / "some" / "data"
