"""Reader of parquet files and folders (MMSU as downloaded), one record per row."""

from __future__ import annotations

from pathlib import Path

from diffa2.eval.loaders.records import DataError, Record


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError([f"{path}: no .parquet files in this folder"])
    records = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            records.append(Record(row, f"{file}[{len(records)}]", len(records)))
    return records
