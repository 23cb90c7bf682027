"""Read, validate and write benchmark files in their official formats.

Formats (field lists from docs/benchmarks.md §1.1, §2.1, §3.1 and docs/model.md §7):

* ``mmau_json`` -- MMAU (and the synthetic ``synth`` split): a JSON list of records with ``id``, ``audio_id``
  (path relative to the audio root, e.g. ``./test-mini-audios/<id>.wav``), ``question``, ``choices`` (list),
  ``answer`` (one of the choices), ``task``, ``difficulty``, ``sub-category``, ``category`` (a string, or in
  13 MMAU records a one-element list). Predictions: the same list plus ``model_output`` (+ ``model_prediction``).
* ``mmar_jsonl`` -- MMAR: JSONL (or a JSON list) with ``id``, ``audio_path``, ``question``, ``choices``,
  ``answer``, ``modality``, ``category``, ``sub-category`` and more. Predictions: plus ``answer_prediction``.
* ``mmsu`` -- MMSU: the HF dataset ``ddwang2000/MMSU`` (split ``train``), a parquet file/folder, or JSONL with
  ``id``, ``question``, ``choice_a``..``choice_d`` (``choice_c``/``choice_d`` may be null), ``answer_gt`` (the
  answer *text*), ``category``, ``sub-category``, ``sub-sub-category`` and the audio as ``audio_path`` or
  ``audio`` (a path, or HF's ``{"bytes", "path"}``). Predictions: JSONL plus ``response``.

Every problem found is reported at once, each naming the file, the line (JSONL) or index (JSON list / table)
and the field. Records are kept unchanged (``Record.data``) so predictions carry every metadata field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffa2.eval.specs import BUILTIN_SPECS, BenchmarkSpec
from diffa2.io import atomic_write_json, atomic_write_text

MAX_PROBLEMS_SHOWN = 30
MMSU_CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")
MISSING_VALUE = "(missing)"


class DataError(ValueError):
    """Bad benchmark data: every problem found, one per line, each with file, line/index and field."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        more = len(self.problems) - len(shown)
        head = f"{source}: " if source else ""
        text = f"{head}{len(self.problems)} problem(s) in the data:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@dataclass
class Record:
    """One record as stored, with where it came from (``file:line`` for JSONL, ``file[index]`` otherwise)."""

    data: dict[str, Any]
    where: str
    index: int


@dataclass
class AudioRef:
    """Where an item's audio is: a file path, or encoded bytes (HF datasets), with a label for messages."""

    path: Path | None
    data: bytes | None
    label: str


@dataclass
class Item:
    """A request: what the runner decodes for one record."""

    index: int
    id: str
    question: str
    choices: list[str | None]  # positional: option letter i maps to choices[i]; None = unused MMSU option
    answer: str
    audio: AudioRef
    record: Record


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


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


def _read_hf(dataset_id: str, split: str, revision: str | None) -> tuple[list[Record], str]:
    """Rows of a Hugging Face dataset, audio kept as encoded bytes (decoded later by diffa2.audio at 16 kHz)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError([f"{dataset_id}: reading a Hugging Face dataset needs the `datasets` package"]) from exc
    try:
        ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, missing, auth)
        raise DataError(
            [f"{dataset_id}: cannot load split {split!r} from the Hugging Face Hub or cache ({type(exc).__name__}: "
             f"{exc}); pass a local parquet/JSONL path with --data"]
        ) from exc  # fmt: skip
    if "audio" in ds.column_names:
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    identity = f"hf:{dataset_id}@{revision or 'default'} fingerprint {getattr(ds, '_fingerprint', '?')}"
    return [Record(row, f"hf:{dataset_id}[{i}]", i) for i, row in enumerate(ds)], identity


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
                         "records": len(records)}  # fmt: skip
    raise DataError([f"{source}: no such file or folder (and not a Hugging Face dataset id owner/name)"])


def _hash_files(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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
        names = sorted(name for name, s in BUILTIN_SPECS.items() if s.format == other)
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


# ---------------------------------------------------------------------------------------------------------------
# Items (requests)
# ---------------------------------------------------------------------------------------------------------------


def _audio_ref(record: dict, fmt: str, root: Path) -> AudioRef:
    def resolve(p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else root / path

    if fmt == "mmau_json":
        return AudioRef(resolve(record["audio_id"]), None, record["audio_id"])
    if fmt == "mmar_jsonl":
        return AudioRef(resolve(record["audio_path"]), None, record["audio_path"])
    if isinstance(record.get("audio_path"), str) and record["audio_path"]:
        return AudioRef(resolve(record["audio_path"]), None, record["audio_path"])
    audio = record.get("audio")
    if isinstance(audio, str):
        return AudioRef(resolve(audio), None, audio)
    label = str(audio.get("path") or f"<audio bytes of {record.get('id')}>")
    if audio.get("bytes"):
        return AudioRef(None, bytes(audio["bytes"]), label)
    return AudioRef(resolve(audio["path"]), None, label)


def to_items(records: Sequence[Record], spec: BenchmarkSpec, audio_root: str | Path) -> list[Item]:
    """Validated records as requests (call `validate(..., for_run=True)` first)."""
    root = Path(audio_root)
    return [
        Item(
            index=rec.index,
            id=str(rec.data["id"]),
            question=rec.data["question"],
            choices=list(choices_of(rec.data, spec.format)),
            answer=answer_of(rec.data, spec.format),
            audio=_audio_ref(rec.data, spec.format, root),
            record=rec,
        )
        for rec in records
    ]


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
