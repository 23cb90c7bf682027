"""`compat="reference"`: DIFFA-2's released inference behaviour (docs/reference-compat.md), batch-safe at inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import clip, make_tiny_model
from transformers.masking_utils import create_causal_mask

from diffa2.audio import LogMelFeaturizer
from diffa2.demo.answer import load_model
from diffa2.demo.cli import parse_args
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.__main__ import build_parser, main
from diffa2.eval.runner import compat_identity
from diffa2.inference import AudioQA
from diffa2.modeling.checkpoint import save_pretrained
from diffa2.modeling.configuration import WHISPER_LARGE_V3, DIFFA2Config
from diffa2.stages.arguments import ModelArguments
from diffa2.stages.cli import SFT_ARG_TYPES, parse_stage_options
from diffa2.stages.runner import set_system_prompts

FIXTURES = Path(__file__).parent / "fixtures"
LONG_PROMPT = ("You are a helpful voice assistant. Imagine you can hear the audio clips. Focus on the audios and "
               "respond directly to the prompts.")
QUESTIONS = ["How many beeps are there?", "What is the pitch of the tone?", "Please transcribe the audio to text.",
             "What is the pitch?", "How many?", "Is it loud or quiet?", "one two three", "yes or no?"]
# The tiny preset's window is 4 s (400 mel frames, 200 encoder frames); every clip here is shorter but the last.
SECONDS = [0.5, 0.9, 1.3, 1.75, 2.2, 2.9, 3.4, 4.0]


def reference_model(chat):
    model = make_tiny_model(chat)
    model.config.compat = "reference"
    return model


def featurize(model, waves):
    return LogMelFeaturizer(model.config.n_mels, model.config.window_seconds)(waves)


@pytest.mark.parametrize("config", [
    DecodeConfig(gen_length=8, block_length=4, steps=8),
    DecodeConfig.preset("fpd", gen_length=8, block_length=8, steps=8, factor_quirk=True),
], ids=["plain", "fpd"])
def test_a_batch_of_eight_gives_the_answers_of_eight_single_runs(chat, config):
    qa = AudioQA(reference_model(chat), chat)
    assert qa.chat.compat == "reference"
    waves = [clip(s, 200 + 150 * i, seed=i) for i, s in enumerate(SECONDS)]
    seeds = list(range(8))
    batch = qa.answer(waves, QUESTIONS, config, seed=seeds)
    for i in range(8):
        single = qa.answer([waves[i]], [QUESTIONS[i]], config, seed=[seeds[i]])
        assert batch.token_ids[i].tolist() == single.token_ids[0].tolist()
        assert batch.texts[i] == single.texts[0]
        assert batch.row_nfe[i] == single.row_nfe[0]


def test_reference_slot_rule_by_hand(chat):
    ref = chat.with_compat("reference")
    lead, whole = ref.reference_prompt_texts("How many beeps are there?")
    head = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful voice assistant."
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nThis is the audio: ")
    assert lead == head
    assert whole == head + ("<audio>. How many beeps are there?<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    lead_ids = [1, 3, 89, 95, 268, 75, 83, 4, 307, 295, 293, 263, 353, 336, 337, 20, 5, 3, 91, 277, 88, 4, 307, 357,
                354, 267, 278, 32, 227]
    assert chat.tokenizer(lead)["input_ids"] == lead_ids  # 29 tokens, the last the trailing space " "
    ids, slot = ref.encode_prompt("How many beeps are there?")
    assert ids == lead_ids + [34, 374, 365, 227, 46, 85, 93, 317, 276, 95, 318, 360, 86, 89, 293, 267, 274, 37, 5, 3,
                              71, 316, 4, 307]
    assert slot == 29 - 1
    assert chat.tokenizer.decode(ids[:slot]).endswith("This is the audio:")
    assert chat.tokenizer.decode(ids[slot:]).startswith(" <audio>. How many beeps")


def test_reference_prompt_keeps_the_instruction_verbatim(chat):
    ref = chat.with_compat("reference")
    ids, slot = ref.encode_prompt(" Pitch?\n")
    assert chat.tokenizer.decode(ids[slot:]).startswith(" <audio>.  Pitch?\n<|eot_id|>")
    toolkit_ids, toolkit_slot = chat.encode_prompt(" Pitch?\n")
    assert toolkit_slot == slot == 28 and toolkit_ids != ids  # the toolkit strips the instruction
    assert chat.tokenizer.decode(toolkit_ids[slot:]).startswith(" <audio>. Pitch?<|eot_id|>")


def test_qformer_reads_the_padding_of_a_short_clip_and_equals_toolkit_on_a_full_window(chat):
    toolkit, reference = make_tiny_model(chat), reference_model(chat)
    queries = toolkit.config.num_queries
    for seconds, tokens, same_queries in ((1.0, 12, False), (4.0, 50, True)):  # 50 and 200 encoder frames
        feats, lengths = featurize(toolkit, [clip(seconds)])
        a, b = toolkit.encode_speech(feats, lengths), reference.encode_speech(feats, lengths)
        assert a.lengths.tolist() == b.lengths.tolist() == [queries + tokens]
        assert torch.equal(a.embeds[:, queries:], b.embeds[:, queries:])  # the semantic tokens are the same
        assert torch.equal(a.embeds[:, :queries], b.embeds[:, :queries]) == same_queries


def test_reference_qformer_output_depends_on_padding_frames(chat):
    model = reference_model(chat)
    taps = tuple(torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    noisy = tuple(torch.cat([t[:, :50], t[:, 50:] + 1.0], dim=1) for t in taps)
    lengths = torch.tensor([50])
    adapter = model.acoustic_adapter
    assert not torch.allclose(adapter(taps, lengths, mask_padding=False), adapter(noisy, lengths, mask_padding=False))
    torch.testing.assert_close(adapter(taps, lengths), adapter(noisy, lengths), atol=1e-6, rtol=1e-6)


def test_training_keeps_the_batch_max_semantic_span_inference_each_rows_own(chat):
    model = reference_model(chat)
    feats, lengths = featurize(model, [clip(1.0), clip(2.5)])  # 50 and 125 encoder frames -> 12 and 31 tokens
    assert model.encode_speech(feats, lengths).lengths.tolist() == [8 + 12, 8 + 31]
    model.train()
    assert model.encode_speech(feats, lengths).lengths.tolist() == [8 + 31, 8 + 31]
    toolkit = make_tiny_model(chat).train()
    assert toolkit.encode_speech(feats, lengths).lengths.tolist() == [8 + 12, 8 + 31]


def test_post_processing_keeps_text_after_eos(chat):
    ref = chat.with_compat("reference")
    ids = chat.encode_answer("two") + [chat.ids.eos] + chat.encode_answer("three") + [chat.ids.eos] * 2
    assert ref.decode_answer(ids) == "twothree"
    assert chat.decode_answer(ids) == "two"
    assert ref.decode_answer([chat.ids.eos, *chat.encode_answer(" high ")]) == "high"


def test_the_llm_mask_at_batch_one_is_no_mask(chat):
    model = reference_model(chat)
    embeds = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(0))
    masked = model.backbone(embeds, torch.ones(1, 30, dtype=torch.bool))
    assert torch.equal(masked, model.backbone.lm(inputs_embeds=embeds).logits)
    lm = model.backbone.lm  # transformers drops an all-true mask: attention gets no bias at all, on any device
    all_true = torch.ones(1, 30, dtype=torch.long)
    assert create_causal_mask(config=lm.config, inputs_embeds=embeds, attention_mask=all_true, cache=None,
                              position_ids=torch.arange(30)[None]) is None


def test_large_v3_features_have_128_mels_and_a_30_s_window(chat):
    config = DIFFA2Config(encoder=dict(WHISPER_LARGE_V3), backbone=make_tiny_model(chat).config.backbone,
                          compat="reference")
    assert (config.n_mels, config.window_seconds) == (128, 30.0)
    features, lengths = LogMelFeaturizer(config.n_mels, config.window_seconds)([clip(1.0), clip(2.5)])
    assert tuple(features.shape) == (2, 128, 3000) and lengths.tolist() == [100, 250]


def test_compat_and_system_prompts_are_stored_and_overridable(chat, tmp_path):
    model = make_tiny_model(chat)
    set_system_prompts(model, ModelArguments(training_system_prompt=LONG_PROMPT))
    model.config.compat = "reference"
    save_pretrained(model, tmp_path, tokenizer=chat.tokenizer)
    qa = AudioQA.from_checkpoint(tmp_path)
    assert (qa.model.config.compat, qa.chat.compat) == ("reference", "reference")
    assert qa.model.config.prompt_for_training == LONG_PROMPT
    assert qa.chat.system_prompt == "You are a helpful voice assistant."  # inference answers with the short one
    toolkit = AudioQA.from_checkpoint(tmp_path, compat="toolkit")
    assert (toolkit.model.config.compat, toolkit.chat.compat) == ("toolkit", "toolkit")
    with pytest.raises(ValueError, match="compat must be one of"):
        AudioQA(make_tiny_model(chat), chat, compat="paper")


def test_system_prompt_flag_sets_both_prompts_unless_training_has_its_own(chat):
    model = make_tiny_model(chat)
    set_system_prompts(model, ModelArguments(system_prompt="Be brief."))
    assert (model.config.system_prompt, model.config.prompt_for_training) == ("Be brief.", "Be brief.")
    set_system_prompts(model, ModelArguments(training_system_prompt=LONG_PROMPT))
    assert (model.config.system_prompt, model.config.prompt_for_training) == ("Be brief.", LONG_PROMPT)


def test_eval_run_takes_compat_and_records_it(checkpoint, tmp_path):
    records = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:2]
    for i, record in enumerate(records):
        path = tmp_path / "data" / record["audio_id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, clip(0.5 + i, 300 + 100 * i), 16000)
    (tmp_path / "data" / "mmau.json").write_text(json.dumps(records), encoding="utf-8")
    argv = ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(tmp_path / "data" / "mmau.json"),
            "--out", str(tmp_path / "out"), "--no-progress", "--compat", "reference"]
    assert build_parser().parse_args(argv).compat == "reference"
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["run"]["compat"] == "reference"


def test_compat_identity_keeps_earlier_toolkit_fingerprints():
    assert compat_identity("toolkit", None) == {}
    assert compat_identity("toolkit", "toolkit") == {"compat": "toolkit"}
    assert compat_identity("reference", None) == compat_identity("reference", "reference") == {"compat": "reference"}


def test_demo_takes_compat(checkpoint):
    assert parse_args(["--compat", "reference"]).compat == "reference"
    assert parse_args([]).compat is None
    assert load_model(str(checkpoint), "reference").chat.compat == "reference"
    assert load_model(str(checkpoint)).chat.compat == "toolkit"


def test_system_prompts_come_from_yaml_and_flags(tmp_path):
    (tmp_path / "stage.yaml").write_text(f"training_system_prompt: {LONG_PROMPT}\n")
    argv = ["--config", str(tmp_path / "stage.yaml"), "--system_prompt", "Be brief.", "--output_dir", str(tmp_path)]
    model_args, *_ = parse_stage_options(SFT_ARG_TYPES, argv, "stage", {})
    assert (model_args.system_prompt, model_args.training_system_prompt) == ("Be brief.", LONG_PROMPT)
    model_args, *_ = parse_stage_options(SFT_ARG_TYPES, ["--output_dir", str(tmp_path)], "stage", {})
    assert (model_args.system_prompt, model_args.training_system_prompt) == (None, None)
