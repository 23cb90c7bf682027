"""The official MMAU rule against lmms-eval's MMAU matching, on the same predictions (docs/lmms-eval.md §4).

    python -m diffa2.lmms.compare runs/eval/synth/predictions.json   # a diffa2.eval predictions file (MMAU format)
    python -m diffa2.lmms.compare --oracle data/synth/test_mmau.json # every answer style of a model that is right

lmms-eval's matching is its own code (lmms_eval/tasks/mmau/utils.py: `parse_multi_choice_response`,
`letter_to_ans`, as `mmau_process_results` calls them): a letter A-D from "(X)", " X " or "X.", the last one when
several, a random one when none; its choice text compared lower-cased with the answer.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from typing import Any

from diffa2.eval.loaders import answer_of, choices_of, read_predictions
from diffa2.eval.scoring import ItemScore, normalize_prediction, score_record
from diffa2.eval.specs import BenchmarkSpec, load_spec

LMMS_LETTERS = ["A", "B", "C", "D"]  # lmms-eval's MMAU matcher parses these four letters only


def lmms_eval_mmau_correct(prediction: str, record: dict[str, Any], spec: BenchmarkSpec) -> bool:
    """Whether lmms-eval's MMAU `process_results` scores `prediction` correct (a parsed letter past the item's
    options, where lmms-eval raises IndexError, counts wrong)."""
    from lmms_eval.tasks.mmau.utils import letter_to_ans, parse_multi_choice_response

    choices = choices_of(record, spec.format)
    letter = parse_multi_choice_response(prediction, LMMS_LETTERS)
    if ord(letter) - ord("A") >= len(choices):
        return False
    return letter_to_ans(letter, choices).strip().lower() == str(answer_of(record, spec.format)).strip().lower()


def official_score(prediction: Any, record: dict[str, Any], spec: BenchmarkSpec) -> ItemScore:
    """The spec's official rule on one prediction, as `diffa2.eval.core.score_entries` applies it."""
    row = dict(record)
    normalized = normalize_prediction(prediction, record, spec)
    row[spec.prediction_key] = normalized if spec.mode == "normalized" else prediction
    return score_record(row, f"item {record.get('id')}", spec, spec.mode, spec.prediction_key)


def compare(records: Sequence[dict[str, Any]], predictions: Sequence[str], spec: BenchmarkSpec,
            seed: int = 0) -> dict[str, Any]:
    """Accuracy (percent) of `predictions` under the official rule and under lmms-eval's matching (its random
    fallback drawn from `random.seed(seed)`, as lmms-eval seeds it), over the same records."""
    random.seed(seed)
    official = [official_score(p, r, spec) for p, r in zip(predictions, records, strict=True)]
    counted = [s for s in official if s.counted]
    lmms = [lmms_eval_mmau_correct(p, r, spec) for p, r in zip(predictions, records, strict=True)]
    return {"items": len(records), "official": 100.0 * sum(s.correct for s in counted) / max(len(counted), 1),
            "lmms_eval": 100.0 * sum(lmms) / max(len(lmms), 1)}


def _letter(record: dict[str, Any], spec: BenchmarkSpec) -> str:
    return "ABCDEFGH"[choices_of(record, spec.format).index(answer_of(record, spec.format))]


def _wrong(record: dict[str, Any], spec: BenchmarkSpec) -> str:
    return next(c for c in choices_of(record, spec.format) if c != answer_of(record, spec.format))


# Answer styles of a model that always picks the right option (and one that always picks a wrong one).
ORACLE_STYLES: dict[str, Callable[[dict[str, Any], BenchmarkSpec], str]] = {
    "choice text (what the diffa prompt asks for)": lambda r, s: str(answer_of(r, s.format)),
    "letter only: B": _letter,
    "letter and text: (B) text": lambda r, s: f"({_letter(r, s)}) {answer_of(r, s.format)}",
    "letter and text: B. text": lambda r, s: f"{_letter(r, s)}. {answer_of(r, s.format)}",
    "sentence: The answer is text.": lambda r, s: f"The answer is {answer_of(r, s.format)}.",
    "a wrong choice's text": _wrong,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Print both accuracies for a predictions file, or for every oracle answer style over a test split."""
    parser = argparse.ArgumentParser(prog="python -m diffa2.lmms.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="MMAU-format predictions (with --oracle: the test split's metadata file)")
    parser.add_argument("--benchmark", default="synth", help="spec whose rule and keys apply (default: synth)")
    parser.add_argument("--oracle", action="store_true", help="score ORACLE_STYLES answers instead of the file's")
    parser.add_argument("--seed", type=int, default=0, help="seed of lmms-eval's random fallback (default: 0)")
    args = parser.parse_args(argv)
    spec = load_spec(args.benchmark)
    records = [r.data for r in read_predictions(args.file)]
    if args.oracle:
        rows = {name: compare(records, [style(r, spec) for r in records], spec, args.seed)
                for name, style in ORACLE_STYLES.items()}
    else:
        with_key = [r for r in records if isinstance(r.get(spec.prediction_key), str)]
        rows = {args.file: compare(with_key, [r[spec.prediction_key] for r in with_key], spec, args.seed)}
    print("| predictions | items | official rule | lmms-eval MMAU matching |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['items']} | {row['official']:.1f} | {row['lmms_eval']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
