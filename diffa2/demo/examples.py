"""Example clips and questions for the page, from the synthetic corpus of the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

from diffa2.data.synth import QUESTION_KINDS, ensure_synth_corpus

EXAMPLE_QUESTIONS: list[str] = [kind.phrasings[0] for kind in QUESTION_KINDS.values()]


def example_clips(directory: str | Path, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """One test-split clip per question kind, as ([clip path, question] rows, kind labels).

    The corpus is built at its "small" size in `directory` when missing (about a second); its test clips come from
    the same generator as the full corpus the embedded default is trained and evaluated on.
    """
    corpus = ensure_synth_corpus(directory, seed=seed, size="small")
    first: dict[str, dict] = {}
    for record in json.loads(corpus.test_mmau.read_text(encoding="utf-8")):
        first.setdefault(record["sub-category"], record)
    rows = [[str((corpus.root / r["audio_id"]).resolve()), r["question"]] for r in first.values()]
    return rows, list(first)
