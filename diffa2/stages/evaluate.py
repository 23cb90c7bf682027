"""End-of-stage evaluation on the synthetic corpus: multiple-choice accuracy next to chance, and WER for ASR."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Literal, get_args

import jiwer
from tqdm import tqdm

from diffa2.audio import load_audio, trim_to_window
from diffa2.data.synth import format_mc_prompt
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.scoring import wordset_match
from diffa2.inference import AudioQA


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


TestPrompt = Literal["choices", "question"]  # MMAU's prompt with the lettered choices, or the question alone
TEST_PROMPTS: tuple[str, ...] = get_args(TestPrompt)


def evaluate_multiple_choice(
    qa: AudioQA,
    test_file: str | Path,
    decode: DecodeConfig,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    prompt: TestPrompt = "choices",
) -> dict:
    """Decode every MMAU-format item and score it with MMAU's official rule; accuracy overall and per sub-category.

    `prompt`: "choices" asks with MMAU's prompt (question and lettered choices), "question" with the question alone
    (what stages 1-2 train on); the answer is scored against the choices either way.
    """
    if prompt not in TEST_PROMPTS:
        raise ValueError(f"test prompt {prompt!r}: expected one of {TEST_PROMPTS}")
    test_file = Path(test_file)
    records = json.loads(test_file.read_text())[:limit]
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    chance = defaultdict(float)
    window = qa.model.config.window_seconds
    for batch in tqdm(list(_batches(records, batch_size)), desc="test", unit="batch", leave=False):
        waves = [trim_to_window(load_audio(test_file.parent / r["audio_id"]), window)[0] for r in batch]
        prompts = [format_mc_prompt(r["question"], r["choices"]) if prompt == "choices" else r["question"]
                   for r in batch]
        answers = qa.answer(waves, prompts, decode)
        for record, text in zip(batch, answers.texts, strict=True):
            kind = record["sub-category"]
            per_kind[kind][0] += wordset_match(text, record["answer"], record["choices"])
            per_kind[kind][1] += 1
            chance[kind] += 1 / len(set(record["choices"]))
    correct = sum(c for c, _ in per_kind.values())
    total = sum(t for _, t in per_kind.values())
    return {
        "prompt": prompt,
        "accuracy": 100 * correct / max(total, 1),
        "chance": 100 * sum(chance.values()) / max(total, 1),
        "total": total,
        "per_kind": {k: {"accuracy": 100 * c / t, "chance": 100 * chance[k] / t, "total": t}
                     for k, (c, t) in sorted(per_kind.items())},
    }


def evaluate_transcription(qa: AudioQA, examples: list, decode: DecodeConfig, *, batch_size: int = 32) -> float:
    """Word error rate (percent) of transcriptions of `SFTExample`s whose answers are the reference texts."""
    hypotheses, references = [], []
    for batch in tqdm(list(_batches(examples, batch_size)), desc="asr", unit="batch", leave=False):
        answers = qa.answer([ex.wave for ex in batch], [ex.instruction for ex in batch], decode)
        hypotheses += [text or "<empty>" for text in answers.texts]
        references += [ex.answer for ex in batch]
    return 100 * jiwer.wer(references, hypotheses)
