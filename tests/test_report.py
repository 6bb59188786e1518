"""`clusterlab report` on a real MLflow SQLite store: LSD-C Table 2 (MNIST) from finished runs.

Runs are made with MlflowClient as clusterlab's training makes them (tags method / git_commit /
clusterlab.hardware, params seed / data.name / eval.split, final metrics as fractions, start and
end times); no Ray, no training.
"""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from clusterlab import cli
from clusterlab.platform.tracking import HARDWARE_TAG
from clusterlab.platform.train import hardware_description
from clusterlab.platform.report import HEADER, PAPERS, command_line

T0 = 1_700_000_000_000  # ms
TITLE = PAPERS["lsdc_mnist"].title


def add_run(client: MlflowClient, exp: str, method: str, seed: int, metrics: dict[str, float], *,
            start_min: float = 0.0, minutes: float = 10.0, status: str = "FINISHED", dataset: str = "mnist",
            hardware: str = "1 x NVIDIA H200", commit: str = "0123456789abcdef", tags: dict | None = None,
            epochs: int = 15) -> str:
    run = client.create_run(exp, start_time=int(T0 + start_min * 60000), run_name=f"{method}-{seed}",
                            tags={"method": method, "dataset": dataset, "git_commit": commit, HARDWARE_TAG: hardware,
                                  "clusterlab.run_name": f"{method}-{seed}", **(tags or {})})
    run_id = run.info.run_id
    for key, value in (("seed", seed), ("data.name", dataset), ("eval.split", "all"), ("method", method),
                       ("epochs", epochs)):
        client.log_param(run_id, key, str(value))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status, end_time=int(T0 + (start_min + minutes) * 60000))
    return run_id


LSDC = [0.981, 0.975, 0.990, 0.968, 0.986]
LSDC_PIXELS = [0.530, 0.521, 0.540, 0.525, 0.533]
ROTNET = 0.874
ROTNET_PIXELS = 0.511


@pytest.fixture()
def store(tracking_uri):
    """Experiment 'encoders': one RotNet run (seed 0, earliest), a failed SimCLR run and a
    CIFAR-10 LSD-C run (both ignored). Experiment 'lsdc': a sweep parent (ignored) and five
    LSD-C seeds, 10..50 minutes each, on two kinds of hardware."""
    client = MlflowClient(tracking_uri)
    encoders, lsdc = client.create_experiment("encoders"), client.create_experiment("lsdc")
    add_run(client, encoders, "rotnet", 0, {"kmeans_raw_acc": ROTNET, "kmeans_norm_acc": 0.9,
                                            "pixels_acc": ROTNET_PIXELS}, minutes=60, epochs=2)  # shortened
    add_run(client, encoders, "simclr", 0, {"kmeans_norm_acc": 0.99}, status="FAILED")
    add_run(client, encoders, "lsdc", 7, {"head_acc": 0.2, "pixels_acc": 0.2}, dataset="cifar10")
    add_run(client, lsdc, "lsdc", 0, {"head_acc": 0.1, "pixels_acc": 0.1}, tags={"clusterlab.role": "parent"})
    for seed, (acc, pixels) in enumerate(zip(LSDC, LSDC_PIXELS)):
        add_run(client, lsdc, "lsdc", seed, {"head_acc": acc, "pixels_acc": pixels, "kmeans_raw_acc": 0.5},
                start_min=100 + seed, minutes=10 * (seed + 1),
                hardware="2 x NVIDIA H200" if seed else "1 x NVIDIA H200",
                commit="fedcba9876543210" if seed == 4 else "0123456789abcdef")
    return client, lsdc


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def pct(values: list[float]) -> str:
    return f"{np.mean(values) * 100:.1f} +- {np.std(values) * 100:.1f}"


def report(tmp_path, *extra: str) -> list[str]:
    return ["report", "--experiment", "encoders", "--experiment", "lsdc", "--paper", "lsdc_mnist",
            "--out", str(tmp_path / "REPRODUCTIONS.md"), *extra]


def test_report_rows_from_finished_runs(store, tmp_path, capsys):
    assert cli.main(report(tmp_path)) == 0
    printed = capsys.readouterr().out
    written = (tmp_path / "REPRODUCTIONS.md").read_text()
    assert written.startswith(HEADER) and written.count(f"## {TITLE}") == 1
    section = written[written.index(f"## {TITLE}"):]
    assert printed.startswith(section)  # stdout shows what was written

    # LSD-C: mean +- population std of the five seeds (the parent and the CIFAR-10 run left out)
    row = table_row(printed, "LSD-C (cluster head)")
    assert row[1:7] == ["`head_acc`", "98.6 +- 0.5 (10 seeds; LSD-C Table 2)", pct(LSDC), "5", "15", ">= 97.6: met"]
    assert row[7] == "30.0 min/run, 2.5 h total"  # 10, 20, ..., 50 minutes
    assert row[8] == "1 x NVIDIA H200; 2 x NVIDIA H200" and row[9] == "01234567, fedcba98"
    assert "- LSD-C (cluster head): 0: 98.1, 1: 97.5, 2: 99.0, 3: 96.8, 4: 98.6" in printed

    # raw pixels: one value per seed over every method, seed 0 from the earliest run (RotNet's)
    pixels = [ROTNET_PIXELS, *LSDC_PIXELS[1:]]
    row = table_row(printed, "K-means on raw pixels")
    assert row[3:8] == [pct(pixels), "5", "-", "within 3 of 57.2: missed", "-"]  # epochs and time: other rows
    assert "- K-means on raw pixels: 0: 51.1, 1: 52.1, 2: 54.0, 3: 52.5, 4: 53.3" in printed

    # one RotNet seed: no std; its wall time; rows nobody ran
    row = table_row(printed, "RotNet + K-means on its features")
    assert row[2:8] == ["-", "87.4", "1", "2 of 200", "-", "60.0 min/run, 60.0 min total"]  # of rotnet_mnist's
    assert "- RotNet + K-means on its features: epochs 2 (rotnet_mnist: 200)" in printed
    # the LSD-C runs name no encoder: that is a deviation from the recipe's RotNet start
    assert "- LSD-C (cluster head): no encoder: trained from scratch, not from a rotnet_mnist run" in printed
    assert "Notes:" not in printed
    for label in ("SimCLR + K-means", "MIX'EM Max Comp", "MIX'EM-initialised K-means"):
        assert table_row(printed, label)[3:7] == ["no runs", "0", "-", "-"]

    assert ("Written by: `clusterlab report --experiment encoders --experiment lsdc --paper lsdc_mnist "
            f"--out {tmp_path / 'REPRODUCTIONS.md'}`") in section
    assert "How to rerun" in section and "clusterlab sweep search_spaces/lsdc_mnist_seeds.yaml" in section


def test_notes_go_under_the_table_and_into_the_command(store, tmp_path, capsys):
    notes = ["LSD-C: no GPU was lent", "SimCLR | MIX'EM: not run"]
    assert cli.main(report(tmp_path, "--note", notes[0], "--note", notes[1])) == 0
    written = (tmp_path / "REPRODUCTIONS.md").read_text()
    assert "Notes:\n\n- LSD-C: no GPU was lent\n- SimCLR | MIX'EM: not run\n" in written
    assert "--note 'LSD-C: no GPU was lent' --note 'SimCLR | MIX'\"'\"'EM: not run'" in written


def test_target_met_and_missed(tracking_uri, tmp_path, capsys):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lsdc")
    for seed, (acc, pixels) in enumerate([(0.970, 0.590), (0.976, 0.600)]):
        add_run(client, exp, "lsdc", seed, {"head_acc": acc, "pixels_acc": pixels})
    assert cli.main(["report", "--experiment", "lsdc", "--paper", "lsdc_mnist", "--out", str(tmp_path / "r.md")]) == 0
    printed = capsys.readouterr().out
    assert table_row(printed, "LSD-C (cluster head)")[3:7] == [pct([0.970, 0.976]), "2", "15", ">= 97.6: missed"]
    assert table_row(printed, "K-means on raw pixels")[3:7] == [pct([0.590, 0.600]), "2", "-", "within 3 of 57.2: met"]


def test_rewrite_replaces_only_its_section(store, tmp_path, capsys):
    out = tmp_path / "REPRODUCTIONS.md"
    before = "# Reproductions\n\nHand-written intro.\n\n## Another paper\n\nkept as is\n"
    out.write_text(before)
    assert cli.main(report(tmp_path)) == 0
    out.write_text(out.read_text() + "\n## A later paper\n\nalso kept\n")
    client, lsdc = store
    add_run(client, lsdc, "lsdc", 5, {"head_acc": 0.99, "pixels_acc": 0.5}, start_min=200)
    assert cli.main(report(tmp_path)) == 0
    capsys.readouterr()
    text = out.read_text()
    assert text.startswith(before + "\n")
    assert text.endswith("\n## A later paper\n\nalso kept\n")
    assert text.count(f"## {TITLE}") == 1
    assert table_row(text, "LSD-C (cluster head)")[3:5] == [pct([*LSDC, 0.99]), "6"]


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "lsdc", "--paper", "lsdc_cifar"], "--paper: unknown paper table 'lsdc_cifar'; known: lsdc_mnist"),
    (["--experiment", "lsdc", "--experiment", "lsdcc", "--paper", "lsdc_mnist"],
     "--experiment: no MLflow experiment named 'lsdcc'"),
    (["--experiment", "empty", "--paper", "lsdc_mnist"], "--experiment 'empty': no FINISHED run there"),
    (["--experiment", "lsdc", "--experiment", "again", "--paper", "lsdc_mnist"],
     "2 FINISHED lsdc runs with seed 3 (lsdc-3, lsdc-3)"),
])
def test_bad_input_is_refused(store, tmp_path, capsys, argv, message):
    client, _ = store
    empty = client.create_experiment("empty")
    add_run(client, empty, "lsdc", 0, {"head_acc": 0.9}, status="FAILED")
    add_run(client, empty, "lsdc", 1, {"head_acc": 0.9}, dataset="cifar10")
    add_run(client, empty, "simclr", 2, {"maxcomp_acc": 0.9})  # MIX'EM's metric on a SimCLR run
    add_run(client, client.create_experiment("again"), "lsdc", 3, {"head_acc": 0.9})
    out = tmp_path / "REPRODUCTIONS.md"
    assert cli.main(["report", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "empty" in argv:
        assert "head_acc (method lsdc)" in err and "pixels_acc (any method)" in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:Query string argument")  # SQLAlchemy ignores ?token=
def test_no_credentials_in_output(store, tracking_uri, tmp_path, capsys):
    uri = f"{tracking_uri}?token=s3cr3t-value"  # the same SQLite store, with a credential-like parameter
    assert cli.main(report(tmp_path, "--tracking-uri", uri)) == 0
    printed = capsys.readouterr().out
    written = (tmp_path / "REPRODUCTIONS.md").read_text()
    assert "s3cr3t" not in printed and "s3cr3t" not in written
    assert f"--tracking-uri '{tracking_uri}?token=***'" in written
    assert "user:***@host" in command_line(["e"], "lsdc_mnist", None, "http://user:secret@host:5000")
    assert "secret" not in command_line(["e"], "lsdc_mnist", None, "http://user:secret@host:5000")


def test_out_directory_must_exist(store, tmp_path, capsys):
    argv = ["report", "--experiment", "lsdc", "--paper", "lsdc_mnist", "--out", str(tmp_path / "no" / "R.md")]
    assert cli.main(argv) == 2
    assert "--out: the directory" in capsys.readouterr().err


def test_hardware_description_on_cpu():
    text = hardware_description(torch.device("cpu"), 2)
    assert text.startswith("2 x CPU (") and text.endswith(" cores)")


@pytest.mark.parametrize("key", sorted(PAPERS))
def test_rerun_commands_parse(key):
    """The "How to rerun" commands of every table are commands of this CLI, with valid configs
    and search spaces (``$ROTNET_RUN_ID`` and the like stand for a run id)."""
    from clusterlab.config import load_config
    from clusterlab.search_space import load_search_space

    for command in (*PAPERS[key].rerun, *PAPERS[key].budget_rerun):
        argv = [re.sub(r"\$[A-Z_]+", "a" * 32, a) for a in shlex.split(command)]
        assert argv[0] == "clusterlab", command
        args = cli.parse_args(argv[1:])
        if args.command == "sweep":
            load_search_space(args.space, [*args.overrides, f"data.root={args.data_root}"])
        elif args.command == "train":
            load_config(None, [*args.overrides, f"data.root={args.data_root}"], preset=args.preset)
        else:
            assert args.command == "report" and args.paper == key


def test_deviations_name_the_run_and_its_encoder_against_their_recipes(tracking_uri, tmp_path, capsys):
    # A CPU-budget chain as `clusterlab train` / `sweep` log it: params of every key, the encoder's
    # run id in the trial's init_from tag. Bookkeeping params (root, resources, ...) are not deviations.
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("chain")
    rotnet = add_run(client, exp, "rotnet", 0, {"kmeans_raw_acc": 0.7, "pixels_acc": 0.53}, epochs=6)
    client.log_param(rotnet, "optim.milestones", "[2, 4, 5]")
    client.log_param(rotnet, "resources.cpus_per_worker", "2.0")
    lsdc = add_run(client, exp, "lsdc", 0, {"head_acc": 0.9, "pixels_acc": 0.53}, epochs=5,
                   tags={"init_from": rotnet})
    client.log_param(lsdc, "lsdc.rampup_length", "16.667")
    client.log_param(lsdc, "data.root", "/somewhere/else")
    add_run(client, exp, "lsdc", 1, {"head_acc": 0.9, "pixels_acc": 0.53}, tags={"init_from": "/ckpt/rotnet"})
    assert cli.main(["report", "--experiment", "chain", "--paper", "lsdc_mnist", "--out",
                     str(tmp_path / "R.md"), "--tracking-uri", tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert table_row(printed, "LSD-C (cluster head)")[5] == "5, 15 of 15"
    listed = printed[printed.index("Deviations from the recipe"):].splitlines()
    line = next(line for line in listed if line.startswith("- LSD-C (cluster head): "))
    assert line == ("- LSD-C (cluster head): lsdc.rampup_length 16.667 (lsdc_mnist: 50.0); epochs 5 (lsdc_mnist: 15); "
                    f"encoder run {rotnet[:8]} optim.milestones [2, 4, 5] (rotnet_mnist: [60, 120, 160]); "
                    f"encoder run {rotnet[:8]} epochs 6 (rotnet_mnist: 200); "
                    "encoder from /ckpt/rotnet: not an MLflow run, its recipe is not checked")
    assert ("- RotNet + K-means on its features: optim.milestones [2, 4, 5] (rotnet_mnist: [60, 120, 160]); "
            "epochs 6 (rotnet_mnist: 200)") in listed
