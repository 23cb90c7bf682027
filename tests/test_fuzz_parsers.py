"""Fuzz tests (hypothesis) of the manifest and prediction-file parsers: arbitrary bytes, text and JSON lines never
fail with anything but the project's own error type, and valid records round-trip unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffa2.data.manifest import ManifestError, read_manifest
from diffa2.eval.loaders import DataError, read_predictions, validate, write_predictions
from diffa2.eval.report import build_report
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import BUILTIN_SPECS, MODES

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REQUIRED = ("input", "target", "audio_filepath")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# A line is raw bytes, free text, or JSON (often an object with some of the fields the parsers look for).
field_names = st.sampled_from(["input", "target", "audio_filepath", "id", "question", "choices", "answer",
                               "model_output", "audio_id", "choice_a", "answer_gt", "response", "category"])
json_objects = st.dictionaries(field_names | st.text(max_size=6), json_values, max_size=8)
lines = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                  (json_values | json_objects).map(lambda v: json.dumps(v).encode()))
files = st.lists(lines, max_size=8).map(lambda ls: b"\n".join(ls))


def scratch(factory, suffix: str, content: bytes) -> Path:
    """A fresh file per example (pytest's session-scoped temporary folders; hypothesis reruns the test body)."""
    path = factory.mktemp("fuzz") / f"file{suffix}"
    path.write_bytes(content)
    return path


@FUZZ
@given(content=files, suffix=st.sampled_from([".jsonl", ".json"]), skip=st.booleans())
def test_manifest_parser_fails_only_with_manifest_errors(tmp_path_factory, content, suffix, skip):
    path = scratch(tmp_path_factory, suffix, content)
    try:
        records, problems = read_manifest(path, required=REQUIRED, audio_field="audio_filepath",
                                          on_error="skip" if skip else "raise")
    except ManifestError as err:
        assert str(path) in str(err)
        return
    for rec in records:
        assert all(isinstance(rec.fields[k], str) for k in REQUIRED)
    assert all(p.startswith(str(path)) for p in problems)


manifest_records = st.lists(
    st.fixed_dictionaries({"input": st.text(max_size=30), "target": st.text(max_size=30),
                           "audio_filepath": st.text(min_size=1, max_size=20).filter(str.strip)},
                          optional={"duration": st.floats(0, 100), "dataset": st.text(max_size=5)}),
    min_size=1, max_size=6)


@FUZZ
@given(records=manifest_records)
def test_valid_manifest_records_round_trip(tmp_path_factory, records):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    jsonl = scratch(tmp_path_factory, ".jsonl", text.encode())
    listed = scratch(tmp_path_factory, ".json", json.dumps(records).encode())
    for path in (jsonl, listed):
        read, problems = read_manifest(path, required=REQUIRED, audio_field="audio_filepath")
        assert problems == [] and [r.fields for r in read] == records


@FUZZ
@given(content=files, suffix=st.sampled_from([".jsonl", ".json"]), benchmark=st.sampled_from(sorted(BUILTIN_SPECS)),
       mode=st.sampled_from(MODES))
def test_prediction_parser_and_scorer_fail_only_with_data_errors(tmp_path_factory, content, suffix, benchmark,
                                                                 mode):
    path = scratch(tmp_path_factory, suffix, content)
    spec = BUILTIN_SPECS[benchmark]
    try:
        records = read_predictions(path)
        validate(records, spec, for_run=False, source=str(path))
    except DataError as err:
        assert str(path) in str(err) or "no records" in str(err)
        return
    result = score_records(records, spec, mode)  # validated records always score
    build_report(result)
    assert len(result.items) == len(records)


mmau_predictions = st.lists(
    st.builds(lambda i, choices, pick, output: {"id": str(i), "question": "q", "choices": choices,
                                                "answer": choices[pick % len(choices)], "model_output": output},
              st.integers(0, 10**6), st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=5),
              st.integers(0, 4), st.text(max_size=30)),
    min_size=1, max_size=6)


@FUZZ
@given(records=mmau_predictions, suffix=st.sampled_from([".jsonl", ".json"]))
def test_valid_prediction_files_round_trip(tmp_path_factory, records, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"predictions{suffix}"
    write_predictions(path, records)
    read = read_predictions(path)
    assert [r.data for r in read] == records
    validate(read, BUILTIN_SPECS["mmau"], for_run=False)
