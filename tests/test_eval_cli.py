"""`python -m diffa2.eval` end to end: help texts, `score` on hand-checked files, `run` on MMAR, MMSU (JSONL and
parquet with audio bytes) and the synthetic benchmark, and clear errors on bad data."""

from __future__ import annotations

import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import make_tiny_model

from diffa2.chat import ChatFormat
from diffa2.eval.__main__ import main
from diffa2.modeling.checkpoint import save_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["--gen-length", "4", "--block-length", "4", "--steps", "4", "--no-progress"]




def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(seconds: float, freq: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, freq), 16000, format="WAV")
    return buffer.getvalue()


def test_help_of_every_subcommand(capsys, monkeypatch):
    # `python -m diffa2.eval --help`, in-process (a subprocess would pay torch's import time again).
    monkeypatch.setattr(sys, "argv", ["diffa2.eval", "--help"])
    monkeypatch.delitem(sys.modules, "diffa2.eval.__main__")  # run it afresh as __main__, as `-m` does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("diffa2.eval", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m diffa2.eval" in out and "{run,score,score_answers,prompts}" in out
    expected = {
        "run": ("--benchmark", "--model", "--data", "--audio_root", "--out", "--batch_size", "--limit", "--steps",
                "--gen_length", "--block_length", "--temperature", "--cfg_scale", "--remasking", "--prompt", "--mode",
                "--mcq", "--n_draws"),
        "score": ("--benchmark", "--predictions", "--mode", "--prediction_key", "--out"),
        "score_answers": ("--model", "--audio", "--question", "--candidate", "--n_draws", "--seed", "--elbo_form"),
        "prompts": ("--show",),
    }
    for command, flags in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: python -m diffa2.eval {command}" in text
        for flag in flags:
            assert flag in text, (command, flag)


def test_prompts_command(capsys):
    assert main(["prompts"]) == 0
    listing = capsys.readouterr().out
    assert "diffa " in listing and "r1_aqa" in listing and "mmsu_official" in listing
    assert main(["prompts", "--show", "audio_flamingo"]) == 0
    assert "(D) flute" in capsys.readouterr().out


def test_score_cli_on_hand_checked_mmau_file(tmp_path, capsys):
    records = {r["id"][:8]: r for r in json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))}
    rows = [
        records["3fe64f3d"] | {"model_output": "The answer is Man."},  # correct
        records["72fb5481"] | {"model_output": "woman"},  # wrong: article missing
        records["7a1dcecc"] | {"model_output": "D"},  # wrong officially, right normalized
        records["16964657"] | {"model_output": "thirteen"},  # correct (duplicated gold)
        records["b132f501"],  # no prediction: left out officially
    ]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert main(["score", "--benchmark", "mmau", "--predictions", str(path), "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "overall: 50.00%  (2/4)" in out and "mode=official" in out
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["overall"] == {"correct": 2, "total": 4, "accuracy": 50.0}
    assert report["breakdown"]["task"]["sound"] == {"correct": 1, "total": 3, "accuracy": pytest.approx(100 / 3)}
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r.png").is_file()
    assert main(["score", "--benchmark", "mmau", "--predictions", str(path), "--mode", "normalized"]) == 0
    assert "overall: 75.00%  (3/4)" in capsys.readouterr().out
    assert main(["score", "--benchmark", "mmau", "--predictions", str(path), "--mode", "strict"]) == 0
    assert "overall: 40.00%  (2/5)" in capsys.readouterr().out


def test_score_cli_reports_bad_records_clearly(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"choices": ["a", "b"], "answer": "c", "answer_prediction": "a"}\n', encoding="utf-8")
    assert main(["score", "--benchmark", "mmar", "--predictions", str(path)]) == 2
    assert f"{path}:1: field 'answer': 'c' is not one of the options" in capsys.readouterr().err


def test_run_mmar_jsonl(checkpoint, tmp_path, capsys):
    data = tmp_path / "mmar"
    data.mkdir()
    shutil.copy(FIXTURES / "mmar_subset.jsonl", data / "MMAR-meta.jsonl")
    rows = [json.loads(line) for line in (data / "MMAR-meta.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, r in enumerate(rows[:8]):
        (data / r["audio_path"]).parent.mkdir(parents=True, exist_ok=True)
        sf.write(data / r["audio_path"], tone(0.5 + 0.2 * i, 300 + 50 * i), 16000)
    out = tmp_path / "out"
    argv = ["run", "--benchmark", "mmar", "--model", str(checkpoint), "--data", str(data / "MMAR-meta.jsonl"),
            "--out", str(out), "--limit", "10", "--batch-size", "5", *FAST]
    assert main(argv) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 10 and all("answer_prediction" in p for p in preds[:8])
    assert all("answer_prediction" not in p and "audio_error" in p for p in preds[8:])
    assert all(p["rubric"] == r["rubric"] for p, r in zip(preds, rows, strict=False))  # metadata kept
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["breakdown"]) == {"modality", "category", "sub-category"}
    assert report["counts"]["audio_missing"] == 2 and report["overall"]["total"] == 8
    # `score` on our own file reproduces the run's report numbers.
    assert main(["score", "--benchmark", "mmar", "--predictions", str(out / "predictions.jsonl"),
                 "--out", str(tmp_path / "rescored.json")]) == 0
    rescored = json.loads((tmp_path / "rescored.json").read_text(encoding="utf-8"))
    assert (rescored["overall"], rescored["breakdown"]) == (report["overall"], report["breakdown"])


def test_run_mmsu_jsonl_and_parquet_with_audio_bytes(checkpoint, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "mmsu_subset.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = rows[:8]
    for i, r in enumerate(rows):
        r["audio"] = {"bytes": wav_bytes(0.6, 200 + 40 * i) if i != 2 else b"garbage", "path": f"{r['id']}.wav"}
        del r["audio_path"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmsu.parquet")
    out = tmp_path / "out"
    argv = ["run", "--benchmark", "mmsu", "--model", str(checkpoint), "--data", str(tmp_path / "mmsu.parquet"),
            "--out", str(out), "--batch-size", "4", "--mode", "strict", *FAST]
    assert main(argv) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert preds[0]["audio"] == f"{rows[0]['id']}.wav"  # bytes replaced by the path
    assert "response" not in preds[2] and "audio_error" in preds[2]
    assert sum("response" in p for p in preds) == 7
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "strict" and report["overall"]["total"] == 8
    assert report["counts"]["audio_unreadable"] == 1
    assert set(report["breakdown"]) == {"category", "sub-category", "sub-sub-category"}
    assert "Do not provide any additional explanations" in (out / "samples.jsonl").read_text(encoding="utf-8")


def test_run_synth_end_to_end(tmp_path):
    from diffa2.data.synth import build_synth_corpus

    corpus = build_synth_corpus(tmp_path / "synth", size="small")
    chat = ChatFormat.from_pretrained(corpus.tokenizer_dir)
    save_pretrained(make_tiny_model(chat), tmp_path / "ckpt", tokenizer=chat.tokenizer)
    out = tmp_path / "out"
    argv = ["run", "--benchmark", "synth", "--model", str(tmp_path / "ckpt"), "--data", str(corpus.test_mmau),
            "--out", str(out), "--batch-size", "12", *FAST]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    n = len(json.loads(corpus.test_mmau.read_text(encoding="utf-8")))
    assert report["counts"]["records"] == n and report["overall"]["total"] == n
    assert list(report["breakdown"]) == ["sub-category", "task", "difficulty"]
    assert report["counts"]["audio_missing"] == report["counts"]["audio_unreadable"] == 0
    assert report["run"]["prompt"] == "diffa"


def test_run_rejects_bad_data_with_every_problem(checkpoint, tmp_path, capsys):
    rows = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:3]
    rows[0]["answer"] = "Nobody"
    del rows[2]["audio_id"]
    (tmp_path / "bad.json").write_text(json.dumps(rows), encoding="utf-8")
    argv = ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(tmp_path / "bad.json"),
            "--out", str(tmp_path / "out"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "bad.json[0]: field 'answer'" in err and "bad.json[2]: field 'audio_id'" in err
    assert not (tmp_path / "out").exists()


def test_synth_without_model_points_at_make_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/sft/final here
    assert main(["run", "--benchmark", "synth"]) == 2
    assert "runs/sft/final" in (err := capsys.readouterr().err) and "make train" in err
    assert main(["run", "--benchmark", "mmau", "--data", "x.json"]) == 2
    assert "--model is required for mmau" in capsys.readouterr().err
