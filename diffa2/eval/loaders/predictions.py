"""Predictions files in the official submission formats (JSON list or JSONL), written atomically and read back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffa2.eval.loaders.json_files import _read_json_list, _read_jsonl
from diffa2.eval.loaders.records import DataError, Record
from diffa2.io import atomic_write_json, atomic_write_text

# ---------------------------------------------------------------------------------------------------------------
# Predictions files (official submission formats)
# ---------------------------------------------------------------------------------------------------------------


def jsonable_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record safe to write as JSON: HF audio bytes are replaced by their path (or dropped)."""
    out = dict(record)
    audio = out.get("audio")
    if isinstance(audio, dict) and "bytes" in audio:
        out["audio"] = audio.get("path")
    for key, value in out.items():
        if isinstance(value, bytes | bytearray):
            out[key] = None
    return out


def write_predictions(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write a JSON list (``.json``) or JSONL (``.jsonl``), as the official scorers read them."""
    path = Path(path)
    if path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        atomic_write_json(path, list(rows))


def read_predictions(path: str | Path) -> list[Record]:
    """Records of a predictions file: JSON list or JSONL, chosen by extension like the official scorers."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such predictions file"])
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_json_list(path)
