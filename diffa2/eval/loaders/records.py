"""The shapes every loader shares (records, audio references, requests, DataError), kept apart so that each
format's reader depends only on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # A conversation item (docs/conversations.md): the earlier turns (`diffa2.chat.Turn`s whose clips' sources are
    # `AudioRef`s) and the clips that open the asked turn; an item without them is one question about `audio`.
    history: tuple = ()
    question_audio: tuple[AudioRef, ...] = ()

    @property
    def is_conversation(self) -> bool:
        return bool(self.history or self.question_audio)
