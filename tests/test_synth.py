"""The synthetic corpus of the embedded default: determinism, formats, and that the audio carries its
labels."""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diffa2.data import synth
from diffa2.data.synth import (
    COMPLETE_MARKER,
    PILOT_AMP,
    PILOT_HZ,
    QUESTION_KINDS,
    SAMPLE_RATE,
    STAGES,
    build_synth_corpus,
    chance_accuracy,
    ensure_synth_corpus,
    is_complete,
    render_clip,
)

DESTA_KEYS = {"audio_id", "audio_filepath", "transcription", "input", "target", "dataset", "duration",
              "seed_transcript"}
MMAU_KEYS = {"id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category",
             "sub-category", "difficulty"}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _words(text: str) -> set[str]:
    """The MMAU scorer's tokenisation: the set of lower-cased \\b\\w+\\b matches."""
    return set(re.findall(r"\b\w+\b", text.lower()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_synth_corpus(tmp_path_factory.mktemp("synth") / "c", seed=0, size="small")


@pytest.fixture(scope="module")
def records(corpus):
    out = {}
    for stage in STAGES:
        for split in ("train", "validation"):
            out[(stage, split)] = json.loads(corpus.manifest(stage, split).read_text())
    return out


@pytest.fixture(scope="module")
def test_items(corpus):
    return json.loads(corpus.test_mmau.read_text())


def test_same_seed_gives_identical_bytes_and_other_seed_differs(corpus, tmp_path):
    again = build_synth_corpus(tmp_path / "again", seed=0, size="small")
    first, second = _hashes(corpus.root), _hashes(again.root)
    assert len(first) > 80
    assert first == second
    other = _hashes(build_synth_corpus(tmp_path / "other", seed=1, size="small").root)
    assert set(other) == set(first)  # same layout ...
    wavs = [k for k in first if k.endswith(".wav")]
    assert all(other[k] != first[k] for k in wavs)  # ... different audio
    for name in ("stage3_sft_train.json", "test_mmau.json"):
        assert other[name] != first[name]


def test_manifests_have_the_desta_format_and_real_audio(corpus, records):
    seen = set()
    for (stage, _split), items in records.items():
        assert items, stage
        for r in items:
            assert DESTA_KEYS <= set(r)
            assert r["dataset"] == "diffa2-synth"
            assert r["seed_transcript"].startswith("[00:00-00:02] (") or r["seed_transcript"].startswith(
                f"[00:00-00:02] {r['transcription']} ("
            )
            if r["audio_filepath"] in seen:
                continue
            seen.add(r["audio_filepath"])
            info = sf.info(str(corpus.root / r["audio_filepath"]))
            assert (info.samplerate, info.channels, info.subtype, info.format) == (
                SAMPLE_RATE,
                1,
                "PCM_16",
                "WAV",
            )
            assert info.frames / info.samplerate == pytest.approx(r["duration"], abs=1e-9)
    assert len(seen) >= 30


def test_json_and_jsonl_hold_the_same_records(corpus):
    paths = [corpus.manifest(s, sp) for s in STAGES for sp in ("train", "validation")] + [corpus.test_mmau]
    for path in paths:
        as_list = json.loads(path.read_text())
        lines = path.with_suffix(".jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == as_list


def test_stage_contents(records):
    for split in ("train", "validation"):
        for r in records[("stage1_asr", split)]:
            assert r["input"] == "Please transcribe the audio to text."
            assert r["target"] == r["transcription"] and 1 <= len(r["target"].split()) <= 3
        stage2_kinds = {r["kind"] for r in records[("stage2_acoustic", split)]}
        assert "Spoken Content" not in stage2_kinds and "Caption" in stage2_kinds
    assert {r["kind"] for r in records[("stage3_sft", "train")]} == set(QUESTION_KINDS)
    # several phrasings per kind, and some items in the multiple-choice format
    stage3 = records[("stage3_sft", "train")]
    assert any(r["input"].startswith("You are given the audio") for r in stage3)
    assert len({r["input"] for r in stage3 if r["kind"] == "Pitch" and "\n" not in r["input"]}) >= 2


def test_answers_agree_with_the_rendered_attributes(records):
    """The target of every attribute question is the attribute written in the seed transcript."""
    as_word = {"1": "one", "2": "two", "3": "three", "4": "four"}
    field = {"Pitch": "pitch", "Tempo": "tempo", "Loudness": "loudness", "Background Noise": "noise",
             "Event Counting": "beeps"}
    for items in records.values():
        for r in items:
            if r["kind"] in field:
                value = re.search(field[r["kind"]] + r": (\w+)", r["seed_transcript"]).group(1)
                assert r["target"] == as_word.get(value, value) if r["kind"] == "Event Counting" else value
            elif r["kind"] == "Spoken Content":
                assert r["target"] == r["transcription"]
            if r["kind"] in QUESTION_KINDS and r["kind"] != "Spoken Content":
                assert r["target"] in QUESTION_KINDS[r["kind"]].values


def test_preference_pairs_differ_minimally(records):
    for split in ("train", "validation"):
        items = records[("stage4_pref", split)]
        assert items
        for r in items:
            assert r["chosen"] == r["target"]
            assert r["rejected"] != r["chosen"]
            a, b = r["chosen"].split(), r["rejected"].split()
            assert len(a) == len(b)
            assert sum(x != y for x, y in zip(a, b, strict=True)) == 1
            kind = QUESTION_KINDS[r["kind"]]
            if kind.values is not None:
                assert r["rejected"] in kind.values
            if "\nChoices:\n" in r["input"]:  # multiple choice: the rejected answer is one of the options
                assert f". {r['rejected']}\n" in r["input"]


def test_mmau_test_split(corpus, test_items, records):
    assert len(test_items) == 4 * len(QUESTION_KINDS)
    train_audio = {r["audio_filepath"] for items in records.values() for r in items}
    train_hashes = {hashlib.sha256((corpus.root / p).read_bytes()).hexdigest() for p in train_audio}
    ids = set()
    for r in test_items:
        assert set(r) == MMAU_KEYS
        assert r["answer"] in r["choices"] and 2 <= len(r["choices"]) <= 4
        assert len(set(r["choices"])) == len(r["choices"])
        assert r["split"] == "test-mini" and r["task"] in {"sound", "music", "speech"}
        assert r["difficulty"] in {"easy", "medium", "hard"}
        kind = QUESTION_KINDS[r["sub-category"]]
        assert r["task"] == kind.task and r["question"] == kind.phrasings[0]
        if kind.values is not None:
            assert sorted(r["choices"]) == sorted(kind.values)
        # under the official string match only the exact answer scores: no wrong option has its word set
        for c in r["choices"]:
            if c != r["answer"]:
                assert _words(c) != _words(r["answer"])
        path = corpus.root / r["audio_id"]
        assert path.is_file() and r["audio_id"] not in train_audio
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in train_hashes
        ids.add(r["id"])
    assert len(ids) == len(test_items)


def test_chance_hand_case_and_corpus_info(corpus, test_items, records):
    hand = [
        {"choices": ["a", "b"], "sub-category": "X", "task": "sound"},
        {"choices": ["a", "b", "c", "d"], "sub-category": "Y", "task": "sound"},
        {"choices": ["a", "b", "c", "d"], "sub-category": "Y", "task": "speech"},
    ]
    ch = chance_accuracy(hand)
    assert ch["overall"] == pytest.approx((0.5 + 0.25 + 0.25) / 3, abs=1e-6)
    assert ch["by_sub_category"] == {"X": 0.5, "Y": 0.25}
    assert ch["by_task"] == {"sound": pytest.approx(0.375), "speech": 0.25}

    info = corpus.info
    assert info["seed"] == 0 and info["format_version"] == synth.FORMAT_VERSION
    assert info["chance"] == chance_accuracy(test_items)
    assert info["chance"]["by_sub_category"]["Pitch"] == pytest.approx(1 / 3, abs=1e-6)
    assert info["chance"]["by_sub_category"]["Event Counting"] == 0.25
    assert info["vocabulary"] == list(synth.VOCABULARY)
    assert set(info["question_kinds"]) == set(QUESTION_KINDS)
    for (stage, split), items in records.items():
        assert info["counts"][stage][split]["items"] == len(items)
    assert info["counts"]["test_mmau"]["items"] == len(test_items)


def test_ensure_builds_only_when_missing_or_incomplete(tmp_path, monkeypatch):
    root = tmp_path / "c"
    built = []
    real_build = synth.build_synth_corpus

    def counting_build(*args, **kwargs):
        built.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr("diffa2.data.synth.build.build_synth_corpus", counting_build)
    ensure_synth_corpus(root, seed=0, size="small")
    assert len(built) == 1 and is_complete(root, 0, "small")
    ensure_synth_corpus(root, seed=0, size="small")
    assert len(built) == 1  # complete: reused
    next(root.glob("audio/train/*.wav")).unlink()  # damaged
    assert not is_complete(root, 0, "small")
    ensure_synth_corpus(root, seed=0, size="small")
    assert len(built) == 2
    (root / COMPLETE_MARKER).unlink()  # an interrupted build never wrote its marker
    ensure_synth_corpus(root, seed=0, size="small")
    assert len(built) == 3
    ensure_synth_corpus(root, seed=1, size="small")  # another seed is another corpus
    assert len(built) == 4 and json.loads((root / "corpus_info.json").read_text())["seed"] == 1


def test_command_line_prints_a_summary(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "c"), "--seed", "3", "--small"]) == 0
    out = capsys.readouterr().out
    assert "test_mmau.json" in out and "chance accuracy" in out and "tokenizer" in out and "time:" in out
    assert is_complete(tmp_path / "c", 3, "small")


# ---- the audio really carries the labels (pure numpy, no feature extractor) ----


def _band_level(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(spec[(f >= lo) & (f < hi)].sum())


def _render(family: str, **attrs) -> np.ndarray:
    base = {"loudness": "loud", "noise": False}
    base.update(attrs)
    return render_clip(np.random.default_rng(7), family, base).astype(np.float64) / 32767


def test_beep_count_is_audible():
    for count in (1, 2, 3, 4):
        x = _render("sound", count=count, pitch="medium")
        env = np.abs(x).reshape(-1, 160).max(1) > 10 * PILOT_AMP  # 10 ms frames above the pilot
        onsets = int(np.sum(np.diff(env.astype(int)) == 1))
        assert onsets == count


def test_pitch_loudness_noise_and_pilot_are_where_designed():
    for pitch, (lo, hi) in {"low": (200, 300), "medium": (690, 950), "high": (2150, 3000)}.items():
        x = _render("music", tempo="slow", pitch=pitch)
        fund = _band_level(x, lo, hi)
        for other_lo, other_hi in ((200, 300), (690, 950), (2150, 3000)):
            if (other_lo, other_hi) != (lo, hi):
                assert fund > 10 * _band_level(x, other_lo, other_hi)
    # loudness: events vs the constant pilot, ~20 dB apart between classes whatever the overall gain
    ratios = {}
    for loudness in ("quiet", "loud"):
        x = _render("sound", count=4, pitch="low", loudness=loudness)
        ratios[loudness] = _band_level(x, 150, 400) / _band_level(x, PILOT_HZ - 50, PILOT_HZ + 50)
    assert ratios["loud"] > 30 * ratios["quiet"]
    # background noise: energy between the tones, where a clean clip has none
    gap = {
        noise: _band_level(_render("sound", count=1, pitch="low", noise=noise), 4000, 6000)
        for noise in (0, 1)
    }
    assert gap[1] > 1000 * (gap[0] + 1e-12)
    # speech: the two tones of each word
    x = _render("speech", words=("red",))
    lo, hi = synth.WORD_TONES["red"]
    assert _band_level(x, lo - 30, lo + 30) > 100 * _band_level(x, 560, 640)
    assert _band_level(x, hi - 60, hi + 60) > 100 * _band_level(x, 1780, 1920)


def test_concurrent_ensure_builds_once(tmp_path, monkeypatch):
    built = []
    real_build = synth.build_synth_corpus

    def counting_build(*args, **kwargs):
        built.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr("diffa2.data.synth.build.build_synth_corpus", counting_build)

    def ensure(_):
        return ensure_synth_corpus(tmp_path / "c", seed=0, size="small").root

    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(ensure, range(2)))
    assert roots[0] == roots[1] and len(built) == 1
    assert is_complete(tmp_path / "c", 0, "small")


def test_tempo_is_the_note_rate():
    def onsets(x):
        env = np.abs(x).reshape(-1, 160).max(1) > 10 * PILOT_AMP
        return int(np.sum(np.diff(env.astype(int)) == 1))

    for pitch in ("low", "medium", "high"):
        assert 3 <= onsets(_render("music", tempo="slow", pitch=pitch)) <= 5
        assert onsets(_render("music", tempo="fast", pitch=pitch)) >= 11
