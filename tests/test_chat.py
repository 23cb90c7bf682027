"""Prompt template, audio slot and answer encoding/decoding."""

from __future__ import annotations

import pytest

from diffa2.chat import ChatFormat, SpecialIds


def test_prompt_text_is_the_llama3_template(chat):
    before, after = chat.prompt_texts("What is the pitch?")
    assert before + after == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful voice assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThis is the audio: <audio>. What is the pitch?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_audio_slot_splits_after_the_lead_in(chat):
    ids, slot = chat.encode_prompt("How many beeps are there?")
    tok = chat.tokenizer
    assert tok.decode(ids[:slot]).endswith("This is the audio:")
    assert tok.decode(ids[slot:]).startswith(" <audio>. How many beeps")
    assert ids[0] == chat.ids.bos and ids.count(chat.ids.bos) == 1  # BOS from the template only
    assert tok.decode(ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_answer_round_trip_and_stop_tokens(chat):
    ids = chat.encode_answer("high")
    assert ids[-1] == chat.ids.eot
    assert chat.decode_answer(ids + [chat.ids.eos] * 3) == "high"
    assert chat.decode_answer(chat.encode_answer("two") + chat.encode_answer("three")) == "two"
    assert chat.decode_answer([chat.ids.eos] + ids) == ""


def test_special_ids_come_from_the_tokenizer(chat):
    tok = chat.tokenizer
    assert chat.ids == SpecialIds(
        mask=tok.convert_tokens_to_ids("<|mdm_mask|>"),
        eos=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad=tok.pad_token_id,
        eot=tok.convert_tokens_to_ids("<|eot_id|>"),
        bos=tok.convert_tokens_to_ids("<|startoftext|>"),
    )
    assert chat.ids.pad == chat.ids.eos != chat.ids.mask


def test_backbone_disagreeing_on_mask_id_is_an_error(chat):
    with pytest.raises(ValueError, match="mask_token_id"):
        chat.ids.check_backbone({"mask_token_id": 126336, "eos_token_id": chat.ids.eos})


def test_system_prompt_is_configurable(chat):
    custom = ChatFormat(chat.tokenizer, system_prompt="Be brief.")
    assert "Be brief.<|eot_id|>" in custom.prompt_texts("q")[0]
