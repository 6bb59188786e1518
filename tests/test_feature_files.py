"""Parquet features: round trip, row groups, schema errors, never overwritten."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clusterlab.eval.feature_files import read_features, write_features


def _batches(n_batches: int = 3, rows: int = 4, dim: int = 5, m: int = 3):
    rng = np.random.default_rng(0)
    for b in range(n_batches):
        rep = rng.normal(size=(rows, dim)).astype(np.float32)
        coeff = rng.dirichlet(np.ones(m), size=rows).astype(np.float32)
        yield {"index": np.arange(b * rows, (b + 1) * rows), "label": rng.integers(-1, 3, rows),
               "representation": rep, "coefficients": coeff, "component": coeff.argmax(1)}


def test_round_trip_in_row_groups(tmp_path):
    path = write_features(tmp_path / "test.parquet", _batches())
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3 and meta.num_rows == 12
    schema = pq.read_schema(path)
    assert schema.field("representation").type == pa.list_(pa.float32(), 5)
    assert schema.field("index").type == pa.int64() and schema.field("label").type == pa.int64()
    back = read_features(path)
    expected = {k: np.concatenate([b[k] for b in _batches()]) for k in next(_batches())}
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value)
    assert back["representation"].dtype == np.float32 and back["representation"].shape == (12, 5)


def test_never_overwrites(tmp_path):
    path = write_features(tmp_path / "f.parquet", _batches())
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_features(path, _batches())


def test_schema_errors_name_the_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"index": [0, 1], "label": [0, 1]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet lacks the required column\(s\) \['representation'\]"):
        read_features(path)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"index": [0], "label": [0], "representation": ["x"]}), wrong)
    with pytest.raises(ValueError, match="'representation' must be a fixed-size list"):
        read_features(wrong)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(ValueError, match="not a Parquet file"):
        read_features(not_parquet)
    with pytest.raises(FileNotFoundError):
        read_features(tmp_path / "missing.parquet")


def test_several_files_read_as_one_train_then_test(tmp_path):
    """eval.split=all reads train then test into one array per column (LSD-C Sec. 4)."""
    train = write_features(tmp_path / "train.parquet", _batches(n_batches=3))
    test = write_features(tmp_path / "test.parquet", _batches(n_batches=2, rows=3))
    both = read_features([train, test])
    for key in ("label", "index", "representation", "coefficients"):
        np.testing.assert_array_equal(both[key], np.concatenate([read_features(train)[key], read_features(test)[key]]))
    assert both["representation"].shape == (18, 5)
    assert read_features([train, test], columns=["label", "representation"]).keys() == {"label", "representation"}

    no_coefficients = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(test).drop_columns(["coefficients", "component"]), no_coefficients)
    with pytest.raises(ValueError, match=r"other.parquet lacks the column 'coefficients' that .*train.parquet has"):
        read_features([train, no_coefficients])
    wider = write_features(tmp_path / "wider.parquet", _batches(dim=6))
    with pytest.raises(ValueError, match=r"wider.parquet: column 'representation' is fixed_size_list.*\[6\], but"):
        read_features([train, wider])


def test_a_read_leaves_nothing_in_arrows_memory(tmp_path):
    """The arrays own their memory: none of it stays in Arrow's allocator, which keeps freed
    memory (a whole-table read held a 70,000-image MNIST evaluation's features three times)."""
    path = write_features(tmp_path / "f.parquet", _batches(n_batches=4, rows=2_000, dim=256))
    before = pa.total_allocated_bytes()
    features = read_features(path)
    assert pa.total_allocated_bytes() - before < 1_000_000  # the features are 8 MB
    assert all(values.flags.owndata for values in features.values())
