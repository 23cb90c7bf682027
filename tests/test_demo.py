"""The Gradio demo: the answer function on audio files (good and bad), checkpoints, training progress, the
command line, and the launched app through gradio_client.

The tiny checkpoint has random weights, so answers are garbage; the tests check the pipeline and the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import clip

from diffa2.audio import load_audio
from diffa2.data.synth import ANSWER_TOKENS
from diffa2.demo import answer as answer_module
from diffa2.demo.answer import (
    END_GLYPH,
    MASK_GLYPH,
    MAX_QUESTION_CHARS,
    DecodeSettings,
    Update,
    answer_clip,
    batcher_for,
    load_model,
    model_info,
    render_canvas,
)
from diffa2.demo.checkpoints import count_label
from diffa2.demo.examples import EXAMPLE_QUESTIONS, example_clips
from diffa2.demo.training import TrainingFailed, parse_progress, run_training
from diffa2.diffusion.decoding import DEFAULT_MODE, PRESETS, DecodeConfig
from diffa2.runs import checkpoint_choices, default_checkpoint, find_checkpoints, is_embedded_default

REPO = Path(__file__).resolve().parents[1]
FAST = DecodeSettings(gen_length=8, block_length=8, steps=4)  # four forward passes per answer
QUESTION = "What is the pitch of the sound?"



def write_wav(path: Path, wave: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, 16000)
    return path


async def collect(audio, question=QUESTION, checkpoint=None, settings=FAST, **kwargs) -> list[Update]:
    return [u async for u in answer_clip(None if audio is None else str(audio), question, checkpoint, settings,
                                         **kwargs)]


def run(audio, question=QUESTION, checkpoint=None, settings=FAST, **kwargs) -> list[Update]:
    return asyncio.run(collect(audio, question, checkpoint, settings, **kwargs))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(options) -> Iterator[str]:
    """The demo launched in this process on 127.0.0.1 and a free port; yields its URL, closes it afterwards."""
    from diffa2.demo.ui import launch

    app = launch(options, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield app.local_url
    finally:
        app.close()


def install_checkpoint(checkpoint: Path, runs: Path, stage: str = "sft") -> Path:
    """A copy of a checkpoint where a stage run would have written it."""
    return Path(shutil.copytree(checkpoint, runs / stage / "final"))


# -- the answer function on audio files -------------------------------------------------------------------------


def test_answer_streams_the_unmasking_then_the_answer(tmp_path, checkpoint):
    wav = write_wav(tmp_path / "tone.wav", clip(1.5))
    updates = run(wav, checkpoint=str(checkpoint))
    frames, last = updates[:-1], updates[-1]
    assert len(frames) == FAST.steps + 1 and last.done and not any(u.done for u in frames)
    masked = [u.text.count(MASK_GLYPH) for u in frames]
    assert masked == [8, 6, 4, 2, 0]  # the all-masked canvas first, then 2 of the 8 positions committed per step
    assert frames[0].text == MASK_GLYPH * 8 and "NFE 0, 8 of 8 positions masked" in frames[0].status
    assert "NFE 1," in frames[1].status and "Done: NFE 4," in last.status
    qa = load_model(str(checkpoint))
    direct = qa.answer([load_audio(wav)], [QUESTION], FAST.to_config())
    assert last.text == direct.texts[0]
    assert MASK_GLYPH not in last.text and END_GLYPH not in last.text
    assert batcher_for(qa).trace  # decoded by the model's continuous batcher, the server's answer path


def test_kv_cache_settings_decode_with_the_static_path(tmp_path, checkpoint):
    wav = write_wav(tmp_path / "tone.wav", clip(1.5))
    settings = DecodeSettings(gen_length=8, block_length=4, steps=4, cache="prefix")
    updates = run(wav, checkpoint=str(checkpoint), settings=settings)
    direct = load_model(str(checkpoint)).answer([load_audio(wav)], [QUESTION], settings.to_config())
    assert updates[0].text == MASK_GLYPH * 8 and updates[-1].text == direct.texts[0]
    assert updates[-1].status.startswith(f"Done: NFE {direct.nfe},")


def test_visitors_share_forwards_and_pauses_hold_no_thread(tmp_path, checkpoint):
    wav = write_wav(tmp_path / "tone.wav", clip(1.5))
    qa = load_model(str(checkpoint))
    engine = batcher_for(qa)
    seen = len(engine.trace)

    async def two_visitors() -> tuple[list[list[Update]], float]:
        start = asyncio.get_running_loop().time()
        both = await asyncio.gather(*(collect(wav, q, str(checkpoint), delay=0.3) for q in (QUESTION, "Is it loud?")))
        return both, asyncio.get_running_loop().time() - start

    (first, second), seconds = asyncio.run(two_visitors())
    assert first[-1].status.startswith("Done: NFE 4,") and second[-1].status.startswith("Done: NFE 4,")
    # 5 frames each, 0.3 s apart: 1.5 s per visitor; both on one event loop thread, so the pauses overlap
    assert 1.5 <= seconds < 2.6
    assert max(len(record.rows) for record in list(engine.trace)[seen:]) == 2  # one forward served both


def test_too_long_question_is_refused_with_the_limit(tmp_path, checkpoint):
    wav = write_wav(tmp_path / "tone.wav", clip(1.0))
    updates = run(wav, "x" * (MAX_QUESTION_CHARS + 1), str(checkpoint))
    assert [u.status for u in updates] == [f"⚠ The question is {MAX_QUESTION_CHARS + 1} characters long, over the "
                                           f"limit of {MAX_QUESTION_CHARS}; shorten it."]
    assert run(wav, "x" * MAX_QUESTION_CHARS, str(checkpoint))[-1].status.startswith("Done: NFE 4,")


def test_model_info_says_size_training_and_what_it_answers(tmp_path, checkpoint):
    final = install_checkpoint(checkpoint, tmp_path / "runs")
    parameters = sum(p.numel() for p in load_model(str(final)).model.parameters())
    info = model_info(str(final))
    assert info.startswith(f"**{final}**: {count_label(parameters)} parameters.")
    assert "tiny embedded default, trained from scratch on the built-in synthetic audio corpus" in info
    assert "(Spoken Content, Event Counting, Pitch, Tempo, Loudness, Background Noise) in 4 answer tokens" in info
    assert "No summary.json beside it" in info
    summary = {"stage": "sft", "steps": 1200, "test": {"accuracy": 98.9}}
    (final.parent / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    assert info.replace("No summary.json beside it: how it was trained is not recorded.",
                        "Trained by the `sft` stage for 1200 steps; 98.9 % on its test split (summary.json of the "
                        "run).") == model_info(str(final))
    assert model_info(str(tmp_path)).startswith("⚠ ") and "is not a DIFFA-2 checkpoint" in model_info(str(tmp_path))
    assert [count_label(n) for n in (999, 1234, 1_340_000, 8_000_000_000)] == ["999", "1.23 k", "1.34 M", "8 B"]


def test_warm_up_makes_the_first_resampled_clip_fast(tmp_path):
    wav = tmp_path / "cd.wav"
    sf.write(wav, clip(1.0), 44100)  # not 16 kHz: resampled
    script = textwrap.dedent(f"""
        import sys, time
        from diffa2.audio import load_audio
        from diffa2.demo.answer import warm_up
        if sys.argv[1] == "warm":
            warm_up()
        start = time.perf_counter()
        load_audio({str(wav)!r})
        print(time.perf_counter() - start)
    """)
    seconds = {}
    for how in ("cold", "warm"):
        out = subprocess.run([sys.executable, "-c", script, how], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        seconds[how] = float(out.stdout)
    # librosa imports scipy.signal on its first resample (about a second or more): warm_up pays it at startup
    assert seconds["warm"] < 0.2 < seconds["cold"], seconds


def test_answer_on_synthetic_corpus_examples(small_corpus, checkpoint):
    rows, kinds = example_clips(small_corpus)
    assert len(rows) == len(kinds) == len(EXAMPLE_QUESTIONS) == 6
    assert all(Path(path).is_file() and question in EXAMPLE_QUESTIONS for path, question in rows)
    path, question = rows[kinds.index("Pitch")]
    last = run(path, question, str(checkpoint))[-1]
    assert last.done and last.status.startswith("Done: NFE 4,")


def test_too_long_clip_is_trimmed_with_a_notice(tmp_path, checkpoint):
    window = load_model(str(checkpoint)).model.config.window_seconds
    wav = write_wav(tmp_path / "long.wav", clip(window + 2.5))
    last = run(wav, checkpoint=str(checkpoint))[-1]
    assert f"The clip is {window + 2.5:.1f} s long; only its first {window:g} s" in last.status
    assert "Done: NFE 4," in last.status


def bad_inputs(tmp: Path) -> dict[str, tuple[dict, str]]:
    """Case name -> (arguments of `run` besides the checkpoint, the message expected in the page)."""
    text = tmp / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    empty = tmp / "empty.wav"
    empty.write_bytes(b"")
    no_samples = write_wav(tmp / "no_samples.wav", np.zeros(0, np.float32))
    silent = write_wav(tmp / "silent.wav", np.zeros(16000, np.float32))
    tone = write_wav(tmp / "tone.wav", clip(1.0))
    (tmp / "nothing").mkdir()
    return {
        "non-audio file": ({"audio": text}, "Could not read the audio: notes.wav: cannot be decoded by libsndfile "
                           "(Error opening 'notes.wav': Format not recognised.); expected a wav/flac/ogg/mp3 file."),
        "empty file": ({"audio": empty},
                       "Could not read the audio: empty.wav: is empty (0 bytes); expected an encoded audio file."),
        "zero-length clip": ({"audio": no_samples}, "Could not read the audio: no_samples.wav: contains no samples"),
        "silent clip": ({"audio": silent}, "silent.wav is silent (its loudest sample is -inf dBFS)"),
        "too large": ({"audio": tone, "max_bytes": 10_000},
                      "tone.wav is 0.0306 MB, over the upload limit of 0.00954 MB"),
        "no clip": ({"audio": None}, "Upload an audio file or record one"),
        "no question": ({"audio": tone, "question": "  "}, "Type a question"),
        "no checkpoint": ({"audio": tone, "checkpoint": None}, "No checkpoint selected"),
        "not a checkpoint": ({"audio": tone, "checkpoint": str(tmp / "nothing")}, "is not a DIFFA-2 checkpoint"),
        "bad settings": ({"audio": tone, "settings": DecodeSettings(gen_length=10, block_length=4, steps=4)},
                         "Decoding settings: gen_length 10 is not a multiple of block_length 4"),
        "two parallel rules": ({"audio": tone, "settings": DecodeSettings(threshold=0.9, factor=1)},
                               "Decoding settings: threshold and factor are alternative parallel rules"),
    }


@pytest.mark.parametrize("case", ["non-audio file", "empty file", "zero-length clip", "silent clip", "too large",
                                  "no clip", "no question", "no checkpoint", "not a checkpoint", "bad settings",
                                  "two parallel rules"])
def test_bad_input_gives_one_message_not_an_exception(case, tmp_path, checkpoint):
    kwargs, expected = bad_inputs(tmp_path)[case]
    updates = run(**{"checkpoint": str(checkpoint)} | kwargs)
    assert len(updates) == 1 and updates[0].done and updates[0].text == ""
    assert updates[0].status.startswith("⚠ ") and expected in updates[0].status
    assert "Traceback" not in updates[0].status


def test_unexpected_error_is_one_line_in_the_page(tmp_path, checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(answer_module.AudioQA, "prefix", broken)  # the batcher's prompt encoder
    updates = run(write_wav(tmp_path / "t.wav", clip(1.0)), checkpoint=str(checkpoint))
    assert [u.text.count(MASK_GLYPH) for u in updates] == [8, 0]  # the masked canvas, then the message
    assert updates[-1].status == "⚠ Internal error (RuntimeError: boom); the details are in the server log."


def test_render_canvas_shows_masks_and_end_tokens(chat):
    high, low = (chat.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("high", " low"))
    ids = chat.ids
    canvas = [*high, ids.mask, *low, ids.eot, ids.mask, ids.eos]
    assert render_canvas(canvas, chat) == f"high{MASK_GLYPH} low{END_GLYPH}{MASK_GLYPH}{END_GLYPH}"
    assert render_canvas([ids.mask] * 3, chat) == MASK_GLYPH * 3


# -- decoding settings ---------------------------------------------------------------------------------------


def test_settings_map_onto_decode_config():
    settings = DecodeSettings(gen_length=16, block_length=8, steps=8, threshold=0.8, cache="dual", eos_early_exit=True)
    expected = DecodeConfig(gen_length=16, block_length=8, steps=8, threshold=0.8, cache="dual", eos_early_exit=True)
    assert settings.to_config() == expected
    assert DecodeSettings(factor=1.5).to_config().factor == 1.5 and DecodeSettings().to_config().threshold is None


@pytest.mark.parametrize("mode", sorted(PRESETS))
def test_every_named_mode_fills_the_speed_controls(mode):
    n = ANSWER_TOKENS  # the embedded default's answer length, which the synth benchmark decodes with
    assert DecodeSettings.from_mode(mode).to_config() == DecodeConfig.preset(mode, gen_length=n, block_length=n,
                                                                              steps=n)


# -- checkpoints ----------------------------------------------------------------------------------------------


def test_default_checkpoint_is_the_latest_embedded_default(tmp_path, checkpoint):
    runs = tmp_path / "runs"
    assert find_checkpoints(runs) == [] and default_checkpoint(runs) is None
    older = install_checkpoint(checkpoint, runs, "acoustic")
    newer = install_checkpoint(checkpoint, runs, "sft")
    real = install_checkpoint(checkpoint, runs, "real")
    config = real / "config.json"
    config.write_text(config.read_text().replace('"encoder_source": null', '"encoder_source": "/models/whisper"'))
    for age, directory in enumerate((real, newer, older)):  # real newest, then sft, then acoustic
        stamp = 2_000_000_000 - 100 * age
        os.utime(directory / "config.json", (stamp, stamp))
    assert find_checkpoints(runs) == [real, newer, older]
    assert not is_embedded_default(real) and is_embedded_default(newer)
    assert default_checkpoint(runs) == str(newer)
    assert default_checkpoint(runs, "/elsewhere/ckpt") == "/elsewhere/ckpt"
    assert checkpoint_choices(runs, str(older)) == [str(older), str(real), str(newer)]


# -- training the tiny default from the page --------------------------------------------------------------------


def fake_training(copy_from: Path | None, runs: Path, code: int = 0) -> list[str]:
    """A command printing what the SFT stage prints (tqdm bars redrawn with \\r) and, if given, writing a
    checkpoint to <runs>/sft/final."""
    script = textwrap.dedent(f"""
        import shutil, sys
        print("[sft] model: tiny preset, random initialisation", flush=True)
        for n in range(0, 5):
            sys.stderr.write(f"\\r{{n * 25:3d}}%|##        | {{n}}/4 [00:0{{n}}<00:04,  1.00it/s]")
            sys.stderr.flush()
        sys.stderr.write("\\rtest:  50%|#####     | 1/2 [00:01<00:01,  1.00batch/s]\\n")
        if {str(copy_from)!r} != "None":
            shutil.copytree({str(copy_from)!r}, {str(runs / "sft" / "final")!r})
        print("synthetic test accuracy: 42.0%", flush=True)
        sys.exit({code})
    """)
    return [sys.executable, "-c", script]


def test_training_progress_is_parsed_from_the_stage_output(tmp_path):
    reports = list(run_training(fake_training(None, tmp_path), tmp_path))
    fractions = [r.fraction for r in reports if r.fraction is not None]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]
    assert reports[0].message == "[sft] model: tiny preset, random initialisation"
    assert [r.message for r in reports][-3:] == ["training step 4/4", "evaluating (test) 1/2",
                                                 "synthetic test accuracy: 42.0%"]


def test_failed_training_reports_its_last_lines(tmp_path):
    with pytest.raises(TrainingFailed, match=r"exited with code 3(.|\n)*synthetic test accuracy"):
        list(run_training(fake_training(None, tmp_path, code=3), tmp_path))


def test_progress_of_real_tqdm_lines():
    line = " 12%|█▏        | 96/800 [00:31<03:50,  3.04it/s]"
    assert parse_progress(line).fraction == pytest.approx(0.12) and parse_progress(line).message.endswith("96/800")
    assert parse_progress("{'loss': 1.5, 'epoch': 0.1}").fraction is None


# -- command line and the launched app -------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [["demo/app.py"], ["-m", "diffa2.demo"]])
def test_command_line_help(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--share", "--model", "--runs_dir", "--max_upload_mb", "127.0.0.1"):
        assert flag in out.stdout


@pytest.mark.parametrize("argv", [[], ["--allow_training"], ["--allow-training"]])
def test_train_button_only_with_allow_training(argv, tmp_path, small_corpus):
    from diffa2.demo.cli import parse_args
    from diffa2.demo.ui import DemoOptions, build_app

    allowed = parse_args(argv).allow_training
    assert allowed == bool(argv)
    app = build_app(DemoOptions(runs_dir=tmp_path / "runs", examples_dir=small_corpus, allow_training=allowed))
    (button,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "train"]
    events = {fn.api_name: fn for fn in app.fns.values()}
    assert button.visible is allowed and ("train" in events) is allowed
    assert events["answer"].concurrency_limit == 8  # answers share the batcher (MAX_BATCH) instead of queueing


def test_gradio_client_answers_and_reports_bad_input(tmp_path, checkpoint, small_corpus):
    from gradio_client import Client, handle_file

    from diffa2.demo.ui import DemoOptions

    runs = tmp_path / "runs"
    final = install_checkpoint(checkpoint, runs)
    rows, kinds = example_clips(small_corpus)
    path, question = rows[kinds.index("Pitch")]
    with serve(DemoOptions(runs_dir=runs, examples_dir=small_corpus)) as url:
        client = Client(url, verbose=False)
        text, status = client.predict(audio=handle_file(path), question=question, delay=0, api_name="/answer")
        expected = run(path, question, str(final), DecodeSettings.from_mode(DEFAULT_MODE))[-1]  # the page's default
        assert (text, status.split(", ")[0]) == (expected.text, expected.status.split(", ")[0])
        junk = tmp_path / "junk.mp3"
        junk.write_bytes(b"\x00\x01 not an mp3" * 20)
        text, status = client.predict(audio=handle_file(str(junk)), question=question, api_name="/answer")
        assert text == "" and status.startswith("⚠ Could not read the audio: junk.mp3: cannot be decoded")


def test_gradio_client_trains_when_there_is_no_checkpoint(tmp_path, checkpoint, small_corpus):
    from gradio_client import Client, handle_file

    from diffa2.demo.ui import DemoOptions

    runs = tmp_path / "runs"
    options = DemoOptions(runs_dir=runs, examples_dir=small_corpus, train_command=fake_training(checkpoint, runs),
                          allow_training=True)
    wav = str(write_wav(tmp_path / "tone.wav", clip(1.0)))
    with serve(options) as url:
        client = Client(url, verbose=False)
        _, status = client.predict(audio=handle_file(wav), question=QUESTION, checkpoint=None, delay=0,
                                   api_name="/answer")
        assert status.startswith("⚠ No checkpoint selected")
        dropdown, _, message = client.predict(api_name="/train")
        selected = str(runs / "sft" / "final")
        assert dropdown["value"] == selected and [selected, selected] in dropdown["choices"]
        assert message == f"Trained and selected `{selected}`."
        _, status = client.predict(audio=handle_file(wav), question=QUESTION, checkpoint=selected, delay=0,
                                   api_name="/answer")
        assert status.startswith("Done: NFE ")
