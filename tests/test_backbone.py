"""The LLaDA backbone: published checkpoint format in, LLaDA's math out, padding and direction handled."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llada import LLADA_8B_CONFIG, llada_reference_logits, tiny_llada_state_dict, write_tiny_llada

from diffa2.modeling.backbone import (
    LLaDABackbone,
    llada_config,
    llama_config_from_llada,
    load_state_dict_files,
)


@pytest.mark.parametrize("sharded", [False, True])
def test_tiny_llada_checkpoint_matches_llada_forward(tmp_path, sharded):
    config = write_tiny_llada(tmp_path, sharded=sharded)
    backbone = LLaDABackbone.from_llada_pretrained(tmp_path).eval()
    ids = torch.tensor([5, 17, 42, 290, 290, 7, 291])
    expected = llada_reference_logits(load_state_dict_files(tmp_path), config, ids)
    got = backbone(backbone.embed(ids[None]), torch.ones(1, 7, dtype=torch.bool))[0]
    assert got.shape == (7, config["embedding_size"])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_attention_is_bidirectional(tmp_path):
    write_tiny_llada(tmp_path)
    backbone = LLaDABackbone.from_llada_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    changed = ids.clone()
    changed[0, -1] = 10
    mask = torch.ones(1, 4, dtype=torch.bool)
    first = backbone(backbone.embed(ids), mask)[0, 0]
    first_changed = backbone(backbone.embed(changed), mask)[0, 0]
    assert (first - first_changed).abs().max() > 1e-3  # the last token is visible to the first


def test_left_padded_row_equals_row_alone(tmp_path):
    write_tiny_llada(tmp_path)
    backbone = LLaDABackbone.from_llada_pretrained(tmp_path).eval()
    short = torch.tensor([4, 8, 15])
    long = torch.tensor([16, 23, 42, 7, 9])
    batch = torch.stack([torch.cat([torch.full((2,), 291), short]), long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    together = backbone(backbone.embed(batch), mask)
    alone = backbone(backbone.embed(short[None]), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(together[0, 2:], alone[0], atol=1e-5, rtol=1e-5)


def test_save_writes_llada_names_and_round_trips_bit_exact(tmp_path):
    config = write_tiny_llada(tmp_path / "src")
    backbone = LLaDABackbone.from_llada_pretrained(tmp_path / "src")
    backbone.save_llada_pretrained(tmp_path / "out")
    saved = load_state_dict_files(tmp_path / "out")
    assert set(saved) == set(tiny_llada_state_dict(config))
    reloaded = LLaDABackbone.from_llada_pretrained(tmp_path / "out")
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config


def test_config_writer_has_the_published_key_set():
    ours = llada_config(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=300,
                        mask_token_id=290, eos_token_id=291)
    assert set(ours) == set(LLADA_8B_CONFIG) - {"transformers_version"}
    assert ours["embedding_size"] == 384  # padded to a multiple of 128 like 126464


def test_real_8b_config_maps_to_llama():
    llama = llama_config_from_llada(LLADA_8B_CONFIG)
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (4096, 12288, 32)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size) == (32, 32, 126464)
    assert llama.rope_parameters["rope_theta"] == 500000.0
    assert llama.tie_word_embeddings is False and llama.is_causal is False


def test_unsupported_architecture_is_refused():
    with pytest.raises(NotImplementedError, match="block_type='sequential'"):
        llama_config_from_llada(LLADA_8B_CONFIG | {"block_type": "sequential"})
    with pytest.raises(ValueError, match="lacks .*rope_theta"):
        llama_config_from_llada({k: v for k, v in LLADA_8B_CONFIG.items() if k != "rope_theta"})


def test_mismatched_checkpoint_names_missing_and_misshaped_tensors(tmp_path):
    write_tiny_llada(tmp_path)
    state = load_state_dict_files(tmp_path)
    backbone = LLaDABackbone(json.loads((tmp_path / "config.json").read_text()))
    broken = dict(state)
    del broken["model.transformer.blocks.1.up_proj.weight"]
    broken["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        backbone.load_llada_state_dict(broken, source="ckpt")
    assert "model.transformer.blocks.1.up_proj.weight" in str(err.value)
    assert "model.transformer.blocks.0.q_proj.weight: (3, 3) vs (32, 32)" in str(err.value)
    with pytest.raises(ValueError, match="unknown parameter name 'model.transformer.wpe.weight'"):
        backbone.load_llada_state_dict(state | {"model.transformer.wpe.weight": torch.zeros(1)}, source="ckpt")


def test_pickled_bin_is_read_with_weights_only(tmp_path):
    config = write_tiny_llada(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.transformer.wte.weight": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        LLaDABackbone.from_llada_pretrained(tmp_path)
    torch.save(tiny_llada_state_dict(config), tmp_path / "pytorch_model.bin")
    assert LLaDABackbone.from_llada_pretrained(tmp_path).hidden_size == 32
