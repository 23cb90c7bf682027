"""Long audio (issue 18, part 2): clips over the encoder window encoded window by window (`long_audio: window`),
the limit on the total, `trim` unchanged, and the synthetic long-clip split (docs/long-audio.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import clip, small_run_args

from diffa2.audio import split_windows
from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.data.synth.long import LONG_WINDOW_SECONDS, LONG_WINDOWS, build_long_split, build_long_training_split
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.__main__ import main as eval_main
from diffa2.eval.runner import RunOptions, run_benchmark
from diffa2.inference import AudioQA
from diffa2.modeling.configuration import DIFFA2Config
from diffa2.stages import sft, vrpo

# The tiny model: a 4 s window = 400 mel frames = 200 encoder frames -> 50 semantic tokens, after 8 acoustic queries.
LEAD = 8
FULL_WINDOW_SPAN = LEAD + 50
FAST = DecodeConfig(gen_length=4, block_length=4, steps=4)


@pytest.fixture
def qa(tiny_model, chat) -> AudioQA:
    return AudioQA(tiny_model, chat, long_audio="window")


def test_split_windows_cuts_consecutive_windows_and_keeps_a_short_clip_whole():
    wave = np.arange(10 * 16000, dtype=np.float32)
    pieces = split_windows(wave, 4.0)
    assert [len(p) for p in pieces] == [64000, 64000, 32000]
    assert np.array_equal(np.concatenate(pieces), wave)
    short = clip(3.0)
    (alone,) = split_windows(short, 4.0)
    assert np.array_equal(alone, short)


def test_a_10_s_clip_gives_three_windows_and_their_spans_in_order(qa):
    speech = qa.speech([clip(10.0, seed=1)])
    # windows of 4, 4 and 2 s: two full spans and one of 8 + 100 encoder frames / 4
    assert speech.lengths.tolist() == [2 * FULL_WINDOW_SPAN + LEAD + 25]
    twelve = qa.speech([clip(12.0, seed=2)])
    assert twelve.lengths.tolist() == [3 * FULL_WINDOW_SPAN]
    # each window's span is that window encoded alone, in order
    wave = clip(10.0, seed=1)
    for w, (lo, hi) in enumerate([(0, 58), (58, 116), (116, 149)]):
        alone = qa.speech([wave[w * 64000 : (w + 1) * 64000]], "trim")
        torch.testing.assert_close(speech.embeds[0, lo:hi], alone.embeds[0, : hi - lo], atol=1e-5, rtol=1e-5)


def test_a_clip_under_the_window_is_unchanged(qa, chat):
    waves, questions = [clip(1.5, seed=3), clip(4.0, seed=4)], ["What is the pitch of the tone?", "How many?"]
    windowed = qa.prefix(waves, questions)
    trimmed = qa.prefix(waves, questions, long_audio="trim")
    assert torch.equal(windowed.embeds, trimmed.embeds) and torch.equal(windowed.attention_mask,
                                                                        trimmed.attention_mask)


def test_batch_equals_one_by_one_with_mixed_window_counts(qa):
    waves = [clip(2.0, 300, seed=5), clip(9.0, 500, seed=6), clip(12.5, 700, seed=7)]  # 1, 3 and 4 windows
    questions = ["What is the pitch of the tone?", "How many beeps are there?", "What is the pitch of the tone?"]
    speech = qa.speech(waves)
    assert speech.lengths.tolist() == [LEAD + 25, 2 * FULL_WINDOW_SPAN + LEAD + 12, 3 * FULL_WINDOW_SPAN + LEAD + 6]
    together = qa.prefix(waves, questions)
    batch = qa.answer(waves, questions, FAST, seed=[11, 12, 13])
    for i in range(3):
        alone = qa.prefix(waves[i : i + 1], questions[i : i + 1])
        width = int(alone.attention_mask.sum())
        assert int(together.attention_mask[i].sum()) == width
        torch.testing.assert_close(together.embeds[i, -width:], alone.embeds[0], atol=1e-5, rtol=1e-5)
        one = qa.answer(waves[i : i + 1], questions[i : i + 1], FAST, seed=11 + i)
        assert torch.equal(batch.token_ids[i], one.token_ids[0])


def test_the_limit_refuses_a_longer_clip_naming_it(tiny_model, chat):
    qa = AudioQA(tiny_model, chat, long_audio="window", max_audio_seconds=8.0)
    assert qa.speech([clip(8.0)]).lengths.tolist() == [2 * FULL_WINDOW_SPAN]
    with pytest.raises(ValueError, match=r"a 9\.00 s clip exceeds max_audio_seconds=8 \(long_audio 'window'\)"):
        qa.speech([clip(9.0)])
    with pytest.raises(ValueError, match=r"max_audio_seconds must be > 0, got 0"):
        AudioQA(tiny_model, chat, max_audio_seconds=0)
    with pytest.raises(ValueError, match=r"long_audio must be one of \['trim', 'window'\], got 'frames'"):
        AudioQA(tiny_model, chat, long_audio="frames")


def test_trim_is_the_default_and_bit_identical_to_the_plain_speech_path(tiny_model, chat):
    config = tiny_model.config.to_dict()
    assert config["long_audio"] == "trim"
    config.pop("long_audio")  # a checkpoint written before the option loads as "trim"
    assert DIFFA2Config.from_checkpoint_dict(config).long_audio == "trim"
    with pytest.raises(ValueError, match=r"config: long_audio must be one of \['trim', 'window'\], got 'cut'"):
        DIFFA2Config.from_checkpoint_dict(config | {"long_audio": "cut"})
    qa = AudioQA(tiny_model, chat)
    waves = [clip(0.7, seed=8), clip(3.9, seed=9)]
    questions = ["How many beeps are there?", "What is the pitch of the tone?"]
    features, lengths = qa.featurizer(waves)
    speech = tiny_model.encode_speech(features, lengths)
    prompts = [chat.encode_prompt(q) for q in questions]
    by_hand = tiny_model.build_prefix([p for p, _ in prompts], [s for _, s in prompts], speech)
    assert qa.long_audio == "trim" and torch.equal(qa.prefix(waves, questions).embeds, by_hand.embeds)
    with pytest.raises(ValueError, match="exceed the 4.0 s window"):  # trim takes clips cut to the window
        qa.speech([clip(5.0)])


def test_long_split_is_reproducible_and_puts_each_cue_in_window_2_or_3(tmp_path):
    first = build_long_split(tmp_path / "a", seed=3, per_kind=2)
    second = build_long_split(tmp_path / "b", seed=3, per_kind=2)
    records = json.loads(first.read_text())
    assert first.read_bytes() == second.read_bytes() and len(records) == 12
    assert [r["cue_window"] for r in records] == [2, 3] * 6
    step = int(LONG_WINDOW_SECONDS * 16000)
    for r in records:
        audio, rate = sf.read(tmp_path / "a" / r["audio_id"], dtype="int16")
        assert rate == 16000 and len(audio) == LONG_WINDOWS * step
        assert (tmp_path / "b" / r["audio_id"]).read_bytes() == (tmp_path / "a" / r["audio_id"]).read_bytes()
        heard = {i // step + 1 for i in np.flatnonzero(audio)}
        assert heard == {r["cue_window"]}  # silence everywhere else
    other = json.loads(build_long_split(tmp_path / "c", seed=4, per_kind=2).read_text())
    assert [r["choices"] for r in other] != [r["choices"] for r in records]


def test_eval_runs_the_long_split_windowed_and_trimmed(checkpoint, tmp_path):
    manifest = build_long_split(tmp_path / "long", seed=0, per_kind=1)
    reports = {}
    for mode in ("trim", "window"):
        options = RunOptions(benchmark="synth", model=str(checkpoint), data=str(manifest), out=str(tmp_path / mode),
                             progress=False, long_audio=mode, decoding={"gen_length": 4, "block_length": 4,
                                                                        "steps": 4})
        reports[mode] = run_benchmark(options, log=lambda _: None).report
    assert reports["trim"]["counts"]["audio_trimmed"] == 6 and reports["window"]["counts"]["audio_trimmed"] == 0
    assert "long_audio" not in reports["trim"]["run"]
    assert reports["window"]["run"]["long_audio"] == "window"
    assert reports["window"]["run"]["max_audio_seconds"] == 120.0
    assert reports["trim"]["run"]["fingerprint"] != reports["window"]["run"]["fingerprint"]


def test_eval_cli_refuses_a_bad_limit_and_windowed_likelihood(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["run", "--benchmark", "synth", "--model", str(checkpoint), "--max_audio_seconds", "0"])
    assert exit_info.value.code == 2
    assert "--max_audio_seconds 0 is out of range: must be > 0" in capsys.readouterr().err
    code = eval_main(["run", "--benchmark", "synth", "--model", str(checkpoint), "--data", "x.json",
                      "--long_audio", "window", "--mcq", "likelihood"])
    assert code == 2
    assert "--long_audio window is not supported with --mcq likelihood" in capsys.readouterr().err


def test_training_windows_a_long_clip_as_inference_does(qa, tiny_model, chat):
    # --long_audio window in training: the collator cuts each clip into windows, the model joins their spans, and
    # the logits are those of the prefix AudioQA builds for the same clips at inference
    waves = [clip(2.0, 300, seed=5), clip(9.0, 500, seed=6), clip(12.5, 700, seed=7)]
    questions = ["What is the pitch of the tone?", "How many beeps are there?", "What is the pitch of the tone?"]
    collator = SFTCollator(chat, qa.featurizer, answer_length=6, feature_cache_items=16, window_seconds=4.0)
    examples = [SFTExample(wave, question, "high", audio_key=f"clip{i}")
                for i, (wave, question) in enumerate(zip(waves, questions, strict=True))]
    batch = collator(examples)
    assert batch.window_counts == [1, 3, 4] and batch.input_features.shape[0] == 8
    assert batch.feature_lengths.tolist() == [200, 400, 400, 100, 400, 400, 400, 50]  # 10 ms frames per window
    tiny_model.eval()
    with torch.no_grad():
        trained = tiny_model(batch.input_features, batch.feature_lengths, batch.prompt_ids, batch.audio_slots,
                             batch.answer_ids, batch.answer_mask, window_counts=batch.window_counts)
        served = tiny_model.answer_logits(qa.prefix(waves, questions), batch.answer_ids, batch.answer_mask)
    torch.testing.assert_close(trained, served, atol=1e-5, rtol=1e-5)
    again = collator(examples)  # the second visit reads every window's features from the cache
    assert len(collator.features.cache) == 8 and torch.equal(again.input_features, batch.input_features)


def test_long_training_split_moves_each_stage3_clip_into_one_window(small_corpus, tmp_path):
    first, second = (tmp_path / "a", tmp_path / "b")
    for root in (first, second):
        shutil.copytree(small_corpus, root)
    manifest = build_long_training_split(first, seed=0, items=5)
    assert build_long_training_split(second, seed=0, items=5).read_bytes() == manifest.read_bytes()
    sources = json.loads((first / "stage3_sft_train.json").read_text())[:5]
    records = json.loads(manifest.read_text())
    step = int(LONG_WINDOW_SECONDS * 16000)
    assert len(records) == 5 and {r["cue_window"] for r in records} <= {1, 2, 3}
    for source, record in zip(sources, records, strict=True):
        assert (record["input"], record["target"], record["kind"]) == (source["input"], source["target"],
                                                                       source["kind"])
        assert "seed_transcript" not in record and record["duration"] == LONG_WINDOWS * LONG_WINDOW_SECONDS
        audio, _ = sf.read(first / record["audio_filepath"], dtype="int16")
        cue, _ = sf.read(first / source["audio_filepath"], dtype="int16")
        heard = np.flatnonzero(audio)
        assert {int(i) // step + 1 for i in heard} == {record["cue_window"]}
        start = heard[0] - int(np.flatnonzero(cue)[0])
        assert np.array_equal(audio[start : start + len(cue)], cue)  # the clip itself, moved
    with pytest.raises(FileNotFoundError, match="stage3_sft_train.json not found"):
        build_long_training_split(tmp_path / "empty")


@pytest.mark.slow
def test_an_sft_run_with_long_audio_window_trains_on_long_clips_and_records_it(small_corpus, tmp_path):
    corpus = tmp_path / "synth"
    shutil.copytree(small_corpus, corpus)
    build_long_training_split(corpus, seed=0, items=8)
    recipe = tmp_path / "long.yaml"
    recipe.write_text('name: long\ntrain:\n  - path: "{synth}/long_train.json"\n')
    args = small_run_args(tmp_path / "run", corpus, 2, ["--recipe", str(recipe), "--long_audio", "window",
                                                        "--tiny_window_seconds", "4"])
    summary = sft.main(args)
    assert summary["steps"] == 2 and summary["trimmed_items"] == 0  # 12 s clips kept whole, in three windows
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["long_audio"] == "window"
    trimmed = sft.main(small_run_args(tmp_path / "trim", corpus, 2, ["--recipe", str(recipe),
                                                                     "--tiny_window_seconds", "4"]))
    assert trimmed["trimmed_items"] == 8


def test_long_audio_window_is_refused_by_a_stage_that_cuts_clips(tmp_path, small_corpus, checkpoint):
    with pytest.raises(ValueError, match="--long_audio window trains the SFT stages .1-3. only; the vrpo stage"):
        vrpo.main(small_run_args(tmp_path / "run", small_corpus, 2, ["--long_audio", "window",
                                                                     "--model", str(checkpoint)]))
