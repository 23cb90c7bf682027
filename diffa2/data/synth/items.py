"""Item and question generation of the synthetic corpus: stage manifests' records, multiple-choice options,
rejected answers and the balanced MMAU-format test split, all drawn from explicit random streams."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from diffa2.data.synth.constants import COUNT_WORDS, DATASET_NAME, FAMILIES, VOCABULARY
from diffa2.data.synth.questions import (
    CAPTION_KIND,
    CAPTION_PHRASINGS,
    MC_FRACTION,
    QUESTION_KINDS,
    QuestionKind,
    format_mc_prompt,
)
from diffa2.data.synth.render import _SPLIT_CODE, Clip, _make_clip

# ----------------------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------------------


def _content_distractors(rng: np.random.Generator, words: tuple[str, ...], k: int) -> list[str]:
    """``k`` utterances that differ from ``words`` in exactly one position, by a word not in the utterance."""
    out: list[str] = []
    while len(out) < k:
        pos = int(rng.integers(0, len(words)))
        new = str(rng.choice([w for w in VOCABULARY if w not in words]))
        cand = " ".join(words[:pos] + (new,) + words[pos + 1 :])
        if cand not in out:
            out.append(cand)
    return out


def _choices(rng: np.random.Generator, clip: Clip, kind: QuestionKind) -> list[str]:
    answer = clip.answer(kind)
    if kind.values is None:
        options = [answer, *_content_distractors(rng, clip.attrs["words"], 3)]
    else:
        options = list(kind.values)
    return [options[i] for i in rng.permutation(len(options))]


def _rejected(rng: np.random.Generator, clip: Clip, kind: QuestionKind, choices: list[str] | None) -> str:
    """A minimally wrong answer: another value of the closed set, or the utterance with one word swapped."""
    answer = clip.answer(kind)
    if choices is not None:
        wrong = [c for c in choices if c != answer]
    elif kind.values is None:
        wrong = _content_distractors(rng, clip.attrs["words"], 1)
    else:
        wrong = [v for v in kind.values if v != answer]
    return str(wrong[int(rng.integers(0, len(wrong)))])


def _record(clip: Clip, instruction: str, target: str, kind: str) -> dict:
    return {
        "audio_id": clip.clip_id,
        "audio_filepath": clip.relpath,
        "transcription": clip.transcription,
        "input": instruction,
        "target": target,
        "dataset": DATASET_NAME,
        "duration": clip.duration,
        "seed_transcript": clip.seed_transcript(),
        "kind": kind,
    }


def _balanced(rng: np.random.Generator, options: Sequence, n: int) -> list:
    """``n`` draws with every option equally often (up to one), in random order."""
    seq = [options[i % len(options)] for i in range(n)]
    return [seq[i] for i in rng.permutation(n)]


def _stage_items(rng: np.random.Generator, stage: str, clips: dict[str, list[Clip]], n: int) -> list[dict]:
    kinds = list(QUESTION_KINDS)
    if stage == "stage2_acoustic":
        kinds = [k for k in kinds if k != "Spoken Content"] + [CAPTION_KIND]
    items = []
    for kind_name in _balanced(rng, kinds, n):
        if kind_name == CAPTION_KIND:
            family = FAMILIES[int(rng.integers(0, len(FAMILIES)))]
            pool = clips[family]
            clip = pool[int(rng.integers(0, len(pool)))]
            phrasing = (
                CAPTION_PHRASINGS[0] if stage == "stage2_acoustic" else str(rng.choice(CAPTION_PHRASINGS))
            )
            items.append(_record(clip, phrasing, clip.caption(), CAPTION_KIND))
            continue
        kind = QUESTION_KINDS[kind_name]
        family = kind.families[int(rng.integers(0, len(kind.families)))]
        pool = clips[family]
        clip = pool[int(rng.integers(0, len(pool)))]
        if stage == "stage2_acoustic":
            question = kind.phrasings[0]
        else:
            question = kind.phrasings[int(rng.integers(0, len(kind.phrasings)))]
        choices = None
        if stage != "stage2_acoustic" and rng.random() < MC_FRACTION:
            choices = _choices(rng, clip, kind)
            instruction = format_mc_prompt(question, choices)
        else:
            instruction = question
        rec = _record(clip, instruction, clip.answer(kind), kind_name)
        if stage == "stage4_pref":
            rec["chosen"] = rec["target"]
            rec["rejected"] = _rejected(rng, clip, kind, choices)
        items.append(rec)
    return items


def _difficulty(clip: Clip, kind: QuestionKind) -> str:
    """easy/medium/hard: a base per kind (longer utterances and more beeps are harder), one level up with
    background noise."""
    levels = ("easy", "medium", "hard")
    if kind.name == "Spoken Content":
        base = len(clip.attrs["words"]) - 1
    elif kind.name == "Event Counting":
        base = 1 if clip.attrs["count"] <= 2 else 2
    elif kind.name == "Tempo":
        base = 1
    else:
        base = 0
    if clip.attrs["noise"] and kind.name != "Background Noise":
        base += 1
    return levels[min(base, 2)]


def _test_split(seed: int, per_kind: int) -> tuple[list[Clip], list[dict]]:
    """Fresh clips (their own random streams), one question each; answers balanced within every kind."""
    clips, records = [], []
    index = 0
    for kind in QUESTION_KINDS.values():
        krng = np.random.default_rng([seed, _SPLIT_CODE["test"], 99, index])
        values = kind.values or (None,)
        for j in range(per_kind):
            family = kind.families[j % len(kind.families)]
            value = values[(j // len(kind.families)) % len(values)]
            fixed = {}
            if kind.attribute == "count":
                fixed["count"] = COUNT_WORDS.index(value) + 1
            elif kind.attribute == "noise":
                fixed["noise"] = value == "yes"
            elif value is not None:
                fixed[kind.attribute] = value
            clip = _make_clip(seed, "test", family, index, fixed)
            index += 1
            choices = _choices(krng, clip, kind)
            records.append(
                {
                    "id": str(uuid.UUID(bytes=krng.bytes(16), version=4)),
                    "audio_id": clip.relpath,
                    "question": kind.phrasings[0],
                    "choices": choices,
                    "answer": clip.answer(kind),
                    "dataset": DATASET_NAME,
                    "task": kind.task,
                    "split": "test-mini",
                    "category": kind.category,
                    "sub-category": kind.name,
                    "difficulty": _difficulty(clip, kind),
                }
            )
            clips.append(clip)
    return clips, records


def chance_accuracy(records: Iterable[dict]) -> dict:
    """Expected accuracy of a uniform guess among each item's choices: overall, per sub-category, per task."""
    by_sub: dict[str, list[float]] = {}
    by_task: dict[str, list[float]] = {}
    allp: list[float] = []
    for r in records:
        p = 1.0 / len(r["choices"])
        allp.append(p)
        by_sub.setdefault(r["sub-category"], []).append(p)
        by_task.setdefault(r["task"], []).append(p)

    def mean(v: list[float]) -> float:
        return round(float(sum(v) / len(v)), 6) if v else 0.0

    return {
        "overall": mean(allp),
        "by_sub_category": {k: mean(v) for k, v in sorted(by_sub.items())},
        "by_task": {k: mean(v) for k, v in sorted(by_task.items())},
    }

