"""End-of-stage evaluation on the synthetic corpus: multiple-choice accuracy next to chance (the eval runner's core,
`diffa2.eval.core.evaluate`, with the `synth` spec), and WER for ASR."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import jiwer
from tqdm import tqdm

from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.core import evaluate, load_items
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


TestPrompt = Literal["choices", "question"]  # MMAU's prompt with the lettered choices, or the question alone
TEST_PROMPTS: tuple[str, ...] = get_args(TestPrompt)
# The prompt template (diffa2.eval.prompts) of each: the synth spec's "diffa" (= the corpus's format_mc_prompt).
TEST_PROMPT_TEMPLATES = {"choices": "diffa", "question": "question"}


def evaluate_test_split(
    qa: AudioQA,
    test_file: str | Path,
    decode: DecodeConfig,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    prompt: TestPrompt = "choices",
) -> dict:
    """The `synth` benchmark on an MMAU-format test file with `decode`: accuracy and chance overall and per
    sub-category (`per_kind`), as `python -m diffa2.eval run --benchmark synth` scores it.

    `prompt`: "choices" asks with MMAU's prompt (question and lettered choices), "question" with the question alone
    (what stages 1-2 train on); the answer is scored against the choices either way.
    """
    if prompt not in TEST_PROMPTS:
        raise ValueError(f"test prompt {prompt!r}: expected one of {TEST_PROMPTS}")
    spec = load_spec("synth").replace(prompt=TEST_PROMPT_TEMPLATES[prompt])
    test_file = Path(test_file)
    items, _ = load_items(spec, test_file, test_file.parent, limit=limit)
    summary = evaluate(qa, spec, items, decoding=decode, batch_size=batch_size, progress="test").summary
    return {
        "prompt": prompt,
        "accuracy": summary["accuracy"],
        "chance": summary["chance"],
        "total": summary["total"],
        "per_kind": {kind: {k: cell[k] for k in ("accuracy", "chance", "total")}
                     for kind, cell in summary["breakdown"]["sub-category"].items()},
    }


def evaluate_transcription(qa: AudioQA, examples: list, decode: DecodeConfig, *, batch_size: int = 32) -> float:
    """Word error rate (percent) of transcriptions of `SFTExample`s whose answers are the reference texts."""
    hypotheses, references = [], []
    for batch in tqdm(list(_batches(examples, batch_size)), desc="asr", unit="batch", leave=False):
        answers = qa.answer([ex.wave for ex in batch], [ex.instruction for ex in batch], decode)
        hypotheses += [text or "<empty>" for text in answers.texts]
        references += [ex.answer for ex in batch]
    return 100 * jiwer.wer(references, hypotheses)
