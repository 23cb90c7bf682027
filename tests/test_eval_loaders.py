"""Benchmark formats, validation messages, predictions files, specs (diffa2/eval/benchmarks/*.yaml), prompts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffa2.data.synth import ANSWER_TOKENS
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.loaders import (
    DataError,
    jsonable_record,
    read_predictions,
    read_records,
    read_records_with_identity,
    to_items,
    validate,
    write_predictions,
)
from diffa2.eval.prompts import PROMPTS, get_prompt, register_prompt
from diffa2.eval.report import build_report
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import (
    SPEC_DIR,
    SpecError,
    benchmark_names,
    load_spec,
    load_spec_file,
    paper_decoding,
    spec_from_dict,
)

FIXTURES = Path(__file__).parent / "fixtures"
MMAU, MMAR, MMSU = load_spec("mmau"), load_spec("mmar"), load_spec("mmsu")


def test_fixtures_load_and_validate():
    for name, spec in (("mmau_subset.json", MMAU), ("mmar_subset.jsonl", MMAR), ("mmsu_subset.jsonl", MMSU)):
        records = read_records(FIXTURES / name)
        validate(records, spec, for_run=True)
        items = to_items(records, spec, FIXTURES)
        assert all(item.answer in item.choices for item in items)
    mmsu = to_items(read_records(FIXTURES / "mmsu_subset.jsonl"), MMSU, "/data")
    two = next(i for i in mmsu if i.choices[2] is None)
    assert two.choices[3] is None and two.audio.path == Path("/data/audio") / f"{two.id}.wav"


def test_validation_names_file_line_and_field(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "mmar_subset.jsonl").read_text(encoding="utf-8").splitlines()]
    bad = [dict(r) for r in rows[:6]]
    del bad[0]["choices"]
    bad[1]["answer"] = "not an option"
    bad[2]["choices"] = "just a string"
    bad[3]["id"] = bad[4]["id"]
    bad[5]["audio_path"] = None
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad), encoding="utf-8")
    with pytest.raises(DataError) as err:
        validate(read_records(path), MMAR, for_run=True, source=str(path))
    problems = err.value.problems
    assert f"{path}:1: field 'choices': missing" in problems
    assert any(p.startswith(f"{path}:2: field 'answer': 'not an option' is not one of") for p in problems)
    assert any(p.startswith(f"{path}:3: field 'choices': expected a list of strings") for p in problems)
    assert any(p.startswith(f"{path}:5: field 'id'") and "repeats the id of" in p for p in problems)
    assert f"{path}:6: field 'audio_path': missing or not a path string" in problems
    assert "6 problem(s)" in str(err.value) or "problem(s)" in str(err.value)


def test_bad_json_lines_and_lists_are_reported(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"id": 1}\n{"id": 2\n\n[]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        read_records(jsonl)
    lst = tmp_path / "x.json"
    lst.write_text('[{"id": "a"}, 3]', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.json\[1\]: expected a JSON object"):
        validate(read_records(lst), MMAU, for_run=False)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.json")
    # A .json file holding JSONL is read as JSONL (some toolkits write that).
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    assert [r.data["a"] for r in read_records(lines)] == [1, 2]


def test_mmsu_validation(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "mmsu_subset.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[0]["answer_gt"] = "ecstatic"
    rows[1]["choice_c"] = 3
    del rows[2]["audio_path"]
    path = tmp_path / "mmsu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        validate(read_records(path), MMSU, for_run=True)
    text = str(err.value)
    assert f"{path}:1: field 'answer_gt'" in text and f"{path}:2: field 'choice_c'" in text
    assert f"{path}:3: field 'audio_path'/'audio'" in text
    validate(read_records(path)[3:], MMSU, for_run=True)  # the rest is fine


def test_mmsu_parquet_with_hf_audio_struct(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "mmsu_subset.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["audio"] = {"bytes": b"RIFF....", "path": r.pop("audio_path").split("/")[-1]}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    records, identity = read_records_with_identity(tmp_path)
    assert len(records) == len(rows) and len(identity["sha256"]) == 64
    validate(records, MMSU, for_run=True)
    item = to_items(records, MMSU, tmp_path)[0]
    assert item.audio.data == b"RIFF...." and item.audio.path is None
    out = jsonable_record(records[0].data)
    assert out["audio"] == rows[0]["audio"]["path"]  # bytes never reach a JSON predictions file
    json.dumps(out)


def test_hf_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="ddwang2000/MMSU: cannot load split 'train'"):
        read_records("ddwang2000/MMSU")


def test_predictions_round_trip_both_formats(tmp_path):
    rows = [r.data | {"model_output": "x"} for r in read_records(FIXTURES / "mmau_subset.json")]
    for name in ("p.json", "p.jsonl"):
        write_predictions(tmp_path / name, rows)
        assert [r.data for r in read_predictions(tmp_path / name)] == rows
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8")) == rows  # a JSON list, as evaluation.py reads


# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------


def test_every_shipped_yaml_loads_complete():
    files = sorted(SPEC_DIR.glob("*.yaml"))
    assert [f.name for f in files] == ["mmar.yaml", "mmau.yaml", "mmau_r1_aqa.yaml", "mmsu.yaml", "synth.yaml",
                                       "synth_multiturn.yaml"]
    assert benchmark_names() == ("mmar", "mmau", "mmsu", "synth")  # the variant is chosen with --spec
    for f in files:
        spec = load_spec_file(f)
        assert spec.prompt in PROMPTS
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
        assert "include" in raw or set(raw) == {fl.name for fl in dataclasses.fields(spec)}, f"{f} is incomplete"
        assert spec_from_dict(spec.to_dict()) == spec  # the YAML schema round-trips


def test_shipped_specs_keep_their_values():
    """Key values of the shipped specs, pinned (they equalled the former built-in Python specs field by field)."""
    parallel16 = DecodeConfig.preset("parallel", gen_length=16, block_length=16, steps=16)
    for name in ("mmau", "mmar", "mmsu"):  # DIFFA-2's settings (docs/model.md §7)
        spec = load_spec(name)
        assert (spec.version, spec.profile, spec.decoding) == (2, "parallel", parallel16)
        assert spec.profiles == {"paper": paper_decoding()} and spec.decoding.threshold == 0.9
    assert (MMAU.format, MMAU.prompt, MMAU.rule, MMAU.prediction_key, MMAU.extra_prediction_keys) == (
        "mmau_json", "diffa", "mmau_wordset", "model_output", ("model_prediction",))
    assert MMAU.breakdown == ("task", "difficulty", "sub-category", "category")
    assert MMAU.official_values == {"task": ("sound", "music", "speech"), "difficulty": ("easy", "medium", "hard")}
    assert (MMAR.format, MMAR.prediction_key, MMAR.predictions_file) == ("mmar_jsonl", "answer_prediction",
                                                                         "predictions.jsonl")
    assert len(MMAR.official_values["modality"]) == 7 and MMAR.official_values["category"][0] == "Signal Layer"
    assert (MMSU.format, MMSU.prompt, MMSU.rule, MMSU.prediction_key, MMSU.default_data) == (
        "mmsu", "diffa_mmsu", "mmsu_letter", "response", "ddwang2000/MMSU")
    synth = load_spec("synth")
    assert (synth.version, synth.default_data, synth.default_model, synth.profiles) == (3, "synth",
                                                                                      "runs/sft/final", {})
    assert synth.decoding == DecodeConfig.preset("parallel", gen_length=ANSWER_TOKENS, block_length=ANSWER_TOKENS,
                                                 steps=ANSWER_TOKENS)
    assert synth.breakdown == ("sub-category", "task", "difficulty")
    variant = load_spec("mmau", SPEC_DIR / "mmau_r1_aqa.yaml")
    assert (variant.prompt, variant.mode, variant.profiles) == ("r1_aqa", "normalized", {})
    assert (variant.decoding.gen_length, variant.decoding.block_length, variant.decoding.steps) == (64, 32, 64)
    assert variant.decoding.threshold == 0.9 and variant.prediction_key == "model_output"  # the rest from mmau.yaml


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['promt'\]"):
        spec_from_dict({"name": "mmau", "promt": "diffa"})
    with pytest.raises(SpecError, match=r"unknown decoding key\(s\) \['step'\]"):
        spec_from_dict({"name": "mmau", "decoding": {"step": 4}})
    with pytest.raises(SpecError, match="decoding"):
        spec_from_dict({"name": "mmau", "decoding": {"gen_length": 16, "block_length": 5}})
    with pytest.raises(SpecError, match="mode 'lenient' is not one of"):
        spec_from_dict(MMAU.to_dict() | {"mode": "lenient"})
    with pytest.raises(SpecError, match=r"missing required key\(s\) \['data_version', 'description', 'format', "
                                        r"'version'\]"):
        spec_from_dict({"name": "mmau", "prompt": "diffa"})
    with pytest.raises(SpecError, match="unknown benchmark"):
        load_spec("mmlu")
    variant = tmp_path / "v.yaml"
    variant.write_text(f"include: {SPEC_DIR / 'mmau.yaml'}\nprompt: r1_aqa\ndecoding: {{steps: 8}}\n")
    spec = load_spec("mmau", variant)
    assert spec.prompt == "r1_aqa" and spec.decoding.steps == 8 and spec.decoding.gen_length == 16
    with pytest.raises(SpecError, match="not 'mmar'"):
        load_spec("mmar", variant)
    cycle = tmp_path / "c.yaml"
    cycle.write_text("include: c.yaml\n")
    with pytest.raises(SpecError, match="include cycle"):
        load_spec_file(cycle)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------


def test_diffa_prompts_match_the_reference_text():
    mmau = get_prompt("diffa")("Which is it? ", ["Man", "Woman"])
    assert mmau == (
        "You are given the audio and a multiple-choice question. Choose the best answer based only on the speech "
        "content and style.\nQuestion: Which is it?\nChoices:\nA. Man\nB. Woman\nAnswer:"
    )
    mmsu = get_prompt("diffa_mmsu")("Gender?", ["male", "female", None, None])
    assert mmsu == (
        "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
        "**you should only choose A or B or C or D.** Do not provide any additional explanations or content."
        "\n\nQuestion: Gender?\n\nA. male\nB. female"
    )
    # The synthetic corpus trains with exactly this prompt (train/test parity of the embedded default).
    from diffa2.data.synth import format_mc_prompt

    assert mmau == format_mc_prompt("Which is it?", ["Man", "Woman"])
    # The official MMSU templates print null options as "None" (the known trap, reproduced on purpose).
    assert get_prompt("mmsu_official")("Gender?", ["male", "female", None, None]).endswith("C. None\nD. None")


def test_every_template_renders_2_to_8_options_with_the_right_letters():
    eight = [f"option {i}" for i in range(8)]
    unlettered = {"mmau_authors", "mmar_authors", "r1_aqa"}  # these list the texts without letters
    assert get_prompt("question")(" Q? ", eight) == "Q?"  # the stages' question-only prompt lists no options
    for name, template in PROMPTS.items():
        if name == "question":
            continue
        text = template("Q?", eight)
        assert "Q?" in text and "option 7" in text, name
        if name not in unlettered:
            assert "H. option 7" in text or "(H) option 7" in text, name
        two = template("Q?", ["first", "second"])
        assert "second" in two and "option 7" not in two, name
    assert "['first', 'second']" in get_prompt("r1_aqa")("Q?", ["first", "second"])


def test_prompt_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_prompt("diffa", answer_style="text", source="x")(lambda q, c: q)
    with pytest.raises(KeyError, match="available: .*diffa"):
        get_prompt("nope")


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: reading, validating and scoring arbitrary predictions files raises DataError or works, nothing else
# ---------------------------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["id", "choices", "answer", "answer_gt", "model_output", "answer_prediction", "response",
                        "task", "difficulty", "category", "sub-category", "modality", "choice_a", "choice_b",
                        "choice_c", "choice_d"])
RECORDS = st.lists(st.dictionaries(KEYS, JSON_VALUES | st.lists(st.text(max_size=10), min_size=2, max_size=5)),
                   min_size=1, max_size=4)


def _score_file(path: Path, spec_name: str) -> None:
    spec = load_spec(spec_name)
    try:
        records = read_predictions(path)
        validate(records, spec, for_run=False)
    except DataError:
        return
    for mode in ("official", "strict", "normalized"):
        build_report(score_records(records, spec, mode))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_fuzz_arbitrary_bytes_as_predictions_file(tmp_path, content, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    for name in ("mmau", "mmar", "mmsu"):
        _score_file(path, name)


EXTRA_KEYS = st.sampled_from(["model_output", "answer_prediction", "response", "task", "difficulty", "category",
                              "sub-category", "sub-sub-category", "modality", "choice_c", "choice_d"])


@st.composite
def nearly_valid_rows(draw) -> list[dict]:
    """Records that mostly pass validation (so scoring runs), with arbitrary predictions and labels."""
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        choices = draw(st.lists(st.text(max_size=12), min_size=2, max_size=6))
        row = {"choices": choices, "answer": draw(st.sampled_from(choices)),
               "choice_a": choices[0], "choice_b": choices[1], "answer_gt": choices[0]}
        row |= draw(st.dictionaries(EXTRA_KEYS, JSON_VALUES | st.text(max_size=30), max_size=5))
        rows.append(row)
    return rows


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=RECORDS | nearly_valid_rows(), name=st.sampled_from(["mmau", "mmar", "mmsu"]))
def test_fuzz_structured_records(tmp_path, rows, name):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _score_file(path, name)
