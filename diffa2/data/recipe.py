"""Data recipes: named mixtures of manifests with field mapping, audio root and limits (`data_recipes/*.yaml`).

A recipe is YAML like

    name: diffa2-stage3-sft
    max_audio_seconds: 30          # longer clips are trimmed and counted (null = the model window)
    train:
      - path: /data/DIFFA-data/stage3/merged_data.json
        weight: 1.0                # repeat factor; fractions take a seeded subset
        instruction_field: input
        target_field: target       # stage 1 uses `transcription`
    validation:
      - path: /data/DIFFA-data/stage3/dev.json

`{synth}` in a path stands for the synthetic corpus directory of the embedded default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from diffa2.chat import Question
from diffa2.data.manifest import ManifestFormat, ManifestRecord, RecordFields, read_manifest


def _yaml_hint(value: Any) -> str:
    """YAML reads `1e-3` (no dot) as text: say so when a rejected string is a number in disguise."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (text: YAML reads exponents without a dot, like 1e-3, as text; write 1.0e-3)"


@dataclass
class DataSource:
    path: str
    format: ManifestFormat = "auto"
    weight: float = 1.0
    instruction_field: str = "input"
    target_field: str = "target"
    audio_field: str = "audio_filepath"  # a path (relative to audio_root) or an HF Audio column
    audio_root: str | None = None  # default: the manifest's directory
    rejected_field: str | None = None  # preference data (stage 4)
    conversation_field: str = "conversation"  # multi-turn records, DIFFA/DeSTA2 style: question/answer pairs
    messages_field: str = "messages"  # multi-turn records, messages style (docs/conversations.md)
    instruction_contains: str | None = None  # keep only records whose instruction holds this text

    def __post_init__(self) -> None:
        """Check types and ranges here, so a typo fails when the recipe loads, not hours into a run."""
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"'path' must be a non-empty string, got {self.path!r}")
        if self.format not in ("auto", "json", "jsonl", "hf"):
            raise ValueError(f"'format' must be auto, json, jsonl or hf, got {self.format!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not self.weight >= 0:
            raise ValueError(f"'weight' must be a number >= 0 (a repeat factor), got {self.weight!r}"
                             f"{_yaml_hint(self.weight)}")
        for name in ("instruction_field", "target_field", "audio_field", "conversation_field", "messages_field"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name!r} must be a string, got {getattr(self, name)!r}")
        for name in ("audio_root", "rejected_field", "instruction_contains"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name!r} must be a string or null, got {getattr(self, name)!r}")

    def resolved(self, synth_dir: str | Path | None) -> DataSource:
        def sub(value: str | None) -> str | None:
            if value is None or "{synth}" not in value:
                return value
            if synth_dir is None:
                raise ValueError(f"recipe path {value!r} uses {{synth}} but no synthetic corpus is set")
            return value.replace("{synth}", str(synth_dir))

        return DataSource(**{**self.__dict__, "path": sub(self.path), "audio_root": sub(self.audio_root)})

    @property
    def record_fields(self) -> RecordFields:
        """The field names this source's records use."""
        return RecordFields(self.instruction_field, self.target_field, self.audio_field, self.conversation_field,
                            self.messages_field, self.rejected_field)


@dataclass
class DataRecipe:
    name: str
    train: list[DataSource]
    validation: list[DataSource] = field(default_factory=list)
    max_audio_seconds: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> DataRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        source_keys = {f.name for f in fields(DataSource)}

        def sources(key: str) -> list[DataSource]:
            out = []
            for i, item in enumerate(data.get(key) or []):
                bad = sorted(set(item) - source_keys) if isinstance(item, dict) else None
                if bad is None or bad or "path" not in item:
                    raise ValueError(f"{source}: {key}[{i}] must be a mapping with 'path' and keys from "
                                     f"{sorted(source_keys)}; got {item!r}")
                try:
                    out.append(DataSource(**item))
                except ValueError as err:
                    raise ValueError(f"{source}: {key}[{i}]: {err}") from None
            return out

        if not data.get("train"):
            raise ValueError(f"{source}: a recipe needs at least one 'train' source")
        for key in ("train", "validation"):
            if not isinstance(data.get(key) or [], list):
                raise ValueError(f"{source}: {key!r} must be a list of sources, got {data[key]!r:.80}")
        seconds = data.get("max_audio_seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0):
            raise ValueError(f"{source}: 'max_audio_seconds' must be a number > 0 or null, got {seconds!r}")
        return cls(name=str(data.get("name", source)), train=sources("train"), validation=sources("validation"),
                   max_audio_seconds=data.get("max_audio_seconds"))

    @classmethod
    def load(cls, path: str | Path) -> DataRecipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data recipe")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a data recipe is a YAML mapping (name, train, validation), got "
                             f"{type(data).__name__}")
        return cls.from_dict(data, source=str(path))


@dataclass
class RecipeItem:
    record: ManifestRecord
    source: DataSource

    def prompt(self) -> tuple[Question, str, list[Any]]:
        """The question (an instruction, or a conversation for a multi-turn record), the answer to train on (the
        last assistant turn) and the clips' audio values (paths or HF audio cells) in order."""
        fields, names = self.record.fields, self.source.record_fields
        if names.is_multi_turn(fields):
            conversation, answer = names.conversation_of(fields)
            return conversation, answer, [clip.source for clip in conversation.clips]
        return fields[names.instruction], fields[names.target], [fields[names.audio]]


def load_split(
    sources: list[DataSource], *, synth_dir: str | Path | None, seed: int, on_error: str = "raise"
) -> tuple[list[RecipeItem], list[str]]:
    """Read every source of a split and mix them by weight (deterministic for a seed)."""
    rng = random.Random(seed)
    items: list[RecipeItem] = []
    problems: list[str] = []
    for raw in sources:
        src = raw.resolved(synth_dir)
        required = (src.instruction_field, src.target_field, src.audio_field) + (
            (src.rejected_field,) if src.rejected_field else ()
        )
        records, bad = read_manifest(src.path, src.format, required=required, audio_field=src.audio_field,
                                     on_error=on_error, multi_turn=src.record_fields)
        problems += bad
        if src.instruction_contains is not None:
            records = [r for r in records if src.instruction_contains in str(r.fields.get(src.instruction_field, ""))]
        whole, fraction = divmod(src.weight, 1.0)
        chosen = records * int(whole) + rng.sample(records, round(fraction * len(records)))
        items += [RecipeItem(r, src) for r in chosen]
    return items, problems
