"""Training checkpoints: one ``checkpoint.pt`` (+ a readable ``config.yaml`` and the
per-epoch metrics so far, ``history.json``) per directory.

A checkpoint holds everything needed to resume training (model, optimiser, scheduler, the
number of completed epochs) and to rebuild the model for evaluation without the dataset
(the config and the data statistics the model was trained with). Its metric history lets a
resumed run log the epochs whose metrics the tracking store never received.

Every file is written under a temporary name and renamed into place, so a process killed
while writing leaves the previous file whole.

``checkpoint.pt`` holds only tensors and plain values (dicts, lists, tuples, strings,
numbers, booleans, None) and is read with ``torch.load(weights_only=True)``: a file that asks
for anything else (a pickle that would run code when loaded) is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clusterlab.config import ExperimentConfig, build_stored_config
from clusterlab.trainers.base import DataMeta, Method, build_method

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half


def _plain(value: Any) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors, dicts, lists,
    tuples, str, int, float, bool, None (numpy scalars become Python numbers); anything else
    is an error here, at save time, rather than a checkpoint that cannot be loaded."""
    if isinstance(value, np.generic):  # before float: numpy.float64 is a float subclass torch refuses
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, OrderedDict):  # model state dicts: same type, same _metadata (module versions)
        plain = OrderedDict((k, _plain(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            plain._metadata = _plain(value._metadata)
        return plain
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} (only tensors and plain values)")


def save_checkpoint(directory: str | Path, *, method: Method, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epochs_done: int, meta: DataMeta,
                    history: list[dict[str, float]] | None = None,
                    epoch_progress: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint (and ``history``, the per-epoch metrics so far) atomically.
    ``epoch_progress``: for a checkpoint taken inside epoch ``epochs_done + 1`` (on a
    preemption notice), how far that epoch got (``platform.loop.EpochProgress``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _plain({
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epochs_done": int(epochs_done),
        "config": method.cfg.model_dump(mode="json"),
        "meta": dict(meta.__dict__),
        **({"epoch_progress": epoch_progress} if epoch_progress else {}),
    })
    _write_atomically(directory / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
    _write_atomically(directory / "config.yaml", lambda tmp: tmp.write_text(method.cfg.to_yaml(), encoding="utf-8"))
    _write_atomically(directory / HISTORY_FILE, lambda tmp: tmp.write_text(json.dumps(history or [])))
    return directory / CHECKPOINT_FILE


def read_history(directory: str | Path) -> list[dict[str, float]]:
    """The per-epoch metrics saved with a checkpoint (empty for checkpoints that have none)."""
    file = Path(directory) / HISTORY_FILE
    return json.loads(file.read_text()) if file.is_file() else []


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or directory onto the CPU, with a clear error if it is unusable."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file} (expected a directory containing {CHECKPOINT_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "WeightsUnpickler" not in str(exc):
            raise ValueError(f"checkpoint {file} is unreadable (UnpicklingError: {exc})") from None
        # torch's message recommends weights_only=False; say what was refused instead.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.? Please use|\n|$)",
                          str(exc))
        reason = found.group(1).strip() if found else "a pickle instruction torch does not admit"
        raise ValueError(
            f"checkpoint {file} is unreadable: it holds objects other than tensors and plain values, and clusterlab "
            f"never executes code from a checkpoint, so it was refused unread ({reason})"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise ValueError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {file} holds a {type(state).__name__}, not a dict; it was not written by clusterlab")
    missing = {"model", "config", "meta", "epochs_done"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {file} lacks {sorted(missing)}; it was not written by clusterlab")
    return state


def method_from_checkpoint(state: dict[str, Any]) -> tuple[Method, ExperimentConfig, DataMeta]:
    """Rebuild the trained method (in eval mode, on the CPU) from :func:`read_checkpoint`'s result."""
    cfg = build_stored_config(state["config"], source="checkpoint config")
    meta = DataMeta(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["meta"].items()})
    method = build_method(cfg, meta)
    method.load_state_dict(state["model"])
    return method.eval(), cfg, meta


def load_backbone(method: Method, state: dict[str, Any]) -> None:
    """Initialise ``method.backbone`` from a checkpoint of any method (MIX'EM Sec. 4: stage 2
    continues from the base SimCLR encoder; its heads start fresh)."""
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    try:
        method.backbone.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        trained = state["config"]["model"]
        raise ValueError(
            f"init_from: the checkpoint's backbone ({trained['backbone']}, stem {trained['stem']}) does not match "
            f"this run's model section; use the same model.backbone / model.stem / model.cnn_width ({exc})"
        ) from None
