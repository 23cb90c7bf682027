"""Size presets: `real` (Whisper-large-v3 + LLaDA-8B-Instruct, DIFFA-2's adapters) and `tiny` (same code, CPU sizes).

Presets only pin numbers; all wiring lives in `DIFFA2Model`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import WhisperConfig

from diffa2.chat import SpecialIds
from diffa2.modeling.backbone import llada_config, read_llada_config
from diffa2.modeling.configuration import WHISPER_LARGE_V3_TAPS, DIFFA2Config
from diffa2.modeling.safe_load import load_weights_only
from diffa2.modeling.whisper_convert import hf_config_from_openai_dims


def encoder_config_of(source: str | Path) -> dict:
    """The WhisperConfig dict of an HF Whisper directory or an OpenAI `.pt` file (read, not guessed)."""
    source = Path(source)
    if source.is_dir():
        return WhisperConfig.from_pretrained(str(source)).to_dict()
    # mmap: read `dims` without loading a multi-GB file into memory; weights_only: never unpickle code.
    checkpoint = load_weights_only(source, mmap=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint:
        raise ValueError(f"{source}: not an OpenAI Whisper checkpoint (no 'dims' entry)")
    return hf_config_from_openai_dims(checkpoint["dims"]).to_dict()


def real_config(
    whisper: str | Path, llada: str | Path, *, speech_path: str | int = "acoustic+semantic",
    tap_layers: list[int] | None = None
) -> DIFFA2Config:
    """DIFFA-2 at full size: frozen Whisper-large-v3 encoder and LLaDA-8B-Instruct backbone from local paths.

    `tap_layers` defaults to DIFFA-2's large-v3 taps; other encoders (e.g. whisper-small) need their own.
    """
    encoder = encoder_config_of(whisper)
    return DIFFA2Config(
        encoder=encoder,
        backbone=read_llada_config(llada),
        encoder_source=str(whisper),
        backbone_source=str(llada),
        tokenizer_source=str(llada),
        tap_layers=list(tap_layers or WHISPER_LARGE_V3_TAPS),
        num_queries=64,
        qformer_layers=2,
        qformer_heads=int(encoder["encoder_attention_heads"]),
        qformer_intermediate=3072,
        num_prompt_embeddings=20,
        speech_path=speech_path,
    )


def tiny_encoder_config(*, d_model: int = 64, layers: int = 2, heads: int = 4, window_seconds: float = 4.0,
                        n_mels: int = 80, init_std: float = 0.1) -> dict:
    """A small Whisper encoder config with every architectural key explicit.

    `init_std` is 0.1, not Whisper's 0.02: at 0.02 the two convolutions shrink the log-mel (std ~0.36) to ~0.01,
    60x below the sinusoidal positions (std ~0.63) they are added to, so a randomly initialised encoder starts out
    encoding position, not sound. 0.1 keeps the conv stack roughly variance-preserving at these widths.
    """
    positions = int(round(window_seconds * 100 / 2))
    return WhisperConfig(
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=positions,
        max_target_positions=32,
        vocab_size=64,  # the decoder is never built; its token ids only need to be in range
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=init_std,
    ).to_dict()


def tiny_config(
    special: SpecialIds,
    vocab_size: int,
    *,
    encoder_dim: int = 64,
    encoder_layers: int = 2,
    llm_dim: int = 128,
    llm_layers: int = 4,
    llm_heads: int = 4,
    window_seconds: float = 4.0,
    num_queries: int = 8,
    speech_path: str | int = "acoustic+semantic",
    rope_theta: float = 10000.0,
) -> DIFFA2Config:
    """DIFFA-2 at laptop size, trained from scratch (encoder and backbone trainable; no base sources).

    `rope_theta` is 10,000 rather than LLaDA's 500,000: with 32-dimensional heads, theta 500,000 leaves only a
    handful of rotary frequencies that change over a ~150-token sequence, so a small model trained from scratch
    can barely tell answer slots apart; 10,000 spreads the frequencies over the whole range.
    """
    backbone = llada_config(
        d_model=llm_dim,
        n_heads=llm_heads,
        n_layers=llm_layers,
        mlp_hidden_size=3 * llm_dim,
        vocab_size=vocab_size,
        mask_token_id=special.mask,
        eos_token_id=special.eos,
        pad_token_id=special.pad,
        rope_theta=rope_theta,
    )
    return DIFFA2Config(
        encoder=tiny_encoder_config(d_model=encoder_dim, layers=encoder_layers, window_seconds=window_seconds),
        backbone=backbone,
        encoder_trainable=True,
        backbone_trainable=True,
        tap_layers=list(range(1, encoder_layers + 1)),
        num_queries=num_queries,
        qformer_layers=1,
        qformer_heads=4,
        qformer_intermediate=2 * encoder_dim,
        qformer_dropout=0.0,
        num_prompt_embeddings=4,
        speech_path=speech_path,
    )
