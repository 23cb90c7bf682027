"""Tests of the Whisper speech encoder, its loaders and the OpenAI -> HF conversion."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import tiny_openai_whisper_model, write_tiny_hf_whisper, write_tiny_openai_whisper
from transformers import WhisperForConditionalGeneration

from diffa2.audio import LogMelFeaturizer
from diffa2.modeling.encoder import CheckpointError, WhisperSpeechEncoder
from diffa2.modeling.whisper_convert import (
    hf_config_from_openai_dims,
    openai_key_to_hf,
    openai_to_hf_state_dict,
)

D_MODEL, LAYERS, POSITIONS = 64, 2, 100  # tiny_checkpoints defaults: 2 s window, 200 mel frames
# Observed: our encoder loaded from the OpenAI .pt and openai-whisper's own AudioEncoder agree bit for bit
# (max abs difference 0.0, fp32, CPU, both through SDPA); 1e-5 allows other attention kernels.
OPENAI_PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_whisper(tmp_path_factory.mktemp("hf") / "whisper", with_bin=True)


@pytest.fixture(scope="module")
def openai_pt(tmp_path_factory):
    return write_tiny_openai_whisper(tmp_path_factory.mktemp("oa") / "tiny.pt")


def random_mel(batch: int, seed: int = 0, n_mels: int = 80) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_mels, 2 * POSITIONS, generator=gen)


def encoder_weights_from_safetensors(directory) -> dict[str, torch.Tensor]:
    full = load_file(directory / "model.safetensors")
    return {k.removeprefix("model.encoder."): v for k, v in full.items() if k.startswith("model.encoder.")}


# ------------------------------------------------------------------------------------------------ loading


def test_hf_directory_layout_is_the_real_one(hf_dir):
    names = load_file(hf_dir / "model.safetensors").keys()
    assert "model.encoder.embed_positions.weight" in names
    assert "model.decoder.embed_tokens.weight" in names
    assert all(n.startswith("model.") for n in names)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["num_mel_bins"], config["d_model"], config["encoder_layers"]) == (80, D_MODEL, LAYERS)
    assert config["max_source_positions"] == POSITIONS
    assert (hf_dir / "pytorch_model.bin").is_file()


def test_hf_directory_loads_every_encoder_weight(hf_dir):
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    expected = encoder_weights_from_safetensors(hf_dir)
    loaded = encoder.encoder.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert (encoder.hidden_size, encoder.num_layers, encoder.n_mels) == (D_MODEL, LAYERS, 80)
    assert (encoder.max_source_positions, encoder.input_frames) == (POSITIONS, 2 * POSITIONS)
    assert not encoder.training
    assert encoder.encoder.conv1.weight.dtype == torch.float32


def test_hf_directory_matches_transformers_own_loading(hf_dir):
    reference = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    mel = random_mel(2)
    with torch.no_grad():
        expected = reference.model.encoder(mel).last_hidden_state
        ours = encoder(mel, torch.tensor([200, 200])).last_hidden_state
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_bin_only_directory_loads_the_same_weights(tmp_path, hf_dir):
    bin_dir = write_tiny_hf_whisper(tmp_path / "bin", with_bin=True, with_safetensors=False)
    assert not (bin_dir / "model.safetensors").exists() and (bin_dir / "pytorch_model.bin").is_file()
    from_bin = WhisperSpeechEncoder.from_pretrained(bin_dir)
    from_safetensors = WhisperSpeechEncoder.from_pretrained(hf_dir)  # same seed, same weights
    mel = random_mel(1, seed=1)
    with torch.no_grad():
        a = from_bin(mel, torch.tensor([150])).last_hidden_state
        b = from_safetensors(mel, torch.tensor([150])).last_hidden_state
    assert a.shape == (1, 75, D_MODEL)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sharded_and_bare_layouts(tmp_path, hf_dir):
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (
        sharded / "model.safetensors"
    ).exists()
    # WhisperModel layout: `encoder.*` keys without the `model.` prefix.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(
        {
            k.removeprefix("model."): v.contiguous()
            for k, v in model.state_dict().items()
            if k.startswith("model.")
        },
        bare / "model.safetensors",
    )
    mel = random_mel(1, seed=2)
    outs = []
    for directory in (hf_dir, sharded, bare):
        with torch.no_grad():
            outs.append(
                WhisperSpeechEncoder.from_pretrained(directory)(mel, torch.tensor([200])).last_hidden_state
            )
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


def test_torch_dtype_is_applied(hf_dir):
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    out = encoder(random_mel(1), torch.tensor([10]))
    assert out.last_hidden_state.dtype == torch.bfloat16 and out.last_hidden_state.shape == (1, 5, D_MODEL)


# ------------------------------------------------------------------------------------------------ OpenAI


def test_openai_pt_matches_the_openai_implementation(openai_pt):
    reference = tiny_openai_whisper_model()  # same seed as the file
    encoder = WhisperSpeechEncoder.from_pretrained(openai_pt)
    mel = random_mel(2, seed=3)
    with torch.no_grad():
        expected = reference.encoder(mel)
        out = encoder(mel, torch.tensor([200, 200]))
    diff = (out.last_hidden_state - expected).abs().max().item()
    assert expected.abs().max().item() > 1.0  # a non-trivial output
    assert diff <= OPENAI_PARITY_ATOL


def test_openai_pt_equals_hf_directory_built_from_the_same_weights(tmp_path, openai_pt):
    checkpoint = torch.load(openai_pt, weights_only=True)
    config = hf_config_from_openai_dims(checkpoint["dims"])
    model = WhisperForConditionalGeneration(config).eval()
    # Strict: every OpenAI key (decoder included) must land on exactly one HF parameter.
    model.model.load_state_dict(openai_to_hf_state_dict(checkpoint["model_state_dict"]), strict=True)
    model.save_pretrained(tmp_path / "converted")

    mel = random_mel(2, seed=4)
    lengths = torch.tensor([200, 63])
    with torch.no_grad():
        from_pt = WhisperSpeechEncoder.from_pretrained(openai_pt)(mel, lengths)
        from_dir = WhisperSpeechEncoder.from_pretrained(tmp_path / "converted")(mel, lengths)
    torch.testing.assert_close(from_pt.last_hidden_state, from_dir.last_hidden_state, rtol=0, atol=0)

    # The decoder mapping is right too: full seq2seq logits equal openai-whisper's.
    reference = tiny_openai_whisper_model()
    tokens = torch.tensor([[50258, 50259, 50360, 400, 1000]])
    with torch.no_grad():
        expected = reference(mel[:1], tokens)
        logits = model(input_features=mel[:1], decoder_input_ids=tokens).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_openai_key_mapping_examples():
    pairs = {
        "encoder.conv1.weight": "encoder.conv1.weight",
        "encoder.positional_embedding": "encoder.embed_positions.weight",
        "encoder.blocks.3.attn.query.bias": "encoder.layers.3.self_attn.q_proj.bias",
        "encoder.blocks.0.attn.key.weight": "encoder.layers.0.self_attn.k_proj.weight",
        "encoder.blocks.0.attn.out.weight": "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.blocks.1.attn_ln.weight": "encoder.layers.1.self_attn_layer_norm.weight",
        "encoder.blocks.1.mlp.0.weight": "encoder.layers.1.fc1.weight",
        "encoder.blocks.1.mlp.2.bias": "encoder.layers.1.fc2.bias",
        "encoder.blocks.1.mlp_ln.bias": "encoder.layers.1.final_layer_norm.bias",
        "encoder.ln_post.weight": "encoder.layer_norm.weight",
        "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
        "decoder.positional_embedding": "decoder.embed_positions.weight",
        "decoder.blocks.0.cross_attn.value.weight": "decoder.layers.0.encoder_attn.v_proj.weight",
        "decoder.blocks.0.cross_attn_ln.bias": "decoder.layers.0.encoder_attn_layer_norm.bias",
        "decoder.ln.weight": "decoder.layer_norm.weight",
    }
    for openai_name, hf_name in pairs.items():
        assert openai_key_to_hf(openai_name) == hf_name
    with pytest.raises(ValueError, match="encoder.blocks.0.attn.rotary"):
        openai_to_hf_state_dict({"encoder.blocks.0.attn.rotary": torch.zeros(1)})


def test_hf_config_from_dims_sets_every_field():
    dims = dict(
        n_mels=128,
        n_audio_ctx=1500,
        n_audio_state=1280,
        n_audio_head=20,
        n_audio_layer=32,
        n_vocab=51866,
        n_text_ctx=448,
        n_text_state=1280,
        n_text_head=20,
        n_text_layer=32,
    )
    c = hf_config_from_openai_dims(dims)
    # whisper-large-v3 values (docs/checkpoint-formats.md section 4.1).
    assert (c.num_mel_bins, c.d_model, c.encoder_layers, c.encoder_attention_heads) == (128, 1280, 32, 20)
    assert (c.encoder_ffn_dim, c.decoder_ffn_dim, c.max_source_positions, c.max_target_positions) == (
        5120,
        5120,
        1500,
        448,
    )
    assert (c.bos_token_id, c.eos_token_id, c.decoder_start_token_id, c.vocab_size) == (
        50257,
        50257,
        50258,
        51866,
    )
    assert hf_config_from_openai_dims({**dims, "n_vocab": 51865}).eos_token_id == 50256
    with pytest.raises(ValueError, match="n_text_layer"):
        hf_config_from_openai_dims({k: v for k, v in dims.items() if k != "n_text_layer"})


# ------------------------------------------------------------------------------------------------ forward


def test_lengths_and_trimming(hf_dir):
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    out = encoder(random_mel(3), torch.tensor([200, 77, 1]))
    assert out.lengths.dtype == torch.int64
    assert out.lengths.tolist() == [100, 39, 1]  # (n - 1) // 2 + 1
    assert out.last_hidden_state.shape == (3, 100, D_MODEL)
    out = encoder(random_mel(2), torch.tensor([77, 10]))
    assert out.lengths.tolist() == [39, 5]
    assert out.last_hidden_state.shape == (2, 39, D_MODEL)  # batch max, not the full 100
    assert out.padding_mask().tolist()[1] == [True] * 5 + [False] * 34


def test_hidden_states_count_and_meaning(hf_dir):
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    enc = encoder.encoder
    captured = {}
    hook = enc.layers[0].register_forward_hook(lambda m, i, o: captured.setdefault("layer0", o))
    mel = random_mel(2, seed=5)
    with torch.no_grad():
        out = encoder(mel, torch.tensor([120, 30]))
        embeddings = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel))))
        embeddings = embeddings.transpose(1, 2) + enc.embed_positions.weight
    hook.remove()
    assert len(out.hidden_states) == LAYERS + 1
    assert all(h.shape == (2, POSITIONS, D_MODEL) for h in out.hidden_states)  # untrimmed
    torch.testing.assert_close(out.hidden_states[0], embeddings)  # 0 = conv + positions
    torch.testing.assert_close(out.hidden_states[1], captured["layer0"], rtol=0, atol=0)  # i = layer i
    torch.testing.assert_close(
        out.hidden_states[-1][:, :60], out.last_hidden_state, rtol=0, atol=0
    )  # final LN
    assert encoder(mel, torch.tensor([120, 30]), output_hidden_states=False).hidden_states is None


def test_batched_clips_equal_their_single_runs(hf_dir):
    featurizer = LogMelFeaturizer.from_pretrained(hf_dir)
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    rng = np.random.default_rng(0)
    short = (0.3 * rng.standard_normal(4000)).astype(np.float32)  # 0.25 s
    long = (0.3 * rng.standard_normal(31000)).astype(np.float32)  # 1.94 s
    features, feature_lengths = featurizer([short, long])
    assert feature_lengths.tolist() == [25, 194]
    with torch.no_grad():
        batch = encoder(features, feature_lengths)
        singles = [encoder(features[i : i + 1], feature_lengths[i : i + 1]) for i in range(2)]
    assert batch.lengths.tolist() == [13, 97]
    assert singles[0].last_hidden_state.shape == (1, 13, D_MODEL)
    for i, single in enumerate(singles):
        n = int(single.lengths[0])
        torch.testing.assert_close(
            batch.last_hidden_state[i, :n], single.last_hidden_state[0], rtol=0, atol=1e-5
        )


def test_random_init_and_freeze(hf_dir):
    config = WhisperSpeechEncoder.from_pretrained(hf_dir).config
    encoder = WhisperSpeechEncoder.from_config(config)
    assert encoder.hidden_size == D_MODEL
    assert all(p.requires_grad for n, p in encoder.named_parameters() if "embed_positions" not in n)
    encoder.freeze()
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_forward_rejects_wrong_shapes(hf_dir):
    encoder = WhisperSpeechEncoder.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match=r"\[B, 80, 200\]"):
        encoder(torch.zeros(1, 80, 3000), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"\[1, 200\]"):
        encoder(torch.zeros(1, 80, 200), torch.tensor([0]))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        WhisperSpeechEncoder.from_pretrained(tmp_path / "absent")


def test_directory_without_config_or_weights(tmp_path, hf_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json") as info:
        WhisperSpeechEncoder.from_pretrained(empty)
    assert str(empty) in str(info.value)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights") as info:
        WhisperSpeechEncoder.from_pretrained(only_config)
    assert str(only_config) in str(info.value)


def test_pickle_that_is_not_a_checkpoint(tmp_path):
    not_whisper = tmp_path / "dict.pt"
    torch.save({"foo": torch.zeros(2)}, not_whisper)
    with pytest.raises(CheckpointError, match="not an OpenAI Whisper checkpoint") as info:
        WhisperSpeechEncoder.from_pretrained(not_whisper)
    assert str(not_whisper) in str(info.value)

    arbitrary = tmp_path / "object.pkl"
    # An arbitrary object: weights_only refuses to unpickle it.
    arbitrary.write_bytes(pickle.dumps(pytest.approx(1.0), protocol=2))
    with pytest.raises(CheckpointError, match="weights_only") as info:
        WhisperSpeechEncoder.from_pretrained(arbitrary)
    assert str(arbitrary) in str(info.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match=str(garbage)):
        WhisperSpeechEncoder.from_pretrained(garbage)


def test_mismatched_shapes_name_the_file(tmp_path, hf_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_mel_bins"] = 128  # weights have 80-mel conv1
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"conv1.weight: checkpoint \(64, 80, 3\) vs model \(64, 128, 3\)"
    ) as info:
        WhisperSpeechEncoder.from_pretrained(bad)
    assert str(bad / "model.safetensors") in str(info.value)


def test_missing_encoder_key_is_reported(tmp_path, hf_dir):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    del weights["model.encoder.embed_positions.weight"]
    save_file(weights, partial / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing encoder keys \['embed_positions.weight'\]"):
        WhisperSpeechEncoder.from_pretrained(partial)


def test_openai_checkpoint_with_unknown_key(tmp_path, openai_pt):
    checkpoint = torch.load(openai_pt, weights_only=True)
    checkpoint["model_state_dict"]["encoder.extra_head.weight"] = torch.zeros(3)
    odd = tmp_path / "odd.pt"
    torch.save(checkpoint, odd)
    with pytest.raises(CheckpointError, match="encoder.extra_head.weight") as info:
        WhisperSpeechEncoder.from_pretrained(odd)
    assert str(odd) in str(info.value)
