"""Scoring parity on the full MMAU test-mini and MMAR metadata: diffa2.eval vs. an independent re-implementation.

    python bench/eval_parity.py DIR   # DIR: mmau-test-mini.json (Sakshi113/MMAU), MMAR-meta.jsonl (ddlBoJack/MMAR)

For every record and each of several prediction variants (exact text, lower/upper case, letter only, "(X) text",
"X. text", "The answer is text.", "The answer is X.", two options named, empty, punctuation, markdown, all
options listed, <answer> tags, a wrong option, missing key, a seeded mix), it writes the predictions file in the
official format, scores it with ``python -m diffa2.eval score`` machinery and with ``reference_wordset`` below (a
plain loop written from the rule of MMAU's evaluation.py, sharing no code with diffa2.eval), and checks that both
agree on every item. It prints accuracy per variant (official and normalized modes) and an oracle table of the
official rule for comparison. Needs the full benchmark metadata, so it is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from diffa2.eval.loaders import read_predictions, validate, write_predictions
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import load_spec
from diffa2.validation import parse_checked


def reference_wordset(prediction: str, answer: str, choices: list[str]) -> bool:
    """The official MMAU/MMAR decision, re-derived independently: plain lists and loops."""

    def tokens(s: str) -> list[str]:
        found = []
        for m in re.finditer(r"\b\w+\b", s.lower()):
            if m.group(0) not in found:
                found.append(m.group(0))
        return found

    pred, gold = tokens(prediction), tokens(answer)
    if len(pred) == 0:
        return False
    for t in gold:
        if t not in pred:
            return False
    for c in choices:
        ct = tokens(c)
        if sorted(ct) == sorted(gold):
            continue
        for t in ct:
            if t not in gold and t in pred:
                return False
    return True


def variants(record: dict, rng: random.Random) -> dict[str, str | None]:
    choices, answer = record["choices"], record["answer"]
    idx = choices.index(answer)
    letter = chr(ord("A") + idx)
    wrong = next((c for c in choices if c != answer), answer)
    other = choices[(idx + 1) % len(choices)]
    out = {
        "exact": answer,
        "lower": answer.lower(),
        "upper": answer.upper(),
        "letter": letter,
        "paren_letter": f"({letter})",
        "paren_text": f"({letter}) {answer}",
        "dot_text": f"{letter}. {answer}",
        "answer_is_text": f"The answer is {answer}.",
        "answer_is_letter": f"The answer is {letter}.",
        "two_options": f"{answer} or {other}",
        "empty": "",
        "punctuation": f"{answer}!!!",
        "markdown": f"**{answer}**",
        "all_options": f"{answer}. Options: " + ", ".join(choices),
        "answer_tag": f"<think>maybe {other}</think><answer>{answer}</answer>",
        "wrong_option": wrong,
        "missing": None,
    }
    out["mixed"] = out[rng.choice([k for k in out if k != "missing"])]
    return out


def run(name: str, records: list[dict], out_dir: Path) -> list[str]:
    spec = load_spec(name)
    key = spec.prediction_key
    rng = random.Random(0)
    per_record = [variants(r, rng) for r in records]
    lines = []
    for variant in per_record[0]:
        rows = []
        for r, v in zip(records, per_record, strict=True):
            row = dict(r)
            if v[variant] is not None:
                row[key] = v[variant]
            rows.append(row)
        path = out_dir / f"{name}_{variant}{Path(spec.predictions_file).suffix}"
        write_predictions(path, rows)
        loaded = read_predictions(path)
        validate(loaded, spec, for_run=False)
        official = score_records(loaded, spec, "official")
        normalized = score_records(loaded, spec, "normalized")
        mismatches = 0
        ref_correct = ref_total = 0
        for rec, s in zip(loaded, official.items, strict=True):
            if key not in rec.data:
                continue  # the official script skips it
            ref = reference_wordset(rec.data[key], rec.data["answer"], rec.data["choices"])
            ref_total += 1
            ref_correct += ref
            mismatches += ref != s.correct or not s.counted
        o, n = official.overall(), normalized.overall()
        ref_acc = 100 * ref_correct / ref_total if ref_total else float("nan")
        fmt = "n/a" if o["accuracy"] is None else f"{o['accuracy']:6.2f}"
        nfmt = "n/a" if n["accuracy"] is None else f"{n['accuracy']:6.2f}"
        lines.append(f"{name:5} {variant:17} official {fmt} ({o['correct']}/{o['total']})  reference {ref_acc:6.2f} "
                     f"({ref_correct}/{ref_total})  item mismatches {mismatches}  normalized {nfmt}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", type=Path, help="folder with mmau-test-mini.json and MMAR-meta.jsonl")
    return parser


def main(argv: list[str] | None = None) -> int:
    import tempfile

    shared = parse_checked(build_parser(), argv).benchmarks
    mmau = json.loads((shared / "mmau-test-mini.json").read_text(encoding="utf-8"))
    lines = (shared / "MMAR-meta.jsonl").read_text(encoding="utf-8").splitlines()
    mmar = [json.loads(line) for line in lines if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        for line in run("mmau", mmau, Path(tmp)) + run("mmar", mmar, Path(tmp)):
            print(line)
    print("oracle table of the official rule (MMAU / MMAR): exact 100.0/100.0, '(X) text' or 'X. text' 96.7/98.5, "
          "'The answer is text.' 90.7/91.0, letter only 0.2/0.0, text + all options 0.1/1.2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
