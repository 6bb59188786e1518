"""Checks of a run's inputs before anything expensive starts (torch, Ray, the tracking store).

- :func:`check_inputs`: ``storage_path`` and the dataset's files, content included (stat calls
  once a file has been validated in this process); the CLI calls it before importing the
  platform, so a wrong path answers in a fraction of a second.
- :func:`preflight`: :func:`check_inputs`, then the splits' sizes against ``batch_size`` and
  the number of clusters, and the method's own data checks (``MethodSpec.check_data``).

Both raise :class:`~clusterlab.config.ConfigError` naming the field and how to fix it. This
module imports neither torch nor Ray nor MLflow (digits' splits resize with torch when built).
"""

from __future__ import annotations

import os

from clusterlab.config import ConfigError, ExperimentConfig
from clusterlab.data.datasets import DatasetNotFoundError, build_splits, check_dataset, download_dataset
from clusterlab.methods import spec_for
from clusterlab.platform import cluster

# The splits each data.protocol reads (the test split is always evaluated).
PROTOCOL_SPLITS = {"train": ("train", "test"), "train+test": ("train", "test"),
                   "train+unlabeled": ("train", "unlabeled", "test")}


def dataset_need(cfg: ExperimentConfig) -> cluster.DatasetNeed:
    """What every node of a cluster must hold for ``cfg`` (checked there by check_cluster)."""
    return cfg.data.name, cfg.data.root, PROTOCOL_SPLITS[cfg.data.protocol]


def check_local_storage(storage_path: str | None) -> None:
    """A local ``storage_path`` must be a writable directory, or creatable in a writable one;
    checked without creating anything (URIs are checked by Ray when it writes)."""
    location = cluster.storage_location(storage_path)
    path = cluster.local_path(location)
    if path is None:
        return
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage_path: {existing} is a file, not a directory; pass a directory for checkpoints")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage_path: {existing} is not writable by this user; pass a directory you can write "
                          "(checkpoints and results go there)")


def check_inputs(cfg: ExperimentConfig) -> None:
    """``storage_path`` and the dataset's files (downloaded first when ``data.download``)."""
    check_local_storage(cfg.storage_path)
    try:
        if cfg.data.download:
            download_dataset(cfg.data.name, cfg.data.root)
        check_dataset(cfg.data.name, cfg.data.root, PROTOCOL_SPLITS[cfg.data.protocol])
    except DatasetNotFoundError as exc:
        raise ConfigError(f"data.root: {exc}") from None


def preflight(cfg: ExperimentConfig) -> dict[str, int]:
    """:func:`check_inputs`, then sizes -> ``{"train", "val", "test", "num_classes"}``."""
    check_inputs(cfg)
    splits = build_splits(cfg.data.name, cfg.data.root, cfg.data.protocol, cfg.data.val_fraction,
                          cfg.seed, cfg.data.image_size, cfg.data.limit)
    sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
             "num_classes": splits.num_classes}
    if cfg.batch_size > sizes["train"]:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training set ({sizes['train']} images of "
            f"{cfg.data.name} under protocol {cfg.data.protocol!r}); use batch_size <= {sizes['train']}"
        )
    if sizes["num_classes"] > sizes["test"]:
        raise ConfigError(f"data: {sizes['num_classes']} clusters cannot be formed from {sizes['test']} test images")
    check_data = spec_for(cfg.method).check_data
    if check_data is not None:
        check_data(cfg, sizes)
    return sizes
