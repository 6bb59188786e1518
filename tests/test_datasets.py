"""Tests for clusterlab.data.datasets.

Every file-based dataset is exercised with tiny files written here in the real
on-disk format; MNIST, whose reader enforces the published image counts, with the real
files (../shared/datasets, skipped where absent) and damaged copies of them. Pixel
probes are placed by computing byte offsets by hand (not by reusing the reader's
reshape), so a wrong reshape or a missing STL-10 transpose fails; where possible the result is also cross-checked against torchvision's own
loading code with its md5 checks disabled.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterlab import cli
from clusterlab.data import datasets as ds
from clusterlab.data.datasets import (
    DATASETS,
    CIFAR100_FINE_TO_COARSE,
    DatasetNotFoundError,
    ImageArray,
    build_splits,
    channel_stats,
    check_dataset,
    expected_files,
    load_split,
)

# ----------------------------------------------------------------------- writers


def _id_rows(start: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3072) CIFAR rows: random noise, with the image id in bytes 0 and 1
    (R channel, row 0, cols 0-1) so images can be identified after shuffling."""
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    ids = np.arange(start, start + n)
    rows[:, 0] = ids % 256
    rows[:, 1] = ids // 256
    return rows


def _cifar_id(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    out: dict = {"train_rows": [], "train_labels": []}
    for i in range(1, 6):
        rows = _id_rows((i - 1) * per_batch, per_batch, rng)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(d / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels,
                                      "data": rows, "filenames": [f"f{j}.png" for j in range(per_batch)]})
        out["train_rows"].append(rows)
        out["train_labels"] += labels
    rows = _id_rows(1000, n_test, rng)
    labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _dump(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": rows,
                             "filenames": [f"t{j}.png" for j in range(n_test)]})
    _dump(d / "batches.meta", {"num_cases_per_batch": 10000, "num_vis": 3072,
                               "label_names": [f"class{k}" for k in range(10)]})
    out["train_rows"] = np.concatenate(out["train_rows"])
    out["test_rows"] = rows
    out["test_labels"] = labels
    return out


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 10, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    out = {}
    for split, n, start in (("train", n_train, 0), ("test", n_test, 5000)):
        rows = _id_rows(start, n, rng)
        fine = [int(v) for v in (np.arange(n) % 100 if split == "train" else rng.integers(0, 100, n))]
        coarse = [CIFAR100_FINE_TO_COARSE[f] for f in fine]
        _dump(d / split, {"filenames": [f"{j}.png" for j in range(n)], "batch_label": split,
                          "fine_labels": fine, "coarse_labels": coarse, "data": rows})
        out[split] = (rows, fine)
    _dump(d / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                       "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    return out


STL_BYTES = 3 * 96 * 96


def _stl_offset(n: int, c: int, row: int, col: int) -> int:
    """Byte offset of pixel (row, col) of channel c of image n in an STL-10 X file:
    each channel is stored column-major (column index varies slowest)."""
    return n * STL_BYTES + c * 96 * 96 + col * 96 + row


def write_stl10(root: Path, n_train: int = 12, n_test: int = 5, n_unl: int = 7, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        buf = rng.integers(0, 200, size=n * STL_BYTES, dtype=np.uint8)
        buf.tofile(d / f"{split}_X.bin")
        out[split] = buf
        if split != "unlabeled":
            y = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10 on disk
            rng.shuffle(y)
            y.tofile(d / f"{split}_y.bin")
            out[split + "_y"] = y
    (d / "class_names.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    return out


def write_imagefolder(root: Path, size: int = 10) -> None:
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, count in (("train", 3), ("test", 2)):
        for cls, rgb in colours.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = np.zeros((size, size, 3), dtype=np.uint8)
                arr[:] = rgb
                arr[1, 2] = (i * 10, 200, 7)  # one marker pixel at row 1, col 2
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def real_mnist() -> Path:
    """The data root holding the real MNIST (see its README.md); skips the test where it is absent."""
    if not all((MNIST_ROOT / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
        pytest.skip(f"the real MNIST is not at {MNIST_ROOT / 'MNIST' / 'raw'} (the project's shared datasets)")
    return MNIST_ROOT


def write_idx(path: Path, magic: int, dims: Sequence[int], data: bytes = b"") -> Path:
    """A hand-written IDX file (LeCun's format: big-endian int32 magic number and dimensions, then
    the uint8 data), gzip-compressed when ``path`` ends in ``.gz``."""
    raw = np.array([magic, *dims], dtype=">i4").tobytes() + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def write_mnist(root: Path) -> None:
    """An intact MNIST under ``root/MNIST/raw``: the real test files copied, so a test may damage
    them, and the real train files symlinked (47 MB, never written to)."""
    real = real_mnist() / "MNIST" / "raw"
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True)
    for f in MNIST_FILES:
        if f.startswith("t10k"):
            shutil.copyfile(real / f, d / f)
        else:
            (d / f).symlink_to(real / f)


# ------------------------------------------------------------------------ mapping


def test_cifar100_fine_to_coarse_mapping() -> None:
    assert len(CIFAR100_FINE_TO_COARSE) == 100
    counts = Counter(CIFAR100_FINE_TO_COARSE)
    assert sorted(counts) == list(range(20))
    assert all(v == 5 for v in counts.values())
    assert CIFAR100_FINE_TO_COARSE[8] == 18  # bicycle -> vehicles_1
    assert CIFAR100_FINE_TO_COARSE[58] == 18  # pickup_truck -> vehicles_1
    assert CIFAR100_FINE_TO_COARSE[0] == 4  # apple -> fruit_and_vegetables
    assert CIFAR100_FINE_TO_COARSE[4] == 0  # beaver -> aquatic_mammals


def test_registry() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100_20", "stl10", "imagefolder", "digits", "mnist"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert set(info.splits) <= set(ds.SPLIT_NAMES)
        assert "test" in info.splits and "train" in info.splits
        assert info.how_to_get
    assert DATASETS["cifar10"].directory == "cifar-10-batches-py"
    assert DATASETS["cifar100_20"].directory == "cifar-100-python"
    assert DATASETS["stl10"].directory == "stl10_binary"
    assert DATASETS["stl10"].splits == ("train", "test", "unlabeled")
    assert DATASETS["digits"].image_size == 16
    assert DATASETS["imagefolder"].image_size is None
    assert DATASETS["mnist"].directory == "MNIST/raw" and DATASETS["mnist"].image_size == 28
    assert DATASETS["mnist"].splits == ("train", "test")


# -------------------------------------------------------------------------- CIFAR


def test_cifar10_layout_and_labels(tmp_path: Path) -> None:
    w = write_cifar10(tmp_path)
    tr = load_split("cifar10", tmp_path, "train")
    te = load_split("cifar10", tmp_path, "test")
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (6, 3, 32, 32)
    for a in (tr, te):
        assert a.images.dtype == np.uint8 and a.images.flags.c_contiguous
        assert a.labels.dtype == np.int64
    np.testing.assert_array_equal(tr.labels, w["train_labels"])
    np.testing.assert_array_equal(te.labels, w["test_labels"])
    np.testing.assert_array_equal(_cifar_id(tr.images), np.arange(20))  # batch order kept
    # Hand-computed offsets: row byte = c * 1024 + r * 32 + col.
    rows = w["train_rows"]
    for n, c, r, col in [(0, 0, 5, 7), (13, 1, 31, 0), (19, 2, 3, 30), (7, 2, 31, 31)]:
        assert tr.images[n, c, r, col] == rows[n, c * 1024 + r * 32 + col]
    np.testing.assert_array_equal(tr.images.reshape(20, -1), rows)


def test_cifar_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tvc

    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    for train in (True, False):
        ref = tvc.CIFAR10(str(tmp_path), train=train)
        ours = load_split("cifar10", tmp_path, "train" if train else "test")
        np.testing.assert_array_equal(ours.images.transpose(0, 2, 3, 1), ref.data)
        np.testing.assert_array_equal(ours.labels, ref.targets)
        ref100 = tvc.CIFAR100(str(tmp_path), train=train)
        ours100 = load_split("cifar100_20", tmp_path, "train" if train else "test")
        np.testing.assert_array_equal(ours100.images.transpose(0, 2, 3, 1), ref100.data)
        np.testing.assert_array_equal(ours100.labels, np.asarray(CIFAR100_FINE_TO_COARSE)[ref100.targets])


def test_cifar100_20_labels(tmp_path: Path) -> None:
    w = write_cifar100(tmp_path)
    tr = load_split("cifar100_20", tmp_path, "train")
    te = load_split("cifar100_20", tmp_path, "test")
    assert tr.images.shape == (200, 3, 32, 32) and te.images.shape == (10, 3, 32, 32)
    for a, split in ((tr, "train"), (te, "test")):
        fine = w[split][1]
        np.testing.assert_array_equal(a.labels, [CIFAR100_FINE_TO_COARSE[f] for f in fine])
        assert a.labels.min() >= 0 and a.labels.max() <= 19
    assert set(tr.labels.tolist()) == set(range(20))
    assert tr.labels[8] == 18 and tr.labels[58] == 18 and tr.labels[0] == 4 and tr.labels[4] == 0
    assert tr.images[3, 1, 2, 9] == w["train"][0][3, 1024 + 2 * 32 + 9]


def test_cifar100_inconsistent_coarse_labels_rejected(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["coarse_labels"][0] = (entry["coarse_labels"][0] + 1) % 20
    _dump(path, entry)
    with pytest.raises(ValueError, match="coarse_labels"):
        load_split("cifar100_20", tmp_path, "test")


def test_cifar_bad_row_length_rejected(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch",
          {"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]})
    with pytest.raises(ValueError, match="3072"):
        load_split("cifar10", tmp_path, "test")


# ------------------------------------------------------------------------- STL-10


def test_stl10_column_major_and_labels(tmp_path: Path) -> None:
    w = write_stl10(tmp_path)
    tr = load_split("stl10", tmp_path, "train")
    te = load_split("stl10", tmp_path, "test")
    un = load_split("stl10", tmp_path, "unlabeled")
    assert tr.images.shape == (12, 3, 96, 96) and te.images.shape == (5, 3, 96, 96)
    assert un.images.shape == (7, 3, 96, 96)
    for a in (tr, te, un):
        assert a.images.dtype == np.uint8 and a.images.flags.c_contiguous
    np.testing.assert_array_equal(tr.labels, w["train_y"].astype(np.int64) - 1)
    assert tr.labels.min() == 0 and tr.labels.max() == 9
    assert np.all(un.labels == -1) and un.labels.dtype == np.int64
    # Non-symmetric probes: (row, col) != (col, row) so a missing transpose fails.
    for n, c, r, col in [(0, 0, 3, 80), (5, 1, 90, 2), (11, 2, 0, 95), (3, 1, 40, 41)]:
        assert tr.images[n, c, r, col] == w["train"][_stl_offset(n, c, r, col)]
    assert un.images[6, 2, 10, 20] == w["unlabeled"][_stl_offset(6, 2, 10, 20)]


def test_stl10_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import STL10

    write_stl10(tmp_path)
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    for split in ("train", "test", "unlabeled"):
        ref = STL10(str(tmp_path), split=split)
        ours = load_split("stl10", tmp_path, split)
        np.testing.assert_array_equal(ours.images, ref.data)
        np.testing.assert_array_equal(ours.labels, ref.labels)


def test_stl10_truncated_file_rejected(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="multiple"):
        load_split("stl10", tmp_path, "test")


# ---------------------------------------------------------------------- protocols


def test_protocols(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    s = build_splits("cifar10", tmp_path, "train")
    assert len(s.train) == 20 and len(s.val) == 0 and len(s.test) == 6
    assert s.val.images.shape == (0, 3, 32, 32)
    assert s.num_classes == 10
    assert s.mean == DATASETS["cifar10"].mean and s.std == DATASETS["cifar10"].std
    s2 = build_splits("cifar10", tmp_path, "train+test")
    assert len(s2.train) == 20 + 6
    np.testing.assert_array_equal(_cifar_id(s2.train.images), list(range(20)) + list(range(1000, 1006)))
    np.testing.assert_array_equal(_cifar_id(s2.test.images), np.arange(1000, 1006))  # eval is test
    with pytest.raises(ValueError, match=r"train\+unlabeled.*stl10"):
        build_splits("cifar10", tmp_path, "train+unlabeled")
    with pytest.raises(ValueError, match="protocol"):
        build_splits("cifar10", tmp_path, "test")


def test_stl10_train_plus_unlabeled(tmp_path: Path) -> None:
    w = write_stl10(tmp_path)
    s = build_splits("stl10", tmp_path, "train+unlabeled")
    assert len(s.train) == 12 + 7 and len(s.test) == 5
    np.testing.assert_array_equal(s.train.labels[:12], w["train_y"].astype(np.int64) - 1)
    assert np.all(s.train.labels[12:] == -1)
    assert s.train.images[12, 2, 10, 20] == w["unlabeled"][_stl_offset(0, 2, 10, 20)]
    np.testing.assert_array_equal(s.test.labels, w["test_y"].astype(np.int64) - 1)
    # stl10 has no stored stats: computed from the labelled train split only.
    tr = load_split("stl10", tmp_path, "train")
    assert s.mean == pytest.approx(channel_stats(tr.images)[0])
    assert s.std == pytest.approx(channel_stats(tr.images)[1])


def test_val_fraction_holdout(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    s = build_splits("cifar10", tmp_path, "train+test", val_fraction=0.25, seed=3)
    assert len(s.val) == round(0.25 * 26) == 6 and len(s.train) == 20
    tr_ids, val_ids = _cifar_id(s.train.images), _cifar_id(s.val.images)
    assert not set(tr_ids) & set(val_ids)
    assert sorted(set(tr_ids) | set(val_ids)) == list(range(20)) + list(range(1000, 1006))
    # labels travel with their images
    full = build_splits("cifar10", tmp_path, "train+test")
    by_id = dict(zip(_cifar_id(full.train.images).tolist(), full.train.labels.tolist()))
    assert [by_id[i] for i in tr_ids] == s.train.labels.tolist()
    assert [by_id[i] for i in val_ids] == s.val.labels.tolist()
    # whole images (not just the id bytes) survive the in-place compaction
    pos = {i: k for k, i in enumerate(_cifar_id(full.train.images).tolist())}
    np.testing.assert_array_equal(s.train.images, full.train.images[[pos[i] for i in tr_ids]])
    np.testing.assert_array_equal(s.val.images, full.train.images[[pos[i] for i in val_ids]])
    # seeded: same seed -> same split, other seed -> different split
    again = build_splits("cifar10", tmp_path, "train+test", val_fraction=0.25, seed=3)
    np.testing.assert_array_equal(_cifar_id(again.val.images), val_ids)
    other = build_splits("cifar10", tmp_path, "train+test", val_fraction=0.25, seed=4)
    assert set(_cifar_id(other.val.images)) != set(val_ids)
    with pytest.raises(ValueError):
        build_splits("cifar10", tmp_path, "train", val_fraction=1.0)


# ------------------------------------------------------------------------- digits


def test_digits() -> None:
    check_dataset("digits", None, ["train", "test"])
    assert expected_files("digits", None, ["train"]) == []
    tr = load_split("digits", None, "train")
    te = load_split("digits", None, "test")
    assert len(tr) + len(te) == 1797
    assert len(te) == 360 and len(tr) == 1437
    assert tr.images.shape == (1437, 3, 16, 16) and tr.images.dtype == np.uint8
    assert set(tr.labels.tolist()) == set(range(10)) == set(te.labels.tolist())
    np.testing.assert_array_equal(tr.images[:, 0], tr.images[:, 2])
    # stratified: every class keeps ~20 % of its images in test
    for k in range(10):
        frac = (te.labels == k).sum() / ((te.labels == k).sum() + (tr.labels == k).sum())
        assert abs(frac - 0.2) < 0.02
    native = load_split("digits", None, "train", image_size=8)
    assert native.images.shape == (1437, 3, 8, 8)
    assert native.images.max() == 255 and native.images.min() == 0
    from sklearn.datasets import load_digits

    raw = load_digits().data.reshape(-1, 8, 8)
    scaled = {np.rint(img * 255 / 16).astype(np.uint8).tobytes() for img in raw}
    assert all(img[0].tobytes() in scaled for img in native.images[:20])
    s = build_splits("digits", None, "train", val_fraction=0.1)
    assert s.num_classes == 10 and len(s.val) == round(0.1 * 1437)
    assert s.mean == pytest.approx(channel_stats(tr.images)[0])
    assert 0.1 < s.mean[0] < 0.6 and 0.1 < s.std[0] < 0.6


# ------------------------------------------------------------------------- resize


def test_resize(tmp_path: Path) -> None:
    w = write_cifar10(tmp_path)
    small = load_split("cifar10", tmp_path, "test", image_size=16)
    assert small.images.shape == (6, 3, 16, 16) and small.images.dtype == np.uint8
    assert small.images.flags.c_contiguous
    native = load_split("cifar10", tmp_path, "test")
    ref = F.interpolate(torch.from_numpy(native.images).float(), size=(16, 16), mode="bilinear",
                        align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8)
    np.testing.assert_array_equal(small.images, ref.numpy())
    np.testing.assert_array_equal(small.labels, w["test_labels"])
    # constant colour planes stay exactly constant, in the right channel
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, :1024], rows[0, 1024:2048], rows[0, 2048:] = 10, 128, 250
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": rows, "labels": [3]})
    big = load_split("cifar10", tmp_path, "test", image_size=48)
    assert big.images.shape == (1, 3, 48, 48)
    assert [np.unique(big.images[0, c]).tolist() for c in range(3)] == [[10], [128], [250]]
    s = build_splits("cifar10", tmp_path, "train+test", image_size=8)
    assert s.train.images.shape == (21, 3, 8, 8) and s.test.images.shape == (1, 3, 8, 8)


# ------------------------------------------------------------------ missing files


def test_missing_files_message(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    (d / "data_batch_5").unlink()
    check_dataset("cifar10", tmp_path, ["test"])  # test split is complete
    with pytest.raises(DatasetNotFoundError) as exc:
        check_dataset("cifar10", tmp_path, ["train", "test"])
    msg = str(exc.value)
    assert str((d / "data_batch_3").absolute()) in msg
    assert str((d / "data_batch_5").absolute()) in msg
    assert "data_batch_1" not in msg and "test_batch" not in msg
    assert DATASETS["cifar10"].how_to_get in msg
    assert isinstance(exc.value, FileNotFoundError)
    assert exc.value.missing == [d / "data_batch_3", d / "data_batch_5"]
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_split("cifar10", tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        build_splits("cifar10", tmp_path, "train")


def test_missing_dataset_entirely(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        check_dataset("stl10", tmp_path / "nowhere", ["train", "unlabeled"])
    msg = str(exc.value)
    for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin"):
        assert str(tmp_path / "nowhere" / "stl10_binary" / f) in msg
    assert "test_X.bin" not in msg
    assert DATASETS["stl10"].how_to_get in msg
    with pytest.raises(DatasetNotFoundError, match="batches.meta"):
        check_dataset("cifar10", tmp_path, ["test"])
    with pytest.raises(ValueError, match="data root"):
        check_dataset("cifar10", None, ["train"])


def test_unknown_names() -> None:
    with pytest.raises(ValueError) as exc:
        check_dataset("svhn", "/tmp", ["train"])
    for name in DATASETS:
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("cifar1O", "/tmp", "train")
    with pytest.raises(ValueError, match="unlabeled"):
        check_dataset("cifar10", "/tmp", ["unlabeled"])
    with pytest.raises(ValueError):
        ds.download_dataset("digits", "/tmp")
    with pytest.raises(ValueError):
        ds.download_dataset("imagefolder", "/tmp")


# -------------------------------------------------------------------------- MNIST

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_real_files(capsys: pytest.CaptureFixture) -> None:
    """The real MNIST: 60k + 10k 28x28 digits with the published class counts, served as three
    equal channels, the stored statistics those of its train split."""
    root = real_mnist()
    ds._VALIDATED.clear()
    tr = load_split("mnist", root, "train")
    te = load_split("mnist", root, "test")
    assert tr.images.shape == (60000, 3, 28, 28) and te.images.shape == (10000, 3, 28, 28)
    assert tr.images.dtype == np.uint8 and tr.images.flags.c_contiguous
    assert tr.labels[0] == 5
    assert np.bincount(tr.labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(te.labels).tolist() == MNIST_TEST_COUNTS
    np.testing.assert_array_equal(tr.images[:, 0], tr.images[:, 1])
    np.testing.assert_array_equal(tr.images[:, 0], tr.images[:, 2])
    assert tr.images.max() == 255 and tr.images.min() == 0
    # Hand-computed offset of a pixel in the IDX file: 16-byte header, then 784 bytes per image, row-major.
    raw = (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    for n, r, c in [(0, 10, 15), (9999, 20, 7), (1234, 5, 22)]:
        assert te.images[n, 0, r, c] == raw[16 + n * 784 + r * 28 + c]
    mean, std = channel_stats(tr.images)
    assert mean == pytest.approx(DATASETS["mnist"].mean, abs=1e-4)
    assert std == pytest.approx(DATASETS["mnist"].std, abs=1e-4)
    assert cli.main(["data", "check", "mnist", "--data-root", str(root)]) == 0
    assert "all files present and intact" in capsys.readouterr().out


def test_mnist_matches_torchvision_and_download_keeps_files_on_disk(tmp_path: Path) -> None:
    """torchvision reads the same layout into the same arrays; ``download_dataset`` downloads nothing
    where all files exist (no network is needed; none is here): it checks them, and names a damaged
    one rather than letting torchvision fail parsing it."""
    from torchvision.datasets import MNIST

    root = real_mnist()
    ds.download_dataset("mnist", root)
    ref = MNIST(str(root), train=False)
    ours = load_split("mnist", root, "test")
    np.testing.assert_array_equal(ours.images[:, 0], ref.data.numpy())
    np.testing.assert_array_equal(ours.labels, ref.targets.numpy())
    write_mnist(tmp_path)
    bad = _mnist_label_10(tmp_path)
    with pytest.raises(ds.DatasetFileDamagedError, match="delete it and rerun with data.download=true") as exc:
        ds.download_dataset("mnist", tmp_path)
    assert exc.value.path == bad


def test_mnist_gz_reads_like_the_raw_files(tmp_path: Path) -> None:
    """Each file may be ``NAME.gz`` instead; when both exist the uncompressed one is read."""
    real = real_mnist()
    d = tmp_path / "MNIST" / "raw"
    d.mkdir(parents=True)
    for f in MNIST_FILES[2:]:
        (d / f"{f}.gz").write_bytes(gzip.compress((real / "MNIST" / "raw" / f).read_bytes(), compresslevel=1))
    assert expected_files("mnist", tmp_path, ["test"]) == [d / f"{f}.gz" for f in MNIST_FILES[2:]]
    ds._VALIDATED.clear()
    gz = load_split("mnist", tmp_path, "test")
    ref = load_split("mnist", real, "test")
    np.testing.assert_array_equal(gz.images, ref.images)
    np.testing.assert_array_equal(gz.labels, ref.labels)
    # Both present: the uncompressed file wins, so a damaged .gz next to it is never read.
    shutil.copyfile(real / "MNIST" / "raw" / MNIST_FILES[3], d / MNIST_FILES[3])
    (d / f"{MNIST_FILES[3]}.gz").write_bytes(b"not gzip")
    assert expected_files("mnist", tmp_path, ["test"]) == [d / f"{MNIST_FILES[2]}.gz", d / MNIST_FILES[3]]
    check_dataset("mnist", tmp_path, ["test"])
    np.testing.assert_array_equal(load_split("mnist", tmp_path, "test").labels, ref.labels)


def test_mnist_missing_files(tmp_path: Path) -> None:
    """Missing files are named under torchvision's names, with the .gz alternative and how to download."""
    d = tmp_path / "MNIST" / "raw"
    write_idx(d / "train-labels-idx1-ubyte.gz", 2049, [60000], bytes(60000))
    with pytest.raises(DatasetNotFoundError) as exc:
        check_dataset("mnist", tmp_path, ["train", "test"])
    msg = str(exc.value)
    assert exc.value.missing == [d / f for f in MNIST_FILES if f != "train-labels-idx1-ubyte"]
    for f in exc.value.missing:
        assert str(f) in msg
    assert "train-labels" not in msg.split("How to get it")[0]  # present as .gz
    assert ".gz" in msg and "data.download=true" in msg and DATASETS["mnist"].how_to_get in msg
    with pytest.raises(ValueError, match="data root"):
        check_dataset("mnist", None, ["train"])


# -------------------------------------------------------------------- imagefolder


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, size=10)
    with pytest.raises(ValueError, match="image_size"):
        load_split("imagefolder", tmp_path, "train")
    tr = load_split("imagefolder", tmp_path, "train", image_size=10)
    assert tr.images.shape == (6, 3, 10, 10) and tr.images.dtype == np.uint8
    np.testing.assert_array_equal(tr.labels, [0, 0, 0, 1, 1, 1])  # cat, dog (sorted)
    assert tr.images[0, 0, 5, 5] == 255 and tr.images[0, 2, 5, 5] == 0  # cat is red
    assert tr.images[3, 2, 5, 5] == 255 and tr.images[3, 0, 5, 5] == 0  # dog is blue
    assert tr.images[1, :, 1, 2].tolist() == [10, 200, 7]  # marker at row 1, col 2
    assert tr.images[1, :, 2, 1].tolist() == [255, 0, 0]
    small = load_split("imagefolder", tmp_path, "test", image_size=4)
    assert small.images.shape == (4, 3, 4, 4)
    s = build_splits("imagefolder", tmp_path, "train+test", image_size=10)
    assert s.num_classes == 2 and len(s.train) == 10 and len(s.test) == 4
    assert s.mean == pytest.approx(channel_stats(tr.images)[0])


def test_imagefolder_test_subset_and_extra_class(tmp_path: Path) -> None:
    from PIL import Image

    write_imagefolder(tmp_path, size=6)
    # test holding only the second class keeps the train index of that class
    for p in (tmp_path / "test" / "cat").iterdir():
        p.unlink()
    (tmp_path / "test" / "cat").rmdir()
    te = load_split("imagefolder", tmp_path, "test", image_size=6)
    np.testing.assert_array_equal(te.labels, [1, 1])
    (tmp_path / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "test" / "zebra" / "0.png")
    with pytest.raises(ValueError, match="zebra"):
        load_split("imagefolder", tmp_path, "test", image_size=6)


def test_imagefolder_missing_test_dir(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "test")
    with pytest.raises(DatasetNotFoundError) as exc:
        build_splits("imagefolder", tmp_path, "train", image_size=8)
    assert str(tmp_path / "test") in str(exc.value)


# ---------------------------------------------------------------- small utilities


def test_channel_stats() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(1100, 3, 4, 5), dtype=np.uint8)  # > one chunk
    imgs[:, 1] //= 2
    mean, std = channel_stats(imgs)
    f = imgs.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-8)
    assert mean[1] < mean[0]
    assert channel_stats(np.full((2, 3, 2, 2), 255, np.uint8)) == ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def test_image_array() -> None:
    imgs = np.arange(5 * 3 * 2 * 2, dtype=np.uint8).reshape(5, 3, 2, 2)
    a = ImageArray(imgs, np.array([0, 1, 2, 3, 4], dtype=np.int32))
    assert len(a) == 5 and a.labels.dtype == np.int64
    b = a.subset(np.array([4, 1]))
    assert b.labels.tolist() == [4, 1]
    np.testing.assert_array_equal(b.images[0], imgs[4])
    c = ImageArray.concat([a, b])
    assert len(c) == 7 and c.labels.tolist() == [0, 1, 2, 3, 4, 4, 1]
    assert a.subset(np.array([True, False, False, False, True])).labels.tolist() == [0, 4]
    with pytest.raises(ValueError):
        ImageArray.concat([a, ImageArray(np.zeros((1, 3, 3, 3), np.uint8), np.zeros(1, np.int64))])
    with pytest.raises(TypeError):
        ImageArray(imgs.astype(np.float32), np.zeros(5, np.int64))
    with pytest.raises(ValueError):
        ImageArray(imgs, np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        ImageArray(imgs[:, :1], np.zeros(5, np.int64))
    # non-contiguous input is made C-contiguous
    t = ImageArray(np.ascontiguousarray(imgs.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), np.zeros(5, np.int64))
    assert t.images.flags.c_contiguous


# ------------------------------------------------------------ damaged files: exit 2, before Ray
# Each case damages one file of an otherwise intact tiny dataset the way it has been seen
# damaged, and expects `data check` and `train`'s preflight to refuse it with exit code 2 and
# a message naming the file (not a traceback), before Ray starts or anything is written.


def _cifar10_batch(root: Path, name: str) -> Path:
    return root / "cifar-10-batches-py" / name


def _rewrite(path: Path, **changes) -> Path:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry.update(changes)
    _dump(path, entry)
    return path


def _cifar10_truncated(root: Path) -> Path:
    p = _cifar10_batch(root, "data_batch_1")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _cifar10_text(root: Path) -> Path:
    p = _cifar10_batch(root, "data_batch_1")
    p.write_text("this is not a CIFAR batch\n" * 20)
    return p


def _cifar10_string_labels(root: Path) -> Path:
    return _rewrite(_cifar10_batch(root, "data_batch_2"), labels=["cat", "dog", "cat", "dog"])


def _cifar10_label_10(root: Path) -> Path:
    return _rewrite(_cifar10_batch(root, "data_batch_3"), labels=[0, 1, 10, 2])


def _cifar10_negative_test_label(root: Path) -> Path:
    p = _cifar10_batch(root, "test_batch")
    with open(p, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    return _rewrite(p, labels=[-1, *labels[1:]])


def _cifar10_short_rows(root: Path) -> Path:
    return _rewrite(_cifar10_batch(root, "data_batch_4"), data=np.zeros((4, 3000), np.uint8))


def _cifar10_float_rows(root: Path) -> Path:
    return _rewrite(_cifar10_batch(root, "data_batch_5"), data=np.zeros((4, 3072), np.float32))


def _cifar10_labels_count(root: Path) -> Path:
    return _rewrite(_cifar10_batch(root, "data_batch_1"), labels=[1, 2, 3])


def _cifar100_fine_100(root: Path) -> Path:
    p = root / "cifar-100-python" / "train"
    with open(p, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    fine = list(entry["fine_labels"])
    fine[7] = 100
    entry["fine_labels"] = fine
    entry.pop("coarse_labels")
    _dump(p, entry)
    return p


def _cifar100_coarse_20(root: Path) -> Path:
    p = root / "cifar-100-python" / "test"
    with open(p, "rb") as f:
        coarse = pickle.load(f, encoding="latin1")["coarse_labels"]
    return _rewrite(p, coarse_labels=[20, *coarse[1:]])


def _cifar100_truncated_meta(root: Path) -> Path:
    p = root / "cifar-100-python" / "meta"
    p.write_bytes(p.read_bytes()[:30])
    return p


def _stl10_truncated_x(root: Path) -> Path:
    p = root / "stl10_binary" / "train_X.bin"
    p.write_bytes(p.read_bytes()[:-5])
    return p


def _stl10_short_y(root: Path) -> Path:
    p = root / "stl10_binary" / "test_y.bin"
    p.write_bytes(p.read_bytes()[:-1])
    return p


def _stl10_label(file: str, index: int, value: int) -> Callable[[Path], Path]:
    """Damage: label byte ``index`` of ``file`` set to ``value`` (STL-10 labels are 1..10)."""

    def damage(root: Path) -> Path:
        p = root / "stl10_binary" / file
        y = bytearray(p.read_bytes())
        y[index] = value
        p.write_bytes(bytes(y))
        return p

    return damage


def _stl10_unlabeled_size(root: Path) -> Path:
    p = root / "stl10_binary" / "unlabeled_X.bin"
    p.write_bytes(p.read_bytes() + b"\0" * 100)
    return p


def _imagefolder_corrupt_png(root: Path) -> Path:
    p = root / "train" / "dog" / "1.png"
    b = bytearray(p.read_bytes())
    b[60:70] = b"\xff" * 10  # inside the IDAT chunk: header intact, checksum and pixels broken
    p.write_bytes(bytes(b))
    return p


def _imagefolder_not_an_image(root: Path) -> Path:
    p = root / "test" / "cat" / "0.png"
    p.write_text("not a png")
    return p


def _imagefolder_empty_class(root: Path) -> Path:
    (root / "train" / "bird").mkdir()
    return root / "train" / "bird"


def _imagefolder_empty_test(root: Path) -> Path:
    import shutil

    for d in (root / "test").iterdir():
        shutil.rmtree(d)
    return root / "test"


def _imagefolder_bomb(root: Path) -> Path:
    """An image over twice PIL's pixel limit (the limit is lowered for the test, as a real bomb
    would take gigabytes to decode)."""
    from PIL import Image

    p = root / "train" / "cat" / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    return p


def _mnist_file(root: Path, name: str) -> Path:
    return root / "MNIST" / "raw" / name


def _mnist_truncated_images(root: Path) -> Path:
    p = _mnist_file(root, "t10k-images-idx3-ubyte")
    p.write_bytes(p.read_bytes()[: 16 + 9000 * 784 + 100])
    return p


def _mnist_truncated_gz(root: Path) -> Path:
    p = _mnist_file(root, "t10k-images-idx3-ubyte")
    gz = p.with_name(p.name + ".gz")
    gz.write_bytes(gzip.compress(p.read_bytes(), compresslevel=1)[:-5000])
    p.unlink()
    return gz


def _mnist_gzip_without_suffix(root: Path) -> Path:
    p = _mnist_file(root, "t10k-labels-idx1-ubyte")
    p.write_bytes(gzip.compress(p.read_bytes()))
    return p


def _mnist_wrong_magic(root: Path) -> Path:
    return write_idx(_mnist_file(root, "t10k-images-idx3-ubyte"), 2049, [10000, 28, 28])


def _mnist_wrong_dims(root: Path) -> Path:
    return write_idx(_mnist_file(root, "t10k-images-idx3-ubyte"), 2051, [10000, 32, 32])


def _mnist_label_10(root: Path) -> Path:
    p = _mnist_file(root, "t10k-labels-idx1-ubyte")
    b = bytearray(p.read_bytes())
    b[8 + 4321] = 10
    p.write_bytes(bytes(b))
    return p


def _mnist_label_count(root: Path) -> Path:
    """A labels file one label short whose header agrees with its size: only the count is wrong."""
    p = _mnist_file(root, "t10k-labels-idx1-ubyte")
    return write_idx(p, 2049, [9999], p.read_bytes()[8:-1])


WRITERS = {
    "cifar10": lambda root: write_cifar10(root, n_test=12),
    "cifar100_20": lambda root: write_cifar100(root, n_test=30),
    "stl10": lambda root: write_stl10(root, n_test=12),
    "imagefolder": lambda root: write_imagefolder(root),
    "mnist": write_mnist,
}
TRAIN_ARGS = {"imagefolder": ["data.image_size=10"]}

DAMAGED = [
    pytest.param("cifar10", _cifar10_truncated, "not a readable pickle", id="cifar10-truncated-pickle"),
    pytest.param("cifar10", _cifar10_text, "not a readable pickle", id="cifar10-text-file"),
    pytest.param("cifar10", _cifar10_string_labels, "must be a list of integers", id="cifar10-string-labels"),
    pytest.param("cifar10", _cifar10_label_10, "must be in 0..9", id="cifar10-label-10"),
    pytest.param("cifar10", _cifar10_negative_test_label, "must be in 0..9", id="cifar10-test-label-minus-1"),
    pytest.param("cifar10", _cifar10_short_rows, "(N, 3072)", id="cifar10-rows-3000"),
    pytest.param("cifar10", _cifar10_float_rows, "(N, 3072)", id="cifar10-float-data"),
    pytest.param("cifar10", _cifar10_labels_count, "3 'labels' for 4 images", id="cifar10-label-count"),
    pytest.param("cifar100_20", _cifar100_fine_100, "must be in 0..99", id="cifar100-fine-100"),
    pytest.param("cifar100_20", _cifar100_coarse_20, "must be in 0..19", id="cifar100-coarse-20"),
    pytest.param("cifar100_20", _cifar100_truncated_meta, "not a readable pickle", id="cifar100-truncated-meta"),
    pytest.param("stl10", _stl10_truncated_x, "not a positive multiple of 27648", id="stl10-truncated-X"),
    pytest.param("stl10", _stl10_short_y, "holds 12 images", id="stl10-y-one-short"),
    pytest.param("stl10", _stl10_label("train_y.bin", 3, 0), "must be 1..10", id="stl10-label-0"),
    pytest.param("stl10", _stl10_label("test_y.bin", 0, 11), "must be 1..10", id="stl10-label-11"),
    pytest.param("stl10", _stl10_unlabeled_size, "not a positive multiple", id="stl10-unlabeled-size"),
    pytest.param("imagefolder", _imagefolder_corrupt_png, "not a decodable image", id="imagefolder-corrupt-png"),
    pytest.param("imagefolder", _imagefolder_not_an_image, "not a decodable image", id="imagefolder-text-as-png"),
    pytest.param("imagefolder", _imagefolder_empty_class, "holds no images", id="imagefolder-empty-class"),
    pytest.param("imagefolder", _imagefolder_empty_test, "holds no class directories", id="imagefolder-empty-test"),
    pytest.param("imagefolder", _imagefolder_bomb, "decompression bomb", id="imagefolder-decompression-bomb"),
    pytest.param("mnist", _mnist_truncated_images, "expected 7840016 bytes", id="mnist-truncated-images"),
    pytest.param("mnist", _mnist_truncated_gz, "not a readable gzip file", id="mnist-truncated-gz"),
    pytest.param("mnist", _mnist_gzip_without_suffix, "rename it to t10k-labels-idx1-ubyte.gz", id="mnist-gzip-as-raw"),
    pytest.param("mnist", _mnist_wrong_magic, "magic number 2049", id="mnist-wrong-magic"),
    pytest.param("mnist", _mnist_wrong_dims, "32x32 images, expected 28x28", id="mnist-32x32-images"),
    pytest.param("mnist", _mnist_label_10, "must be in 0..9", id="mnist-label-10"),
    pytest.param("mnist", _mnist_label_count, "announces 9999 labels, but t10k-images-idx3-ubyte holds 10000",
                 id="mnist-label-count"),
]
FIXES = {
    "cifar10": "data.download=true", "cifar100_20": "data.download=true", "stl10": "data.download=true",
    "imagefolder": "To fix it:", "mnist": "delete it and rerun with data.download=true",
}


class RayStarted(Exception):
    pass


@pytest.fixture()
def ray_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way `train` starts Ray is replaced by a recorder that aborts the command."""
    import ray

    from clusterlab.platform import run

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("ray")
        raise RayStarted()

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(run, "init_ray", refuse)
    return calls


def _damage(name, damage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    root = tmp_path / "data"
    WRITERS[name](root)
    ds._VALIDATED.clear()
    if damage is _imagefolder_bomb:
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2 * 1000: DecompressionBombError
    return root, damage(root)


@pytest.mark.parametrize(("name", "damage", "what"), DAMAGED)
def test_damaged_file_fails_data_check(name, damage, what, tmp_path, monkeypatch, capsys) -> None:
    root, bad = _damage(name, damage, tmp_path, monkeypatch)
    with pytest.raises(ds.DatasetFileDamagedError) as exc:
        check_dataset(name, root, DATASETS[name].splits)
    assert exc.value.path == bad and isinstance(exc.value, DatasetNotFoundError)
    assert cli.main(["data", "check", name, "--data-root", str(root)]) == 2
    out = capsys.readouterr()
    assert str(bad) in out.err and what in out.err and FIXES[name] in out.err, out.err
    assert "Traceback" not in out.err and "all files" not in out.out


@pytest.mark.parametrize(("name", "damage", "what"), DAMAGED)
def test_damaged_file_fails_train_before_ray(name, damage, what, tmp_path, monkeypatch, capsys, ray_guard,
                                            tracking_uri) -> None:
    root, bad = _damage(name, damage, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    protocol = ["data.protocol=train+unlabeled"] if damage is _stl10_unlabeled_size else []
    code = cli.main(["train", f"data.name={name}", "--data-root", str(root), "batch_size=4", "epochs=1",
                     *TRAIN_ARGS.get(name, []), *protocol, f"storage_path={tmp_path / 'ray'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.root" in err and str(bad) in err and what in err, err
    assert not ray_guard, "Ray was started"
    assert not (tmp_path / "ray").exists()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_intact_datasets_pass_data_check_and_preflight(name, tmp_path, monkeypatch, capsys, ray_guard,
                                                       tracking_uri) -> None:
    """Control: the same tiny datasets, intact, pass `data check` and get `train` as far as Ray."""
    root = tmp_path / "data"
    WRITERS[name](root)
    ds._VALIDATED.clear()
    assert cli.main(["data", "check", name, "--data-root", str(root)]) == 0
    assert "all files present and intact" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RayStarted):
        cli.main(["train", f"data.name={name}", "--data-root", str(root), "batch_size=4", "epochs=1",
                  *TRAIN_ARGS.get(name, []), f"storage_path={tmp_path / 'ray'}"])
    assert ray_guard


def test_data_checks_reuse_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file validated once in a process is not parsed again while unchanged (preflight checks,
    then build_splits checks again), and is re-checked once it changes."""
    write_cifar10(tmp_path)
    ds._VALIDATED.clear()
    parsed: list[str] = []
    real = ds._unpickle
    monkeypatch.setattr(ds, "_unpickle", lambda p: parsed.append(p.name) or real(p))
    check_dataset("cifar10", tmp_path, ["test"])
    check_dataset("cifar10", tmp_path, ["test"])
    assert sorted(parsed) == ["batches.meta", "test_batch"]
    _cifar10_negative_test_label(tmp_path)
    with pytest.raises(ds.DatasetFileDamagedError, match="test_batch"):
        check_dataset("cifar10", tmp_path, ["test"])
