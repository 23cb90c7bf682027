"""Validated records as requests for the runner: question, options, gold answer and where the audio is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffa2.eval.loaders.fields import answer_of, choices_of
from diffa2.eval.loaders.records import AudioRef, Item, Record
from diffa2.eval.specs import BenchmarkSpec

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
