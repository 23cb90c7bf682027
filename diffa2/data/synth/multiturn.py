"""The multi-turn split: follow-up questions about one clip, and questions comparing two clips (docs/conversations.md).

``python -m diffa2.data.synth --multiturn --out data/synth`` writes, beside the corpus (its files are untouched):

* ``multiturn_train.json`` / ``multiturn_validation.json`` (and ``.jsonl``): messages-style training records
  (``{"messages": [...], "kind", "turns"}``), every conversation once per prefix ending with an assistant turn, so
  training on the last assistant turn (the toolkit's rule) trains every turn;
* ``test_multiturn_mmau.json``: MMAU-format items, one per turn of each test conversation, with ``turn`` (1 or 2),
  ``conversation_id``, ``history`` (the earlier turns, messages style, gold answers in the assistant turns)
  and ``question_audio`` (clips of the asked turn, the second clip of a comparison), so the eval runner reports
  accuracy per turn (``--spec`` ``diffa2/eval/benchmarks/synth_multiturn.yaml``);
* the clips under ``audio_multiturn/{split}/``.

A conversation's first turn asks one of the corpus's question kinds about clip one. A *follow-up* then asks another
kind about the same clip; a *comparison* brings clip two and asks which clip is louder / higher / faster / has more
beeps (answers ``one`` or ``two``: single tokens of the corpus's tokenizer). Clips come from their own random
streams; every file depends only on the seed and the sizes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from diffa2.data.synth.constants import DATASET_NAME, FAMILIES, PITCH_BASE_HZ, SAMPLE_RATE
from diffa2.data.synth.items import _choices, _difficulty
from diffa2.data.synth.questions import MC_FRACTION, QUESTION_KINDS, format_mc_prompt
from diffa2.data.synth.render import Clip, _random_attrs, render_clip
from diffa2.io import atomic_write_text

MULTITURN_AUDIO_DIR = "audio_multiturn"
MULTITURN_TEST = "test_multiturn_mmau.json"
MULTITURN_MANIFESTS = {"train": "multiturn_train.json", "validation": "multiturn_validation.json"}
_MULTITURN_CODE = 5  # the random streams of this split (the corpus's splits use 1-3, the long split 4)
_SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}
CLIP_NAMES = ("one", "two")  # the answers of a comparison: clip one or clip two


@dataclass(frozen=True)
class Comparison:
    """A question comparing two clips: the attribute, its order (lowest first), phrasings and the families."""

    name: str  # the sub-category of its test items
    attribute: str
    order: tuple
    phrasings: tuple[str, ...]
    families: tuple[str, ...]


COMPARISONS: dict[str, Comparison] = {
    c.name: c
    for c in (
        Comparison("Loudness comparison", "loudness", ("quiet", "loud"),
                   ("Which clip is louder, clip one or clip two?", "Which of the two clips is louder?"), FAMILIES),
        Comparison("Pitch comparison", "pitch", tuple(PITCH_BASE_HZ),
                   ("Which clip is higher in pitch, clip one or clip two?", "Which of the two clips is higher?"),
                   ("sound", "music")),
        Comparison("Tempo comparison", "tempo", ("slow", "fast"),
                   ("Which clip is faster, clip one or clip two?", "Which of the two melodies is faster?"), ("music",)),
        Comparison("Counting comparison", "count", (1, 2, 3, 4),
                   ("Which clip has more beeps, clip one or clip two?", "Which of the two clips has more beeps?"),
                   ("sound",)),
    )
}
FOLLOW_UP = "follow-up"
COMPARISON = "comparison"


@dataclass(frozen=True)
class MultiturnSizes:
    """Conversations per split: training and validation in total, test per turn-2 sub-category."""

    train: int = 1200
    validation: int = 48
    test_per_kind: int = 20


def _clip(seed: int, split: str, index: int, family: str, fixed: dict) -> Clip:
    rng = np.random.default_rng([seed, _MULTITURN_CODE, _SPLIT_CODES[split], index])
    attrs = _random_attrs(rng, family, fixed)
    clip_id = f"mt-{split}-{index:05d}"
    clip = Clip(clip_id, split, family, attrs, f"{MULTITURN_AUDIO_DIR}/{split}/{clip_id}.wav")
    clip.audio = render_clip(rng, family, attrs)
    return clip


def _kinds_for(family: str) -> list[str]:
    return [name for name, kind in QUESTION_KINDS.items() if family in kind.families]


def _turn(rng: np.random.Generator, clip: Clip, kind_name: str, *, mc: bool, canonical: bool) -> dict:
    """One question about `clip`: its prompt (multiple choice or plain), choices, answer and kind."""
    kind = QUESTION_KINDS[kind_name]
    question = kind.phrasings[0 if canonical else int(rng.integers(0, len(kind.phrasings)))]
    choices = _choices(rng, clip, kind)
    prompt = format_mc_prompt(question, choices) if mc else question
    return {"question": question, "choices": choices, "answer": clip.answer(kind), "prompt": prompt,
            "kind": kind_name, "difficulty": _difficulty(clip, kind)}


def _conversation(seed: int, split: str, index: int, rng: np.random.Generator, second: str, *,
                  test: bool) -> tuple[list[Clip], list[dict]]:
    """Clips and two turns of one conversation whose second turn is `second` (a question kind or a comparison)."""
    canonical = test
    mc = test or bool(rng.random() < MC_FRACTION)
    if second in COMPARISONS:
        comp = COMPARISONS[second]
        family = comp.families[int(rng.integers(0, len(comp.families)))]
        ranks = [int(r) for r in rng.choice(len(comp.order), 2, replace=False)]  # two different values
        clips = [_clip(seed, split, 2 * index + j, family, {comp.attribute: comp.order[ranks[j]]}) for j in range(2)]
        first_kind = _kinds_for(family)[int(rng.integers(0, len(_kinds_for(family))))]
        winner = CLIP_NAMES[int(ranks[1] > ranks[0])]
        question = comp.phrasings[0 if canonical else int(rng.integers(0, len(comp.phrasings)))]
        choices = list(CLIP_NAMES)
        last = {"question": question, "choices": choices, "answer": winner,
                "prompt": format_mc_prompt(question, choices) if mc else question, "kind": second,
                "difficulty": "medium"}
    else:
        family = QUESTION_KINDS[second].families[int(rng.integers(0, len(QUESTION_KINDS[second].families)))]
        clips = [_clip(seed, split, 2 * index, family, {})]
        others = [k for k in _kinds_for(family) if k != second]
        first_kind = others[int(rng.integers(0, len(others)))]
        last = _turn(rng, clips[0], second, mc=mc, canonical=canonical)
    first = _turn(rng, clips[0], first_kind, mc=mc, canonical=canonical)
    return clips, [first, last]


def _second_kinds() -> list[str]:
    """The turn-2 sub-categories: a follow-up of every question kind, and every comparison."""
    return [*QUESTION_KINDS, *COMPARISONS]


def _messages(clips: list[Clip], turns: list[dict], upto: int) -> list[dict]:
    """Messages of the first `upto` turns (each user turn then its gold answer); clip two opens turn 2's user turn."""
    out: list[dict] = []
    for t, turn in enumerate(turns[:upto]):
        audio = [clips[0]] if t == 0 else clips[1:]
        out.append({"role": "user", "content": [*({"type": "audio", "audio": c.relpath} for c in audio),
                                                {"type": "text", "text": turn["prompt"]}]})
        out.append({"role": "assistant", "content": turn["answer"]})
    return out


def _write(root: Path, clips: list[Clip]) -> None:
    for clip in clips:
        path = root / clip.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), clip.audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _training_records(root: Path, seed: int, split: str, n: int) -> list[dict]:
    rng = np.random.default_rng([seed, _MULTITURN_CODE, _SPLIT_CODES[split]])
    kinds = _second_kinds()
    records = []
    for i in range(n):
        second = kinds[i % len(kinds)]
        clips, turns = _conversation(seed, split, i, rng, second, test=False)
        _write(root, clips)
        kind = COMPARISON if second in COMPARISONS else FOLLOW_UP
        for upto in (1, 2):
            records.append({"messages": _messages(clips, turns, upto), "conversation_id": f"mt-{split}-{i:05d}",
                            "kind": kind, "turns": upto, "sub-category": turns[upto - 1]["kind"],
                            "dataset": DATASET_NAME})
    return records


def _test_records(root: Path, seed: int, per_kind: int) -> list[dict]:
    rng = np.random.default_rng([seed, _MULTITURN_CODE, _SPLIT_CODES["test"]])
    records = []
    index = 0
    for second in _second_kinds():
        for _ in range(per_kind):
            clips, turns = _conversation(seed, "test", index, rng, second, test=True)
            _write(root, clips)
            conversation = f"mt-test-{index:05d}"
            index += 1
            kind = COMPARISON if second in COMPARISONS else FOLLOW_UP
            for t, turn in enumerate(turns):
                task = "comparison" if turn["kind"] in COMPARISONS else QUESTION_KINDS[turn["kind"]].task
                records.append({
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "audio_id": clips[0].relpath,
                    "question": turn["question"],
                    "choices": turn["choices"],
                    "answer": turn["answer"],
                    "dataset": DATASET_NAME,
                    "task": task,
                    "split": "test-mini",
                    "category": "Reasoning" if turn["kind"] in COMPARISONS else "Information Extraction",
                    "sub-category": turn["kind"],
                    "difficulty": turn["difficulty"],
                    "conversation_id": conversation,
                    "conversation_kind": kind,
                    "turn": t + 1,
                    "history": _messages(clips, turns, t),
                    "question_audio": [c.relpath for c in clips[1:]] if t == 1 else [],
                })
    return records


def build_multiturn_split(out: str | Path, *, seed: int = 0, sizes: MultiturnSizes | None = None) -> dict[str, Path]:
    """Write the multi-turn manifests, test file and clips under ``out``; returns the files by split."""
    sizes = sizes or MultiturnSizes()
    if min(sizes.train, sizes.validation, sizes.test_per_kind) < 1:
        raise ValueError(f"every multi-turn size must be >= 1, got {sizes}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, name in MULTITURN_MANIFESTS.items():
        records = _training_records(root, seed, split, getattr(sizes, split))
        path = root / name
        atomic_write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(path.with_suffix(".jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in records))
        written[split] = path
    written["test"] = root / MULTITURN_TEST
    atomic_write_text(written["test"], json.dumps(_test_records(root, seed, sizes.test_per_kind), indent=1,
                                                  ensure_ascii=False) + "\n")
    return written

