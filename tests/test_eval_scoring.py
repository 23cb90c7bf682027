"""Scoring rules on real MMAU / MMAR records and hand-written MMSU records, against hand-derived expectations.

Every expected value below was worked out by hand from the official rules (MMAU evaluation.py's word set, MMAR
code/evaluation.py = MMAU's rule, MMSU mmsu_evaluation.py's letters); the comment on each case says why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffa2.eval.loaders import Record, read_predictions, read_records, validate, write_predictions
from diffa2.eval.report import build_report, data_quirks
from diffa2.eval.scoring import (
    EMPTY,
    MISSING,
    NULL,
    UNPARSEABLE,
    extract_letter_answer,
    extract_text_answer,
    mmsu_letter,
    score_records,
    word_set,
    wordset_match,
)
from diffa2.eval.specs import load_spec

FIXTURES = Path(__file__).parent / "fixtures"
MMAU = load_spec("mmau")
MMAR = load_spec("mmar")
MMSU = load_spec("mmsu")


@pytest.fixture(scope="module")
def mmau() -> dict[str, dict]:
    return {r["id"][:8]: r for r in json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def mmar() -> dict[str, dict]:
    rows = [json.loads(line) for line in (FIXTURES / "mmar_subset.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["id"][:14]: r for r in rows}


@pytest.fixture(scope="module")
def mmsu() -> list[dict]:
    return [r.data for r in read_records(FIXTURES / "mmsu_subset.jsonl")]


def official(record: dict, prediction: str) -> bool:
    return wordset_match(prediction, record["answer"], record["choices"])


# ---------------------------------------------------------------------------------------------------------------
# MMAU / MMAR word-set rule
# ---------------------------------------------------------------------------------------------------------------


def test_word_set_tokenises_like_the_official_rule():
    assert word_set("Twenty-three, TWENTY three!") == {"twenty", "three"}
    assert word_set("1.63 seconds") == {"1", "63", "seconds"}
    assert word_set("It's") == {"it", "s"}
    assert word_set("snake_case x") == {"snake_case", "x"}  # \w includes the underscore
    assert word_set("是的。紧张的音乐") == {"是的", "紧张的音乐"}  # a CJK run is one token
    assert word_set("  ...!? ") == frozenset()


# (record, prediction, expected, why)
MMAU_CASES = [
    ("3fe64f3d", "Man", True, "exact text"),
    ("3fe64f3d", "man", True, "case is ignored"),
    ("3fe64f3d", "MAN.", True, "punctuation is dropped"),
    ("3fe64f3d", "A", False, "letter only: {a} lacks 'man'"),
    ("3fe64f3d", "(A)", False, "letter only"),
    ("3fe64f3d", "A. Man", True, "'a' is in no wrong option here"),
    ("3fe64f3d", "The answer is Man.", True, "the/answer/is appear in no option"),
    ("3fe64f3d", "Man or Woman", False, "a second option named: 'woman' is an incorrect token"),
    ("3fe64f3d", "", False, "empty prediction"),
    ("3fe64f3d", "   ", False, "no tokens"),
    ("3fe64f3d", "<answer>Man</answer>", True, "tag words are in no option"),
    ("3fe64f3d", "Woman", False, "wrong option"),
    ("72fb5481", "A woman", True, "exact"),
    ("72fb5481", "woman", False, "the answer's article 'a' is missing"),
    ("72fb5481", "B. A woman", True, "'b' is in no option"),
    ("72fb5481", "A woman, not a child", False, "'child' is unique to a wrong option"),
    ("7a1dcecc", "A motorsport racing event", True, "8-choice item, exact"),
    ("7a1dcecc", "The answer is A motorsport racing event.", False, "'the' and 'is' occur in the garbled option"),
    ("7a1dcecc", "motorsport racing event", False, "answer word 'a' missing"),
    ("7a1dcecc", "D", False, "letter only"),
    ("40c9c875", "first: frustration, second: neutral", True, "wrong option with the answer's word set counts"),
    ("40c9c875", "both neutral", False, "'both' is unique to a wrong option; answer words missing"),
    ("dd249c7f", "nine", True, "duplicates elsewhere do not matter"),
    ("dd249c7f", "fourteen", False, "duplicated wrong option"),
    ("16964657", "thirteen", True, "gold answer duplicated: the duplicate adds no incorrect token"),
    ("16964657", "Thirteen.", True, "case and punctuation"),
    ("16964657", "C", False, "letter of the duplicate"),
    ("e277d88f", "1.63 seconds", True, "exact, duplicated gold"),
    ("e277d88f", "1,63 seconds", True, "punctuation only separates tokens"),
    ("e277d88f", "1.63", False, "'seconds' is an answer word"),
    ("e277d88f", "1.63 or 1.53 seconds", False, "'53' is unique to a wrong option"),
    ("b132f501", "3", True, "digits"),
    ("b132f501", "3 times", True, "extra word in no option"),
    ("b132f501", "2 or 3", False, "two options"),
    ("b132f501", "The answer is D.", False, "letter, not text"),
    ("78f299b4", "wind", True, "2-choice item"),
    ("78f299b4", "wharf", False, "2-choice item, wrong"),
    ("8cbc0f29", "Loving one's parents is a bad thing, it's not good.", True,
     "same word set as the answer (reordered negation)"),
]


@pytest.mark.parametrize(("rid", "prediction", "expected", "why"), MMAU_CASES)
def test_mmau_rule_on_real_records(mmau, rid, prediction, expected, why):
    assert official(mmau[rid], prediction) is expected, why


MMAR_CASES = [
    ("fqFf2fkbKag_00", "Table tennis", True, "exact"),
    ("fqFf2fkbKag_00", "Tennis", False, "'table' missing (the shorter option adds no incorrect token)"),
    ("fqFf2fkbKag_00", "table tennis, not badminton", False, "'badminton' names a wrong option"),
    ("BV1pr421M7A6_0", "From near to far", True, "order-only options are indistinguishable"),
    ("BV1pr421M7A6_0", "Circling around", False, "wrong"),
    ("KBn0lNwcPHA_00", "是的。紧张的音乐变成了跑动的火车声，我们还听到了Bond说“健康与安全”。", True, "CJK exact"),
    ("KBn0lNwcPHA_00", "是的", False, "CJK runs are whole tokens; most answer tokens missing"),
    ("ztvEag8Y2_Y_00", "Word guessing game", True, "5 options, one of them empty"),
    ("ztvEag8Y2_Y_00", "Number guessing game", False, "'number' is unique to a wrong option"),
    ("R33NY5b6ZWA_00", "yes", True, "2-choice"),
    ("R33NY5b6ZWA_00", "A", False, "letter"),
    ("BV1mifMY4Ebq_0", "Colonial Imagination Depicts colonies as irresponsible paradises, genderizing and "
     "objectifying local cultures and people", True, "emoji are not word characters"),
]


@pytest.mark.parametrize(("rid", "prediction", "expected", "why"), MMAR_CASES)
def test_mmar_rule_on_real_records(mmar, rid, prediction, expected, why):
    assert official(mmar[rid], prediction) is expected, why


def _records(rows: list[dict]) -> list[Record]:
    return [Record(r, f"test[{i}]", i) for i, r in enumerate(rows)]


def test_modes_on_missing_null_empty_and_letters(mmau):
    base = mmau["3fe64f3d"]  # Man / Woman / Child / Robot -> Man
    rows = [
        base | {"model_output": "Man"},  # correct
        base | {"model_output": "A"},  # letter: wrong officially, right when normalized
        base | {"model_output": ""},  # empty: counted wrong in every mode
        dict(base),  # no key: left out (official, normalized), wrong (strict)
        base | {"model_output": None},  # null: the official script would crash; left out / wrong
        base | {"model_output": "The answer is (A)."},  # normalized -> Man
    ]
    records = _records(rows)
    validate(records, MMAU, for_run=False)
    off = score_records(records, MMAU, "official")
    assert [s.status for s in off.items] == ["scored", "scored", EMPTY, MISSING, NULL, "scored"]
    assert off.overall() == {"correct": 1, "total": 4, "accuracy": 25.0}
    strict = score_records(records, MMAU, "strict")
    assert strict.overall() == {"correct": 1, "total": 6, "accuracy": pytest.approx(100 / 6)}
    norm = score_records(records, MMAU, "normalized")
    assert norm.overall() == {"correct": 3, "total": 4, "accuracy": 75.0}
    report = build_report(off)
    assert report["counts"]["prediction_missing"] == 1 and report["counts"]["prediction_null"] == 1
    assert report["counts"]["left_out"] == 2
    # wrong format among answered items: "A", "" and "The answer is (A)." name no option officially.
    assert report["counts"]["wrong_format"] == 3 and report["counts"]["wrong_format_rate"] == 75.0
    assert any("null" in w for w in report["warnings"])


def test_prediction_key_fallback_is_reported(mmau):
    rows = [mmau["3fe64f3d"] | {"model_prediction": "Man"}]
    result = score_records(_records(rows), MMAU, "official")
    assert result.prediction_key == "model_prediction" and result.overall()["correct"] == 1
    assert any("model_prediction" in w for w in build_report(result)["warnings"])
    # An explicit key wins, and a key no record has leaves everything out (like the official script).
    assert score_records(_records(rows), MMAU, "official", "model_output").overall()["total"] == 0


def test_breakdown_normalises_list_category_and_counts_quirks(mmau):
    rows = [r | {"model_output": r["answer"]} for r in mmau.values()]
    result = score_records(_records(rows), MMAU, "official")
    breakdown = result.breakdown()
    assert set(breakdown) == {"task", "difficulty", "sub-category", "category"}
    assert "Reasoning" in breakdown["category"] and all(isinstance(k, str) for k in breakdown["category"])
    assert sum(c["total"] for c in breakdown["task"].values()) == len(rows)
    quirks = data_quirks(result.records, MMAU)
    assert quirks["choices_per_item"] == {"2": 4, "4": 31, "5": 4, "8": 1}
    assert quirks["duplicate_choices"] >= 4 and quirks["indistinguishable_choices"] >= 4
    assert quirks["label_stored_as_list"] >= 3
    assert result.overall()["accuracy"] == 100.0


def test_unexpected_official_values_are_counted_not_fatal(mmau):
    rows = [mmau["3fe64f3d"] | {"task": "noise", "model_output": "Man"}]
    report = build_report(score_records(_records(rows), MMAU))
    assert report["data_quirks"]["values_outside_official_set"] == {"task": {"noise": 1}}
    assert report["breakdown"]["task"] == {"noise": {"correct": 1, "total": 1, "accuracy": 100.0}}


# ---------------------------------------------------------------------------------------------------------------
# MMSU letter rule
# ---------------------------------------------------------------------------------------------------------------

# The parse table of docs/benchmarks.md §3.2 ("Parse outcomes").
MMSU_PARSES = [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("D. female", "D"), ("The answer is C.", "C"),
    ("The correct option is (B)", "B"), ("Answer: C", "A"), ("Based on the audio, the answer is D.", "B"),
    ("Correct answer: B.", "C"), ("The answer is C", None), ("c", None), ("**C**", None), ("I think it's B", None),
    ("\nB\n", "B"), ("x\nC\n.", "C"),
]


@pytest.mark.parametrize(("response", "letter"), MMSU_PARSES)
def test_mmsu_letter_parse_table(response, letter):
    assert mmsu_letter(response) == letter


def test_mmsu_official_drops_unparseable_and_counts_empty(mmsu):
    rec = mmsu[0]  # happy / sad / angry / neutral -> sad (B)
    rows = [
        rec | {"response": "B"},  # correct
        rec | {"response": "The answer is B."},  # correct (second-to-last)
        rec | {"response": "Answer: B"},  # parses as A: wrong
        rec | {"response": "b"},  # wrong format: dropped officially
        rec | {"response": ""},  # empty: counted wrong
        rec | {"response": "None"},  # "None": counted wrong
        rec | {"response": None},  # null: the script fails on it ("Error prediction!"): left out
        dict(rec),  # no key: read as "": counted wrong
    ]
    records = _records(rows)
    validate(records, MMSU, for_run=False)
    off = score_records(records, MMSU, "official")
    assert [s.status for s in off.items] == ["scored", "scored", "scored", UNPARSEABLE, EMPTY, EMPTY, NULL, MISSING]
    assert [s.letter for s in off.items[:3]] == ["B", "B", "A"]
    assert off.overall() == {"correct": 2, "total": 6, "accuracy": pytest.approx(100 / 3)}
    assert score_records(records, MMSU, "strict").overall()["total"] == 8
    norm = score_records(records, MMSU, "normalized")  # "Answer: B" -> B, "b" -> B
    assert norm.overall() == {"correct": 4, "total": 7, "accuracy": pytest.approx(400 / 7)}
    report = build_report(off)
    assert report["counts"]["prediction_unparseable"] == 1 and report["counts"]["wrong_format"] == 3


def test_mmsu_two_choice_items_and_literal_none_option(mmsu):
    two = next(r for r in mmsu if r["choice_c"] is None)  # male / female -> female (B)
    assert two["answer_gt"] == "female"
    none_gold = next(r for r in mmsu if r["answer_gt"] == "None")  # the literal option "None" is the answer (D)
    rows = [two | {"response": "B"}, two | {"response": "C"}, none_gold | {"response": "D"}]
    result = score_records(_records(rows), MMSU, "official")
    assert [s.correct for s in result.items] == [True, False, True]  # "C" has no text: counted, wrong
    assert result.breakdown()["sub-sub-category"]


# ---------------------------------------------------------------------------------------------------------------
# Normalized-mode extraction
# ---------------------------------------------------------------------------------------------------------------

EXTRACT_CASES = [
    ("B", "Woman"), ("(b)", "Woman"), ("[C]", "Child"), ("Option D", "Robot"), ("B.", "Woman"),
    ("The answer is B.", "Woman"), ("The correct answer is (B) Woman", "Woman"), ("B. Woman", "Woman"),
    ("(A) Man", "Man"), ("<answer>C</answer>", "Child"), ("<think>A? no</think><answer>Robot</answer>", "Robot"),
    ("**Man**", "Man"), ("woman", "Woman"), ("Final answer: D", "Robot"), ("E", "E"), ("", ""),
    ("A. Woman", "Woman"),  # text beats a contradicting letter
    ("I hear a man speaking", "I hear a man speaking"),  # left for the official rule
]


@pytest.mark.parametrize(("raw", "expected"), EXTRACT_CASES)
def test_extract_text_answer(raw, expected):
    assert extract_text_answer(raw, ["Man", "Woman", "Child", "Robot"]) == expected


def test_extract_text_prefers_a_choice_that_is_a_letter():
    # Chord names: a bare "C" is the option "C", not the third option (MMAU item 56c7b462).
    assert extract_text_answer("C", ["G", "D", "E", "C"]) == "C"
    assert extract_text_answer("B", ["G", "D", "E", "C"]) == "D"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Answer: C", "C"), ("c", "C"), ("**C**", "C"), ("The answer is C", "C"), ("angry", "C"), ("(D) neutral", "D"),
     ("<answer>B</answer>", "B"), ("nonsense", "nonsense"), ("Option A", "A")],
)
def test_extract_letter_answer(raw, expected):
    assert extract_letter_answer(raw, ["happy", "sad", "angry", "neutral"]) == expected


def test_normalization_is_stable_on_every_choice(mmau, mmar):
    for r in list(mmau.values()) + list(mmar.values()):
        for c in r["choices"]:
            if c.strip():
                assert official(r, extract_text_answer(c, r["choices"])) == official(r, c)


# ---------------------------------------------------------------------------------------------------------------
# Parity with an independent re-implementation on the real subsets
# ---------------------------------------------------------------------------------------------------------------


def reference_rule(prediction: str, answer: str, choices: list[str]) -> bool:
    """Straight from the prose of docs/benchmarks.md §1.2, with lists and loops (no shared code)."""
    toks = lambda s: sorted(set(re.findall(r"\b\w+\b", s.lower())))  # noqa: E731
    pred, gold = toks(prediction), toks(answer)
    if not pred or any(t not in pred for t in gold):
        return False
    return not any(t in pred and t not in gold for c in choices if toks(c) != gold for t in toks(c))


def _variants(r: dict) -> list[str]:
    ch, ans = r["choices"], r["answer"]
    letter = chr(65 + ch.index(ans))
    other = ch[(ch.index(ans) + 1) % len(ch)]
    return [ans, ans.lower(), ans.upper(), letter, f"({letter})", f"({letter}) {ans}", f"{letter}. {ans}",
            f"The answer is {ans}.", f"The answer is {letter}.", f"{ans} or {other}", "", f"{ans}!!!", f"**{ans}**",
            f"{ans}. Options: " + ", ".join(ch), f"<answer>{ans}</answer>", other]


@pytest.mark.parametrize("bench", ["mmau", "mmar"])
def test_parity_with_independent_reimplementation(tmp_path, mmau, mmar, bench):
    spec = load_spec(bench)
    records = list((mmau if bench == "mmau" else mmar).values())
    for v in range(len(_variants(records[0]))):
        rows = [r | {spec.prediction_key: _variants(r)[v]} for r in records]
        path = tmp_path / f"p{v}{Path(spec.predictions_file).suffix}"
        write_predictions(path, rows)  # through the official file format and back
        result = score_records(read_predictions(path), spec, "official")
        expected = [reference_rule(r[spec.prediction_key], r["answer"], r["choices"]) for r in rows]
        assert [s.correct for s in result.items] == expected, f"variant {v}"


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: parsers and scorers never crash
# ---------------------------------------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", "A", "(B)", "<answer>", "</answer>", "<answer></answer>", "The answer is", "answer: (Z)", "None", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(prediction=TEXT, choices=st.lists(TEXT, min_size=2, max_size=8), pick=st.integers(0, 7))
def test_fuzz_wordset_and_extraction_never_crash(prediction, choices, pick):
    answer = choices[pick % len(choices)]
    rec = {"choices": choices, "answer": answer}
    for mode in ("official", "strict", "normalized"):
        result = score_records(_records([rec | {"model_output": prediction}]), MMAU, mode)
        assert result.items[0].correct in (True, False)
    assert isinstance(extract_text_answer(prediction, choices), str)


@settings(max_examples=300, deadline=None)
@given(response=TEXT | st.none() | st.integers(), choices=st.lists(TEXT | st.none(), min_size=4, max_size=4))
def test_fuzz_mmsu_never_crashes(response, choices):
    rec = {"choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2], "choice_d": choices[3],
           "answer_gt": choices[0], "response": response}
    for mode in ("official", "strict", "normalized"):
        item = score_records(_records([rec]), MMSU, mode).items[0]
        assert item.correct in (True, False)
    if isinstance(response, str):
        assert mmsu_letter(response) in (None, "A", "B", "C", "D")
        assert isinstance(extract_letter_answer(response, choices), str)
