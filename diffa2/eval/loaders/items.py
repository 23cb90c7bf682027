"""Validated records as requests for the runner: question, options, gold answer and where the audio is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffa2.chat import AudioRef as ChatAudio
from diffa2.chat import Turn, turns_from_messages
from diffa2.eval.loaders.fields import answer_of, choices_of
from diffa2.eval.loaders.records import AudioRef, DataError, Item, Record
from diffa2.eval.specs import BenchmarkSpec

# ---------------------------------------------------------------------------------------------------------------
# Items (requests)
# ---------------------------------------------------------------------------------------------------------------


def _path_ref(value: str, root: Path) -> AudioRef:
    path = Path(value)
    return AudioRef(path if path.is_absolute() else root / path, None, value)


def _conversation(record: Record, root: Path) -> tuple[tuple[Turn, ...], tuple[AudioRef, ...]]:
    """A record's `history` (messages style; audio parts are paths under the audio root) and `question_audio`
    (paths), checked; both empty for an ordinary record."""
    history, question_audio = record.data.get("history") or [], record.data.get("question_audio") or []
    try:
        turns, system = turns_from_messages(history) if history else ([], None)
    except ValueError as err:
        raise DataError([f"{record.where}: field 'history': {err}"]) from None
    bad = [c.source for t in turns for c in t.clips if not isinstance(c.source, str) or not c.source]
    if system is not None or bad or (turns and turns[-1].role != "assistant"):
        raise DataError([f"{record.where}: field 'history' holds user/assistant turns ending with an answer, audio "
                         f"parts as path strings (no system message); got {history!r:.120}"])
    if not isinstance(question_audio, list) or not all(isinstance(p, str) and p for p in question_audio):
        raise DataError([f"{record.where}: field 'question_audio' must be a list of audio paths, got "
                         f"{question_audio!r:.80}"])
    resolved = tuple(Turn(t.role, tuple(ChatAudio(_path_ref(p.source, root)) if isinstance(p, ChatAudio) else p
                                        for p in t.parts)) for t in turns)
    return resolved, tuple(_path_ref(p, root) for p in question_audio)


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
    """Validated records as requests (call `validate(..., for_run=True)` first); a record with `history` and/or
    `question_audio` is a conversation item (docs/conversations.md)."""
    root = Path(audio_root)
    items = []
    for rec in records:
        history, question_audio = _conversation(rec, root)
        items.append(Item(
            index=rec.index,
            id=str(rec.data["id"]),
            question=rec.data["question"],
            choices=list(choices_of(rec.data, spec.format)),
            answer=answer_of(rec.data, spec.format),
            audio=_audio_ref(rec.data, spec.format, root),
            record=rec,
            history=history,
            question_audio=question_audio,
        ))
    return items
