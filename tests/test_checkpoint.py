"""Checkpoints: what is stored, bit-exact round trips, LoRA, strict loading, atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import clip
from safetensors.torch import load_file, save_file
from tiny_checkpoints import write_tiny_hf_whisper
from tiny_llada import write_tiny_llada

from diffa2.diffusion.decoding import DecodeConfig
from diffa2.inference import AudioQA
from diffa2.io import atomic_directory
from diffa2.modeling.checkpoint import build_with_bases, load_pretrained, save_pretrained
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.presets import real_config


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_tiny_model_round_trip_is_bit_exact(tmp_path, chat, tiny_model):
    save_pretrained(tiny_model, tmp_path / "ckpt", tokenizer=chat.tokenizer)
    reloaded = load_pretrained(tmp_path / "ckpt")
    assert_same_state(tiny_model, reloaded)
    qa, qa2 = AudioQA(tiny_model, chat), AudioQA.from_checkpoint(tmp_path / "ckpt")
    config = DecodeConfig(gen_length=8, block_length=8, steps=8)
    assert qa.answer([clip(1.0)], ["Pitch?"], config).texts == qa2.answer([clip(1.0)], ["Pitch?"], config).texts
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tokenizer_source"] == "tokenizer"


@pytest.fixture
def real_format_model(tmp_path, chat, tokenizer_dir):
    """DIFFA-2 on bases read from tiny checkpoints in the published Whisper and LLaDA formats, with LoRA."""
    write_tiny_hf_whisper(tmp_path / "whisper", d_model=32, max_source_positions=100)
    write_tiny_llada(tmp_path / "llada", vocab=len(chat.tokenizer), mask_id=chat.ids.mask, eos_id=chat.ids.eos)
    config = real_config(tmp_path / "whisper", tmp_path / "llada", tap_layers=[1, 2])
    config.tokenizer_source = str(tokenizer_dir)
    model = build_with_bases(config)
    model.add_lora(LoraSettings())
    model.set_trainable(encoder=False, backbone=False)
    with torch.no_grad():  # LoRA B starts at zero; make it matter for the round trip
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.eval()


def test_frozen_bases_store_only_adapters_prompts_and_lora(tmp_path, real_format_model):
    model = real_format_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("encoder.") for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("backbone."))
    lora_targets = {n.split(".")[-4] for n in trainable if "lora_A" in n}  # ...q_proj.lora_A.default.weight
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # LLaDA q/k/v/ff_proj/up_proj

    save_pretrained(model, tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert not any(k.startswith("encoder.") for k in stored)
    assert all("lora_" in k for k in stored if k.startswith("backbone."))
    parts = {k.split(".")[0] for k in stored}
    assert parts == {"semantic_adapter", "acoustic_adapter", "prompt_embeddings", "backbone"}
    reloaded = load_pretrained(tmp_path / "ckpt")
    assert_same_state(model, reloaded)
    saved_config = DIFFA2Config.load(tmp_path / "ckpt" / "config.json")
    assert saved_config.backbone_source == str(tmp_path / "llada") and saved_config.lora == LoraSettings()


def test_merging_lora_keeps_outputs_and_stores_the_backbone(tmp_path, chat, real_format_model):
    qa = AudioQA(real_format_model, chat)
    prefix = qa.prefix([clip(1.0)], ["Pitch?"])
    answer = torch.full((1, 4), chat.ids.mask)
    before = real_format_model.answer_logits(prefix, answer)
    real_format_model.merge_lora()
    torch.testing.assert_close(real_format_model.answer_logits(prefix, answer), before, atol=1e-5, rtol=1e-5)
    save_pretrained(real_format_model, tmp_path / "merged")
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    assert "backbone.lm.model.layers.0.self_attn.q_proj.weight" in stored
    assert not any("lora_" in k for k in stored)
    assert_same_state(real_format_model, load_pretrained(tmp_path / "merged"))


def test_missing_or_extra_tensors_are_named(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    stored = load_file(weights)
    del stored["semantic_adapter.fc2.weight"]
    stored["acoustic_adapter.extra"] = torch.zeros(1)
    save_file(stored, weights)
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "ckpt")
    assert "missing ['semantic_adapter.fc2.weight']" in str(err.value)
    assert "unexpected ['acoustic_adapter.extra']" in str(err.value)


def test_unknown_config_key_is_refused(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"num_querys": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['num_querys'\]"):
        load_pretrained(tmp_path / "ckpt")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "ckpt") as staging:
        (staging / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("crash while saving")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
