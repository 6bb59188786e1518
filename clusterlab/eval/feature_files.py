"""Features on disk: one Parquet file per run and split, so any run can be re-evaluated
without touching the model or a GPU again, and features made elsewhere can be evaluated.

Schema (pyarrow); vectors are fixed-size lists of float32:

=====================  ==========================  ==============================================
column                 type                        meaning
=====================  ==========================  ==============================================
``index``              int64                       row of the image in its split
``label``              int64                       true class, -1 when unknown
``representation``     fixed_size_list<float32>    backbone output h = f(x), un-normalised
``representation_l2``  fixed_size_list<float32>    h / ||h||_2 (what K-means clusters by default)
``coefficients``       fixed_size_list<float32>    MIX'EM mixture coefficients p (optional)
``component``          int64                       MIX'EM dominant component argmax p (optional)
``probabilities``      fixed_size_list<float32>    cluster-head probabilities (optional)
=====================  ==========================  ==============================================

Only ``index``, ``label`` and ``representation`` are required in files read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("index", "label", "representation")
VECTOR_COLUMNS = ("representation", "representation_l2", "coefficients", "probabilities")
INTEGER_COLUMNS = ("index", "label", "component")


def _to_arrow(name: str, values: np.ndarray) -> pa.Array:
    if name in VECTOR_COLUMNS:
        values = np.ascontiguousarray(values, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.array(np.asarray(values, dtype=np.int64))


def write_features(path: str | Path, batches: Iterable[dict[str, np.ndarray]]) -> Path:
    """Stream column batches (each a dict of equal-length arrays) into ``path`` as row groups,
    so a large split is never held in memory twice. Refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; features are never overwritten (remove it or pick another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            table = pa.table({name: _to_arrow(name, values) for name, values in batch.items()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"no features to write to {path}")
    tmp.replace(path)
    return path


def read_features(path: str | Path, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read a features file into numpy arrays ((N, D) float32 for vectors, (N,) int64 otherwise).

    Raises ``ValueError`` naming the file and the problem when the schema is not the one above.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path} is not a Parquet file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path} lacks the required column(s) {missing}; it has {schema.names} "
                         f"(see the features schema in the README)")
    wanted = list(columns) if columns is not None else list(schema.names)
    table = pq.read_table(path, columns=[c for c in wanted if c in schema.names])
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            if not pa.types.is_floating(column.type.value_type):
                raise ValueError(f"{path}: column {name!r} must hold floats, has {column.type}")
            out[name] = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(
                len(column), column.type.list_size)
        elif name in VECTOR_COLUMNS:
            raise ValueError(f"{path}: column {name!r} must be a fixed-size list of float32, has {column.type}")
        else:
            if not pa.types.is_integer(column.type):
                raise ValueError(f"{path}: column {name!r} must be int64, has {column.type}")
            out[name] = column.to_numpy().astype(np.int64, copy=False)
    return out
