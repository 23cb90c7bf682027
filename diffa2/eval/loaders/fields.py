"""Field access and validation per benchmark format (mmau_json, mmar_jsonl, mmsu), so every bad record is
reported at once with its file, line/index and field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from diffa2.eval.loaders.records import MISSING_VALUE, MMSU_CHOICE_KEYS, DataError, Record
from diffa2.eval.specs import BenchmarkSpec, benchmark_names, load_spec

# ---------------------------------------------------------------------------------------------------------------
# Field access per format
# ---------------------------------------------------------------------------------------------------------------


def choices_of(record: dict[str, Any], fmt: str) -> list[Any]:
    """The options in letter order (MMSU: choice_a..choice_d, None where unused)."""
    if fmt == "mmsu":
        return [record.get(k) for k in MMSU_CHOICE_KEYS]
    choices = record.get("choices")
    if isinstance(choices, str):
        # Some mirrors (lmms-lab/mmau) store the list as a JSON string (docs/benchmarks.md §1.1).
        try:
            choices = json.loads(choices)
        except (ValueError, RecursionError):
            return choices  # left for validation to report
    return choices


def answer_of(record: dict[str, Any], fmt: str) -> Any:
    return record.get("answer_gt" if fmt == "mmsu" else "answer")


def breakdown_value(value: Any) -> str:
    """A breakdown label: lists (MMAU's ``category: ["Reasoning"]``) joined, missing values named."""
    if value is None:
        return MISSING_VALUE
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else MISSING_VALUE
    return str(value)


def _check_text(record: dict, key: str, problems: list[str], where: str, *, allow_empty: bool = False) -> None:
    if key not in record:
        problems.append(f"{where}: field {key!r}: missing")
    elif not isinstance(record[key], str):
        problems.append(f"{where}: field {key!r}: expected a string, got {type(record[key]).__name__}")
    elif not allow_empty and not record[key].strip():
        problems.append(f"{where}: field {key!r}: empty")


def record_problems(record: Any, where: str, spec: BenchmarkSpec, *, for_run: bool) -> list[str]:
    """Problems of one record: scoring fields always; id, question and audio too when `for_run`."""
    if not isinstance(record, dict):
        return [f"{where}: expected a JSON object (record), got {type(record).__name__}"]
    fmt = spec.format
    problems: list[str] = []
    if for_run:
        if "id" not in record or not isinstance(record["id"], str | int) or str(record["id"]).strip() == "":
            problems.append(f"{where}: field 'id': missing or not a non-empty string")
        _check_text(record, "question", problems, where)
    # Options.
    if fmt == "mmsu":
        for key in MMSU_CHOICE_KEYS[:2]:
            _check_text(record, key, problems, where)
        for key in MMSU_CHOICE_KEYS[2:]:
            if record.get(key) is not None and not isinstance(record[key], str):
                problems.append(f"{where}: field {key!r}: expected a string or null, got {type(record[key]).__name__}")
        choices = [c for c in choices_of(record, fmt) if isinstance(c, str)]
    else:
        choices = choices_of(record, fmt)
        if "choices" not in record:
            problems.append(f"{where}: field 'choices': missing")
            choices = []
        elif not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            problems.append(f"{where}: field 'choices': expected a list of strings, got {record['choices']!r:.80}")
            choices = []
        elif not 2 <= len(choices) <= 26:
            problems.append(f"{where}: field 'choices': {len(choices)} options (expected 2 to 26)")
    # Gold answer: one of the options. An empty answer is allowed (MMAU's test split withholds answers).
    answer_key = "answer_gt" if fmt == "mmsu" else "answer"
    answer = record.get(answer_key)
    if answer_key not in record:
        problems.append(f"{where}: field {answer_key!r}: missing")
    elif not isinstance(answer, str):
        problems.append(f"{where}: field {answer_key!r}: expected a string, got {type(answer).__name__}")
    elif answer and choices and answer not in choices:
        problems.append(f"{where}: field {answer_key!r}: {answer!r} is not one of the options {choices!r:.120}")
    # Breakdown fields are optional (reported as "(missing)"), but must be labels.
    for key in spec.breakdown:
        value = record.get(key)
        if value is not None and not isinstance(value, str | int | list):
            problems.append(f"{where}: field {key!r}: expected a string label, got {type(value).__name__}")
    if for_run:
        problems += _audio_problems(record, where, fmt)
    return problems


def _audio_problems(record: dict, where: str, fmt: str) -> list[str]:
    if fmt == "mmau_json":
        key = "audio_id"
    elif fmt == "mmar_jsonl":
        key = "audio_path"
    else:
        if isinstance(record.get("audio_path"), str) and record["audio_path"]:
            return []
        audio = record.get("audio")
        if isinstance(audio, str) and audio:
            return []
        if isinstance(audio, dict) and (audio.get("bytes") or audio.get("path")):
            return []
        return [f"{where}: field 'audio_path'/'audio': missing (expected a path or HF audio {{bytes, path}})"]
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        return [f"{where}: field {key!r}: missing or not a path string"]
    return []


# Fields only one format has (docs/benchmarks.md §1.1, §2.1, §3.1): MMAU's audio_id, MMAR's audio_path + modality,
# MMSU's choice_a + answer_gt.
FORMAT_MARKS = {"mmau_json": "audio_id", "mmar_jsonl": "audio_path, modality", "mmsu": "choice_a, answer_gt"}


def guess_format(record: Any) -> str | None:
    """The format whose distinctive fields a record has, or None when it has none or several."""
    if not isinstance(record, dict):
        return None
    found = [fmt for fmt, marks in FORMAT_MARKS.items() if all(m in record for m in marks.split(", "))]
    return found[0] if len(found) == 1 else None


def validate(records: Sequence[Record], spec: BenchmarkSpec, *, for_run: bool, source: str = "") -> None:
    """Raise DataError listing every bad record; for a run, ids must also be unique (they key resumed work)."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    looks_like = {guess_format(rec.data) for rec in records}
    if len(looks_like) == 1 and (other := looks_like.pop()) not in (None, spec.format):
        names = [name for name in benchmark_names() if load_spec(name).format == other]
        problems.append(f"every record has the fields of {other} data ({FORMAT_MARKS[other]}), not of {spec.format} "
                        f"({spec.name}): wrong benchmark? use --benchmark {' or '.join(names)}")
    for rec in records:
        problems += record_problems(rec.data, rec.where, spec, for_run=for_run)
        if for_run and isinstance(rec.data, dict) and "id" in rec.data:
            key = str(rec.data["id"])
            if key in seen:
                problems.append(f"{rec.where}: field 'id': {key!r} repeats the id of {seen[key]}")
            seen.setdefault(key, rec.where)
    if not records:
        problems.append("no records")
    if problems:
        raise DataError(problems, source)
