"""A torch dataset over recipe items: decodes audio lazily, trims to the window, skips bad items and counts them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffa2.audio import AudioError, decode_audio_bytes, load_audio, trim_to_window
from diffa2.chat import ChatFormat, Question
from diffa2.data.collate import PairExample, SFTExample
from diffa2.data.recipe import RecipeItem


@dataclass
class DataStats:
    """What happened to the data during a run, for the end-of-run summary."""

    trimmed: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # where -> reason

    def summary(self) -> str:
        return f"{len(self.skipped)} skipped (bad audio), {len(self.trimmed)} trimmed to the window"


@dataclass(frozen=True)
class TokenBudget:
    """The tokens one training row may hold: the backbone's window, a clip's speech tokens (at most), the canvas."""

    max_sequence_length: int  # the backbone's `max_sequence_length` (LLaDA-8B: 4096)
    speech_tokens: int  # speech tokens of a clip as long as the audio window
    canvas: int | None  # the fixed answer canvas; None: as wide as each batch's longest answer

    def problem(self, prompt_tokens: int, answer_tokens: int, clips: int = 1) -> str | None:
        """Why a row with this prompt, answer (end of turn included) and number of clips cannot be trained, or None."""
        if self.canvas is not None and answer_tokens > self.canvas:
            return f"its answer has {answer_tokens} tokens, more than the {self.canvas}-token answer canvas"
        answer = self.canvas or answer_tokens
        speech = clips * self.speech_tokens
        if prompt_tokens + speech + answer > self.max_sequence_length:
            return (f"prompt ({prompt_tokens}) + speech (up to {speech}) + answer ({answer}) tokens exceed "
                    f"the backbone's {self.max_sequence_length}-token window")
        return None


def items_within(
    items: list[RecipeItem], chat: ChatFormat, budget: TokenBudget
) -> tuple[list[RecipeItem], dict[str, str]]:
    """The items whose answers (chosen and rejected ones alike) fit `budget`; the others by location, with why."""
    kept: list[RecipeItem] = []
    too_long: dict[str, str] = {}
    for item in items:
        question, answer, clips = item.prompt()
        fields, source = item.record.fields, item.source
        prompt = len(chat.encode(question)[0])
        answers = [answer] + ([fields[source.rejected_field]] if source.rejected_field else [])
        problems = [budget.problem(prompt, len(chat.encode_answer(a)), len(clips)) for a in answers]
        reason = next((p for p in problems if p is not None), None)
        if reason is None:
            kept.append(item)
        else:
            too_long[item.record.where] = reason
    return kept, too_long


def audio_path(root: Path, value: str, where: str) -> Path:
    """`value` under `root`; a relative path that climbs out of the root is refused (absolute paths are kept)."""
    path = root / value
    relative = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    if not Path(value).is_absolute() and (relative == os.pardir or relative.startswith(os.pardir + os.sep)):
        raise AudioError(str(path), f"is outside the audio root {root}", expected="a path inside it", where=where)
    return path


class AudioInstructionDataset(torch.utils.data.Dataset):
    """Items -> `SFTExample`s; an unreadable item is reported once, counted, and replaced by the next good one."""

    def __init__(self, items: list[RecipeItem], max_seconds: float, *, on_bad_audio: str = "skip") -> None:
        if not items:
            raise ValueError("the dataset is empty: the recipe's sources hold no usable records")
        self.items = items
        self.max_seconds = max_seconds
        self.on_bad_audio = on_bad_audio
        self.stats = DataStats()

    def __len__(self) -> int:
        return len(self.items)

    def load_wave(self, item: RecipeItem, value: Any = None):
        """One clip of `item` (`value`: its audio value; default the item's single clip), cut to the window."""
        src, rec = item.source, item.record
        value = rec.fields[src.audio_field] if value is None else value
        window = self.max_seconds  # only the window is decoded, so a 2-hour file costs 30 s of memory
        if isinstance(value, dict):  # an undecoded HF Audio cell: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                wave = decode_audio_bytes(value["bytes"], name=str(value.get("path")), where=rec.where,
                                          max_seconds=window)
            else:
                wave = load_audio(value["path"], where=rec.where, max_seconds=window)
        else:
            root = Path(src.audio_root) if src.audio_root else Path(src.path).parent
            wave = load_audio(audio_path(root, value, f"{rec.where} field {src.audio_field!r}"), where=rec.where,
                              max_seconds=window)
        wave, trimmed = trim_to_window(wave, window)
        if trimmed:
            self.stats.trimmed.add(rec.where)
        return wave

    def __getitem__(self, index: int) -> SFTExample:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            question, answer, clips = item.prompt()
            try:
                waves = [self.load_wave(item, value) for value in clips]
            except AudioError as err:
                if self.on_bad_audio != "skip":
                    raise
                if item.record.where not in self.stats.skipped:
                    print(f"[diffa2] skipping {err}")
                self.stats.skipped[item.record.where] = str(err)
                continue
            keys = [f"{item.source.path}:{audio}" if isinstance(audio, str) else None for audio in clips]
            if isinstance(question, str):  # one clip: the classic example
                return self.make_example(waves[0], item, question, answer, keys[0])
            return self.make_example(waves, item, question, answer, keys)
        raise RuntimeError("every item of the dataset has unreadable audio; see the messages above")

    def make_example(self, wave, item: RecipeItem, question: Question, answer: str, audio_key) -> SFTExample:
        """The example of an item whose clip(s) are loaded."""
        return SFTExample(wave, question, answer, audio_key)


class PreferenceDataset(AudioInstructionDataset):
    """Items -> `PairExample`s: the target field (or last assistant turn) is the chosen answer, `rejected_field` the
    rejected one."""

    def __init__(self, items: list[RecipeItem], max_seconds: float, *, on_bad_audio: str = "skip") -> None:
        unpaired = sorted({item.source.path for item in items if not item.source.rejected_field})
        if unpaired:
            raise ValueError(f"preference data needs `rejected_field` on every recipe source; missing on {unpaired}")
        super().__init__(items, max_seconds, on_bad_audio=on_bad_audio)

    def make_example(self, wave, item: RecipeItem, question: Question, answer: str, audio_key) -> PairExample:
        """The pair of an item whose clip(s) are loaded."""
        return PairExample(wave, question, answer, item.record.fields[item.source.rejected_field], audio_key)
