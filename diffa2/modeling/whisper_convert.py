"""OpenAI Whisper ``.pt`` checkpoint -> Hugging Face Whisper names and config.

Facts used (restated in docs/checkpoint-formats.md, sections 2-3):

* The OpenAI file is ``torch.save({"dims": {...10 ints...}, "model_state_dict": {...}})``
  (openai/whisper ``whisper/__init__.py::load_model``).
* HF names are obtained by applying an ordered list of plain substring replacements to every key
  (huggingface/transformers ``models/whisper/convert_openai_to_hf.py``); the result is the state dict of a
  ``WhisperModel`` (no ``model.`` prefix; ``WhisperForConditionalGeneration`` checkpoints add it).
* The HF config is built from the dims; the MLP width is 4 * n_state in OpenAI's code (``whisper/model.py``).

Only this direction (OpenAI -> HF) is implemented.
"""

from __future__ import annotations

import re

import torch
from transformers import WhisperConfig

# Ordered (OpenAI substring, HF substring) pairs, each applied with str.replace to every key.
# Order matters only in that every pattern is matched against the partly renamed key; none of these
# patterns overlaps another's output (".attn.query" cannot match inside ".cross_attn.query").
OPENAI_TO_HF_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("blocks", "layers"),
    ("mlp.0", "fc1"),
    ("mlp.2", "fc2"),
    ("mlp_ln", "final_layer_norm"),
    (".attn.query", ".self_attn.q_proj"),
    (".attn.key", ".self_attn.k_proj"),
    (".attn.value", ".self_attn.v_proj"),
    (".attn.out", ".self_attn.out_proj"),
    (".attn_ln", ".self_attn_layer_norm"),
    (".cross_attn.query", ".encoder_attn.q_proj"),
    (".cross_attn.key", ".encoder_attn.k_proj"),
    (".cross_attn.value", ".encoder_attn.v_proj"),
    (".cross_attn.out", ".encoder_attn.out_proj"),
    (".cross_attn_ln", ".encoder_attn_layer_norm"),
    ("decoder.ln.", "decoder.layer_norm."),
    ("encoder.ln.", "encoder.layer_norm."),
    ("token_embedding", "embed_tokens"),
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("ln_post", "layer_norm"),
)

# Every name a WhisperModel state dict can hold (transformers models/whisper/modeling_whisper.py).
_ATTN = r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)"
_LN = r"(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)\.(weight|bias)"
_VALID_HF_KEY = re.compile(
    r"^(?:"
    r"encoder\.conv[12]\.(weight|bias)"
    r"|(encoder|decoder)\.embed_positions\.weight"
    r"|decoder\.embed_tokens\.weight"
    r"|(encoder|decoder)\.layer_norm\.(weight|bias)"
    rf"|(encoder|decoder)\.layers\.\d+\.(?:{_ATTN}|{_LN}|fc[12]\.(weight|bias))"
    r")$"
)
_DIM_FIELDS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)


def openai_key_to_hf(key: str) -> str:
    """Rename one OpenAI Whisper parameter name to its HF ``WhisperModel`` name (no validation)."""
    for old, new in OPENAI_TO_HF_REPLACEMENTS:
        key = key.replace(old, new)
    return key


def openai_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenAI Whisper state dict to HF ``WhisperModel`` names, raising on names it cannot map."""
    converted: dict[str, torch.Tensor] = {}
    unmappable = []
    for key, value in state_dict.items():
        new_key = openai_key_to_hf(key)
        if not _VALID_HF_KEY.match(new_key):
            unmappable.append(key)
            continue
        if new_key in converted:
            raise ValueError(f"two OpenAI Whisper keys map to the same HF key {new_key!r}")
        converted[new_key] = value
    if unmappable:
        shown = ", ".join(sorted(unmappable)[:10])
        raise ValueError(f"{len(unmappable)} OpenAI Whisper key(s) have no HF Whisper name: {shown}")
    return converted


def hf_config_from_openai_dims(dims: dict[str, int]) -> WhisperConfig:
    """Build a WhisperConfig, every architectural field explicit, from OpenAI ``ModelDimensions`` fields."""
    missing = [f for f in _DIM_FIELDS if f not in dims]
    if missing:
        raise ValueError(f"OpenAI Whisper dims lack {missing}; got {sorted(dims)}")
    d = {f: int(dims[f]) for f in _DIM_FIELDS}
    if d["n_audio_state"] != d["n_text_state"]:
        # HF Whisper has a single d_model for encoder and decoder.
        raise ValueError(f"n_audio_state={d['n_audio_state']} != n_text_state={d['n_text_state']}")
    # convert_openai_to_hf: multilingual-v3 vocab (51866) uses 50257 as endoftext, older vocabularies 50256.
    endoftext = 50257 if d["n_vocab"] > 51865 else 50256
    return WhisperConfig(
        vocab_size=d["n_vocab"],
        num_mel_bins=d["n_mels"],
        d_model=d["n_audio_state"],
        encoder_layers=d["n_audio_layer"],
        encoder_attention_heads=d["n_audio_head"],
        encoder_ffn_dim=4 * d["n_audio_state"],  # OpenAI's MLP is Linear(n_state, 4 * n_state)
        decoder_layers=d["n_text_layer"],
        decoder_attention_heads=d["n_text_head"],
        decoder_ffn_dim=4 * d["n_text_state"],
        max_source_positions=d["n_audio_ctx"],
        max_target_positions=d["n_text_ctx"],
        activation_function="gelu",
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        bos_token_id=endoftext,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        decoder_start_token_id=endoftext + 1,
        is_encoder_decoder=True,
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )
