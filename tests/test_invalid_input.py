"""Bad input never costs a cluster or a run (issue "reliability", item 6).

Every row of ``CASES`` is one ``clusterlab train | sweep | evaluate | reeval`` command line
with something wrong in it: an unknown key, a wrong type, a value out of range, an empty
grid, an unknown metric, missing dataset files, K above the number of images, an unreadable
checkpoint, a config file that does not exist or does not parse. ``test_bad_input_is_refused``
runs ``clusterlab.cli.main`` in-process on it and checks that the command

* exits with code 2 (the CLI's "bad input" code),
* says what is wrong on stderr, naming the field (``optim.lrr``, ``tune.metric``, ``--k``)
  or the path (the missing dataset file, the unreadable checkpoint),
* never starts Ray: ``ray.init`` and ``init_ray`` are replaced by a guard that records the
  attempt and aborts it, and ``ray.is_initialized()`` is still False afterwards, so a case
  that reaches Ray before it checks its input fails here instead of paying for a cluster,
* creates no MLflow run in the tracking store (``$CLUSTERLAB_TRACKING_URI``, a SQLite file
  under ``tmp_path``), and nothing under its ``storage_path`` or working directory (the test
  runs in an empty ``tmp_path/cwd``; train and sweep rows get ``storage_path=tmp_path/ray``).

Placeholders in the table (``{data}``, ``{ckpt}``, ``{configs}``, ``{spaces}``,
``{features}``, ``{tmp}``) are replaced by directories of ``tmp_path`` that the
``workspace`` fixture fills with tiny files: CIFAR-10 in torchvision's on-disk format, MNIST
IDX files with a truncated train images file (uncompressed and ``.gz``), a garbage
``checkpoint.pt``, config and search-space YAML files, Parquet features, and a
``checkpoint.pt`` and a CIFAR-10 ``data_batch_1`` whose pickles would create ``PWNED`` in the
working directory if anything unpickled them unrestricted (the check that the working
directory stays empty catches that; tests/test_untrusted_files.py has the other routes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clusterlab import cli
from test_datasets import write_cifar10, write_idx
from test_untrusted_files import write_payload_checkpoint, write_payload_cifar10

# ----------------------------------------------------------------------- files

#: configs/<name>.yaml
CONFIG_FILES = {
    "broken": "epochs: 3\noptim: {lr: 1e-3\n",  # unclosed flow mapping
    "top_level_list": "- epochs: 3\n- seed: 1\n",
    "section_not_mapping": "preset: simclr_digits\noptim: 5\n",
    "unknown_preset": "preset: simclr_imagenet\nepochs: 3\n",
}

_LR = "search: {optim.lr: {grid: [1e-3]}}\n"

#: spaces/<name>.yaml (simclr_digits trains 40 epochs and reports val_loss every epoch)
SPACE_FILES = {
    "ok": "base: simclr_digits\n" + _LR,
    "ok_cifar10": "base: simclr_cifar10\n" + _LR,
    "broken": "base: simclr_digits\nsearch: {optim.lr: {grid: [1e-3]}\n",
    "unknown_top_key": "base: simclr_digits\nserch: {optim.lr: {grid: [1e-3]}}\n",
    "no_search": "base: simclr_digits\nsearch: {}\n",
    "empty_grid": "base: simclr_digits\nsearch: {optim.lr: {grid: []}}\n",
    "unknown_search_key": "base: simclr_digits\nsearch: {optim.lrr: {grid: [1e-3, 1e-4]}}\n",
    "bad_searched_value": "base: simclr_digits\nsearch: {epochs: {grid: [0, 5]}}\n",
    "loguniform_zero": "base: simclr_digits\nsearch: {optim.lr: {loguniform: [0, 1e-3]}}\n",
    "unknown_metric": "base: simclr_digits\n" + _LR + "tune: {metric: accuracy}\n",
    "bad_mode": "base: simclr_digits\n" + _LR + "tune: {mode: up}\n",
    "grace_above_max_t": "base: simclr_digits\n" + _LR
                         + "tune: {scheduler: {name: asha, max_t: 5, grace_period: 10}}\n",
    "max_t_above_epochs": "base: simclr_digits\n" + _LR + "tune: {scheduler: {name: asha, max_t: 100}}\n",
    "unknown_scheduler": "base: simclr_digits\n" + _LR + "tune: {scheduler: {name: hyperband}}\n",
    "zero_workers": "base: simclr_digits\n" + _LR + "resources: {num_workers: 0}\n",
    "unknown_base": "base: simclr_imagenet\n" + _LR,
    "uniform_inf": "base: simclr_digits\nsearch: {optim.lr: {uniform: [1e-4, .inf]}}\n",
}

GARBAGE = b"this is not a torch checkpoint\n" * 4


def write_truncated_mnist(root: Path, gz: bool) -> None:
    """MNIST whose train images file, the first one checked, is truncated: its header announces
    60000 images but 10 follow, or, as ``NAME.gz``, its gzip stream is cut short. The other three
    files hold only an IDX header; they are never read, as the check stops at the damaged file."""
    d = root / "MNIST" / "raw"
    images = write_idx(d / f"train-images-idx3-ubyte{'.gz' if gz else ''}", 2051, [60000, 28, 28], bytes(10 * 784))
    if gz:
        images.write_bytes(images.read_bytes()[:-20])
    write_idx(d / "train-labels-idx1-ubyte", 2049, [60000])
    write_idx(d / "t10k-images-idx3-ubyte", 2051, [10000, 28, 28])
    write_idx(d / "t10k-labels-idx1-ubyte", 2049, [10000])


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with no runs, made once (MLflow's migrations take seconds); its
    experiment ``empty`` has none either."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("empty")
    return db


@pytest.fixture()
def workspace(tmp_path: Path, empty_store: Path) -> dict[str, str]:
    """The table's placeholders -> directories under ``tmp_path``, filled with the files above;
    ``tracking/mlflow.db`` an existing store without runs (unknown run ids are unknown there)."""
    dirs = {name: tmp_path / name for name in ("data", "ckpt", "configs", "spaces", "features", "cwd", "tracking")}
    for d in dirs.values():
        d.mkdir()
    shutil.copyfile(empty_store, dirs["tracking"] / "mlflow.db")
    (dirs["data"] / "empty").mkdir()
    write_cifar10(dirs["data"] / "cifar10", per_batch=4, n_test=12)  # 20 train, 12 test images
    write_cifar10(dirs["data"] / "cifar10_6_test", per_batch=4, n_test=6)  # 10 classes, 6 test images
    (dirs["ckpt"] / "garbage").mkdir()
    (dirs["ckpt"] / "garbage" / "checkpoint.pt").write_bytes(GARBAGE)
    write_payload_checkpoint(dirs["ckpt"] / "payload", "PWNED")  # relative: in the working directory
    write_payload_cifar10(dirs["data"] / "cifar10_payload", "PWNED")
    write_truncated_mnist(dirs["data"] / "mnist_truncated", gz=False)
    write_truncated_mnist(dirs["data"] / "mnist_truncated_gz", gz=True)
    for name, text in CONFIG_FILES.items():
        (dirs["configs"] / f"{name}.yaml").write_text(text)
    for name, text in SPACE_FILES.items():
        (dirs["spaces"] / f"{name}.yaml").write_text(text)
    (dirs["features"] / "garbage.parquet").write_bytes(GARBAGE)
    from clusterlab.eval.feature_files import write_features

    rng = np.random.default_rng(0)
    write_features(dirs["features"] / "six_rows.parquet", [{
        "index": np.arange(6), "label": np.array([0, 1, 2, 0, 1, 2]),
        "representation": rng.normal(size=(6, 4)).astype(np.float32)}])
    nan = rng.normal(size=(6, 4)).astype(np.float32)
    nan[[1, 4], 2] = np.nan
    write_features(dirs["features"] / "nan.parquet", [{
        "index": np.arange(6), "label": np.array([0, 1, 2, 0, 1, 2]), "representation": nan}])
    write_features(dirs["features"] / "one_class.parquet", [{
        "index": np.arange(6), "label": np.ones(6, dtype=np.int64), "representation": np.abs(nan[:, :2]) + 1}])
    return {"tmp": str(tmp_path), **{name: str(d) for name, d in dirs.items()}}


# ----------------------------------------------------------------------- the table


CASES = [
    # --- train: config keys, types and ranges (pydantic, before anything is read)
    pytest.param(["train", "bogus=1"], ["bogus: unknown key; allowed keys here: method, data"],
                 id="unknown-top-level-key"),
    pytest.param(["train", "optim.lrr=3e-4"], ["optim.lrr: unknown key; allowed keys here: name, lr"],
                 id="unknown-nested-key"),
    pytest.param(["train", "epochs=abc"], ["epochs: Input should be a valid integer", "'abc'"],
                 id="wrong-type-epochs"),
    pytest.param(["train", "optim.lr=fast"], ["optim.lr: Input should be a valid number", "'fast'"],
                 id="wrong-type-lr"),
    pytest.param(["train", "{configs}/section_not_mapping.yaml"], ["optim: Input should be", "(got 5)"],
                 id="section-not-a-mapping"),
    pytest.param(["train", "epochs=0"], ["epochs: Input should be greater than or equal to 1"],
                 id="zero-epochs"),
    pytest.param(["train", "optim.lr=-1"], ["optim.lr: Input should be greater than 0"],
                 id="negative-lr"),
    pytest.param(["train", "batch_size=1"], ["batch_size: Input should be greater than or equal to 2"],
                 id="batch-size-one"),
    pytest.param(["train", "data.val_fraction=1.5"], ["data.val_fraction: Input should be less than 1"],
                 id="val-fraction-above-one"),
    pytest.param(["train", "resources.num_workers=0"], ["resources.num_workers: Input should be greater than"],
                 id="zero-workers"),
    pytest.param(["train", "optim.warmup_epochs=50"], ["optim.warmup_epochs (50) must be < epochs (40)"],
                 id="warmup-not-below-epochs"),
    pytest.param(["train", "method=dino"], ["method: unknown method 'dino'; allowed: excb, lsdc"],
                 id="unknown-method"),
    pytest.param(["train", "data.name=imagenet"], ["data.name: Input should be 'cifar10'", "'imagenet'"],
                 id="unknown-dataset"),
    pytest.param(["train", "{configs}/unknown_preset.yaml"], ["preset: unknown preset 'simclr_imagenet'"],
                 id="unknown-preset-in-yaml"),
    pytest.param(["train", "--run-name", "a/b"], ["run_name: use letters, digits"],
                 id="run-name-with-slash"),
    # --- train: config files
    pytest.param(["train", "{configs}/missing.yaml"], ["config file {configs}/missing.yaml does not exist"],
                 id="config-file-missing"),
    pytest.param(["train", "{configs}/broken.yaml"], ["{configs}/broken.yaml: not valid YAML"],
                 id="config-yaml-does-not-parse"),
    pytest.param(["train", "{configs}/top_level_list.yaml"], ["{configs}/top_level_list.yaml: the top level"],
                 id="config-top-level-not-mapping"),
    # --- train: data and sizes (preflight, before MLflow and Ray)
    pytest.param(["train", "data.name=cifar10"], ["data.root is required", "--data-root"],
                 id="dataset-without-data-root"),
    pytest.param(["train", "data.name=cifar10", "--data-root", "{data}/empty"],
                 ["data.root", "{data}/empty/cifar-10-batches-py/data_batch_1"],
                 id="missing-dataset-files"),
    pytest.param(["train", "data.name=cifar10", "--data-root", "{data}/cifar10", "batch_size=64"],
                 ["batch_size: 64 is larger than the training set"],
                 id="batch-size-above-train-set"),
    pytest.param(["train", "data.name=cifar10", "--data-root", "{data}/cifar10_6_test", "batch_size=8"],
                 ["data: 10 clusters cannot be formed from 6 test images"],
                 id="classes-above-test-images"),
    pytest.param(["train", "data.name=cifar10", "--data-root", "{data}/cifar10_payload", "batch_size=8"],
                 ["data.root", "{data}/cifar10_payload/cifar-10-batches-py/data_batch_1: refused unread",
                  "never runs code from a dataset file"],
                 id="dataset-pickle-with-code"),
    pytest.param(["train", "data.name=mnist", "--data-root", "{data}/empty"],
                 ["data.root", "{data}/empty/MNIST/raw/train-images-idx3-ubyte", "same name + .gz",
                  "data.download=true"],
                 id="mnist-missing-files"),
    pytest.param(["train", "data.name=mnist", "--data-root", "{data}/mnist_truncated"],
                 ["data.root", "{data}/mnist_truncated/MNIST/raw/train-images-idx3-ubyte is damaged",
                  "expected 47040016 bytes", "delete it and rerun with data.download=true"],
                 id="mnist-truncated-images"),
    pytest.param(["train", "data.name=mnist", "--data-root", "{data}/mnist_truncated_gz"],
                 ["data.root", "{data}/mnist_truncated_gz/MNIST/raw/train-images-idx3-ubyte.gz is damaged",
                  "not a readable gzip file"],
                 id="mnist-truncated-gz"),
    pytest.param(["train", "--preset", "excb_digits", "excb.num_clusters=5000"],
                 ["excb.num_clusters: K-means centroid initialisation needs at least K = 5000 images"],
                 id="excb-k-above-images"),
    # --- train: init_from (checked before Ray and before the MLflow run)
    pytest.param(["train", "--init-from", "{ckpt}/garbage/checkpoint.pt"],
                 ["init_from", "{ckpt}/garbage/checkpoint.pt is unreadable"],
                 id="init-from-garbage-checkpoint-file"),
    pytest.param(["train", "init_from={ckpt}/garbage"], ["init_from", "{ckpt}/garbage/checkpoint.pt is unreadable"],
                 id="init-from-garbage-checkpoint-dir"),
    pytest.param(["train", "init_from={ckpt}/payload"],
                 ["init_from", "{ckpt}/payload/checkpoint.pt is unreadable", "never executes code from a checkpoint"],
                 id="init-from-checkpoint-with-code"),
    pytest.param(["train", "init_from={tmp}/nowhere/checkpoint_000009"],
                 ["init_from", "{tmp}/nowhere/checkpoint_000009", "neither an existing checkpoint path"],
                 id="init-from-missing-path"),
    # --- sweep: the search-space file (before Ray, before the MLflow parent run)
    pytest.param(["sweep", "{spaces}/missing.yaml"], ["search space {spaces}/missing.yaml does not exist"],
                 id="space-file-missing"),
    pytest.param(["sweep", "{spaces}/broken.yaml"], ["{spaces}/broken.yaml: not valid YAML"],
                 id="space-yaml-does-not-parse"),
    pytest.param(["sweep", "{spaces}/unknown_top_key.yaml"], ["serch: unknown key; allowed keys here: name, base"],
                 id="space-unknown-top-level-key"),
    pytest.param(["sweep", "{spaces}/no_search.yaml"], ["search: ", "at least 1 item"],
                 id="space-without-search-keys"),
    pytest.param(["sweep", "{spaces}/empty_grid.yaml"], ["search.optim.lr: grid is empty"],
                 id="space-empty-grid"),
    pytest.param(["sweep", "{spaces}/unknown_search_key.yaml"], ["search.optim.lrr", "unknown key"],
                 id="space-unknown-search-key"),
    pytest.param(["sweep", "{spaces}/bad_searched_value.yaml"], ["search.epochs: the value 0 makes an invalid config"],
                 id="space-searched-value-out-of-range"),
    pytest.param(["sweep", "{spaces}/loguniform_zero.yaml"], ["search.optim.lr", "loguniform needs low > 0"],
                 id="space-loguniform-from-zero"),
    pytest.param(["sweep", "{spaces}/unknown_metric.yaml"], ["tune.metric", "does not produce 'accuracy'"],
                 id="space-unknown-metric"),
    pytest.param(["sweep", "{spaces}/bad_mode.yaml"], ["tune.mode: Input should be 'min' or 'max'"],
                 id="space-bad-mode"),
    pytest.param(["sweep", "{spaces}/grace_above_max_t.yaml"], ["tune.scheduler", "grace_period (10) must be <= max_t (5)"],
                 id="space-grace-period-above-max-t"),
    pytest.param(["sweep", "{spaces}/max_t_above_epochs.yaml"], ["tune.scheduler.max_t: 100 is more than the 40 epochs"],
                 id="space-max-t-above-epochs"),
    pytest.param(["sweep", "{spaces}/unknown_scheduler.yaml"], ["tune.scheduler", "'hyperband'"],
                 id="space-unknown-scheduler"),
    pytest.param(["sweep", "{spaces}/zero_workers.yaml"], ["resources.num_workers: Input should be greater than"],
                 id="space-zero-workers"),
    pytest.param(["sweep", "{spaces}/unknown_base.yaml"], ["base: 'simclr_imagenet' is neither a preset"],
                 id="space-unknown-base"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "optim.lrr=1"], ["optim.lrr: unknown key"],
                 id="sweep-unknown-override-key"),
    pytest.param(["sweep", "{spaces}/ok_cifar10.yaml", "--data-root", "{data}/empty"],
                 ["data.root", "{data}/empty/cifar-10-batches-py/data_batch_1"],
                 id="sweep-missing-dataset-files"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "init_from={ckpt}/garbage/checkpoint.pt"],
                 ["init_from", "{ckpt}/garbage/checkpoint.pt is unreadable"],
                 id="sweep-init-from-garbage-checkpoint"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "--resume"], ["--resume: no interrupted sweep named 'ok'"],
                 id="sweep-resume-without-sweep"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "--experiment", "it's"], ["sweep name \"it's\": use letters, digits"],
                 id="sweep-name-with-a-quote"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "--experiment", "../../up"], ["sweep name '../../up': use letters"],
                 id="sweep-name-with-a-path"),
    pytest.param(["train", "--run-name", "r" * 101], ["run_name: at most 100 characters", "got 101"],
                 id="run-name-too-long"),
    # --- evaluate: options and sources
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet", "--k", "1"], ["--k must be >= 2, got 1"],
                 id="evaluate-k-one"),
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet", "--n-init", "0"],
                 ["--n-init must be >= 1, got 0"],
                 id="evaluate-n-init-zero"),
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet", "--k", "abc"],
                 ["argument --k: invalid int value: 'abc'"],
                 id="evaluate-k-not-a-number"),
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet", "--json", "{tmp}/no/such/m.json"],
                 ["--json {tmp}/no/such/m.json: its folder {tmp}/no/such does not exist"], id="json-folder-missing"),
    pytest.param(["train", "optim.lr=.inf"], ["optim.lr: Input should be a finite number"], id="infinite-lr"),
    pytest.param(["train", "loss.temperature=.inf"], ["loss.temperature: Input should be a finite number"],
                 id="infinite-temperature"),
    pytest.param(["train", "resources.cpus_per_worker=.inf"],
                 ["resources.cpus_per_worker: Input should be a finite number"], id="infinite-cpus"),
    pytest.param(["sweep", "{spaces}/uniform_inf.yaml"], ["search.optim.lr.uniform.1: Input should be a finite number"],
                 id="infinite-uniform-bound"),
    pytest.param(["train", "seed=-1"], ["seed: Input should be greater than or equal to 0"], id="negative-seed"),
    pytest.param(["train", f"seed={2**128}"], ["seed: Input should be less than or equal to 4294967295"],
                 id="seed-above-32-bits"),
    pytest.param(["evaluate", "--features", "{features}/missing.parquet"],
                 ["features file {features}/missing.parquet does not exist"],
                 id="evaluate-features-file-missing"),
    pytest.param(["evaluate", "--features", "{features}/garbage.parquet"],
                 ["{features}/garbage.parquet is not a Parquet file"],
                 id="evaluate-features-file-garbage"),
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet", "--k", "10"],
                 ["--k: 10 clusters cannot be formed from the 6 samples of {features}/six_rows.parquet"],
                 id="evaluate-k-above-samples"),
    pytest.param(["evaluate", "--checkpoint", "{ckpt}/garbage/checkpoint.pt"],
                 ["{ckpt}/garbage/checkpoint.pt is unreadable"],
                 id="evaluate-garbage-checkpoint"),
    pytest.param(["evaluate", "--features", "{features}/nan.parquet"],
                 ["{features}/nan.parquet: column 'representation' has NaN or Inf in 2 of 6 rows"],
                 id="evaluate-features-with-nan"),
    pytest.param(["evaluate", "--features", "{features}/one_class.parquet"],
                 ["{features}/one_class.parquet: every row has the label 1"],
                 id="evaluate-features-one-class"),
    pytest.param(["evaluate", "--run-id", "0123456789abcdef0123456789abcdef"],
                 ["--run-id: no MLflow run '0123456789abcdef0123456789abcdef'"],
                 id="evaluate-unknown-run-id"),
    pytest.param(["evaluate", "--checkpoint", "{ckpt}/payload"],
                 ["{ckpt}/payload/checkpoint.pt is unreadable", "never executes code from a checkpoint"],
                 id="evaluate-checkpoint-with-code"),
    pytest.param(["evaluate", "--checkpoint", "{ckpt}/missing"], ["no checkpoint at {ckpt}/missing"],
                 id="evaluate-missing-checkpoint"),
    # --- reeval
    pytest.param(["reeval", "--experiment", "anything", "--k", "1"], ["--k must be >= 2, got 1"],
                 id="reeval-k-one"),
    pytest.param(["reeval", "--experiment", "anything", "--n-init", "0"], ["--n-init must be >= 1, got 0"],
                 id="reeval-n-init-zero"),
    pytest.param(["reeval", "--experiment", "no-such-experiment"],
                 ["--experiment: no MLflow experiment named 'no-such-experiment'"],
                 id="reeval-unknown-experiment"),
    pytest.param(["reeval", "--experiment", "empty", "--filter", "params.seed = '7'"],
                 ["--experiment 'empty': no FINISHED run matching --filter \"params.seed = '7'\" to re-evaluate"],
                 id="reeval-filter-matches-nothing"),
    pytest.param(["evaluate", "--run-id", "0" * 32, "--train-features", "{features}/nan.parquet"],
                 ["--train-features goes with --features"], id="evaluate-train-features-with-run-id"),
    pytest.param(["evaluate", "--features", "{features}/nan.parquet", "--features-dir", "{tmp}/f"],
                 ["--features-dir goes with --checkpoint"], id="evaluate-features-dir-with-features"),
]


# ----------------------------------------------------------------------- the test


class RayStartAttempt(BaseException):
    """Raised in place of starting Ray; a BaseException so no ``except Exception`` swallows it."""


def _fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def _runs(db: Path) -> list:
    """Every run (any lifecycle stage) of every experiment in the SQLite store ``db``."""
    if not db.exists():
        return []
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(experiments, run_view_type=ViewType.ALL)) if experiments else []


@pytest.fixture()
def ray_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every way the CLI starts or attaches to Ray by a recorder that aborts the command."""
    import ray

    from clusterlab.platform import reeval, run, sources

    attempts: list[str] = []

    def refuse(name: str):
        def _refuse(*args, **kwargs):
            attempts.append(name)
            raise RayStartAttempt(name)
        return _refuse

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(run, "init_ray", refuse("clusterlab.platform.run.init_ray"))
    monkeypatch.setattr(reeval, "init_ray", refuse("clusterlab.platform.reeval.init_ray"))
    monkeypatch.setattr(sources, "init_ray", refuse("clusterlab.platform.sources.init_ray"))
    return attempts


@pytest.fixture()
def isolated_mlflow(monkeypatch: pytest.MonkeyPatch):
    """Undo ``mlflow.set_tracking_uri`` (a process global) after the test."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    if "MLFLOW_TRACKING_URI" in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)  # main() sets it


def _run(argv: list[str], workspace: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int | None:
    """``clusterlab <argv>`` in-process, in the empty ``cwd``, tracking to ``tracking/mlflow.db``;
    None when it tried to start Ray."""
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", f"sqlite:///{workspace['tracking']}/mlflow.db")
    monkeypatch.chdir(workspace["cwd"])
    argv = [_fill(a, workspace) for a in argv]
    if argv[0] in ("train", "sweep"):
        argv.append(f"storage_path={workspace['tmp']}/ray")
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse refuses malformed options with exit status 2
        return exc.code
    except RayStartAttempt:
        return None


@pytest.mark.reliability("invalid configs, search spaces, files and options (table in tests/test_invalid_input.py)",
                         "each refused with exit code 2 and a message naming the field or path, before Ray starts; "
                         "no MLflow run, no storage directory created")
@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bad_input_is_refused(argv, expected, workspace, ray_guard, isolated_mlflow, monkeypatch, capsys):
    import ray

    ray_was_up = ray.is_initialized()  # a session-wide Ray from another test module
    code = _run(argv, workspace, monkeypatch)
    err = capsys.readouterr().err

    assert not ray_guard, f"{ray_guard[0]} was called before the input was rejected (stderr: {err!r})"
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    for text in expected:
        assert _fill(text, workspace) in err, f"{_fill(text, workspace)!r} not in stderr {err!r}"
    assert ray.is_initialized() == ray_was_up, "Ray was started"
    assert _runs(Path(workspace["tracking"]) / "mlflow.db") == [], "an MLflow run was created"
    storage = Path(workspace["tmp"]) / "ray"
    assert not storage.exists(), f"{storage} was created"
    assert not any(Path(workspace["cwd"]).iterdir()), \
        f"files appeared in the working directory: {sorted(os.listdir(workspace['cwd']))}"


@pytest.mark.parametrize("argv", [
    pytest.param(["train", "epochs=3"], id="train"),
    pytest.param(["sweep", "{spaces}/ok.yaml", "epochs=3"], id="sweep"),
    pytest.param(["evaluate", "--features", "{features}/six_rows.parquet"], id="evaluate"),
    pytest.param(["reeval", "--experiment", "anything"], id="reeval"),
])
def test_the_guard_stops_valid_commands_at_ray(argv, workspace, ray_guard, isolated_mlflow, monkeypatch):
    """Control: the same commands with valid input get as far as starting Ray (and are stopped
    there by the guard), so a row above passes because its input was refused, not because the
    guard or the fixtures keep every command from getting anywhere."""
    if argv[0] == "reeval":  # a finished run to evaluate: re-evaluation checks that before Ray
        client = MlflowClient(f"sqlite:///{Path(workspace['tracking']) / 'mlflow.db'}")
        run_id = client.create_run(client.create_experiment("anything")).info.run_id
        client.set_terminated(run_id, "FINISHED")
    assert _run(argv, workspace, monkeypatch) is None and ray_guard
    assert len(_runs(Path(workspace["tracking"]) / "mlflow.db")) == (argv[0] == "reeval")  # none but reeval's


def test_bad_filter_and_file_storage_are_refused_before_ray(workspace, ray_guard, isolated_mlflow, monkeypatch,
                                                           capsys):
    """Two refusals the table cannot express: reeval's --filter needs an existing experiment, and
    the table's own storage_path override would win over a bad one."""
    MlflowClient(f"sqlite:///{Path(workspace['tracking']) / 'mlflow.db'}").create_experiment("exists")
    assert _run(["reeval", "--experiment", "exists", "--filter", "params.x = = 'y'"], workspace, monkeypatch) == 2
    assert "--filter:" in capsys.readouterr().err
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", f"sqlite:///{workspace['tracking']}/mlflow.db")
    monkeypatch.chdir(workspace["cwd"])
    a_file = Path(workspace["tmp"]) / "a_file"
    a_file.write_text("not a directory")
    assert cli.main(["train", f"storage_path={a_file}/ray_results"]) == 2
    assert f"storage_path: {a_file} is a file, not a directory" in capsys.readouterr().err
    assert not ray_guard and _runs(Path(workspace["tracking"]) / "mlflow.db") == []


def test_the_table_covers_every_command():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) >= 24
    assert {p.values[0][0] for p in CASES} == {"train", "sweep", "evaluate", "reeval"}
