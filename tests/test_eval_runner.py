"""The runner on a tiny checkpoint: batch safety, resume after a crash or a limit, audio problems, final files.

Audio is synthetic (short tones written next to a copy of the real MMAU fixture); the random tiny model answers
garbage, which is fine: these tests check the pipeline, not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diffa2.eval.core import item_seed
from diffa2.eval.loaders import read_predictions
from diffa2.eval.resume import read_partial
from diffa2.eval.runner import RunOptions, run_benchmark
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import load_spec

FIXTURES = Path(__file__).parent / "fixtures"
FINAL_FILES = ("predictions.json", "samples.jsonl", "report.json", "report.md", "report.png")
FAST = {"gen_length": 4, "block_length": 4, "steps": 4}  # few forward passes: these tests check the pipeline


def write_tone(path: Path, seconds: float, freq: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)




@pytest.fixture(scope="module")
def mmau_dir(tmp_path_factory) -> Path:
    """The MMAU fixture with tones at its audio paths: one file missing, one corrupt, one longer than the window."""
    root = tmp_path_factory.mktemp("mmau")
    shutil.copy(FIXTURES / "mmau_subset.json", root / "mmau.json")
    records = json.loads((root / "mmau.json").read_text(encoding="utf-8"))
    for i, r in enumerate(records):
        path = root / r["audio_id"]
        if i == 3:
            continue  # missing
        if i == 5:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"this is not audio")  # unreadable
            continue
        write_tone(path, 5.0 if i == 7 else 0.5 + (i % 4) * 0.5, 200.0 + 37 * i)  # item 7: trimmed to 4 s
    return root


def run(checkpoint: Path, data_dir: Path, out: Path, **kw) -> dict:
    kw.setdefault("decoding", FAST)
    options = RunOptions(benchmark="mmau", model=str(checkpoint), data=str(data_dir / "mmau.json"), out=str(out),
                         progress=False, **kw)
    return run_benchmark(options, log=lambda _: None).report


def test_run_writes_official_format_and_counts_audio_problems(checkpoint, mmau_dir, tmp_path):
    report = run(checkpoint, mmau_dir, tmp_path, limit=10, batch_size=5, decoding={})  # the spec's 16/16/16
    preds = json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))
    source = json.loads((mmau_dir / "mmau.json").read_text(encoding="utf-8"))[:10]
    assert len(preds) == 10
    for p, s in zip(preds, source, strict=True):
        assert {k: p[k] for k in s} == s  # every metadata field kept, unchanged (category lists included)
        if "audio_error" in p:
            assert "model_output" not in p and "model_prediction" not in p  # the official script skips them
        else:
            assert p["model_output"] == p["model_prediction"] == p["raw_output"]
            assert isinstance(p["normalized_output"], str)
    c = report["counts"]
    assert (c["audio_missing"], c["audio_unreadable"], c["audio_trimmed"]) == (1, 1, 1)
    assert c["records"] == 10 and c["counted"] == 8 and c["prediction_missing"] == 2
    assert set(report["overall"]) == {"correct", "total", "accuracy"} and report["overall"]["total"] == 8
    assert set(report["breakdown"]) == {"task", "difficulty", "sub-category", "category"}
    for cells in report["breakdown"].values():
        assert sum(cell["total"] for cell in cells.values()) == 8
    assert report["run"]["decoding"]["steps"] == 16 and report["run"]["prompt"] == "diffa"
    assert report["mode"] == "official" and any("missing or unreadable audio" in w for w in report["warnings"])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert samples[3]["audio_status"] == "missing" and samples[5]["audio_status"] == "unreadable"
    assert samples[7]["trimmed"] is True and samples[0]["prompt"].startswith("You are given the audio")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **overall** |" in (tmp_path / "report.md").read_text(encoding="utf-8")
    # Strict mode counts the two audio failures as wrong.
    strict = score_records(read_predictions(tmp_path / "predictions.json"), load_spec("mmau"), "strict")
    assert strict.overall()["total"] == 10


def test_batch_of_8_equals_batch_of_1(checkpoint, mmau_dir, tmp_path):
    # Sampling (temperature 1) with per-item seeds: answers vary, and must not depend on the batch.
    decoding = FAST | {"temperature": 1.0}
    run(checkpoint, mmau_dir, tmp_path / "b8", limit=16, batch_size=8, decoding=decoding)
    run(checkpoint, mmau_dir, tmp_path / "b1", limit=16, batch_size=1, decoding=decoding)
    p8 = json.loads((tmp_path / "b8" / "predictions.json").read_text(encoding="utf-8"))
    p1 = json.loads((tmp_path / "b1" / "predictions.json").read_text(encoding="utf-8"))
    assert [p.get("raw_output") for p in p8] == [p.get("raw_output") for p in p1]
    assert len({p.get("raw_output") for p in p8}) > 2  # not all the same garbage
    for name in FINAL_FILES:
        assert (tmp_path / "b8" / name).read_bytes() == (tmp_path / "b1" / name).read_bytes(), name


class Crash(RuntimeError):
    pass


def test_resume_after_crash_and_after_limit_equals_uninterrupted(checkpoint, mmau_dir, tmp_path):
    run(checkpoint, mmau_dir, tmp_path / "full", limit=12, batch_size=4)

    def crash_after_two(batch: int, done: int) -> None:
        if batch == 1:
            raise Crash

    options = RunOptions(benchmark="mmau", model=str(checkpoint), data=str(mmau_dir / "mmau.json"),
                         out=str(tmp_path / "crash"), limit=12, batch_size=4, decoding=FAST,
                         progress=False)
    with pytest.raises(Crash):
        run_benchmark(options, on_batch=crash_after_two, log=lambda _: None)
    assert not (tmp_path / "crash" / "report.json").exists()  # no final files from a partial run
    (partial,) = (tmp_path / "crash" / "partial").glob("*.jsonl")
    assert len(read_partial(partial)) == 8  # two batches of 4 survived
    with partial.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "cut sho')  # a line cut short by the crash
    resumed = run_benchmark(options, log=lambda _: None)
    assert resumed.decoded == 4  # only what was left
    # A limited run first, then the full one.
    run(checkpoint, mmau_dir, tmp_path / "limited", limit=5, batch_size=4)
    run(checkpoint, mmau_dir, tmp_path / "limited", limit=12, batch_size=4)
    for name in FINAL_FILES:
        full = (tmp_path / "full" / name).read_bytes()
        assert (tmp_path / "crash" / name).read_bytes() == full, name
        assert (tmp_path / "limited" / name).read_bytes() == full, name
    # A rerun of a finished run decodes nothing; a changed decoding setting starts a new log.
    assert run_benchmark(options, log=lambda _: None).decoded == 0
    changed = run_benchmark(dataclasses.replace(options, decoding=FAST | {"steps": 1}), log=lambda _: None)
    assert changed.decoded == 10 and len(list((tmp_path / "crash" / "partial").glob("*.jsonl"))) == 2


def test_item_seeds_are_per_item():
    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(0, "b")
    assert item_seed(0, "a") != item_seed(1, "a") and 0 <= item_seed(5, "x") < 2**31


def test_continuous_batches_give_the_static_batch_entries(checkpoint, mmau_dir):
    from diffa2.diffusion.decoding import DecodeConfig
    from diffa2.eval.core import decode_batch, decode_items, load_items, render_prompts
    from diffa2.inference import AudioQA

    spec = load_spec("mmau")
    items, _ = load_items(spec, mmau_dir / "mmau.json", mmau_dir, limit=10)
    prompts = render_prompts(spec, items)
    qa = AudioQA.from_checkpoint(checkpoint)
    static_calls = []
    answer = qa.answer
    qa.answer = lambda *a, **kw: static_calls.append(len(a[0])) or answer(*a, **kw)
    # a threshold rule: answers finish after different numbers of steps
    config = DecodeConfig.preset("parallel", gen_length=8, block_length=4, steps=8, temperature=1.0)
    static = decode_batch(qa, items, prompts, config, seed=3)
    assert static_calls == [8] and sum("output" in e for e in static) == 8  # items 3 and 5: no audio
    groups = list(decode_items(qa, items, prompts, config, 3, batch_size=4))
    assert static_calls == [8]  # the continuous batcher, not AudioQA.answer
    assert [len(g) for g in groups] == [4, 4, 2]
    assert dict(i_entry for g in groups for i_entry in g) == dict(enumerate(static))
    cached = list(decode_items(qa, items, prompts, dataclasses.replace(config, cache="prefix"), 3, batch_size=4))
    assert static_calls == [8, 3, 3, 2]  # KV cache: static batches of 4 in item order, items 3 and 5 unread
    assert [[i for i, _ in g] for g in cached] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
