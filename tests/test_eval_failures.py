"""Evaluation never hides a failure: MMSU counted as its official script counts, audio failures named and
retried, and a run that finds no audio at all stops with an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from diffa2.eval.__main__ import main
from diffa2.eval.loaders import Record, read_predictions, read_records
from diffa2.eval.report import build_report
from diffa2.eval.resume import append_partial, read_logs
from diffa2.eval.runner import RunOptions, run_benchmark
from diffa2.eval.scoring import EMPTY, MISSING, NOT_STRING, NULL, SCORED, UNPARSEABLE, score_records
from diffa2.eval.specs import load_spec

FIXTURES = Path(__file__).parent / "fixtures"
FAST = {"gen_length": 4, "block_length": 4, "steps": 4}
MMSU = load_spec("mmsu")
FINAL_FILES = ("samples.jsonl", "report.json", "report.md", "report.png")



def official_mmsu(records: list[dict]) -> tuple[int, int]:
    """(correct, total) as MMSU's mmsu_evaluation.py counts them, restated as a plain loop for this test."""
    correct = total = 0
    for record in records:
        response = record.get("response", "")  # a missing response reads as empty
        if not isinstance(response, str):
            continue  # .strip() fails: "Error prediction!", skipped
        text = response.strip().replace("\n", "")
        letter = None
        if text and text != "None":
            if text[0] in "ABCD":
                letter = text[0]
            elif len(text) > 1 and text[-2] in "ABCD":
                letter = text[-2]
            else:
                continue  # "Wrong format response": skipped
        options = {"A": record.get("choice_a"), "B": record.get("choice_b"), "C": record.get("choice_c"),
                   "D": record.get("choice_d")}
        correct += letter is not None and options[letter] == record.get("answer_gt")
        total += 1
    return correct, total


def as_records(rows: list[dict]) -> list[Record]:
    return [Record(r, f"preds.jsonl:{i + 1}", i) for i, r in enumerate(rows)]


def mmsu_rows() -> list[dict]:
    rec = read_records(FIXTURES / "mmsu_subset.jsonl")[0].data  # happy / sad / angry / neutral -> sad (B)
    return [
        rec | {"response": "B"},  # correct
        rec | {"response": "A"},  # wrong
        dict(rec),  # no key: read as "", counted wrong
        rec | {"response": None},  # null: "Error prediction!", left out
        rec | {"response": "None"},  # "None": counted wrong
        rec | {"response": "b"},  # wrong format: left out
        rec | {"response": 7},  # not a string: fails like null, left out
    ]


def test_mmsu_missing_response_is_wrong_and_null_is_left_out():
    result = score_records(as_records(mmsu_rows()), MMSU, "official")
    assert [s.status for s in result.items] == [SCORED, SCORED, MISSING, NULL, EMPTY, UNPARSEABLE, NOT_STRING]
    assert [s.counted for s in result.items] == [True, True, True, False, True, False, False]
    assert result.overall() == {"correct": 1, "total": 4, "accuracy": 25.0}
    assert official_mmsu(mmsu_rows()) == (1, 4)
    assert score_records(as_records(mmsu_rows()), MMSU, "strict").overall()["total"] == 7
    counts = build_report(result)["counts"]
    assert (counts["counted"], counts["prediction_missing"], counts["prediction_null"]) == (4, 1, 1)


def test_mmsu_official_mode_matches_the_official_loop_on_every_fixture_record():
    rows = [r.data for r in read_records(FIXTURES / "mmsu_subset.jsonl")]
    responses = ["A", "B", "C", "D", None, "", "None", "The answer is C.", "c", 3, "Answer: D", "B."]
    mixed = [dict(r) if i % 7 == 3 else r | {"response": responses[i % len(responses)]} for i, r in enumerate(rows)]
    overall = score_records(as_records(mixed), MMSU, "official").overall()
    assert (overall["correct"], overall["total"]) == official_mmsu(mixed)


def test_mmsu_score_command_counts_like_the_official_script(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mmsu_rows()), encoding="utf-8")
    out = tmp_path / "report.json"
    assert main(["score", "--benchmark", "mmsu", "--predictions", str(path), "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["overall"] == {"correct": 1, "total": 4, "accuracy": 25.0}


# ---------------------------------------------------------------------------------------------------------------
# Audio failures in a run
# ---------------------------------------------------------------------------------------------------------------


def write_tone(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * (220 + 40 * index) * t)).astype(np.float32), 16000)


def benchmark_dir(root: Path, fixture: str, count: int, audio_key: str, absent: set[int]) -> tuple[Path, list]:
    """`count` fixture records with tones at their audio paths, except at the `absent` indices."""
    root.mkdir(parents=True)
    records = [r.data for r in read_records(FIXTURES / fixture)][:count]
    data = root / fixture
    data.write_text("".join(json.dumps(r) + "\n" for r in records) if fixture.endswith(".jsonl")
                    else json.dumps(records), encoding="utf-8")
    for i, r in enumerate(records):
        if i not in absent:
            write_tone(root / r[audio_key], i)
    return data, records


def run(checkpoint: Path, benchmark: str, data: Path, out: Path, messages: list[str] | None = None):
    options = RunOptions(benchmark=benchmark, model=str(checkpoint), data=str(data), out=str(out), batch_size=4,
                         decoding=FAST, progress=False)
    return run_benchmark(options, log=(messages if messages is not None else []).append)


def test_mmsu_run_counts_an_item_without_audio_wrong_and_names_it(checkpoint, tmp_path):
    data, records = benchmark_dir(tmp_path / "mmsu", "mmsu_subset.jsonl", 6, "audio_path", absent={2})
    result = run(checkpoint, "mmsu", data, tmp_path / "out")
    preds = read_predictions(tmp_path / "out" / "predictions.jsonl")
    assert "response" not in preds[2].data and "audio_error" in preds[2].data
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert (samples[2]["status"], samples[2]["counted"], samples[2]["correct"]) == (MISSING, True, False)
    assert result.report["overall"]["total"] == sum(s["counted"] for s in samples)  # read as empty: counted wrong
    assert (f"1 item(s) had missing or unreadable audio ({records[2]['id']}): no prediction written, 1 counted wrong "
            f"and 0 left out of the count; rerun the same command to retry them") in result.report["warnings"]


def test_missing_audio_is_retried_once_restored(checkpoint, tmp_path):
    data, records = benchmark_dir(tmp_path / "mmau", "mmau_subset.json", 6, "audio_id", absent={1, 4})
    first = run(checkpoint, "mmau", data, tmp_path / "out")
    ids = f"{records[1]['id']}, {records[4]['id']}"
    assert (first.decoded, first.report["overall"]["total"]) == (4, 4)
    assert (f"2 item(s) had missing or unreadable audio ({ids}): no prediction written, 0 counted wrong and 2 left "
            f"out of the count; rerun the same command to retry them") in first.report["warnings"]
    write_tone(data.parent / records[1]["audio_id"], 1)
    write_tone(data.parent / records[4]["audio_id"], 4)
    messages: list[str] = []
    second = run(checkpoint, "mmau", data, tmp_path / "out", messages)
    assert second.decoded == 2 and second.report["overall"]["total"] == 6
    assert not any("audio" in warning for warning in second.report["warnings"])
    assert f"[diffa2.eval] retrying 2 item(s) whose audio was missing or unreadable before: {ids}" in messages
    assert "4 already done" in messages[0]
    fresh = run(checkpoint, "mmau", data, tmp_path / "fresh")
    assert fresh.decoded == 6
    for name in ("predictions.json", *FINAL_FILES):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_a_decoded_entry_wins_over_an_audio_failure_from_another_rank(tmp_path):
    failed = {"key": "k1", "id": "a", "seed": 1, "audio_status": "missing", "audio_error": "file not found"}
    ok = {"key": "k1", "id": "a", "seed": 1, "audio_status": "ok", "trimmed": False, "output": "x", "nfe": 4}
    append_partial(tmp_path / "run.rank0.jsonl", [ok])  # retried by rank 0 of a later 2-process run
    append_partial(tmp_path / "run.rank1.jsonl", [failed])  # failed on rank 1 of an earlier one
    assert read_logs(tmp_path, "run") == {"k1": ok}


def test_no_audio_found_is_an_error_naming_the_root(checkpoint, tmp_path, capsys):
    data, records = benchmark_dir(tmp_path / "mmau", "mmau_subset.json", 3, "audio_id", absent=set())
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    argv = ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(data), "--audio-root", str(wrong),
            "--out", str(tmp_path / "out"), "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    first = wrong / records[0]["audio_id"]
    assert (f"none of the 3 audio files was found under {wrong.resolve()} (the first looked for: {first}); check "
            f"--audio_root (default: the data file's folder)") in err
    assert not (tmp_path / "out").exists()
