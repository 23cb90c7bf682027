"""The `diffa2_synth` task's functions: the synth spec's prompt, audio from the corpus folder, its official rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffa2.data.synth.constants import DEFAULT_CORPUS_DIR
from diffa2.eval.loaders import choices_of
from diffa2.eval.prompts import get_prompt
from diffa2.eval.specs import load_spec
from diffa2.lmms.compare import lmms_eval_mmau_correct, official_score

SPEC = load_spec("synth")


def doc_to_audio(doc: dict[str, Any], root: str | Path = DEFAULT_CORPUS_DIR) -> list[str]:
    """The doc's clip: its `audio_id` under the corpus folder `root` (the spec's default corpus, data/synth)."""
    return [str(Path(root) / doc["audio_id"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The synth spec's prompt template (`diffa`), exactly as `python -m diffa2.eval run --benchmark synth`."""
    return get_prompt(SPEC.prompt)(doc["question"], choices_of(doc, SPEC.format))


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """One doc's scores on the same prediction: the toolkit's official rule and lmms-eval's MMAU matching."""
    score = official_score(results[0], doc, SPEC)
    return {
        "accuracy": {"counted": score.counted, "correct": score.correct},
        "lmms_eval_mmau_accuracy": {"counted": True, "correct": lmms_eval_mmau_correct(results[0], doc, SPEC)},
    }


def aggregate_accuracy(results: list[dict[str, Any]]) -> float:
    """Accuracy in percent over the counted docs (the toolkit's micro average)."""
    counted = [r for r in results if r["counted"]]
    return 100.0 * sum(r["correct"] for r in counted) / len(counted) if counted else float("nan")
