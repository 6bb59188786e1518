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
from test_invalid_input import _runs, isolated_mlflow, ray_guard, workspace  # noqa: F401 (fixtures)

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
