"""Readers of JSON-list (MMAU, predictions) and JSONL (MMAR, MMSU, predictions) files, reporting every bad line
with its file and line number."""

from __future__ import annotations

import json
from pathlib import Path

from diffa2.eval.loaders.records import DataError, Record


def _read_json_list(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path)  # a .json file that is really JSONL
        raise DataError([f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})"]) from exc
    except RecursionError as exc:
        raise DataError([f"{path}: JSON nested too deeply"]) from exc
    except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
        raise DataError([f"{path}: not valid JSON ({exc})"]) from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError([f"{path}: expected a JSON list of records, got {type(data).__name__}"])
    return [Record(r, f"{path}[{i}]", i) for i, r in enumerate(data)]


def _read_jsonl(path: Path) -> list[Record]:
    records, problems = [], []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{lineno}", len(records)))
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
            except RecursionError:
                problems.append(f"{path}:{lineno}: JSON nested too deeply")
            except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
                problems.append(f"{path}:{lineno}: not valid JSON ({exc})")
    if problems:
        raise DataError(problems)
    return records
