"""Reading training manifests in the formats real users have, with errors that name the file and line.

- DIFFA/DeSTA2 JSON list (`audio_id`, `audio_filepath`, `transcription`, `input`, `target`, ...);
- JSON Lines with the same fields;
- Hugging Face datasets saved locally (`save_to_disk` directory, `.parquet` or `.arrow` files) with an audio
  column read undecoded (`Audio(decode=False)`: bytes and/or path), decoded later with soundfile.

Any of them may hold multi-turn records (docs/conversations.md): the DIFFA/DeSTA2 style, the clip's field and a
`conversation` list of question/answer pairs (`[{"input": ..., "target": ...}, ...]`, the clip in the first user
turn), or a `messages` list (`[{"role": "user", "content": [{"type": "audio", "audio": path}, {"type": "text",
"text": ...}]}, {"role": "assistant", "content": ...}, ...]`). Training answers the last assistant turn; the turns
before it are the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffa2.chat import AudioRef, Conversation, Turn, turns_from_messages

ManifestFormat = Literal["auto", "json", "jsonl", "hf"]


class ManifestError(ValueError):
    """A manifest or one of its records is malformed; the message says where and what was expected."""


@dataclass(frozen=True)
class RecordFields:
    """The field names of a source's records: single-turn ones, and the two multi-turn forms'."""

    instruction: str = "input"
    target: str = "target"
    audio: str = "audio_filepath"
    conversation: str = "conversation"
    messages: str = "messages"
    rejected: str | None = None  # preference data: the rejected answer to the last user turn

    def is_multi_turn(self, item: dict) -> bool:
        """Whether a record holds a conversation (a `messages` or `conversation` field) rather than one question."""
        return item.get(self.messages) is not None or item.get(self.conversation) is not None

    def conversation_of(self, item: dict) -> tuple[Conversation, str]:
        """A multi-turn record's prompt (its clips' sources in the `AudioRef`s) and the answer to train on: its
        last assistant turn. Raises ValueError saying what is wrong."""
        if item.get(self.messages) is not None:
            turns, system = turns_from_messages(item[self.messages])
            where = f"field {self.messages!r}"
        else:
            pairs = item[self.conversation]
            where = f"field {self.conversation!r}"
            if not isinstance(pairs, list) or not pairs:
                raise ValueError(f"{where} must be a non-empty list of {{{self.instruction!r}, {self.target!r}}} "
                                 f"objects, got {pairs!r:.80}")
            if not _is_audio(item.get(self.audio)):
                raise ValueError(f"field {self.audio!r} must be a path string or an HF audio cell {{bytes, path}}, "
                                 f"got {item.get(self.audio)!r:.80}")
            turns, system = [], None
            for i, pair in enumerate(pairs):
                keys = (self.instruction, self.target)
                if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in keys):
                    raise ValueError(f"{where}[{i}] must be an object with string fields {list(keys)}, "
                                     f"got {pair!r:.80}")
                lead = (AudioRef(item[self.audio]),) if i == 0 else ()
                turns += [Turn("user", (*lead, pair[self.instruction])), Turn("assistant", (pair[self.target],))]
        if self.rejected is not None and not isinstance(item.get(self.rejected), str):
            raise ValueError(f"field {self.rejected!r} (the rejected answer) must be a string, "
                             f"got {item.get(self.rejected)!r:.80}")
        if not turns or turns[-1].role != "assistant":
            raise ValueError(f"{where}: the last turn must be the assistant's answer to train on")
        try:
            conversation = Conversation(tuple(turns[:-1]), system)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        bad = [c.source for c in conversation.clips if not _is_audio(c.source)]
        if bad or not conversation.clips:
            raise ValueError(f"{where}: every audio part must be a path string or an HF audio cell, and the "
                             f"conversation needs at least one clip; got {bad[0] if bad else 'no clip'!r:.80}")
        return conversation, turns[-1].text


@dataclass
class ManifestRecord:
    fields: dict[str, Any]
    where: str  # "file:line" (JSONL), "file[item]" (JSON list) or "dataset[row]" (HF)


def detect_format(path: Path) -> ManifestFormat:
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        return "hf"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json":
        return "json"
    raise ManifestError(f"{path}: cannot tell the manifest format from the name; set format: json|jsonl|hf")


def read_manifest(
    path: str | Path, fmt: ManifestFormat = "auto", *, required: tuple[str, ...] = (), audio_field: str | None = None,
    on_error: str = "raise", multi_turn: RecordFields | None = None,
) -> tuple[list[ManifestRecord], list[str]]:
    """All records of a manifest and the problems met; a bad record raises, or is skipped when on_error='skip'.

    Every `required` field must be a string, except `audio_field`: a path string or an HF audio cell. With
    `multi_turn`, a record holding a conversation is checked as one instead (`RecordFields.conversation_of`).
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"json": _read_json_list, "jsonl": _read_jsonl, "hf": _read_hf}
    if fmt not in readers:
        raise ManifestError(f"{path}: unknown manifest format {fmt!r}; expected json, jsonl or hf")
    records, problems = [], []
    for where, item in readers[fmt](path):
        problem = _problem(item, required, audio_field, multi_turn)
        if problem is None:
            records.append(ManifestRecord(item, where))
            continue
        if on_error != "skip":
            raise ManifestError(f"{where}: {problem}")
        problems.append(f"{where}: {problem}")
    return records, problems


def _problem(item: Any, required: tuple[str, ...], audio_field: str | None,
             multi_turn: RecordFields | None = None) -> str | None:
    if isinstance(item, Exception):
        return str(item)
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if multi_turn is not None and multi_turn.is_multi_turn(item):
        try:
            multi_turn.conversation_of(item)
        except ValueError as err:
            return f"multi-turn record: {err}"
        return None
    missing = [k for k in required if k not in item or item[k] is None]
    if missing:
        return f"missing field(s) {missing}"
    wrong = [k for k in required if k != audio_field and not isinstance(item[k], str)]
    if wrong:
        return f"field(s) {wrong} must be strings, got {[type(item[k]).__name__ for k in wrong]}"
    if audio_field in required and not _is_audio(item[audio_field]):
        return (f"field {audio_field!r} must be a path string or an HF audio cell {{bytes, path}}, "
                f"got {item[audio_field]!r:.80}")
    return None


def _is_audio(value: Any) -> bool:
    """A non-empty path, or an undecoded HF Audio cell with bytes or a path."""
    if isinstance(value, dict):
        return isinstance(value.get("bytes"), bytes) and bool(value["bytes"]) or (
            isinstance(value.get("path"), str) and bool(value["path"]))
    return isinstance(value, str) and bool(value.strip())


def _parse(text: str) -> Any:
    """json.loads whose every failure is a ValueError: JSONDecodeError, or too-long integers / too-deep nesting."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as err:
        raise ValueError(f"invalid JSON ({err or 'nested too deeply'})") from None


def _read_json_list(path: Path):
    try:
        data = _parse(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except ValueError as err:
        raise ManifestError(f"{path}: {err}") from None
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON list of records (DIFFA/DeSTA2 format), got {type(data).__name__}")
    for i, item in enumerate(data):
        yield f"{path}[{i}]", item


def _read_jsonl(path: Path):
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield f"{path}:{number}", _parse(line)
            except UnicodeDecodeError as err:
                yield f"{path}:{number}", ManifestError(f"not UTF-8 text ({err.reason} at byte {err.start})")
            except json.JSONDecodeError as err:
                yield f"{path}:{number}", ManifestError(f"invalid JSON ({err.msg} at column {err.colno})")
            except ValueError as err:
                yield f"{path}:{number}", ManifestError(str(err))


def _read_hf(path: Path):
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise ManifestError(f"{path}: a DatasetDict; point at one split's directory ({list(dataset)})")
    else:
        builder = "parquet" if path.suffix == ".parquet" else "arrow"
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Audio):
            dataset = dataset.cast_column(column, datasets.Audio(decode=False))
    for i, row in enumerate(dataset):
        yield f"{path}[{i}]", row
