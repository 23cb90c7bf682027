"""Reading benchmark records from any source (file, folder or Hugging Face id), with the data's identity for
reports."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffa2.eval.loaders.hf import _read_hf
from diffa2.eval.loaders.json_files import _read_json_list, _read_jsonl
from diffa2.eval.loaders.parquet import _read_parquet
from diffa2.eval.loaders.records import DataError, Record


def read_records(source: str | Path, *, hf_split: str = "train", hf_revision: str | None = None) -> list[Record]:
    """Records of a JSON list, JSONL, parquet file or folder, or a Hugging Face dataset id."""
    return read_records_with_identity(source, hf_split=hf_split, hf_revision=hf_revision)[0]


def read_records_with_identity(
    source: str | Path, *, hf_split: str = "train", hf_revision: str | None = None
) -> tuple[list[Record], dict[str, Any]]:
    """Records plus the data's identity for reports (path and SHA-256, or HF id, revision and fingerprint)."""
    path = Path(source)
    if path.exists():
        if path.is_dir() or path.suffix == ".parquet":
            records = _read_parquet(path)
            digest = _hash_files(sorted(path.rglob("*.parquet")) if path.is_dir() else [path])
        elif path.suffix == ".jsonl":
            records, digest = _read_jsonl(path), _hash_files([path])
        else:
            records, digest = _read_json_list(path), _hash_files([path])
        return records, {"path": str(path.resolve()), "sha256": digest, "records": len(records)}
    source = str(source)
    if source.count("/") == 1 and not source.startswith((".", "/")) and not Path(source).suffix:
        records, identity = _read_hf(source, hf_split, hf_revision)
        return records, {"hf_dataset": source, "split": hf_split, "revision": hf_revision, "identity": identity,
                         "records": len(records)}
    raise DataError([f"{source}: no such file or folder (and not a Hugging Face dataset id owner/name)"])


def _hash_files(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
