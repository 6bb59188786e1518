"""Hardening, third round: hostile input on the newer surfaces (tracking URIs, Ray addresses,
Unicode in options, YAML bombs, long params, the Python API, heatmaps, search spaces).

Each case below was a traceback, a hang, a silent wrong result or a leaked credential on
main (698b8f9). Commands are run in-process through ``clusterlab.cli.main`` with the guards of
``test_invalid_input``: exit 2 with a message naming what to fix, before Ray, nothing written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterlab import cli
from test_invalid_input import _runs, empty_store, isolated_mlflow, ray_guard, workspace  # noqa: F401 (fixtures)

PASSWORD = "S3cretPW"

#: Commands that open the tracking store, each with what it needs besides.
TRACKING_COMMANDS = {
    "train": ["train", "epochs=3"],
    "evaluate": ["evaluate", "--run-id", "0" * 32],
    "reeval": ["reeval", "--experiment", "x"],
    "report": ["report", "--paper", "lsdc_mnist", "--experiment", "x"],
    "heatmap": ["heatmap", "--experiment", "x", "--x", "lambda_3", "--y", "lambda_4", "--metric", "maxcomp_acc"],
    "reconcile": ["runs", "reconcile", "--experiment", "x"],
}

#: Bad tracking URIs -> what the message must say.
BAD_URIS = {
    "ftp": ("ftp://x", "unsupported scheme 'ftp'"),
    "file-store": ("file:///{tmp}/mlruns", "MLflow file store"),
    "plain-text": ("my tracking store", "MLflow file store"),
    "missing-driver": (f"postgresql://alice:{PASSWORD}@127.0.0.1:1/db", "database driver is not installed"),
    "text-file-as-sqlite": ("sqlite:///{tmp}/notes.txt", "is not a SQLite database"),
    "directory-as-sqlite": ("sqlite:///{tmp}", "is a directory"),
}


def _fill(text: str, workspace: dict[str, str]) -> str:
    return text.format(**workspace)


@pytest.mark.reliability("a bad tracking URI (unsupported scheme, file store, plain text, missing database driver, "
                         "a text file or a directory as the SQLite database) in train, evaluate, reeval, report, "
                         "heatmap, runs reconcile",
                         "exit 2 naming tracking.uri / --tracking-uri / $CLUSTERLAB_TRACKING_URI and what to write "
                         "instead, before Ray, no traceback, nothing written, a password in the URI never printed")
@pytest.mark.parametrize("command", TRACKING_COMMANDS)
@pytest.mark.parametrize("bad", BAD_URIS)
def test_a_bad_tracking_uri_is_refused_up_front(command, bad, workspace, ray_guard, isolated_mlflow,
                                                monkeypatch, capsys):
    uri, expected = BAD_URIS[bad]
    Path(workspace["tmp"], "notes.txt").write_text("not a database\n")
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", _fill(uri, workspace))
    monkeypatch.chdir(workspace["cwd"])
    argv = [_fill(a, workspace) for a in TRACKING_COMMANDS[command]]
    if command == "train":
        argv.append(f"storage_path={workspace['tmp']}/ray")
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert expected in err and "CLUSTERLAB_TRACKING_URI" in err, err
    assert PASSWORD not in out + err
    assert not ray_guard
    assert not any(Path(workspace["cwd"]).iterdir()) and not Path(workspace["tmp"], "ray").exists()
    assert not Path(workspace["tmp"], "mlruns").exists()
    assert Path(workspace["tmp"], "notes.txt").read_text() == "not a database\n"


READ_ONLY_COMMANDS = [c for c in TRACKING_COMMANDS if c != "train"]


@pytest.mark.reliability("a mistyped SQLite path: a file that does not exist for a command that only reads runs "
                         "(evaluate --run-id, reeval, report, heatmap, runs reconcile), a folder that does not exist "
                         "for any command",
                         "exit 2 naming the path and --tracking-uri / $CLUSTERLAB_TRACKING_URI, before Ray; no empty "
                         "store and no folder left behind")
@pytest.mark.parametrize(("command", "missing"), [*((c, "folder") for c in TRACKING_COMMANDS),
                                                   *((c, "file") for c in READ_ONLY_COMMANDS)])
def test_a_mistyped_sqlite_path_creates_nothing(command, missing, workspace, ray_guard, isolated_mlflow,
                                                monkeypatch, capsys):
    database = Path(workspace["tmp"], "typo", "mlflow.db") if missing == "folder" else Path(workspace["tmp"], "m.db")
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.chdir(workspace["cwd"])
    argv = list(TRACKING_COMMANDS[command]) + ([f"storage_path={workspace['tmp']}/ray"] if command == "train" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if command == "train":
        assert f"the folder {database.parent} of the SQLite store does not exist" in err, err
    else:
        assert f"no MLflow store at {database}" in err, err
    assert "CLUSTERLAB_TRACKING_URI" in err and not ray_guard
    assert not database.exists() and not Path(workspace["tmp"], "typo").exists()
    assert not any(Path(workspace["cwd"]).iterdir()) and not Path(workspace["tmp"], "ray").exists()


def test_load_features_of_a_typo_touches_no_store(tmp_path, monkeypatch, isolated_mlflow):
    from clusterlab.api import load_features

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLUSTERLAB_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="'tset.parquett' is neither a features file .* nor an MLflow run id"):
        load_features("tset.parquett")
    with pytest.raises(ValueError, match="no MLflow store at .*mlflow.db"):
        load_features("0" * 32)  # a run id, but no store here
    assert not any(tmp_path.iterdir())


def test_an_unknown_init_from_run_leaves_no_folder(workspace, ray_guard, isolated_mlflow, monkeypatch, capsys):
    monkeypatch.setenv("CLUSTERLAB_TRACKING_URI", f"sqlite:///{workspace['tracking']}/mlflow.db")
    monkeypatch.chdir(workspace["cwd"])
    assert cli.main(["train", "epochs=3", "--init-from", "0" * 32, f"storage_path={workspace['tmp']}/ray"]) == 2
    assert "init_from: MLflow run 00000000000000000000000000000000 has no usable 'checkpoint'" in capsys.readouterr().err
    assert not ray_guard and not Path(workspace["tmp"], "ray").exists()


@pytest.mark.reliability("`clusterlab ui` with a tracking URI holding a password",
                         "the store URI reaches MLflow through MLFLOW_BACKEND_STORE_URI (readable by the owner "
                         "only), never through a command line of the UI or its workers (/proc/<pid>/cmdline)")
def test_the_ui_never_puts_the_store_uri_on_a_command_line(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    store = tmp_path / f"store-{PASSWORD}"  # the URI's distinctive part, as a password would be
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Given the secret way (an environment variable): what clusterlab starts must keep it there.
    ui = subprocess.Popen([sys.executable, "-m", "clusterlab.cli", "ui", "--port", str(port)],
                          env={**os.environ, "CLUSTERLAB_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ui.poll() is None:
            processes = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
            for p in processes:
                try:
                    command_line = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                seen.add(p.pid)
                assert PASSWORD not in command_line, command_line
            if len(seen) > 1:  # the MLflow server and its worker are up
                break
            time.sleep(0.2)
        assert ui.poll() is None, ui.communicate()[0][-2000:]
        assert psutil.Process(ui.pid).environ()["MLFLOW_BACKEND_STORE_URI"] == uri
        assert "mlflow" in " ".join(psutil.Process(ui.pid).cmdline())  # the exec'd MLflow UI itself
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()
    assert len(seen) > 1, "the UI started no worker within 60 s"


# ----------------------------------------------------------------------- text is text

EMOJI = "🙂"


@pytest.mark.reliability("emoji (non-BMP Unicode) in --note, --tag, --data-root, --experiment",
                         "the text arrives unchanged in the config, the printed YAML and the MLflow run's tags, "
                         "description and params (it was turned into lone surrogates and refused or crashed)")
def test_non_bmp_text_in_options_arrives_unchanged(tmp_path, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from clusterlab.platform import tracking

    folder = tmp_path / f"data {EMOJI}"
    folder.mkdir()
    argv = ["--preset", "simclr_digits", "--note", f"{EMOJI} note", "--tag", f"mood={EMOJI}",
            "--data-root", str(folder), "--experiment", f"exp {EMOJI}"]
    assert cli.main(["config", *argv]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tracking"]["note"] == f"{EMOJI} note" and printed["tracking"]["tags"] == {"mood": EMOJI}
    assert printed["data"]["root"] == str(folder) and printed["tracking"]["experiment"] == f"exp {EMOJI}"
    assert EMOJI in cli._load(cli.parse_args(["train", *argv])).to_yaml()  # literal, not "\U0001F642"

    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, _ = tracking.start_run(client, cli._load(cli.parse_args(["train", *argv])), "unicode")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags["mood"] == EMOJI and run.data.tags["mlflow.note.content"] == f"{EMOJI} note"
    assert run.data.params["data.root"] == str(folder)
    assert client.get_experiment(run.info.experiment_id).name == f"exp {EMOJI}"


# ----------------------------------------------------------------------- YAML with bounded cost

def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nepochs: *a{levels - 1}\n"


@pytest.mark.reliability("a config file of nested YAML aliases (billion laughs), a 2 MB config, duplicate YAML keys",
                         "exit 2 at once naming the file: the aliases' expanded size, the file size, the key given "
                         "twice; no message quotes more than a few hundred characters of a value")
@pytest.mark.parametrize("levels", [3, 9, 10])
def test_yaml_bombs_are_refused_at_bounded_cost(levels, tmp_path, capsys):
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels))
    assert path.stat().st_size < 1000
    tracemalloc.start()
    assert cli.main(["config", str(path)]) == 2
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert str(path) in err and len(err) < 2000, err[:3000]
    assert peak < 50 * 2 ** 20
    if 9 ** levels > 100_000:
        assert "aliases expand to more than 100,000 values" in err
    else:  # small enough to validate: the message quotes the value shortened
        assert "epochs: Input should be a valid integer" in err and "..." in err


def test_oversized_and_duplicate_key_configs_are_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("epochs: 3\n" + "# padding\n" * 200_000)
    assert cli.main(["config", str(big)]) == 2
    assert f"config file {big} is 2,000,010 bytes" in capsys.readouterr().err
    twice = tmp_path / "twice.yaml"
    twice.write_text("epochs: 3\noptim: {lr: 1e-3}\nepochs: 5\n")
    assert cli.main(["config", str(twice)]) == 2
    assert "key 'epochs' given twice in one mapping" in capsys.readouterr().err
    space = tmp_path / "space.yaml"
    space.write_text("base: mixem_digits\nsearch: {lambda_3: {grid: [0, 0.1]}, loss.weights.push: {grid: [0.5]}}\n")
    assert cli.main(["sweep", str(space), "--dry-run"]) == 2
    assert "search.loss.weights.push and search.lambda_3 are the same key (loss.weights.push)" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------- params MLflow cuts

@pytest.mark.reliability("a param longer than MLflow stores (optim.milestones of 1,499 values), run resumed",
                         "the param is stored as its head + SHA-256, under MLflow's limit; the same config resumes "
                         "the run (it was refused as 'a different config' forever), another one is refused with a "
                         "message of a few hundred characters")
def test_a_run_with_a_param_over_mlflows_limit_resumes(tmp_path):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from clusterlab.config import PARAM_VALUE_LIMIT, load_config
    from clusterlab.platform import tracking

    assert PARAM_VALUE_LIMIT == MAX_PARAM_VAL_LENGTH
    def cfg(first: int):
        return load_config(None, ["epochs=1500", "optim.schedule=multistep",
                                  f"optim.milestones={list(range(first, 1500))}"], preset="simclr_digits")

    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, resumed = tracking.start_run(client, cfg(1), "longp")
    assert not resumed
    stored = client.get_run(run_id).data.params["optim.milestones"]
    assert len(stored) <= MAX_PARAM_VAL_LENGTH and "sha256" in stored
    client.set_terminated(run_id, "KILLED")
    assert tracking.start_run(client, cfg(1), "longp") == (run_id, True)
    client.set_terminated(run_id, "KILLED")
    with pytest.raises(ValueError) as exc:
        tracking.start_run(client, cfg(2), "longp")
    assert "exists with a different config (1 params differ: optim.milestones" in str(exc.value)
    assert len(str(exc.value)) < 1000


# ----------------------------------------------------------------------- Ray addresses

@pytest.mark.reliability("a bad Ray address: RAY_ADDRESS=garbage, --address ray://nohost.invalid:10001, "
                         "RAY_ADDRESS=127.0.0.1:1 (nothing listening)",
                         "exit 2 within seconds naming $RAY_ADDRESS / --address, the accepted forms or that nothing "
                         "answers there, no traceback (it was a traceback, one after 38 s, or retries without end)")
@pytest.mark.parametrize(("command", "env_address", "expected"), [
    (["train", "epochs=3"], "garbage", "$RAY_ADDRESS ('garbage'): not a Ray address; use local, auto"),
    (["train", "epochs=3", "--address", "ray://nohost.invalid:10001"], None,
     "--address ('ray://nohost.invalid:10001'): nothing answers at nohost.invalid:10001"),
    (["evaluate", "--features", "{features}"], "127.0.0.1:1",
     "$RAY_ADDRESS ('127.0.0.1:1'): nothing answers at 127.0.0.1:1 (Connection refused)"),
], ids=["garbage", "unresolvable-client", "dead-gcs"])
def test_a_bad_ray_address_is_refused_at_once(command, env_address, expected, tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    from clusterlab.eval.feature_files import write_features

    features = tmp_path / "f.parquet"
    write_features(features, [{"index": np.arange(12), "label": np.arange(12) % 3,
                               "representation": np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)}])
    env = {**os.environ, "CLUSTERLAB_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    if env_address:
        env["RAY_ADDRESS"] = env_address
    argv = [a.replace("{features}", str(features)) for a in command]
    if argv[0] == "train":
        argv.append(f"storage_path={tmp_path / 'ray'}")
    done = subprocess.run([sys.executable, "-m", "clusterlab.cli", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


def test_demo_epochs_sets_a_warmup_that_fits_and_refuses_zero(monkeypatch, capsys):
    from clusterlab.platform import run

    class Stop(Exception):
        pass

    seen = []

    def record(cfg, address=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(run, "train", record)
    with pytest.raises(Stop):
        cli.main(["demo", "--epochs", "1"])
    assert (seen[0].epochs, seen[0].optim.warmup_epochs) == (1, 0)  # the preset's 2 warm-up epochs would not fit
    assert "(1 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--epochs", "0"])  # it printed "(40 epochs ...)" and trained 40
    assert exc.value.code == 2 and "--epochs: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--cpus", "inf"])
    assert exc.value.code == 2 and "--cpus: must be a positive, finite number of CPUs" in capsys.readouterr().err


# ----------------------------------------------------------------------- numerics

@pytest.mark.parametrize("factor", [1e20, 1e-20])
def test_evaluation_is_scale_invariant_for_any_finite_features(factor):
    """Digits pixels as features, scaled by 1e20 / 1e-20: float32 row norms and squared
    distances overflow / underflow there (kmeans_norm ACC read 0.102 instead of 0.790, inertia
    0). K-means and the normalisation are scale-invariant, so the metrics equal the unscaled."""
    import numpy as np
    from sklearn.datasets import load_digits

    from clusterlab.api import evaluate_features

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    plain = evaluate_features({"label": digits.target, "representation": x}, n_init=3, device="cpu").metrics
    scaled = evaluate_features({"label": digits.target, "representation": (x * factor).astype(np.float32)},
                               n_init=3, device="cpu").metrics
    for key in ("kmeans_norm_acc", "kmeans_norm_nmi", "kmeans_norm_ari", "kmeans_raw_acc", "kmeans_raw_nmi"):
        assert scaled[key] == pytest.approx(plain[key], abs=1e-2), key  # 0.102 vs 0.790 before; ties may split
    assert plain["kmeans_norm_acc"] > 0.7
    assert scaled["kmeans_raw_inertia"] == pytest.approx(plain["kmeans_raw_inertia"] * factor ** 2, rel=1e-3)


def test_batched_kmeans_refuses_nan_and_complex_input():
    import numpy as np

    from clusterlab.eval.kmeans import batched_kmeans

    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="complex values"):
        batched_kmeans(x.astype(np.complex64), 2, n_init=1)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        batched_kmeans(x, 2, n_init=1)


@pytest.mark.parametrize(("labels", "expected"), [
    ([0.0, float("nan"), 1.7], "2 value(s) are not whole numbers"),
    (None, "values beyond int64"),  # a uint64 array, made in the test
    (["a", "b", "c"], "expected integers"),
], ids=["nan-and-fraction", "uint64", "strings"])
def test_write_features_refuses_labels_it_cannot_store_exactly(labels, expected, tmp_path):
    import numpy as np

    from clusterlab.eval.feature_files import read_features, write_features

    if labels is None:
        labels = np.array([0, 1, 2**64 - 1], dtype=np.uint64)  # was stored as -1
    path = tmp_path / "f.parquet"
    batch = {"index": np.arange(3), "label": np.asarray(labels),
             "representation": np.ones((3, 2), dtype=np.float32)}
    with pytest.raises(ValueError, match="column 'label'") as exc:
        write_features(path, [batch])
    assert expected in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # no file, no *.parquet.tmp
    write_features(path, [{**batch, "label": np.array([0.0, -1.0, 2.0])}])  # whole floats are fine
    assert read_features(path)["label"].tolist() == [0, -1, 2]


# ----------------------------------------------------------------------- heatmaps

HEATMAP_300 = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # 3 GiB: it grew past 23 GB
from clusterlab.platform.heatmap import Cell, write_heatmap
cells = [Cell(None, float(i), float(j), (i * j) % 7 / 7, 0.0, 1, "ok" if (i + j) % 11 else "failed")
         for i in range(300) for j in range(300)]
out = write_heatmap(cells, "loss.weights.push", "loss.weights.pull", None, "maxcomp_acc", "big", sys.argv[1])
print(out.stat().st_size)
"""


@pytest.mark.reliability("`draw_heatmap` of a 300 x 300 grid", "PNG and CSV written under a 3 GiB address-space "
                         "limit (one text and one hatched patch per cell grew past 23 GB); failed cells grey, never "
                         "coloured as a value")
def test_a_300_by_300_heatmap_stays_within_a_memory_bound(tmp_path):
    import csv
    import subprocess
    import sys

    out = tmp_path / "big.png"
    done = subprocess.run([sys.executable, "-c", HEATMAP_300, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.stat().st_size > 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 90_000 and sum(r["status"] == "failed" for r in rows) > 0


def test_a_heatmap_with_one_param_on_two_axes_is_refused(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["heatmap", "--experiment", "x", "--x", "lambda_3", "--y", "loss.weights.push",
                     "--tracking-uri", uri]) == 2
    assert "name a different param on each axis" in capsys.readouterr().err
