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
