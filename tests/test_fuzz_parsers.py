"""Fuzz tests (hypothesis) of the manifest, recipe and prediction-file parsers: arbitrary bytes, text and JSON lines
never fail with anything but the project's own error type, valid records round-trip unchanged, and almost-valid
inputs (one record or one field wrong) are caught at that record or field."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffa2.data.manifest import ManifestError, read_manifest
from diffa2.data.recipe import DataRecipe
from diffa2.eval.loaders import DataError, read_predictions, validate, write_predictions
from diffa2.eval.report import build_report
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import MODES, benchmark_names, load_spec

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
@given(content=files, suffix=st.sampled_from([".jsonl", ".json"]), benchmark=st.sampled_from(list(benchmark_names())),
       mode=st.sampled_from(MODES))
def test_prediction_parser_and_scorer_fail_only_with_data_errors(tmp_path_factory, content, suffix, benchmark,
                                                                 mode):
    path = scratch(tmp_path_factory, suffix, content)
    spec = load_spec(benchmark)
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
    validate(read, load_spec("mmau"), for_run=False)


# -- almost-valid inputs: valid records or recipes with one thing wrong, so they get past the first checks --------

MUTATIONS = {
    "drop": lambda rec, key: {k: v for k, v in rec.items() if k != key},
    "null": lambda rec, key: {**rec, key: None},
    "number": lambda rec, key: {**rec, key: 7},
    "list": lambda rec, key: {**rec, key: [rec[key]]},
}


@FUZZ
@given(records=manifest_records, index=st.integers(0, 5), key=st.sampled_from(REQUIRED),
       mutation=st.sampled_from(sorted(MUTATIONS)), suffix=st.sampled_from([".jsonl", ".json"]))
def test_an_almost_valid_manifest_keeps_every_good_record_and_names_the_bad_one(tmp_path_factory, records, index,
                                                                                key, mutation, suffix):
    bad = index % len(records)
    mutated = [MUTATIONS[mutation](r, key) if i == bad else r for i, r in enumerate(records)]
    if suffix == ".jsonl":
        content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mutated)
        where = f":{bad + 1}: "
    else:
        content = json.dumps(mutated)
        where = f"[{bad}]: "
    path = scratch(tmp_path_factory, suffix, content.encode())
    read, problems = read_manifest(path, required=REQUIRED, audio_field="audio_filepath", on_error="skip")
    assert [r.fields for r in read] == [r for i, r in enumerate(records) if i != bad]
    assert len(problems) == 1 and problems[0].startswith(f"{path}{where}")
    try:
        read_manifest(path, required=REQUIRED, audio_field="audio_filepath", on_error="raise")
    except ManifestError as err:
        assert str(err) == problems[0]
    else:
        raise AssertionError("a bad record must raise with on_error='raise'")


VALID_RECIPE = {"name": "r", "train": [{"path": "a.jsonl", "weight": 0.5}, {"path": "b.json", "format": "json"}],
                "validation": [{"path": "v.jsonl"}], "max_audio_seconds": 30}
recipe_breakage = st.sampled_from([
    ("train", 0, "weight", "2"), ("train", 0, "weight", -1), ("train", 1, "weight", True),
    ("train", 1, "path", 3), ("train", 0, "path", ""), ("train", 1, "format", "csv"),
    ("validation", 0, "target_field", ["t"]), ("validation", 0, "audio_root", 5), ("train", 0, "rejected_field", 1),
    (None, None, "max_audio_seconds", -2), (None, None, "max_audio_seconds", "30"), (None, None, "train", "a.jsonl"),
    ("train", 0, "weight", "1e-3"),
])


@FUZZ
@given(breakage=recipe_breakage, ok_weight=st.floats(0, 5))
def test_an_almost_valid_recipe_fails_at_load_naming_the_file_and_the_field(tmp_path_factory, breakage, ok_weight):
    split, index, key, value = breakage
    data = json.loads(json.dumps(VALID_RECIPE))
    data["train"][1]["weight"] = ok_weight  # the rest stays valid, whatever its values
    if split is None:
        data[key] = value
    else:
        data[split][index][key] = value
    path = scratch(tmp_path_factory, ".yaml", yaml.safe_dump(data).encode())
    assert DataRecipe.load(scratch(tmp_path_factory, ".yaml", json.dumps(VALID_RECIPE).encode())).name == "r"
    try:
        DataRecipe.load(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: ") and repr(key) in str(err)
        assert split is None or f"{split}[{index}]: " in str(err)
    else:
        raise AssertionError(f"{breakage} was accepted")
