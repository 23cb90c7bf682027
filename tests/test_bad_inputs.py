"""Bad data of issues #8 and #15 and what it gets, as one table (the rows and their check: tests/bad_inputs.py).

Audio and manifests go through the training data path (load_split + AudioInstructionDataset, which skips and
counts), benchmark files through `validate` or the runner. Configs, checkpoints, options and output folders are in
tests/test_bad_inputs_setup.py.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from bad_inputs import Case, Ctx, check

from diffa2.audio import load_audio
from diffa2.data.dataset import AudioInstructionDataset
from diffa2.data.recipe import DataSource, load_split
from diffa2.eval.loaders import read_records, validate
from diffa2.eval.specs import load_spec

WINDOW = 30.0


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def record(audio: object = "good.wav", **extra) -> dict:
    return {"audio_filepath": audio, "input": "What is the pitch?", "target": "high"} | extra


def train_on(ctx: Ctx, lines: list[str | bytes]) -> tuple[AudioInstructionDataset, list[str]]:
    """Manifest lines (line 1 a good record) through the training data path; every item is read once."""
    audio = ctx.tmp / "audio"
    audio.mkdir(exist_ok=True)
    sf.write(audio / "good.wav", tone(1.0, 16000), 16000)
    manifest = ctx.tmp / "train.jsonl"
    encoded = [line if isinstance(line, bytes) else line.encode() for line in [json.dumps(record()), *lines]]
    manifest.write_bytes(b"\n".join(encoded) + b"\n")
    items, problems = load_split([DataSource(path=str(manifest), audio_root=str(audio))], synth_dir=None, seed=0,
                                 on_error="skip")
    dataset = AudioInstructionDataset(items, WINDOW)
    for i in range(len(dataset)):
        dataset[i]
    return dataset, problems


def audio_row(write: Callable[[Path], None]) -> Callable[[Ctx], object]:
    """A row whose second manifest line points at the file `write` creates: skip messages, or what was loaded."""

    def run(ctx: Ctx) -> object:
        (ctx.tmp / "audio").mkdir(exist_ok=True)
        write(ctx.tmp / "audio" / "clip.wav")
        dataset, _ = train_on(ctx, [json.dumps(record("clip.wav"))])
        if dataset.stats.skipped:
            return list(dataset.stats.skipped.values())
        wave = dataset.load_wave(dataset.items[1])
        assert wave.dtype == np.float32 and np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
        cut = "trimmed" if dataset.stats.trimmed else "kept"
        return f"{len(wave)} samples at 16 kHz, {cut}"

    return run


def manifest_row(line: str | bytes) -> Callable[[Ctx], object]:
    """A row whose second manifest line is `line`: the problems and skip messages of the training data path."""

    def run(ctx: Ctx) -> object:
        dataset, problems = train_on(ctx, [line])
        return problems + list(dataset.stats.skipped.values())

    return run


def write_wav(seconds: float, rate: int, *, channels: int = 1, subtype: str | None = None, nan: bool = False):
    def write(path: Path) -> None:
        data = tone(seconds, rate, channels)
        if nan:
            data[10] = np.nan
        sf.write(path, data, rate, subtype=subtype)

    return write


def write_two_hours(path: Path) -> None:
    """2 hours of 8 kHz 8-bit mono (58 MB, the smallest real WAV of that length), written block by block."""
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_U8") as handle:
        block = (tone(600, 8000) * 32767).astype(np.int16)
        for _ in range(12):
            handle.write(block)


def two_hour_run(ctx: Ctx) -> object:
    """The 2-hour clip is trimmed to the window and counted, decoding only the window (checked with tracemalloc)."""
    sf.write(ctx.tmp / "warm.wav", tone(0.5, 8000), 8000)
    load_audio(ctx.tmp / "warm.wav")  # imports and first-call set-up are not the clip's memory
    (ctx.tmp / "audio").mkdir()
    write_two_hours(ctx.tmp / "audio" / "clip.wav")
    tracemalloc.start()
    try:
        description = audio_row(lambda path: None)(ctx)  # the clip is written already
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB: the whole file was decoded (2 h at 16 kHz is 460 MB)"
    return description


MMAR_RECORD = {"id": "m1", "audio_path": "./audio/m1.wav", "question": "Which?", "choices": ["a", "b"],
               "answer": "a", "modality": "sound", "category": "Signal Layer", "sub-category": "x"}
MMSU_RECORD = {"id": "s1", "audio_path": "s1.wav", "question": "Which?", "choice_a": "a", "choice_b": "b",
               "choice_c": None, "choice_d": None, "answer_gt": "a", "category": "Perception",
               "sub-category": "x", "sub-sub-category": "y"}


def benchmark_row(records: list[dict], suffix: str, benchmark: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        path = ctx.tmp / f"meta{suffix}"
        path.write_text("".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records))
        return validate(read_records(path), load_spec(benchmark), for_run=True, source=str(path))

    return run


def conversation_item(history: object) -> Callable[[Ctx], object]:
    """A synth benchmark file whose one record carries `history` (docs/conversations.md), loaded for a run."""

    def run(ctx: Ctx) -> object:
        from diffa2.eval.core import load_items

        record = {"id": "c1", "audio_id": "a.wav", "question": "Which?", "choices": ["one", "two"], "answer": "one",
                  "history": history}
        path = ctx.tmp / "multiturn.json"
        path.write_text(json.dumps([record]))
        return load_items(load_spec("synth"), path, ctx.tmp)

    return run


def eval_without_audio(ctx: Ctx) -> object:
    from diffa2.eval.runner import RunOptions, run_benchmark

    path = ctx.tmp / "mmar.jsonl"
    path.write_text(json.dumps(MMAR_RECORD) + "\n")
    options = RunOptions(benchmark="mmar", model=str(ctx.checkpoint), data=str(path), out=str(ctx.tmp / "out"),
                         audio_root=str(ctx.tmp / "wrong"), progress=False)
    return run_benchmark(options, log=lambda _: None)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

ONE_SECOND = "16000 samples at 16 kHz, kept"
CASES = [
    # audio (training data path: a bad clip is skipped, counted and replaced; the message names file and line)
    Case("audio: corrupt", "skipped", "cannot be decoded by libsndfile",
         audio_row(lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 50))),
    Case("audio: empty file (0 bytes)", "skipped", "clip.wav: is empty (0 bytes)", audio_row(lambda p: p.touch())),
    Case("audio: zero-length (header, no samples)", "skipped", "contains no samples (zero-length audio)",
         audio_row(write_wav(0, 16000))),
    Case("audio: NaN-valued samples", "skipped", "contains 1 NaN/inf sample values",
         audio_row(write_wav(1, 16000, subtype="FLOAT", nan=True))),
    Case("audio: 8-bit PCM", "accepted", ONE_SECOND, audio_row(write_wav(1, 16000, subtype="PCM_U8"))),
    Case("audio: 6 channels", "accepted", ONE_SECOND, audio_row(write_wav(1, 16000, channels=6))),
    Case("audio: 192 kHz", "accepted", ONE_SECOND, audio_row(write_wav(1, 192000))),
    Case("audio: 2 hours", "trimmed", "480000 samples at 16 kHz, trimmed", two_hour_run),
    Case("audio: missing file", "skipped", "clip.wav: file not found", audio_row(lambda p: None)),
    # manifests (training data path: on_bad_record=skip, the default; 'raise' gives the same text as an error)
    Case("manifest: bad JSON line", "skipped", "train.jsonl:2: invalid JSON", manifest_row('{"input": "q",')),
    Case("manifest: missing field", "skipped", "train.jsonl:2: missing field(s) ['target']",
         manifest_row(json.dumps({"audio_filepath": "good.wav", "input": "q"}))),
    Case("manifest: wrong type (text field)", "skipped",
         "train.jsonl:2: field(s) ['target'] must be strings, got ['int']", manifest_row(json.dumps(record(target=3)))),
    Case("manifest: wrong type (audio field)", "skipped",
         "train.jsonl:2: field 'audio_filepath' must be a path string or an HF audio cell",
         manifest_row(json.dumps(record(audio=5)))),
    Case("manifest: not UTF-8", "skipped", "train.jsonl:2: not UTF-8 text", manifest_row(b'{"input": "\xff"}')),
    Case("manifest: path outside the audio root", "skipped",
         "is outside the audio root", manifest_row(json.dumps(record(audio="../../etc/passwd")))),
    # multi-turn records (docs/conversations.md): skipped like any bad record, the message says what is wrong
    Case("manifest: multi-turn ending with a user turn", "skipped",
         "train.jsonl:2: multi-turn record: field 'messages': the last turn must be the assistant's answer",
         manifest_row(json.dumps({"messages": [{"role": "user", "content": [
             {"type": "audio", "audio": "good.wav"}, {"type": "text", "text": "q"}]}]}))),
    Case("manifest: multi-turn pair without its answer", "skipped",
         "train.jsonl:2: multi-turn record: field 'conversation'[1] must be an object with string fields "
         "['input', 'target']",
         manifest_row(json.dumps({"audio_filepath": "good.wav", "conversation": [
             {"input": "q1", "target": "a1"}, {"input": "q2"}]}))),
    Case("manifest: multi-turn audio part without a path", "skipped",
         "train.jsonl:2: multi-turn record: messages[0].content[0] must be {'type': 'text', 'text': str} or "
         "{'type': 'audio', 'audio': path}",
         manifest_row(json.dumps({"messages": [{"role": "user", "content": [{"type": "audio"}, "q"]},
                                               {"role": "assistant", "content": "a"}]}))),
    Case("manifest: multi-turn without a clip", "skipped",
         "train.jsonl:2: multi-turn record: field 'messages': every audio part must be a path string or an HF "
         "audio cell, and the conversation needs at least one clip",
         manifest_row(json.dumps({"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}))),
    Case("manifest: multi-turn clip outside the audio root", "skipped", "is outside the audio root",
         manifest_row(json.dumps({"messages": [
             {"role": "user", "content": [{"type": "audio", "audio": "good.wav"}, "q1"]},
             {"role": "assistant", "content": "a1"},
             {"role": "user", "content": [{"type": "audio", "audio": "../../etc/passwd"}, "q2"]},
             {"role": "assistant", "content": "a2"}]}))),
    # benchmark files
    Case("benchmark: MMAR metadata as MMAU", "error",
         "every record has the fields of mmar_jsonl data (audio_path, modality), not of mmau_json (mmau): wrong "
         "benchmark? use --benchmark mmar", benchmark_row([MMAR_RECORD], ".jsonl", "mmau")),
    Case("benchmark: MMSU metadata as MMAR", "error", "wrong benchmark? use --benchmark mmsu",
         benchmark_row([MMSU_RECORD], ".jsonl", "mmar")),
    Case("benchmark: conversation history ending with a question", "error",
         "multiturn.json[0]: field 'history' holds user/assistant turns ending with an answer",
         conversation_item([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, "q"]}])),
    Case("benchmark: conversation history with a bad part", "error",
         "multiturn.json[0]: field 'history': messages[0].content[0] must be {'type': 'text', 'text': str}",
         conversation_item([{"role": "user", "content": [{"type": "image"}]}])),
    Case("benchmark: no audio under --audio-root", "error", "none of the 1 audio files was found under ",
         eval_without_audio),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, checkpoint, chat):
    check(case, Ctx(tmp_path, checkpoint, chat))
