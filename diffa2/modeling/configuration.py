"""DIFFA-2 model configuration and its two size presets (`real`, `tiny`).

A plain dataclass serialised to `config.json` beside the weights. It embeds the encoder's `WhisperConfig`
dict and the backbone's LLaDA `config.json` dict verbatim, and records where their base weights come from,
so a checkpoint that holds only the trained parts says exactly which bases it needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from diffa2.chat import DEFAULT_SYSTEM_PROMPT

FORMAT_VERSION = 1

# Whisper-large-v3 encoder (checkpoint-formats.md §4.1) and its DIFFA-2 tap layers (diffa2-model.md §2.3).
WHISPER_LARGE_V3 = {
    "num_mel_bins": 128,
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_layers": 32,
    "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51866,
}
WHISPER_LARGE_V3_TAPS = [3, 7, 11, 15, 19, 23, 27, 31]


@dataclass
class LoraSettings:
    """LoRA on the backbone; targets are LLaDA module names (DIFFA-2: r 8, alpha 16, dropout 0.05)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"])


@dataclass
class DIFFA2Config:
    """Everything needed to rebuild a DIFFA-2 model; sizes of the base models come from their own configs."""

    encoder: dict[str, Any]  # transformers WhisperConfig.to_dict() of the speech encoder
    backbone: dict[str, Any]  # the LLaDA config.json dict of the dLLM backbone
    encoder_source: str | None = None  # HF Whisper dir or OpenAI .pt the base encoder weights come from
    backbone_source: str | None = None  # LLaDA checkpoint dir the base backbone weights come from
    tokenizer_source: str | None = None  # tokenizer dir (relative paths resolve against the checkpoint dir)
    encoder_trainable: bool = False  # trained weights of a part are stored in checkpoints; frozen ones are not
    backbone_trainable: bool = False
    tap_layers: list[int] = field(default_factory=lambda: list(WHISPER_LARGE_V3_TAPS))
    num_queries: int = 64
    qformer_layers: int = 2
    qformer_heads: int = 20
    qformer_intermediate: int = 3072
    qformer_dropout: float = 0.1
    num_prompt_embeddings: int = 20
    stage: int = 2  # speech path: 1 = prompt embeddings + semantic; 2 = acoustic queries + semantic
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    lora: LoraSettings | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (semantic alignment) or 2 (acoustic + semantic), got {self.stage}")
        layers = int(self.encoder["encoder_layers"])
        bad = [i for i in self.tap_layers if not 0 <= i <= layers]
        if bad:
            raise ValueError(f"tap_layers {bad} outside the encoder's hidden states 0..{layers}")

    @property
    def window_seconds(self) -> float:
        """Audio window of the encoder: 2 mel frames per position, 100 mel frames per second."""
        return self.encoder["max_source_positions"] * 2 / 100

    @property
    def hidden_size(self) -> int:
        """The widest hidden state (encoder or backbone): DeepSpeed sizes its "auto" ZeRO buckets from it."""
        return max(int(self.backbone["d_model"]), int(self.encoder["d_model"]))

    @property
    def n_mels(self) -> int:
        return int(self.encoder["num_mel_bins"])

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "diffa2", **asdict(self)}

    def to_json_string(self) -> str:
        """The config as JSON text (the interface transformers' loggers, e.g. TensorBoard, call)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DIFFA2Config:
        data = dict(data)
        if data.pop("model_type", "diffa2") != "diffa2":
            raise ValueError(f"{source}: not a DIFFA-2 config (model_type {data.get('model_type')!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{source}: written by a newer diffa2 (format {data['format_version']})")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> DIFFA2Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))
