"""No code from a file is ever executed by loading it (hardening issue).

Checkpoints are pickles (``checkpoint.pt``) and so are the CIFAR batches: a pickle can name
any callable and have the loader call it. clusterlab reads checkpoints with
``torch.load(weights_only=True)`` and CIFAR pickles with a restricted unpickler, so a file
whose pickle would call something (here: ``open(marker, "w")``, which creates ``marker``)
is refused unread, with exit code 2 naming the file, and ``marker`` never appears.

Each way such a file reaches clusterlab is covered: ``evaluate --checkpoint``,
``train --init-from`` (a directory, a plain-pickle file, an MLflow run), a CIFAR-10
``data_batch_1`` through ``data check`` and through ``train``'s preflight, and a run planted
in the tracking store, read by ``evaluate --run-id`` and by ``reeval`` (in a Ray task).
The control tests show that the same files do run their payload when loaded the unsafe way,
so a refusal here is not a payload that never worked.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlab import cli
from clusterlab.data import datasets as ds
from clusterlab.data.datasets import DatasetFileRefusedError, load_split
from clusterlab.trainers import DataMeta
from clusterlab.trainers.checkpoint import (
    CHECKPOINT_FILE,
    method_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from test_datasets import write_cifar10, write_cifar100

NEVER_CHECKPOINT = "clusterlab never executes code from a checkpoint"
NEVER_DATA = "clusterlab never runs code from a dataset file"

# --------------------------------------------------------------------- payloads


class OpenPayload:
    """Unpickles as ``open(marker, "w")``: creates ``marker`` if a loader runs it."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class TouchPayload:
    """Unpickles as ``pathlib.Path.touch(marker)`` (pickled as ``getattr(Path, 'touch')``)."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _payload_state(payload) -> dict:
    """A checkpoint dict with every key clusterlab expects, plus the payload."""
    return {"model": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {}, "epochs_done": 1,
            "config": {"method": "simclr"}, "meta": {"num_classes": 10, "image_size": 8,
                                                     "mean": (0.5,) * 3, "std": (0.2,) * 3},
            "extra": payload}


def write_payload_checkpoint(directory: Path, marker: str | Path, *, plain_pickle: bool = False,
                             payload_type: type = OpenPayload) -> Path:
    """``directory/checkpoint.pt`` whose unpickling would create ``marker``: torch's zip format,
    or (``plain_pickle``) a bare pickle as an attacker might write it."""
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / CHECKPOINT_FILE
    state = _payload_state(payload_type(marker))
    if plain_pickle:
        with open(file, "wb") as f:
            pickle.dump(state, f, protocol=2)
    else:
        torch.save(state, file)
    return file


def write_payload_cifar10(root: Path, marker: str | Path) -> Path:
    """A CIFAR-10 copy in the real format whose ``data_batch_1`` would create ``marker``."""
    write_cifar10(root)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # written just above by the test itself
    entry["batch_label"] = OpenPayload(marker)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "marker" / "PWNED"
    path.parent.mkdir()
    return path


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way these commands start Ray is replaced by a recorder that fails the command."""
    import ray

    from clusterlab.platform import reeval, run, sources

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("ray")
        raise AssertionError("Ray was started before the file was refused")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(run, "init_ray", refuse)
    monkeypatch.setattr(reeval, "init_ray", refuse)
    monkeypatch.setattr(sources, "init_ray", refuse)
    return calls


# --------------------------------------------------------------------- controls


def test_the_payloads_run_when_loaded_unsafely(tmp_path, marker):
    """Control: each payload file does create the marker under an unrestricted load."""
    file = write_payload_checkpoint(tmp_path / "zip", marker)
    torch.load(file, weights_only=False)
    assert marker.exists()
    marker.unlink()
    file = write_payload_checkpoint(tmp_path / "plain", marker, plain_pickle=True, payload_type=TouchPayload)
    with open(file, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    batch = write_payload_cifar10(tmp_path / "cifar", marker)
    with open(batch, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


# --------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("plain_pickle", [False, True], ids=["torch-zip", "plain-pickle"])
@pytest.mark.parametrize("payload_type", [OpenPayload, TouchPayload], ids=["open", "path-touch"])
def test_read_checkpoint_refuses_a_payload(tmp_path, marker, plain_pickle, payload_type):
    file = write_payload_checkpoint(tmp_path / "ckpt", marker, plain_pickle=plain_pickle, payload_type=payload_type)
    with pytest.raises(ValueError) as info:
        read_checkpoint(file.parent)
    message = str(info.value)
    assert str(file) in message and "objects other than tensors and plain values" in message
    assert NEVER_CHECKPOINT in message and "weights_only=False" not in message
    assert not marker.exists()


def test_read_checkpoint_refuses_a_plain_pickle_of_default_protocol(tmp_path, marker):
    file = tmp_path / CHECKPOINT_FILE
    with open(file, "wb") as f:
        pickle.dump(_payload_state(OpenPayload(marker)), f)
    with pytest.raises(ValueError, match=NEVER_CHECKPOINT):
        read_checkpoint(file)
    assert not marker.exists()


def test_evaluate_checkpoint_refuses_a_payload(tmp_path, marker, no_ray, tracking_uri, capsys):
    file = write_payload_checkpoint(tmp_path / "ckpt", marker)
    assert cli.main(["evaluate", "--checkpoint", str(file.parent)]) == 2
    err = capsys.readouterr().err
    assert f"{file} is unreadable" in err and NEVER_CHECKPOINT in err
    assert not marker.exists() and not no_ray


@pytest.mark.parametrize("plain_pickle", [False, True], ids=["torch-zip", "plain-pickle"])
def test_train_init_from_refuses_a_payload(tmp_path, marker, no_ray, tracking_uri, capsys, plain_pickle):
    file = write_payload_checkpoint(tmp_path / "ckpt", marker, plain_pickle=plain_pickle)
    target = file if plain_pickle else file.parent
    assert cli.main(["train", "--preset", "simclr_digits", "--init-from", str(target),
                     f"storage_path={tmp_path / 'ray'}"]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and str(file) in err and NEVER_CHECKPOINT in err
    assert not marker.exists() and not no_ray and not (tmp_path / "ray").exists()


def test_a_saved_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    """``save_checkpoint`` writes what ``weights_only=True`` reads (numpy scalars in the data
    statistics included), and optimiser and scheduler resume identically from it."""
    from clusterlab.config import load_config
    from clusterlab.trainers.base import build_method
    from clusterlab.trainers.optim import build_optimizer, build_scheduler

    cfg = load_config(None, ["model.cnn_width=8", "optim.warmup_epochs=1"], preset="simclr_digits")
    mean, std = tuple(np.float64([0.4, 0.5, 0.6])), tuple(np.float32([0.2, 0.2, 0.3]))  # as channel_stats may give
    meta = DataMeta(10, 16, mean, std)

    def fresh():
        method = build_method(cfg, meta)
        optimizer = build_optimizer(cfg.optim, method.parameters())
        return method, optimizer, build_scheduler(cfg.optim, optimizer, cfg.epochs, steps_per_epoch=4)

    torch.manual_seed(0)
    method, optimizer, scheduler = fresh()
    for _ in range(3):
        for p in method.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    save_checkpoint(tmp_path, method=method, optimizer=optimizer, scheduler=scheduler, epochs_done=1, meta=meta)

    state = torch.load(tmp_path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert state["meta"]["mean"] == pytest.approx((0.4, 0.5, 0.6)) and type(state["meta"]["mean"][0]) is float
    restored, restored_cfg, restored_meta = method_from_checkpoint(read_checkpoint(tmp_path))
    assert restored_cfg.model_dump() == cfg.model_dump() and restored_meta.num_classes == 10
    for (name, a), b in zip(method.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name

    _, optimizer2, scheduler2 = fresh()
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for s1, s2 in zip(optimizer.state_dict()["state"].values(), optimizer2.state_dict()["state"].values()):
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    scheduler.step()
    scheduler2.step()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


# --------------------------------------------------------------------- CIFAR pickles


def test_cifar10_payload_is_refused_by_the_reader(tmp_path, marker):
    batch = write_payload_cifar10(tmp_path, marker)
    with pytest.raises(DatasetFileRefusedError) as info:
        ds._read_cifar10([batch])  # the reader itself, not only the check before it
    assert str(batch) in str(info.value) and "open" in str(info.value)  # the refused global, named
    assert NEVER_DATA in str(info.value) and info.value.path == batch
    with pytest.raises(DatasetFileRefusedError):
        load_split("cifar10", tmp_path, "train")
    assert not marker.exists()


def test_cifar100_payload_is_refused(tmp_path, marker):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["filenames"] = TouchPayload(marker)
    with open(path, "wb") as f:
        pickle.dump(entry, f)  # the default protocol: globals as STACK_GLOBAL
    with pytest.raises(DatasetFileRefusedError, match=NEVER_DATA):
        load_split("cifar100_20", tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_real_format_batches_still_load(tmp_path, protocol):
    """What the real files hold is admitted: numpy arrays (under numpy 1's module name too, as
    in the original Python 2 pickles), lists, strings, bytes."""
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    entry = {"batch_label": "training batch 1 of 5", "labels": [3, 7], "data": rows,
             "filenames": [b"a.png", b"b.png"]}
    blob = pickle.dumps(entry, protocol=protocol)
    if protocol == 2:  # numpy 1 wrote the array reconstructor under numpy.core
        blob = blob.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
        assert b"numpy.core.multiarray" in blob
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    if protocol > 4:  # numpy's protocol-5 reconstructor is not what any CIFAR file holds
        with pytest.raises(DatasetFileRefusedError, match="_frombuffer"):
            ds._load_pickle(path)
        return
    loaded = ds._load_pickle(path)
    np.testing.assert_array_equal(loaded["data"], rows)
    assert loaded["labels"] == [3, 7] and loaded["filenames"] == [b"a.png", b"b.png"]


def test_codecs_encode_is_admitted_only_for_latin1_bytes(tmp_path):
    import codecs

    class Rot13:
        def __reduce__(self):
            return codecs.encode, ("data", "rot13")

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Rot13()}, protocol=2))
    with pytest.raises(DatasetFileRefusedError, match="rot13"):
        ds._load_pickle(path)


def test_data_check_refuses_a_payload(tmp_path, marker, capsys):
    batch = write_payload_cifar10(tmp_path / "data", marker)
    assert cli.main(["data", "check", "cifar10", "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert str(batch) in err and NEVER_DATA in err
    assert not marker.exists()


def test_train_preflight_refuses_a_cifar_payload(tmp_path, marker, no_ray, tracking_uri, capsys):
    batch = write_payload_cifar10(tmp_path / "data", marker)
    assert cli.main(["train", "data.name=cifar10", "--data-root", str(tmp_path / "data"), "batch_size=8",
                     f"storage_path={tmp_path / 'ray'}"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and str(batch) in err and NEVER_DATA in err
    assert not marker.exists() and not no_ray and not (tmp_path / "ray").exists()


# --------------------------------------------------------------------- a run planted in the tracking store


def _plant_run(tracking_uri: str, tmp_path: Path, marker: Path, experiment: str) -> str:
    """A FINISHED MLflow run whose ``checkpoint/checkpoint.pt`` artifact is a payload."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id, run_name="planted").info.run_id
    file = write_payload_checkpoint(tmp_path / "planted" / "checkpoint", marker)
    client.log_artifact(run_id, str(file), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_train_init_from_a_planted_run_is_refused(tmp_path, marker, no_ray, tracking_uri, capsys):
    run_id = _plant_run(tracking_uri, tmp_path, marker, "planted-init")
    assert cli.main(["train", "--preset", "simclr_digits", "--init-from", run_id,
                     f"storage_path={tmp_path / 'ray'}"]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and f"{CHECKPOINT_FILE} is unreadable" in err and NEVER_CHECKPOINT in err
    assert not marker.exists() and not no_ray


@pytest.mark.ray
def test_evaluate_run_id_refuses_a_planted_checkpoint(ray_local, tmp_path, marker, tracking_uri, capsys):
    run_id = _plant_run(tracking_uri, tmp_path, marker, "planted-evaluate")
    assert cli.main(["evaluate", "--run-id", run_id, "--tracking-uri", tracking_uri, "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint/{CHECKPOINT_FILE} is unreadable" in err and NEVER_CHECKPOINT in err
    assert not marker.exists()


@pytest.mark.ray
def test_reeval_skips_a_planted_checkpoint(ray_local, tmp_path, marker, tracking_uri, capsys):
    from mlflow import MlflowClient

    run_id = _plant_run(tracking_uri, tmp_path, marker, "planted-reeval")
    code = cli.main(["reeval", "--experiment", "planted-reeval", "--tracking-uri", tracking_uri,
                     "--n-init", "2", "--no-plots"])
    out = capsys.readouterr().out
    assert code == 1, out  # a run that failed re-evaluation (README: "reeval" exits 1)
    assert f"planted ({run_id}) skipped" in out and NEVER_CHECKPOINT in out
    assert "0 evaluated, 0 already evaluated, 1 failed" in out
    assert not marker.exists()
    assert not [k for k in MlflowClient(tracking_uri).get_run(run_id).data.metrics if k.startswith("eval/")]
