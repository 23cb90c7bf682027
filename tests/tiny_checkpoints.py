"""Writers of tiny checkpoints with exactly the on-disk layout of the real published ones.

Layouts follow docs/checkpoint-formats.md. Each writer builds the
real model class with a tiny config and saves it the way the real files were produced, so loaders tested
on these files also accept the real checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------------
# Whisper
# ---------------------------------------------------------------------------------------------------------


def _perturb_layer_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every LayerNorm non-trivial weights (default init is 1/0) so parity tests exercise them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.2 * torch.randn(module.bias.shape, generator=gen))


def write_tiny_hf_whisper(
    directory: str | Path,
    *,
    n_mels: int = 80,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_source_positions: int = 100,
    seed: int = 0,
    with_bin: bool = False,
    with_safetensors: bool = True,
    vocab_size: int = 51866,
    max_target_positions: int = 32,
) -> Path:
    """Write an HF Whisper directory (config, preprocessor config, seq2seq weights) like openai/whisper-*."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Every architectural key explicit: the library defaults (80 mels, d 384, 4 layers, 1500 positions) are
    # those of whisper-tiny, not of the checkpoint being imitated.
    endoftext = 50257 if vocab_size > 51865 else 50256
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=layers,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=max_source_positions,
        max_target_positions=max_target_positions,
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
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    _perturb_layer_norms(model, seed)
    if with_safetensors:
        model.save_pretrained(directory)  # model.safetensors with `model.`-prefixed names + config.json
    else:
        config.save_pretrained(directory)
    if with_bin:
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    # chunk_length is the window in seconds: 2 * max_source_positions mel frames at 100 frames/s.
    window = 2 * max_source_positions / 100
    chunk_length = int(window) if window.is_integer() else window
    WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_length).save_pretrained(directory)
    return directory


def tiny_openai_whisper_model(
    *,
    n_mels: int = 80,
    n_audio_ctx: int = 100,
    n_state: int = 64,
    n_head: int = 4,
    n_layer: int = 2,
    n_vocab: int = 51866,
    n_text_ctx: int = 32,
    seed: int = 0,
):
    """A random ``whisper.model.Whisper`` of the openai-whisper package (encoder and decoder)."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=n_audio_ctx,
        n_audio_state=n_state,
        n_audio_head=n_head,
        n_audio_layer=n_layer,
        n_vocab=n_vocab,
        n_text_ctx=n_text_ctx,
        n_text_state=n_state,
        n_text_head=n_head,
        n_text_layer=n_layer,
    )
    torch.manual_seed(seed)
    model = Whisper(dims).eval()
    # openai-whisper allocates the learned decoder positions with torch.empty (real files always overwrite
    # them); give them defined values so files written from the same seed are identical and finite.
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    _perturb_layer_norms(model, seed)
    return model


def write_tiny_openai_whisper(
    path: str | Path,
    *,
    n_mels: int = 80,
    n_audio_ctx: int = 100,
    n_state: int = 64,
    n_head: int = 4,
    n_layer: int = 2,
    n_vocab: int = 51866,
    n_text_ctx: int = 32,
    seed: int = 0,
) -> Path:
    """Write an OpenAI-format ``.pt`` ({"dims": 10 ints, "model_state_dict"}) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_openai_whisper_model(
        n_mels=n_mels,
        n_audio_ctx=n_audio_ctx,
        n_state=n_state,
        n_head=n_head,
        n_layer=n_layer,
        n_vocab=n_vocab,
        n_text_ctx=n_text_ctx,
        seed=seed,
    )
    # A plain dict of ints, so that torch.load(weights_only=True) accepts it, as whisper.load_model does.
    dims = {k: int(v) for k, v in dataclasses.asdict(model.dims).items()}
    torch.save({"dims": dims, "model_state_dict": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Real-size configs without weights (for models built on the meta device)
# ---------------------------------------------------------------------------------------------------------

# openai/whisper-large-v3 config.json, every key the published file holds (docs/checkpoint-formats.md).
WHISPER_LARGE_V3_CONFIG = {
    "_name_or_path": "openai/whisper-large-v3",
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "apply_spec_augment": False,
    "architectures": ["WhisperForConditionalGeneration"],
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "classifier_proj_size": 256,
    "d_model": 1280,
    "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 32,
    "decoder_start_token_id": 50258,
    "dropout": 0.0,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 32,
    "eos_token_id": 50257,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_length": 448,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "median_filter_width": 7,
    "model_type": "whisper",
    "num_hidden_layers": 32,
    "num_mel_bins": 128,
    "pad_token_id": 50256,
    "scale_embedding": False,
    "torch_dtype": "float16",
    "transformers_version": "4.43.2",
    "use_cache": True,
    "use_weighted_layer_sum": False,
    "vocab_size": 51866,
}


def write_whisper_large_v3_config(directory: str | Path) -> Path:
    """An `openai/whisper-large-v3` directory holding only its config.json (real sizes, no weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(WHISPER_LARGE_V3_CONFIG, indent=2))
    return directory


def write_llada_8b_config(directory: str | Path) -> Path:
    """A `GSAI-ML/LLaDA-8B-Instruct` directory holding only its config.json (real sizes, no weights)."""
    from tiny_llada import LLADA_8B_CONFIG

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLADA_8B_CONFIG, indent=2))
    return directory
