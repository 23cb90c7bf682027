"""DIFFA-2 model configuration (a transformers `PreTrainedConfig`) and the settings it carries.

It embeds the encoder's `WhisperConfig` dict and the backbone's LLaDA `config.json` dict verbatim, and records
where their base weights come from, so a checkpoint that holds only the trained parts says exactly which bases
it needs. Reading is strict: an unknown key is an error, not silently dropped (a typo in a hand-edited config
would otherwise change the model without a word).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from transformers import PreTrainedConfig

from diffa2.audio import check_long_audio
from diffa2.chat import COMPAT_MODES, DEFAULT_SYSTEM_PROMPT

# 2: `stage` (1|2) became `speech_path`; `compat`, `training_system_prompt` and `release` added.
FORMAT_VERSION = 2

# Whisper-large-v3 encoder (docs/checkpoint-formats.md) and its DIFFA-2 tap layers (docs/model.md).
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

SpeechPath = Literal["prompt+semantic", "acoustic+semantic"]
# The reference's `--training_stage` numbers: 1 = the 20 prompt embeddings before the semantic tokens (stage-1
# alignment), 2 = the 64 acoustic queries before them (every later stage and all evaluation).
SPEECH_PATH_OF_STAGE: dict[int, SpeechPath] = {1: "prompt+semantic", 2: "acoustic+semantic"}


@dataclass
class LoraSettings:
    """LoRA on the backbone; targets are LLaDA module names (DIFFA-2: r 8, alpha 16, dropout 0.05)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"])


def speech_path_of(value: str | int) -> SpeechPath:
    """A speech path by name, or by the reference's stage number (1 or 2)."""
    if isinstance(value, int) and not isinstance(value, bool) and value in SPEECH_PATH_OF_STAGE:
        return SPEECH_PATH_OF_STAGE[value]
    if isinstance(value, str) and value.isdigit() and int(value) in SPEECH_PATH_OF_STAGE:
        return SPEECH_PATH_OF_STAGE[int(value)]
    if value in SPEECH_PATH_OF_STAGE.values():
        return value  # type: ignore[return-value]
    raise ValueError(f"speech_path must be one of {list(SPEECH_PATH_OF_STAGE.values())} (or the reference's stage "
                     f"number 1 or 2), got {value!r}")


class DIFFA2Config(PreTrainedConfig):
    """Everything needed to rebuild a DIFFA-2 model; sizes of the base models come from their own configs."""

    model_type = "diffa2"
    # Keys transformers writes into every config.json (Trainer adds `use_cache`); accepted on reading, never required.
    _TRANSFORMERS_KEYS: ClassVar[frozenset[str]] = frozenset(PreTrainedConfig().to_dict()) | {
        "torch_dtype",
        "use_cache",
    }

    encoder: dict[str, Any] | None = None  # transformers WhisperConfig.to_dict() of the speech encoder
    backbone: dict[str, Any] | None = None  # the LLaDA config.json dict of the dLLM backbone
    encoder_source: str | None = None  # HF Whisper dir or OpenAI .pt the base encoder weights come from
    backbone_source: str | None = None  # LLaDA checkpoint dir the base backbone weights come from
    tokenizer_source: str | None = None  # tokenizer dir (relative paths resolve against the checkpoint dir)
    encoder_trainable: bool = False  # trained weights of a part are stored in checkpoints; frozen ones are not
    backbone_trainable: bool = False
    tap_layers: list[int] | None = None  # indices into the encoder's hidden states; None = large-v3's
    num_queries: int = 64
    qformer_layers: int = 2
    qformer_heads: int = 20
    qformer_intermediate: int = 3072
    qformer_dropout: float = 0.1
    num_prompt_embeddings: int = 20
    speech_path: str | int = "acoustic+semantic"  # which tokens lead the semantic ones (see SPEECH_PATH_OF_STAGE)
    # Inference-time system prompt, and the one training prompts are built with (None = the same). DIFFA-2's
    # released code trains with a long prompt and answers with the short one (docs/reference-compat.md).
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    training_system_prompt: str | None = None
    # "toolkit": batch-safe inference with the toolkit's fixes; "reference": DIFFA-2's released code's behaviour.
    compat: str = "toolkit"
    # A clip over the encoder window at inference: "trim" (cut to the window, DIFFA-2's behaviour) or "window"
    # (encoded window by window, the speech spans concatenated; docs/long-audio.md).
    long_audio: str = "trim"
    release: str | None = None  # where an imported DIFFA-2 release came from (None: trained by this toolkit)
    lora: LoraSettings | dict | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self, **kwargs: Any) -> None:
        # Checked here, before PreTrainedConfig sees them, so a typo is named instead of stored.
        unknown = sorted(set(kwargs) - self._TRANSFORMERS_KEYS)
        if unknown:
            known = sorted(f.name for f in fields(self) if not f.name.startswith("_"))
            raise ValueError(f"unknown keys {unknown} in a DIFFA-2 config; known keys are {known}")
        super().__post_init__(**kwargs)
        if self.encoder is None or self.backbone is None:
            raise ValueError("a DIFFA-2 config needs both `encoder` (a WhisperConfig dict) and `backbone` "
                             "(a LLaDA config dict)")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        self.speech_path = speech_path_of(self.speech_path)
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {list(COMPAT_MODES)}, got {self.compat!r}")
        check_long_audio(self.long_audio)
        if self.tap_layers is None:
            self.tap_layers = list(WHISPER_LARGE_V3_TAPS)
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
        """The wider of encoder and backbone widths: DeepSpeed sizes its "auto" ZeRO buckets from it."""
        return max(int(self.backbone["d_model"]), int(self.encoder["d_model"]))

    @property
    def n_mels(self) -> int:
        return int(self.encoder["num_mel_bins"])

    @property
    def uses_acoustic_path(self) -> bool:
        return self.speech_path == "acoustic+semantic"

    @property
    def prompt_for_training(self) -> str:
        """The system prompt training items are built with."""
        return self.system_prompt if self.training_system_prompt is None else self.training_system_prompt

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["lora"] = asdict(self.lora) if isinstance(self.lora, LoraSettings) else self.lora
        return data

    def to_json_string(self, use_diff: bool = False) -> str:
        """The whole config as JSON text (never a diff against defaults: a checkpoint states every setting)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    @classmethod
    def from_checkpoint_dict(cls, data: dict[str, Any], source: str = "config") -> DIFFA2Config:
        """A config from a `config.json` dict, strictly: unknown keys and newer formats are errors naming `source`."""
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{source}: not a DIFFA-2 config (model_type {model_type!r})")
        version = data.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise ValueError(f"{source}: written by a newer diffa2 (format {version})")
        if "stage" in data and version < 2:  # format 1 called the speech path `stage`
            data["speech_path"] = data.pop("stage")
        data["format_version"] = FORMAT_VERSION
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | Path) -> DIFFA2Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        return cls.from_checkpoint_dict(json.loads(path.read_text()), source=str(path))
