"""Official scoring rules of MMAU, MMAR and MMSU, in three modes, with no random fallback anywhere.

The rules are written here from the behaviour of the official scripts (Sakshi113/MMAU@7468292 evaluation.py,
ddlBoJack/MMAR code/evaluation.py, dingdongwang/MMSU@217d1d3 mmsu_evaluation.py; restated with their sources in
docs/benchmarks.md); no code is copied.

Rules
-----
``mmau_wordset`` (MMAU and MMAR): a text is the *set* of lower-cased ``\\b\\w+\\b`` matches. A
prediction without tokens is wrong. The "incorrect" tokens are, over every option whose token set differs from
the answer's, that option's tokens minus the answer's (options with the answer's exact token set, duplicates of
the answer included, add nothing). Correct iff answer tokens <= prediction tokens and the prediction has no
incorrect token.

``mmsu_letter`` (MMSU, newer scorer): strip the response and delete newlines; the letter is the first
character if it is one of ``A B C D``, else the second-to-last character if it is one of them; correct iff the
text of that option equals ``answer_gt``. A response without such a letter is "Wrong format" and is dropped
from numerator and denominator. Empty and "None" responses are counted as wrong: the scorer resets the parsed
letter per record, so they reach the comparison with no letter. A record without a ``response`` key is read as
an empty response (``record.get('response', '')``): counted wrong. A JSON ``null`` (or any non-string) response
makes ``.strip()`` fail; the script prints "Error prediction!" and skips the record: left out of the count.

Modes
-----
``official``  exactly the rule and the script's counting: MMAU/MMAR records without the prediction key are left
              out (the scripts ``continue``), MMSU's are counted wrong; MMSU wrong-format and null responses
              are left out.
``strict``    the rule, but every record counts: missing, null, non-string and unparseable predictions are wrong.
``normalized`` a final answer is extracted first (first ``<answer>`` tag, a bare or parenthesised option
              letter mapped to its choice text, "The answer is X", a leading "X." / "(X)" marker), then the
              official rule applies.

Where the official MMAU/MMAR scripts would crash (a ``null`` prediction, a non-string one), we never crash: the
record is left out in official mode (as MMSU's script does) and counted wrong in strict mode, and the report
counts it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffa2.eval.loaders import Record, answer_of, breakdown_value, choices_of
from diffa2.eval.specs import MODES, BenchmarkSpec

WORD = re.compile(r"\b\w+\b")
MMSU_LETTERS = "ABCD"

# Item statuses. "scored": the rule was applied to a string; the others describe why it could not be.
SCORED, MISSING, NULL, NOT_STRING = "scored", "missing", "null", "not_string"
EMPTY, UNPARSEABLE = "empty", "unparseable"


# ---------------------------------------------------------------------------------------------------------------
# The MMAU / MMAR word-set rule
# ---------------------------------------------------------------------------------------------------------------


def word_set(text: str) -> frozenset[str]:
    """Lower-cased ``\\b\\w+\\b`` tokens as a set (order and repetition ignored, punctuation dropped)."""
    return frozenset(WORD.findall(text.lower()))


def incorrect_tokens(answer: str, choices: Sequence[str]) -> frozenset[str]:
    """Tokens that fail a prediction: those of options whose token set differs from the answer's, minus the answer's."""
    gold = word_set(answer)
    bad: set[str] = set()
    for choice in choices:
        tokens = word_set(choice)
        if tokens != gold:
            bad |= tokens - gold
    return frozenset(bad)


def wordset_match(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """The official MMAU/MMAR decision for one prediction string."""
    pred = word_set(prediction)
    if not pred:
        return False
    return word_set(answer) <= pred and not (pred & incorrect_tokens(answer, choices))


def named_options(prediction: str, choices: Sequence[str]) -> list[int]:
    """Indices of the options the prediction would be scored correct for (empty = names no option)."""
    return [i for i, c in enumerate(choices) if wordset_match(prediction, c, choices)]


# ---------------------------------------------------------------------------------------------------------------
# The MMSU letter rule
# ---------------------------------------------------------------------------------------------------------------


def mmsu_letter(response: str) -> str | None:
    """The official letter: first character, else second-to-last, if it is A-D (upper case only); else None."""
    text = response.strip().replace("\n", "")
    if text and text[0] in MMSU_LETTERS:
        return text[0]
    if len(text) >= 2 and text[-2] in MMSU_LETTERS:
        return text[-2]
    return None


def mmsu_is_empty(response: str) -> bool:
    """Responses the newer scorer compares with no letter (counted wrong, not dropped)."""
    text = response.strip().replace("\n", "")
    return text == "" or text == "None"


# ---------------------------------------------------------------------------------------------------------------
# Final-answer extraction (normalized mode)
# ---------------------------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?$")
_OPTION_WORD = re.compile(r"^(?:option|choice)\s*[(\[]?([A-Z])[)\]]?$", re.I)
_MARKER = re.compile(r"^(?:\(([A-Z])\)\s*|\[([A-Z])\]\s*|([A-Z])[.):]\s+)(.+)$", re.S)
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)\s*:?\s*([^\n]+)", re.I)
_EDGE_PUNCT = " \t\r\n*_`\"'.,;:!"


def _core(text: str) -> str:
    """Text without surrounding whitespace, markdown emphasis, quotes and end punctuation."""
    return text.strip().strip(_EDGE_PUNCT).strip()


def _tag_content(text: str) -> str:
    match = _ANSWER_TAG.search(text)
    return match.group(1) if match else text


def _letter_index(text: str, n: int) -> int | None:
    """Index of a bare/parenthesised letter ("B", "(b)", "[C]", "Option D") if within the n options."""
    core = _core(text)
    m = _BARE_LETTER.match(core) or _OPTION_WORD.match(core)
    if not m:
        return None
    index = ord(m.group(1).upper()) - ord("A")
    return index if index < n else None


def _exact_option(text: str, choices: Sequence[str | None]) -> int | None:
    core = _core(text).casefold()
    if not core:
        return None
    for i, c in enumerate(choices):
        if c is not None and _core(c).casefold() == core:
            return i
    return None


def _resolve_text(text: str, choices: Sequence[str | None]) -> str | None:
    """One option's text if `text` is an option (text beats letter), a letter, or "X. text"; else None."""
    exact = _exact_option(text, choices)
    if exact is not None:
        return choices[exact]
    index = _letter_index(text, len(choices))
    if index is not None and choices[index] is not None:
        return choices[index]
    m = _MARKER.match(text.strip())
    if m:
        index = ord(next(g for g in m.groups()[:3] if g)) - ord("A")
        rest = m.group(4)
        if index < len(choices) and choices[index] is not None:
            exact = _exact_option(rest, choices)
            return choices[exact] if exact is not None else _core(rest) or None
    return None


def extract_text_answer(text: str, choices: Sequence[str | None]) -> str:
    """Final answer of a free-form output as choice text when it can be told, else the (tag) text itself."""
    body = _tag_content(text).strip()
    resolved = _resolve_text(body, choices)
    if resolved is not None:
        return resolved
    said = _ANSWER_IS.findall(body)
    if said:
        claim = said[-1].strip()
        resolved = _resolve_text(claim, choices)
        return resolved if resolved is not None else _core(claim)
    return body


def _resolve_letter(text: str, choices: Sequence[str | None]) -> str | None:
    index = _letter_index(text, len(MMSU_LETTERS))
    if index is not None:
        return MMSU_LETTERS[index]
    exact = _exact_option(text, choices)
    if exact is not None:
        return MMSU_LETTERS[exact]
    m = _MARKER.match(text.strip())
    if m:
        found = next(g for g in m.groups()[:3] if g)
        if found in MMSU_LETTERS:
            return found
    return None


def extract_letter_answer(text: str, choices: Sequence[str | None]) -> str:
    """Final answer of a free-form output as an MMSU letter when it can be told, else the (tag) text itself."""
    body = _tag_content(text).strip()
    resolved = _resolve_letter(body, choices)
    if resolved is not None:
        return resolved
    said = _ANSWER_IS.findall(body)
    if said:
        resolved = _resolve_letter(said[-1], choices)
        if resolved is not None:
            return resolved
    return body


# Extractors by rule: what "normalized" mode applies before the official rule.
EXTRACTORS: dict[str, Callable[[str, Sequence[str | None]], str]] = {
    "mmau_wordset": extract_text_answer,
    "mmsu_letter": extract_letter_answer,
}


def normalize_prediction(text: Any, record: dict[str, Any], spec: BenchmarkSpec) -> Any:
    """The normalized form of a prediction value (non-strings are returned unchanged)."""
    if not isinstance(text, str):
        return text
    choices = choices_of(record, spec.format)
    if not isinstance(choices, list):
        return text
    return EXTRACTORS[spec.rule](text, choices)


# ---------------------------------------------------------------------------------------------------------------
# Scoring records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemScore:
    where: str
    id: str | None
    status: str  # SCORED, MISSING, NULL, NOT_STRING, EMPTY or UNPARSEABLE
    counted: bool  # in the denominator under the mode
    correct: bool
    well_formed: bool  # names exactly one option / parses to a letter (wrong-format rate = not well_formed)
    scored_text: str | None  # the text the rule saw (normalized in normalized mode)
    letter: str | None = None  # MMSU: the parsed letter


def score_record(record: dict[str, Any], where: str, spec: BenchmarkSpec, mode: str, key: str) -> ItemScore:
    """Apply `spec.rule` under `mode` to the prediction stored under `key` in one record."""
    item_id = None if record.get("id") is None else str(record.get("id"))
    strict = mode == "strict"
    mmsu = spec.rule == "mmsu_letter"
    if key not in record:
        # MMSU's script reads a missing response as empty (counted wrong); MMAU's and MMAR's skip the record.
        return ItemScore(where, item_id, MISSING, strict or mmsu, False, False, None)
    value = record[key]
    if value is None:
        # MMAU's and MMAR's scripts crash on null; MMSU's fails on it, prints "Error prediction!" and skips it.
        return ItemScore(where, item_id, NULL, strict, False, False, None)
    if not isinstance(value, str):
        return ItemScore(where, item_id, NOT_STRING, strict, False, False, None)
    text = normalize_prediction(value, record, spec) if mode == "normalized" else value
    choices = choices_of(record, spec.format)
    answer = answer_of(record, spec.format)
    if mmsu:
        if mmsu_is_empty(text):
            return ItemScore(where, item_id, EMPTY, True, False, False, text)
        letter = mmsu_letter(text)
        if letter is None:
            return ItemScore(where, item_id, UNPARSEABLE, strict, False, False, text)
        chosen = choices[MMSU_LETTERS.index(letter)]
        return ItemScore(where, item_id, SCORED, True, chosen == answer, True, text, letter)
    if not word_set(text):
        return ItemScore(where, item_id, EMPTY, True, False, False, text)
    correct = wordset_match(text, answer, choices)
    return ItemScore(where, item_id, SCORED, True, correct, bool(named_options(text, choices)), text)


def resolve_prediction_key(records: Sequence[Record], spec: BenchmarkSpec, key: str | None) -> tuple[str, str]:
    """The key to score and why: `key` if given; else the spec's key, or a fallback key when no record has it."""
    if key:
        return key, "given"
    if any(isinstance(r.data, dict) and spec.prediction_key in r.data for r in records):
        return spec.prediction_key, "spec"
    for other in spec.extra_prediction_keys:
        if any(isinstance(r.data, dict) and other in r.data for r in records):
            return other, f"no record has {spec.prediction_key!r}; scored {other!r} instead"
    return spec.prediction_key, "spec"


@dataclass
class ScoreResult:
    spec: BenchmarkSpec
    mode: str
    prediction_key: str
    key_note: str
    records: list[Record]
    items: list[ItemScore]

    def counted(self) -> list[tuple[Record, ItemScore]]:
        return [(r, s) for r, s in zip(self.records, self.items, strict=True) if s.counted]

    def overall(self) -> dict[str, Any]:
        counted = [s for s in self.items if s.counted]
        return accuracy_cell(sum(s.correct for s in counted), len(counted))

    def breakdown(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for field in self.spec.breakdown:
            tally: dict[str, list[int]] = {}
            for rec, s in self.counted():
                cell = tally.setdefault(breakdown_value(rec.data.get(field)), [0, 0])
                cell[0] += s.correct
                cell[1] += 1
            out[field] = {value: accuracy_cell(c, t) for value, (c, t) in sorted(tally.items())}
        return out

    def status_counts(self) -> dict[str, int]:
        counts = {k: 0 for k in (SCORED, MISSING, NULL, NOT_STRING, EMPTY, UNPARSEABLE)}
        for s in self.items:
            counts[s.status] += 1
        return counts


def accuracy_cell(correct: int, total: int) -> dict[str, Any]:
    """{correct, total, accuracy}; accuracy in percent (None when nothing was counted)."""
    return {"correct": correct, "total": total, "accuracy": (100.0 * correct / total) if total else None}


def score_records(
    records: Sequence[Record], spec: BenchmarkSpec, mode: str | None = None, prediction_key: str | None = None
) -> ScoreResult:
    """Score every record (validate them first with ``loaders.validate(..., for_run=False)``)."""
    mode = mode or spec.mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    key, note = resolve_prediction_key(records, spec, prediction_key)
    items = [score_record(r.data, r.where, spec, mode, key) for r in records]
    return ScoreResult(spec, mode, key, note, list(records), items)
