"""Image datasets for clustering: readers for the real torchvision on-disk formats.

Why this module reads the files itself instead of instantiating
``torchvision.datasets.CIFAR10`` / ``CIFAR100`` / ``STL10``: those classes verify
the md5 checksum of every full-size file before loading anything, so they refuse
tiny hand-written files in the very same format (which is what the tests and any
offline smoke run use), and they hash gigabytes on every start. The readers here
parse exactly the layout torchvision parses (same pickles, same byte order, same
STL-10 column-major transpose), check only that the files exist, and return
plain ``uint8`` arrays in ``(N, 3, H, W)`` layout that the rest of the platform
turns into tensors. torchvision is used only for :func:`download_dataset` (an
explicit, never implicit, download) and to enumerate ``ImageFolder`` trees.

Datasets (keys of :data:`DATASETS`):

* ``cifar10``      -- ``ROOT/cifar-10-batches-py`` (python pickles).
* ``cifar100_20``  -- ``ROOT/cifar-100-python``; the 100 fine labels are mapped to
  the 20 superclasses (:data:`CIFAR100_FINE_TO_COARSE`), the usual deep-clustering
  benchmark (SCAN, MIX'EM).
* ``stl10``        -- ``ROOT/stl10_binary`` (raw ``.bin``), with the 100k-image
  ``unlabeled`` split (labels ``-1``).
* ``imagefolder``  -- ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.
* ``digits``       -- scikit-learn's bundled 8x8 digits (needs no files at all), the
  offline smoke-test dataset.
* ``mnist``        -- ``ROOT/MNIST/raw``, torchvision's layout of the four original files in
  LeCun's IDX format (http://yann.lecun.com/exdb/mnist/), each uncompressed or as ``NAME.gz``.
  Parsed with numpy rather than ``torchvision.datasets.MNIST``, which accepts only the
  uncompressed files and checks nothing of their content; the 28x28 grey digits are served as
  three equal channels, as ``digits`` are.

Security note: the CIFAR files are Python pickles (as in torchvision). They are read with
a restricted unpickler (:class:`_CifarUnpickler`) that builds only what the real files hold
(dicts, lists, strings, numbers and numpy arrays) and refuses any other global, so loading a
file never runs code from it (:class:`DatasetFileRefusedError`).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "SPLIT_NAMES",
    "PROTOCOLS",
    "CIFAR100_FINE_TO_COARSE",
    "ImageArray",
    "DatasetInfo",
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetFileRefusedError",
    "DatasetFileDamagedError",
    "expected_files",
    "check_dataset",
    "load_split",
    "download_dataset",
    "channel_stats",
    "DataSplits",
    "build_splits",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "test", "unlabeled")
PROTOCOLS: tuple[str, ...] = ("train", "train+test", "train+unlabeled")

# Fine label (CIFAR-100 alphabetical order: 0 apple, 1 aquarium_fish, 2 baby, ...)
# -> one of the 20 superclasses (0 aquatic_mammals, 1 fish, ..., 4 fruit_and_vegetables,
# ..., 18 vehicles_1, 19 vehicles_2). This is the mapping used by SCAN / MIX'EM and
# equals the official ``coarse_labels`` of the CIFAR-100 files.
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip

_STL10_SIZE = 96
_STL10_IMAGE_BYTES = 3 * _STL10_SIZE * _STL10_SIZE
_CIFAR_SIZE = 32
_CIFAR_ROW_BYTES = 3 * _CIFAR_SIZE * _CIFAR_SIZE
_MNIST_SIZE = 28
# LeCun's IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number
# (0x00000803 = 2051: uint8 data in 3 dimensions, the images; 0x00000801 = 2049: uint8 in 1
# dimension, the labels), one big-endian int32 per dimension, then the uint8 data row-major.
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
# Files of a split are <prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte; the counts are
# the published ones, enforced so that a truncated or foreign file is named with its expected size.
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_MNIST_COUNT = {"train": 60000, "test": 10000}
# Images processed per step when resizing/copying/summing, so that no full-size
# float copy of a large split (STL-10 unlabeled is 2.7 GB as uint8) ever exists.
_CHUNK = 512


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ImageArray:
    """A split held as one uint8 array plus labels.

    Kept as numpy rather than a torch ``Dataset`` so splits can be concatenated,
    subset and hashed cheaply; augmentation happens later on tensors.
    ``images`` is ``(N, 3, H, W)`` uint8 C-contiguous; ``labels`` is ``(N,)`` int64
    with ``-1`` where the label is unknown (STL-10 unlabeled).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise TypeError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {images.shape}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        # Normalise layout/dtype without copying when already right.
        object.__setattr__(self, "images", np.ascontiguousarray(images))
        object.__setattr__(self, "labels", np.ascontiguousarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> "ImageArray":
        """Rows selected by an integer index array or a boolean mask (a copy)."""
        idx = np.asarray(idx)
        if idx.dtype != np.bool_:
            idx = idx.astype(np.int64, copy=False)
        return ImageArray(self.images[idx], self.labels[idx])

    @staticmethod
    def concat(parts: Sequence["ImageArray"]) -> "ImageArray":
        """Concatenate splits of equal image size (e.g. train+test pooling)."""
        parts = list(parts)
        if not parts:
            raise ValueError("ImageArray.concat needs at least one part")
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate images of different shapes: {sorted(shapes)}")
        if len(parts) == 1:
            return parts[0]
        return ImageArray(
            np.concatenate([p.images for p in parts], axis=0),
            np.concatenate([p.labels for p in parts], axis=0),
        )


# ------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, used to validate requests before reading, and the functions
    that locate, check, read and download its files, to which :func:`expected_files`,
    :func:`check_dataset`, :func:`load_split` and :func:`download_dataset` dispatch. The
    entries, :data:`DATASETS`, follow the functions they name (after the readers).

    ``mean``/``std`` are the per-channel RGB statistics in [0, 1] of the train
    split; ``None`` means they are computed from the loaded train split
    (see :func:`build_splits`).
    """

    name: str
    num_classes: int | None
    image_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    splits: tuple[str, ...]
    directory: str
    how_to_get: str
    # The paths of a split in ``d`` = ROOT/directory: files, or directories if ``paths_are_dirs``.
    split_files: Callable[[Path, str], list[Path]]
    # Checks the content of a split whose paths exist, raising DatasetFileDamagedError or
    # DatasetFileRefusedError; None when there is nothing to check.
    check_split: Callable[[DatasetInfo, Path, str], None] | None
    # (root, the split's files, split, image_size) -> (images, labels) at native size (see the readers).
    read: Callable[[Path | None, list[Path], str, int], tuple[np.ndarray, np.ndarray]]
    # Downloads the files into the data root with torchvision; None when they cannot be downloaded.
    download: Callable[[Path], None] | None
    # Further files in ROOT/directory that every request needs (the metadata torchvision requires too).
    meta_files: tuple[str, ...] = ()
    paths_are_dirs: bool = False
    # False for a dataset without files, whose data root may be None.
    needs_root: bool = True
    # How to fix a damaged file ({root}: the data root), the end of DatasetFileDamagedError's message.
    repair: str = ""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the exact missing path(s)
    and how to obtain the files, so a failed run tells the user what to do.

    ``missing`` holds the missing absolute paths.
    """

    def __init__(self, message: str, missing: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.missing: list[Path] = list(missing)


class _DatasetFileError(DatasetNotFoundError):
    """A dataset file that is present but unusable; ``path`` is that file."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class DatasetFileRefusedError(_DatasetFileError):
    """A dataset file is present but refused unread: a pickle that asks for anything other
    than what the real CIFAR files hold (it would run code if unpickled normally). A
    :class:`DatasetNotFoundError`, so every place that turns an unusable dataset into a clear
    error before training (the CLI's exit code 2, ``preflight``, the multi-node check)
    handles it; ``missing`` is empty and ``path`` is the refused file."""


class DatasetFileDamagedError(_DatasetFileError, ValueError):
    """A dataset file (or directory) is present but its content is unusable: a truncated or
    foreign pickle, a batch with the wrong array size, labels that are not integers or are out
    of the dataset's range, an STL-10 ``.bin`` of the wrong size, an undecodable image, an
    empty class directory, a decompression bomb. The message names ``path``, what is wrong
    and how to fix it. A :class:`DatasetNotFoundError` (exit code 2, ``preflight``'s
    ``data.root: ...``) and, for older callers, a ``ValueError``."""


def _damaged(name: str, root: Path, path: Path, what: str, fix: str | None = None) -> DatasetFileDamagedError:
    fix = fix if fix is not None else DATASETS[name].repair.format(root=root)
    return DatasetFileDamagedError(f"dataset {name!r}: {path} is damaged: {what}. To fix it: {fix}", path)


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}") from None


def _check_splits(info: DatasetInfo, splits: Sequence[str]) -> None:
    if isinstance(splits, str):
        raise TypeError("splits must be a sequence of split names, not a single string")
    for split in splits:
        if split not in info.splits:
            raise ValueError(
                f"dataset {info.name!r} has no split {split!r}; allowed: {', '.join(info.splits)}"
            )


def _root(info: DatasetInfo, data_root: str | Path | None) -> Path | None:
    """Absolute data root, or None when none is given for a dataset that needs no files."""
    if data_root is None:
        if not info.needs_root:
            return None
        raise ValueError(
            f"dataset {info.name!r} needs a data root (directory containing "
            f"{info.directory or 'train/ and test/'}); to get the files: {info.how_to_get}"
        )
    return Path(data_root).expanduser().absolute()


def _split_files(info: DatasetInfo, root: Path, split: str) -> list[Path]:
    return info.split_files(root / info.directory, split)


def expected_files(name: str, data_root: str | Path | None, splits: Sequence[str]) -> list[Path]:
    """Absolute paths (files, or directories for imagefolder) that the given splits need.

    Includes the metadata file torchvision also requires (``batches.meta`` /
    ``meta``) so an incomplete copy is detected. Empty for ``digits``.
    """
    info = _info(name)
    _check_splits(info, splits)
    root = _root(info, data_root)
    if root is None:
        return []
    paths: list[Path] = [root / info.directory / meta for meta in info.meta_files]
    for split in splits:
        for p in _split_files(info, root, split):
            if p not in paths:
                paths.append(p)
    return paths


def check_dataset(name: str, data_root: str | Path | None, splits: Sequence[str]) -> None:
    """Fail fast, before any training starts, if the requested splits are not on disk.

    Checks existence, then content: CIFAR pickles are parsed once each with the restricted
    unpickler (which runs no code from them) and their structure, ``data`` size (uint8
    N x 3072) and label ranges checked; STL-10 ``.bin`` sizes and label bytes; MNIST IDX
    headers, (decompressed) sizes and label bytes (:func:`_check_mnist_split`); every
    ImageFolder class directory non-empty and every image verified by PIL. Raises ValueError
    for an unknown dataset or split (or a missing ``data_root`` for file-based datasets),
    :class:`DatasetNotFoundError` listing every missing path plus how to get it,
    :class:`DatasetFileRefusedError` naming a refused pickle and
    :class:`DatasetFileDamagedError` naming a damaged file, what is wrong and how to fix it.
    Files unchanged since they passed in this process are not checked again.
    """
    info = _info(name)
    paths = expected_files(name, data_root, splits)
    exists = Path.is_dir if info.paths_are_dirs else Path.is_file
    missing = [p for p in paths if not exists(p)]
    if missing:
        root = _root(info, data_root)
        lines = "\n".join(f"  {p}" for p in missing)
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: {len(missing)} missing path(s) under data root {root}:\n"
            f"{lines}\n"
            f"How to get it (ROOT = {root}): {info.how_to_get}",
            missing,
        )
    root = _root(info, data_root)
    assert root is not None or not paths
    if info.check_split is not None:
        for split in splits:
            info.check_split(info, root, split)


# Files (and ImageFolder split trees) already validated in this process, keyed by
# (path, size, mtime) fingerprints, so that preflight's check and build_splits' own check (and a
# second build_splits) do not parse or decode the same unchanged files again.
_VALIDATED: set[tuple] = set()


def _fingerprint(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _load_cifar_entry(info: DatasetInfo, path: Path):
    """The parsed pickle; refused globals stay :class:`DatasetFileRefusedError`, anything else
    that keeps it from parsing (truncated, not a pickle) is :class:`DatasetFileDamagedError`."""
    try:
        return _unpickle(path)
    except (DatasetFileRefusedError, MemoryError):
        raise
    except Exception as exc:
        raise _damaged(info.name, path.parent.parent, path,
                       f"not a readable pickle ({type(exc).__name__}: {exc}); the file is truncated or is not "
                       f"a {info.name} file") from None


def _check_cifar_file(info: DatasetInfo, path: Path) -> None:
    """Parse ``path`` once and check its structure, array sizes and labels."""
    key = ("cifar", info.name, *_fingerprint(path))
    if key in _VALIDATED:
        return
    entry = _load_cifar_entry(info, path)
    if path.name in info.meta_files:
        if not isinstance(entry, dict):
            raise _damaged(info.name, path.parent.parent, path,
                           f"not a CIFAR metadata file (expected a pickled dict, got {type(entry).__name__})")
    else:
        _cifar_batch(info, entry, path)
    _VALIDATED.add(key)


def _check_cifar_split(info: DatasetInfo, root: Path, split: str) -> None:
    """The metadata file and the split's batches, each checked by :func:`_check_cifar_file`."""
    for path in expected_files(info.name, root, [split]):
        _check_cifar_file(info, path)


# -------------------------------------------------------------------------- readers
# Each raw reader returns (images, labels) at native size. ``images`` may be a lazy
# (memory-mapped, non-contiguous) view so that the caller materialises exactly one
# copy, possibly resized or concatenated with other parts.


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for something :class:`_CifarUnpickler` does not build."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2, and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _RefusedGlobal(f"_codecs.encode with {encoding!r} (only str -> latin1 bytes is admitted)")
    return text.encode("latin1")


_NDARRAY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own, under either module name


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what the real CIFAR pickles hold: dicts, lists, strings, bytes, numbers and
    numpy arrays. Every global a pickle names goes through :meth:`find_class`, which admits
    just numpy's array reconstruction (``_reconstruct`` under its numpy 1 and numpy 2 module
    names, ``ndarray``, ``dtype``) and a latin1-only ``_codecs.encode`` (how Python 3 writes
    ``bytes`` at protocol 2); anything else (``os.system``, ``builtins.open``, ...) is refused
    before it is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path):
    """``path`` read with :class:`_CifarUnpickler`; a refused global raises :class:`DatasetFileRefusedError`."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DatasetFileRefusedError(
            f"{path}: refused unread: this pickle asks for {exc}, which a CIFAR file never holds (only dicts, lists, "
            f"strings, numbers and numpy arrays are built); clusterlab never runs code from a dataset file. "
            f"Replace it with the original file", path) from None


def _load_pickle(path: Path) -> dict:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry:
        raise ValueError(f"{path}: not a CIFAR batch (expected a pickled dict with 'data')")
    return entry


def _cifar_labels(info: DatasetInfo, entry: dict, path: Path, key: str, n: int, top: int) -> np.ndarray:
    """``entry[key]`` as int64, checked: one integer per image, each in ``0..top``."""
    if key not in entry:
        raise _damaged(info.name, path.parent.parent, path, f"the batch has no {key!r} (one label per image)")
    try:
        labels = np.asarray(entry[key])
    except Exception as exc:  # ragged nested lists and the like
        raise _damaged(info.name, path.parent.parent, path, f"{key!r} is not a list of integers ({exc})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        first = labels.ravel()[0].item() if labels.size else None
        raise _damaged(info.name, path.parent.parent, path,
                       f"{key!r} must be a list of integers 0..{top}, got {labels.dtype} values of shape "
                       f"{labels.shape} (first: {first!r})")
    if labels.shape[0] != n:
        raise _damaged(info.name, path.parent.parent, path, f"{labels.shape[0]} {key!r} for {n} images")
    bad = np.flatnonzero((labels < 0) | (labels > top))
    if bad.size:
        i = int(bad[0])
        raise _damaged(info.name, path.parent.parent, path,
                       f"{key!r} must be in 0..{top}, but {bad.size} label(s) are out of range (the first: "
                       f"{labels[i]} for image {i})")
    return labels.astype(np.int64, copy=False)


def _cifar_batch(info: DatasetInfo, entry, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` and labels (CIFAR-100: the 20 superclasses) of a parsed batch,
    after checking its structure, array size and label range; :class:`DatasetFileDamagedError`
    naming ``path`` otherwise."""
    root = path.parent.parent
    label_key = "labels" if info.name == "cifar10" else "fine_labels"
    if not isinstance(entry, dict) or "data" not in entry:
        raise _damaged(info.name, root, path, f"not a CIFAR batch (expected a pickled dict with 'data' and "
                                              f"{label_key!r}, got {type(entry).__name__})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_ROW_BYTES:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _damaged(info.name, root, path,
                       f"'data' must be a uint8 array (N, {_CIFAR_ROW_BYTES}), one 3x32x32 image per row, got {got}")
    n = data.shape[0]
    if n == 0:
        raise _damaged(info.name, root, path, "the batch holds no images")
    # Each row: 1024 R, 1024 G, 1024 B, each 32x32 row-major.
    imgs = data.reshape(-1, 3, _CIFAR_SIZE, _CIFAR_SIZE)
    if info.name == "cifar10":
        return imgs, _cifar_labels(info, entry, path, "labels", n, 9)
    fine = _cifar_labels(info, entry, path, "fine_labels", n, len(CIFAR100_FINE_TO_COARSE) - 1)
    coarse = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)[fine]
    if "coarse_labels" in entry:
        # Cross-check against the file's own superclasses: a mismatch means a
        # corrupt/foreign file or a wrong mapping, either of which would silently
        # poison every clustering metric.
        stored = _cifar_labels(info, entry, path, "coarse_labels", n, 19)
        if not np.array_equal(stored, coarse):
            i = int(np.flatnonzero(stored != coarse)[0])
            raise _damaged(info.name, root, path,
                           f"'coarse_labels' disagree with the fine labels (CIFAR100_FINE_TO_COARSE): image {i} has "
                           f"fine label {fine[i]} (superclass {coarse[i]}) but coarse label {stored[i]}")
    return imgs, coarse


def _read_cifar10(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    info = DATASETS["cifar10"]
    images, labels = [], []
    for path in files:
        imgs, labs = _cifar_batch(info, _load_cifar_entry(info, path), path)
        images.append(imgs)
        labels.append(labs)
    return np.concatenate(images) if len(images) > 1 else images[0], np.concatenate(labels)


def _read_cifar100_20(path: Path) -> tuple[np.ndarray, np.ndarray]:
    info = DATASETS["cifar100_20"]
    return _cifar_batch(info, _load_cifar_entry(info, path), path)


def _stl10_sizes_and_labels(info: DatasetInfo, files: list[Path], split: str) -> tuple[int, np.ndarray | None]:
    """Image count of the split's ``X`` file (from its size) and its labels 0..9 (None for
    ``unlabeled``), checked without reading the images: ``X`` must be a positive multiple of
    3x96x96 bytes, ``y`` one byte 1..10 per image."""
    x_path = files[0]
    root = x_path.parent.parent
    size = x_path.stat().st_size
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise _damaged(info.name, root, x_path,
                       f"size {size} bytes is not a positive multiple of {_STL10_IMAGE_BYTES} (one 3x96x96 uint8 "
                       f"image); the file is truncated or is not an STL-10 image file")
    n = size // _STL10_IMAGE_BYTES
    if split == "unlabeled":
        return n, None
    y_path = files[1]
    y_size = y_path.stat().st_size
    if y_size != n:
        raise _damaged(info.name, root, y_path,
                       f"{y_size} bytes (one label byte per image) but {x_path.name} holds {n} images ({size} bytes); "
                       f"one of the two files is truncated or they come from different splits")
    raw = np.fromfile(y_path, dtype=np.uint8)
    bad = np.flatnonzero((raw < 1) | (raw > 10))
    if bad.size:
        i = int(bad[0])
        raise _damaged(info.name, root, y_path,
                       f"labels must be 1..10 (one byte per image), but {bad.size} label(s) are out of range (the "
                       f"first: {raw[i]} for image {i})")
    return n, raw.astype(np.int64) - 1


def _read_stl10(files: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    x_path = files[0]
    n, labels = _stl10_sizes_and_labels(DATASETS["stl10"], files, split)
    # Memory-mapped: nothing is read until the caller copies, and the copy it makes
    # is the only in-memory one (the unlabeled split alone is 2.7 GB).
    raw = np.memmap(x_path, dtype=np.uint8, mode="r")
    # Stored column-major per channel, exactly as torchvision reads it.
    images = raw.reshape(-1, 3, _STL10_SIZE, _STL10_SIZE).transpose(0, 1, 3, 2)
    if labels is None:
        return images, np.full(n, -1, dtype=np.int64)
    return images, labels


def _idx_read(root: Path, path: Path, limit: int) -> tuple[bytes, int]:
    """The first ``limit`` bytes of an MNIST IDX file and its full size in bytes, both after
    decompression for ``NAME.gz`` (read with :mod:`gzip`). A ``.gz`` is read to its end, in
    1 MiB chunks that are not kept: only then is its size known, and so a truncated or corrupt
    stream is reported here, before training, as :class:`DatasetFileDamagedError` (about 0.2 s
    for the 47 MB train images). Callers pass the expected size (or just the header's) as
    ``limit``, so a file of the wrong size, even a gzip bomb, is never held in memory."""
    if path.suffix != ".gz":
        with open(path, "rb") as f:
            return f.read(limit), os.fstat(f.fileno()).st_size
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit)
            size = len(data)
            while chunk := f.read(1 << 20):
                size += len(chunk)
            return data, size
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _damaged("mnist", root, path, f"not a readable gzip file ({type(exc).__name__}: {exc}); it is "
                                            f"truncated or corrupt") from None


def _check_mnist_header(root: Path, path: Path, split: str, head: bytes, size: int,
                        images_of: Path | None = None) -> None:
    """Check an MNIST IDX file from its first bytes ``head`` and its (decompressed) ``size``: the
    magic number, 28x28 images, the split's published count and header + data == size. A labels
    file is given ``images_of``, its images file, which is checked first: a labels count that
    disagrees is thus named against it."""
    n = _MNIST_COUNT[split]
    labels = images_of is not None
    magic, ndim, item, items = ((_IDX_LABELS_MAGIC, 1, 1, "labels") if labels
                                else (_IDX_IMAGES_MAGIC, 3, _MNIST_SIZE * _MNIST_SIZE, "images"))
    header = 4 + 4 * ndim
    expected = header + n * item
    decompressed = " decompressed" if path.suffix == ".gz" else ""
    sizes = (f"expected {expected} bytes{decompressed} ({header} header bytes + {n} "
             f"{'one-byte labels' if labels else f'{_MNIST_SIZE}x{_MNIST_SIZE} images of one byte per pixel'})")
    if len(head) < header:
        raise _damaged("mnist", root, path, f"{size} bytes{decompressed}, shorter than its IDX header; {sizes}")
    got_magic, *dims = np.frombuffer(head, dtype=">i4", count=1 + ndim).tolist()
    if got_magic != magic:
        why = (f"it is gzip-compressed: rename it to {path.name}.gz" if head[:2] == b"\x1f\x8b"
               else f"it is not an MNIST {items} file")
        raise _damaged("mnist", root, path, f"magic number {got_magic} (its first 4 bytes, a big-endian int32), "
                                            f"expected {magic} for an IDX file of {items}; {why}")
    if dims[1:] != [_MNIST_SIZE] * (ndim - 1):
        raise _damaged("mnist", root, path, f"its header announces {'x'.join(map(str, dims[1:]))} images, "
                                            f"expected {_MNIST_SIZE}x{_MNIST_SIZE}")
    if dims[0] != n:
        against = f"{images_of.name} holds {n} images and " if labels else ""
        raise _damaged("mnist", root, path, f"its header announces {dims[0]} {items}, but {against}the MNIST "
                                            f"{split} split has {n}; {sizes}")
    if size != expected:
        raise _damaged("mnist", root, path, f"{size} bytes{decompressed}, {sizes}; the file is truncated or has "
                                            f"extra bytes")


def _mnist_labels(root: Path, path: Path, split: str, images: Path) -> np.ndarray:
    """The split's labels as int64 after checking the labels file (header, size, every label
    in 0..9); reads the whole file (60 kB for train)."""
    data, size = _idx_read(root, path, 8 + _MNIST_COUNT[split])
    _check_mnist_header(root, path, split, data[:8], size, images_of=images)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise _damaged("mnist", root, path, f"labels must be in 0..9 (one byte per image), but {bad.size} label(s) "
                                            f"are out of range (the first: {labels[i]} for image {i})")
    return labels.astype(np.int64)


def _check_mnist_split(root: Path, split: str) -> None:
    """Check a split's two IDX files without reading the images: the images file's header and
    size (a ``.gz`` is decompressed to count its bytes, see :func:`_idx_read`), then the labels
    file whole. Skipped when both are unchanged since they passed in this process."""
    images, labels = _split_files(DATASETS["mnist"], root, split)
    key = ("mnist", split, _fingerprint(images), _fingerprint(labels))
    if key in _VALIDATED:
        return
    head, size = _idx_read(root, images, limit=16)
    _check_mnist_header(root, images, split, head, size)
    _mnist_labels(root, labels, split, images)
    _VALIDATED.add(key)


def _read_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 28, 28)``, three equal channels as ``digits`` are served (so every method's
    augmentations and the RGB backbones apply unchanged), and labels of a split. The header is
    checked again on the bytes actually read, which ``check_dataset`` may have seen earlier."""
    images_path, labels_path = _split_files(DATASETS["mnist"], root, split)
    data, size = _idx_read(root, images_path, 16 + _MNIST_COUNT[split] * _MNIST_SIZE * _MNIST_SIZE)
    _check_mnist_header(root, images_path, split, data[:16], size)
    labels = _mnist_labels(root, labels_path, split, images_path)
    grey = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(-1, 1, _MNIST_SIZE, _MNIST_SIZE)
    return np.repeat(grey, 3, axis=1), labels


def _imagefolder_classes(root: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    classes, _ = find_classes(str(root / "train"))
    return classes


def _imagefolder_files(root: Path, split: str) -> dict[str, list[Path]]:
    """``{class: image paths}`` of ``root/split``, enumerated as torchvision's ``ImageFolder``
    does (class = sub-directory, images = files with its extensions, walked recursively);
    an empty split or class directory is :class:`DatasetFileDamagedError`."""
    import os

    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    d = root / split
    layout = f"arrange the images as {root}/{split}/<class>/<image> (extensions: {', '.join(IMG_EXTENSIONS)})"
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir())
    if not classes:
        raise _damaged("imagefolder", root, d, "it holds no class directories", layout)
    out: dict[str, list[Path]] = {}
    for cls in classes:
        files = [Path(dirpath) / f
                 for dirpath, _, fnames in sorted(os.walk(d / cls, followlinks=True))
                 for f in sorted(fnames) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
        if not files:
            raise _damaged("imagefolder", root, d / cls, "the class directory holds no images",
                           f"put its images in it or remove the empty directory; {layout}")
        out[cls] = files
    return out


def _check_imagefolder_split(root: Path, split: str) -> None:
    """Every class directory holds images, test classes exist in train, and every image opens
    and passes ``PIL.Image.verify()`` (headers and, for PNG, chunk checksums) without exceeding
    ``PIL.Image.MAX_IMAGE_PIXELS``. Cost: one open + verify per image (about 0.5 ms for a 32x32
    PNG: 0.46 s for 1000), skipped when the split's file list, sizes and mtimes are unchanged since the last
    check in this process."""
    from PIL import Image

    files = _imagefolder_files(root, split)
    if split != "train" and (root / "train").is_dir():
        train_classes = set(_imagefolder_classes(root))
        extra = sorted(set(files) - train_classes)
        if extra:
            raise _damaged("imagefolder", root, root / split / extra[0],
                           f"class folder(s) {extra} of {root / split} do not exist in {root / 'train'} "
                           f"(classes: {sorted(train_classes)})",
                           "rename or remove them: test classes must be a subset of the train classes")
    paths = [p for ps in files.values() for p in ps]
    key = ("imagefolder", str(root / split), Image.MAX_IMAGE_PIXELS, hash(tuple(_fingerprint(p) for p in paths)))
    if key in _VALIDATED:
        return
    for path in paths:
        _verify_image(root, Path(path))
    _VALIDATED.add(key)


def _verify_image(root: Path, path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Image.DecompressionBombError as exc:
        raise _damaged("imagefolder", root, path,
                       f"refused as a decompression bomb ({exc}; PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})",
                       f"replace it with a smaller image or remove it from {root}") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise _damaged("imagefolder", root, path, f"not a decodable image ({type(exc).__name__}: {exc})") from None


def _read_imagefolder(root: Path, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    train_classes = _imagefolder_classes(root)
    folder = ImageFolder(str(root / split))
    extra = sorted(set(folder.classes) - set(train_classes))
    if extra:
        raise ValueError(
            f"{root / split}: class folder(s) {extra} do not exist in {root / 'train'} "
            f"(classes: {train_classes})"
        )
    to_train = {folder.class_to_idx[c]: train_classes.index(c) for c in folder.classes}
    n = len(folder.samples)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i, (path, target) in enumerate(folder.samples):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                images[i] = np.asarray(im).transpose(2, 0, 1)
        except MemoryError:
            raise
        except Exception as exc:  # damage verify() does not see (e.g. a truncated JPEG body)
            if isinstance(exc, Image.DecompressionBombError):
                _verify_image(root, Path(path))
            raise _damaged("imagefolder", root, Path(path),
                           f"not a decodable image ({type(exc).__name__}: {exc})") from None
        labels[i] = to_train[target]
    return images, labels


def _read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    x = np.repeat(x, 3, axis=1)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


# ------------------------------------------------------------------ registry entries


def _cifar10_files(d: Path, split: str) -> list[Path]:
    return [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]


def _file_named_split(d: Path, split: str) -> list[Path]:
    """``d/<split>``: CIFAR-100's pickle of the split, or an ImageFolder split's directory."""
    return [d / split]


def _stl10_files(d: Path, split: str) -> list[Path]:
    if split == "unlabeled":
        return [d / "unlabeled_X.bin"]
    return [d / f"{split}_X.bin", d / f"{split}_y.bin"]


def _mnist_files(d: Path, split: str) -> list[Path]:
    # Each file uncompressed, or else NAME.gz when only that exists; the uncompressed name
    # when neither does, so a missing file is reported under the name torchvision writes.
    names = [f"{_MNIST_PREFIX[split]}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    return [d / f"{n}.gz" if not (d / n).is_file() and (d / f"{n}.gz").is_file() else d / n for n in names]


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def _download_cifar100(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    CIFAR100(str(root), train=True, download=True)


def _download_stl10(root: Path) -> None:
    from torchvision.datasets import STL10

    STL10(str(root), split="train", download=True)


def _download_mnist(root: Path) -> None:
    """Both splits, and only when a file is missing (see :func:`download_dataset`)."""
    from torchvision.datasets import MNIST

    if any(not p.is_file() for p in expected_files("mnist", root, DATASETS["mnist"].splits)):
        for train in (True, False):
            MNIST(str(root), train=train, download=True)


# The registry. An entry holds a dataset's static facts and its behaviour, the fields after
# ``how_to_get`` (see DatasetInfo): split_files, check_split, read and download (None: not
# downloadable), plus meta_files, paths_are_dirs, needs_root and repair where they apply. The
# generic functions dispatch to these and never test a dataset's name, so adding a dataset is
# adding an entry here and the functions it names.
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_size=32,
        # Pixel statistics of the 50k training images (population std; the often
        # quoted (0.2023, 0.1994, 0.2010) is not the pixel std).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        splits=("train", "test"),
        directory="cifar-10-batches-py",
        how_to_get=(
            "run `clusterlab data download cifar10 --data-root ROOT` on a machine with internet, "
            "or copy the extracted cifar-10-python.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) there"
        ),
        split_files=_cifar10_files,
        meta_files=("batches.meta",),
        check_split=_check_cifar_split,
        read=lambda root, files, split, size: _read_cifar10(files),
        download=_download_cifar10,
        repair=("re-download CIFAR-10 (data.download=true, or `clusterlab data download cifar10 --data-root {root}`) "
                "or restore the file from cifar-10-python.tar.gz"),
    ),
    "cifar100_20": DatasetInfo(
        name="cifar100_20",
        num_classes=20,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        splits=("train", "test"),
        directory="cifar-100-python",
        how_to_get=(
            "run `clusterlab data download cifar100_20 --data-root ROOT` on a machine with internet, "
            "or copy the extracted cifar-100-python.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) there"
        ),
        split_files=_file_named_split,
        meta_files=("meta",),
        check_split=_check_cifar_split,
        read=lambda root, files, split, size: _read_cifar100_20(files[0]),
        download=_download_cifar100,
        repair=("re-download CIFAR-100 (data.download=true, or `clusterlab data download cifar100_20 "
                "--data-root {root}`) or restore the file from cifar-100-python.tar.gz"),
    ),
    "stl10": DatasetInfo(
        name="stl10",
        num_classes=10,
        image_size=96,
        # None: computed from the 5k labelled train images at load time rather than
        # hard-coding constants we cannot verify offline.
        mean=None,
        std=None,
        splits=("train", "test", "unlabeled"),
        directory="stl10_binary",
        how_to_get=(
            "run `clusterlab data download stl10 --data-root ROOT` on a machine with internet, "
            "or copy the extracted stl10_binary.tar.gz "
            "(http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz) there"
        ),
        split_files=_stl10_files,
        check_split=lambda info, root, split: _stl10_sizes_and_labels(info, _split_files(info, root, split), split),
        read=lambda root, files, split, size: _read_stl10(files, split),
        download=_download_stl10,
        repair=("re-download STL-10 (data.download=true, or `clusterlab data download stl10 --data-root {root}`) "
                "or restore the file from stl10_binary.tar.gz"),
    ),
    "imagefolder": DatasetInfo(
        name="imagefolder",
        num_classes=None,  # number of class folders under ROOT/train
        image_size=None,  # must be given explicitly
        mean=None,
        std=None,
        splits=("train", "test"),
        directory="",
        how_to_get=(
            "arrange your images as ROOT/train/<class>/<image> and ROOT/test/<class>/<image> "
            "(test classes must be a subset of train classes)"
        ),
        split_files=_file_named_split,
        paths_are_dirs=True,
        check_split=lambda info, root, split: _check_imagefolder_split(root, split),
        read=lambda root, files, split, size: _read_imagefolder(root, split, size),
        download=None,
        repair="replace it with an intact image or remove it from {root}",
    ),
    "digits": DatasetInfo(
        name="digits",
        num_classes=10,
        # Native images are 8x8; they are served upscaled to 16x16 because
        # random-resized crops of 8 px images leave too little to recognise.
        image_size=16,
        mean=None,
        std=None,
        splits=("train", "test"),
        directory="",
        how_to_get="bundled with scikit-learn (sklearn.datasets.load_digits); no files needed",
        split_files=lambda d, split: [],
        needs_root=False,
        check_split=None,
        read=lambda root, files, split, size: _read_digits(split),
        download=None,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        image_size=_MNIST_SIZE,
        # Pixel statistics of the 60k training images (population std; tests/test_datasets.py
        # recomputes them from the real files), the values commonly quoted for MNIST.
        mean=(0.1307, 0.1307, 0.1307),
        std=(0.3081, 0.3081, 0.3081),
        splits=("train", "test"),
        directory="MNIST/raw",
        how_to_get=(
            "set data.download=true (or run `clusterlab data download mnist --data-root ROOT`) on a machine with "
            "internet, which downloads it with torchvision.datasets.MNIST into ROOT/MNIST/raw, or copy the four IDX "
            "files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            "t10k-labels-idx1-ubyte (http://yann.lecun.com/exdb/mnist/) into ROOT/MNIST/raw, each uncompressed or "
            "gzipped as the same name + .gz"
        ),
        split_files=_mnist_files,
        check_split=lambda info, root, split: _check_mnist_split(root, split),
        read=lambda root, files, split, size: _read_mnist(root, split),
        download=_download_mnist,
        repair=("delete it and rerun with data.download=true (or `clusterlab data download mnist --data-root "
                "{root}`), or replace it with the original file from http://yann.lecun.com/exdb/mnist/ "
                "(uncompressed, or gzipped as the same name + .gz)"),
    ),
}


def _read_raw(info: DatasetInfo, root: Path | None, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    files = [] if root is None else _split_files(info, root, split)
    return info.read(root, files, split, image_size)


def _resize(chunk: np.ndarray, size: int) -> np.ndarray:
    import torch  # here only: the bad-input paths (check_dataset, its errors) answer without torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(chunk)).to(torch.float32)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def _materialize(parts: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> ImageArray:
    """One uint8 C-contiguous array holding all parts at ``size``x``size``.

    Copies (and resizes) chunk by chunk into a single preallocated output so that
    lazy memory-mapped inputs are never duplicated in memory.
    """
    if len(parts) == 1:
        imgs, labs = parts[0]
        if (
            imgs.shape[2:] == (size, size)
            and imgs.flags.c_contiguous
            and not isinstance(imgs, np.memmap)
            and (imgs.base is None or not isinstance(imgs.base, np.memmap))
        ):
            return ImageArray(imgs, labs)
    total = sum(p[0].shape[0] for p in parts)
    out = np.empty((total, 3, size, size), dtype=np.uint8)
    pos = 0
    for imgs, _ in parts:
        n = imgs.shape[0]
        same = imgs.shape[2:] == (size, size)
        for a in range(0, n, _CHUNK):
            b = min(a + _CHUNK, n)
            out[pos + a : pos + b] = imgs[a:b] if same else _resize(imgs[a:b], size)
        pos += n
    labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
    return ImageArray(out, labels)


def _target_size(info: DatasetInfo, image_size: int | None) -> int:
    if image_size is None:
        if info.image_size is None:
            raise ValueError(f"dataset {info.name!r} needs an explicit image_size")
        return info.image_size
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return int(image_size)


def load_split(name: str, data_root: str | Path | None, split: str, image_size: int | None = None,
               limit: int | None = None) -> ImageArray:
    """Load one split as an :class:`ImageArray`.

    ``image_size`` (square) defaults to the served size in :data:`DATASETS`; when it
    differs from the stored size the images are resized with bilinear, antialiased
    interpolation and rounded back to uint8 (digits are served at 16 by default).
    ``imagefolder`` requires ``image_size``. ``limit``: see :func:`_first`.
    """
    info = _info(name)
    size = _target_size(info, image_size)
    check_dataset(name, data_root, [split])
    root = _root(info, data_root)
    return _materialize([_first(_read_raw(info, root, split, size), limit)], size)


def _first(raw: tuple[np.ndarray, np.ndarray], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` images and labels of a split (``data.limit``: a smoke test or a quick
    look at a large dataset, the same images every time); all of them for None. The files are
    still checked whole."""
    return raw if limit is None else (raw[0][:limit], raw[1][:limit])


def download_dataset(name: str, data_root: str | Path) -> None:
    """Explicitly download and extract a dataset with torchvision (needs internet).

    Never called implicitly: training only ever reads what is on disk. For ``mnist``,
    ``torchvision.datasets.MNIST`` downloads the four ``.gz`` files into ``ROOT/MNIST/raw`` and
    extracts them there, and only when a file is missing: torchvision checks no content (it
    would skip the download and then fail parsing a present but damaged file with a bare
    RuntimeError), so a damaged file is named by :func:`check_dataset` instead, whose message
    says to delete it and download again.
    """
    info = _info(name)
    if info.download is None:
        raise ValueError(f"dataset {name!r} cannot be downloaded: {info.how_to_get}")
    root = Path(data_root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    info.download(root)
    check_dataset(name, root, info.splits)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std in [0, 1] of uint8 ``(N, 3, H, W)`` images.

    Accumulates in float64 chunk by chunk so a large split never gets a full
    float copy.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {images.shape}")
    n_pix = images.shape[0] * images.shape[2] * images.shape[3]
    if n_pix == 0:
        raise ValueError("cannot compute channel statistics of an empty array")
    s = np.zeros(3, dtype=np.float64)
    sq = np.zeros(3, dtype=np.float64)
    for a in range(0, images.shape[0], _CHUNK):
        chunk = images[a : a + _CHUNK].astype(np.float64)
        s += chunk.sum(axis=(0, 2, 3))
        sq += np.square(chunk).sum(axis=(0, 2, 3))
    mean = s / n_pix
    var = np.maximum(sq / n_pix - mean**2, 0.0)
    mean01 = mean / 255.0
    std01 = np.sqrt(var) / 255.0
    return (
        (float(mean01[0]), float(mean01[1]), float(mean01[2])),
        (float(std01[0]), float(std01[1]), float(std01[2])),
    )


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class DataSplits:
    """Everything a run needs: what trains, a held-out validation part of the
    training pool, the evaluation split (always ``test``), and normalisation."""

    train: ImageArray
    val: ImageArray
    test: ImageArray
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _hold_out(pool: ImageArray, val_idx: np.ndarray) -> tuple[ImageArray, ImageArray]:
    """Split ``pool`` into (train, val) in place, without a second full copy.

    ``pool`` must be owned by the caller (it is overwritten). The val rows are
    copied out first (small), then the remaining rows are compacted towards the
    front in ascending order; since the k-th kept row index is always >= k, no
    source row is overwritten before it is read.
    """
    n = len(pool)
    keep = np.ones(n, dtype=bool)
    keep[val_idx] = False
    train_idx = np.flatnonzero(keep)
    val = pool.subset(np.sort(val_idx))
    images = pool.images
    for a in range(0, train_idx.size, _CHUNK):
        src = train_idx[a : a + _CHUNK]
        images[a : a + src.size] = images[src]
    train = ImageArray(images[: train_idx.size], pool.labels[train_idx])
    return train, val


def build_splits(
    name: str,
    data_root: str | Path | None,
    protocol: str,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> DataSplits:
    """Assemble train/val/test for one evaluation protocol.

    * ``"train"``: the train split trains.
    * ``"train+test"``: train and test concatenated train (the standard
      unsupervised-clustering protocol, e.g. MIX'EM Table 4).
    * ``"train+unlabeled"``: STL-10 train plus its 100k unlabeled images.

    Evaluation is always the ``test`` split. ``val_fraction`` of the training pool
    is held out at random with ``np.random.default_rng(seed)`` (order within
    train and val is preserved). ``mean``/``std`` come from :data:`DATASETS`, or
    are computed from the dataset's ``train`` split (at the served size) when
    ``None`` there, so they do not depend on protocol, seed or validation.
    ``limit`` keeps the first images of every split (:func:`_first`).
    """
    info = _info(name)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    pool_splits = protocol.split("+")
    if "unlabeled" in pool_splits and "unlabeled" not in info.splits:
        allowed = [n for n, i in DATASETS.items() if "unlabeled" in i.splits]
        raise ValueError(
            f"protocol {protocol!r} needs an 'unlabeled' split, which dataset {name!r} lacks; "
            f"allowed datasets: {', '.join(allowed)}"
        )
    if not (0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    size = _target_size(info, image_size)
    needed = list(dict.fromkeys(pool_splits + ["test"]))
    check_dataset(name, data_root, needed)
    root = _root(info, data_root)

    raw = {split: _first(_read_raw(info, root, split, size), limit) for split in needed}
    n_train_split = raw["train"][0].shape[0]
    test = _materialize([raw["test"]], size)
    # Every pool is owned here: either a fresh concatenation or the train
    # reader's own array, never shared with ``test`` -- so it may be compacted
    # in place by _hold_out.
    pool = _materialize([raw[s] for s in pool_splits], size)
    del raw

    if info.mean is not None and info.std is not None:
        mean, std = info.mean, info.std
    else:
        mean, std = channel_stats(pool.images[:n_train_split])

    if info.num_classes is not None:
        num_classes = info.num_classes
    else:
        assert root is not None
        num_classes = len(_imagefolder_classes(root))

    n_val = int(round(float(val_fraction) * len(pool)))
    if n_val >= len(pool):
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {len(pool)}")
    if n_val == 0:
        train = pool
        val = pool.subset(np.zeros(0, dtype=np.int64))
    else:
        rng = np.random.default_rng(seed)
        val_idx = rng.permutation(len(pool))[:n_val]
        train, val = _hold_out(pool, val_idx)
    return DataSplits(train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std)
