"""The demo's accuracy check: a checkpoint on the synthetic test split, through the eval runner's core with the
`synth` spec (`diffa2.eval.core.evaluate`), so the page shows what the stage and `python -m diffa2.eval run` give."""

from __future__ import annotations

from pathlib import Path

from diffa2.demo.answer import DecodeSettings, DemoError, load_model
from diffa2.eval.core import Evaluation, evaluate, load_items
from diffa2.eval.specs import load_spec


def evaluate_checkpoint(
    checkpoint: str | None, test_file: str | Path, settings: DecodeSettings, *, limit: int | None = None,
    compat: str | None = None, batch_size: int = 32,
) -> Evaluation:
    """The `synth` benchmark on an MMAU-format test file (its audio beside it) with the page's decoding settings."""
    qa = load_model(checkpoint, compat)
    test_file = Path(test_file)
    if not test_file.is_file():
        raise DemoError(f"No test split at {test_file}.")
    spec = load_spec("synth")
    items, _ = load_items(spec, test_file, test_file.parent, limit=limit)
    return evaluate(qa, spec, items, decoding=settings.to_config(), batch_size=batch_size)


def format_evaluation(evaluation: Evaluation) -> str:
    """Markdown: accuracy next to chance, overall and per question kind (sub-category)."""
    summary = evaluation.summary
    lines = [f"**Synthetic test accuracy: {summary['accuracy']:.1f}%** (chance {summary['chance']:.1f}%, "
             f"{summary['total']} items)", "", "| kind | accuracy | chance | items |", "|---|---|---|---|"]
    for kind, cell in summary["breakdown"]["sub-category"].items():
        lines.append(f"| {kind} | {cell['accuracy']:.1f}% | {cell['chance']:.1f}% | {cell['total']} |")
    return "\n".join(lines)
