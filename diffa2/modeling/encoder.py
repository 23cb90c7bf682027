"""Whisper speech encoder: transformers' ``WhisperEncoder`` plus DIFFA's length bookkeeping and loaders.

Behaviour follows DIFFA's encoder wrapper (docs/model.md section 2.1): the encoder
always sees the full padded window (HF Whisper refuses any other length), the real encoder length of each
clip is ``(mel_frames - 1) // 2 + 1`` (conv2 has stride 2, giving 50 frames per second), and only
``last_hidden_state`` is cut to the batch-max real length; ``hidden_states`` stay full length.

Checkpoints accepted by ``WhisperSpeechEncoder.from_pretrained`` (formats in
docs/checkpoint-formats.md sections 2-4):

* a Hugging Face Whisper directory: ``config.json`` plus ``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, or ``pytorch_model.bin``; parameter names prefixed ``model.encoder.``
  (WhisperForConditionalGeneration), ``encoder.`` (WhisperModel) or bare (WhisperEncoder);
* an OpenAI Whisper ``.pt`` file (``{"dims", "model_state_dict"}``), renamed with ``whisper_convert``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from diffa2.modeling.safe_load import CheckpointError, load_weights_only
from diffa2.modeling.whisper_convert import hf_config_from_openai_dims, openai_to_hf_state_dict

# Key prefixes of the encoder inside the layouts we accept, most specific first.
_HF_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"


@dataclass
class SpeechEncoderOutput:
    """Encoder output: trimmed last layer, per-clip real lengths, and every untrimmed hidden state."""

    # [B, T_max, d]: final-LayerNorm output, cut to T_max = max(lengths).
    last_hidden_state: torch.Tensor
    # [B] int64: real encoder frames per clip, (feature_lengths - 1) // 2 + 1.
    lengths: torch.Tensor
    # num_layers + 1 tensors [B, max_source_positions, d], not trimmed (padding frames included):
    # index 0 = conv1/conv2 + positional embeddings, index i (1..num_layers-1) = output of the i-th layer
    # (``encoder.layers[i - 1]``),
    # index num_layers = final-LayerNorm output of the last layer (== last_hidden_state before trimming).
    # Checked against transformers 5.24: WhisperEncoder records each WhisperEncoderLayer's output and
    # `capture_outputs(tie_last_hidden_states=True)` replaces the last entry with `last_hidden_state`,
    # so the raw (pre-LayerNorm) output of the last layer is not exposed.
    hidden_states: tuple[torch.Tensor, ...] | None

    def padding_mask(self) -> torch.Tensor:
        """Bool [B, T_max], True on real frames of ``last_hidden_state``, so adapters can ignore padding."""
        t_max = self.last_hidden_state.shape[1]
        positions = torch.arange(t_max, device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]


def encoder_lengths(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Real encoder frames for n real mel frames: ``(n - 1) // 2 + 1`` (DIFFA; conv2 k=3, stride 2, pad 1)."""
    return (feature_lengths.long() - 1) // 2 + 1


class WhisperSpeechEncoder(nn.Module):
    """Whisper encoder taking padded log-mels and real mel lengths, returning DIFFA-style outputs."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config)

    @classmethod
    def from_config(cls, config: WhisperConfig) -> WhisperSpeechEncoder:
        """Randomly initialised encoder (used when a tiny preset trains it from scratch)."""
        return cls(config)

    @property
    def hidden_size(self) -> int:
        """Width d of every encoder frame."""
        return self.config.d_model

    @property
    def num_layers(self) -> int:
        """Number of transformer layers; ``hidden_states`` has this many + 1 entries."""
        return self.config.encoder_layers

    @property
    def n_mels(self) -> int:
        """Mel bins the first convolution expects (80 or 128 for real Whisper)."""
        return self.config.num_mel_bins

    @property
    def max_source_positions(self) -> int:
        """Encoder frames of a full window (1500 for 30 s)."""
        return self.config.max_source_positions

    @property
    def input_frames(self) -> int:
        """Mel frames the encoder requires: ``2 * max_source_positions`` (3000 for 30 s)."""
        return self.config.max_source_positions * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]

    def freeze(self) -> WhisperSpeechEncoder:
        """Stop gradients and switch to eval mode (DIFFA keeps the encoder frozen in every stage)."""
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        return self

    def forward(
        self,
        input_features: torch.Tensor,
        feature_lengths: torch.Tensor,
        *,
        output_hidden_states: bool = True,
    ) -> SpeechEncoderOutput:
        """Encode [B, n_mels, 2*max_source_positions] log-mels whose real lengths are ``feature_lengths``."""
        expected = (self.n_mels, self.input_frames)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"input_features must be [B, {expected[0]}, {expected[1]}] (padded to the full window), "
                f"got {tuple(input_features.shape)}"
            )
        feature_lengths = torch.as_tensor(feature_lengths, device=input_features.device).long()
        if feature_lengths.shape != (input_features.shape[0],):
            raise ValueError(
                f"feature_lengths must be [{input_features.shape[0]}], got {tuple(feature_lengths.shape)}"
            )
        if bool((feature_lengths < 1).any()) or bool((feature_lengths > self.input_frames).any()):
            raise ValueError(
                f"feature_lengths must lie in [1, {self.input_frames}], got {feature_lengths.tolist()}"
            )
        dtype = self.encoder.conv1.weight.dtype
        out = self.encoder(
            input_features.to(dtype), output_hidden_states=output_hidden_states, return_dict=True
        )
        lengths = encoder_lengths(feature_lengths)
        t_max = int(lengths.max())
        hidden_states = tuple(out.hidden_states) if output_hidden_states else None
        return SpeechEncoderOutput(
            last_hidden_state=out.last_hidden_state[:, :t_max],
            lengths=lengths,
            hidden_states=hidden_states,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, torch_dtype: torch.dtype | None = None
    ) -> WhisperSpeechEncoder:
        """Load the encoder of an HF Whisper directory or an OpenAI ``.pt`` file; strict, fp32 unless told."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such Whisper checkpoint (directory or OpenAI .pt file)")
        if path.is_dir():
            config, state_dict, source = _read_hf_directory(path)
        else:
            config, state_dict, source = _read_openai_checkpoint(path)
        # Build on the meta device (no random init of ~600M parameters for large-v3), then take the tensors.
        with torch.device("meta"):
            model = cls(config)
        _strict_load(model.encoder, state_dict, source)
        model.to(torch_dtype or torch.float32)
        model.eval()
        return model


def _read_hf_directory(directory: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], Path]:
    """Config and encoder-only state dict (prefix stripped) of an HF Whisper directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory}: not a Hugging Face Whisper directory (no config.json); "
            "pass an HF Whisper directory or an OpenAI whisper .pt file"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    if raw.get("model_type") != "whisper":
        raise CheckpointError(f"{config_path}: model_type is {raw.get('model_type')!r}, expected 'whisper'")
    config = WhisperConfig.from_dict(raw)

    if (directory / _SAFETENSORS).is_file():
        source = directory / _SAFETENSORS
        state_dict = _read_safetensors_encoder([source])
    elif (directory / _SAFETENSORS_INDEX).is_file():
        source = directory / _SAFETENSORS_INDEX
        try:
            weight_map = json.loads(source.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{source}: not a safetensors index (needs a 'weight_map')") from exc
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{source}: shard file(s) listed in the index are missing: {absent}")
        state_dict = _read_safetensors_encoder(shards)
    elif (directory / _TORCH_BIN).is_file():
        source = directory / _TORCH_BIN
        full = load_weights_only(source)
        if not _is_tensor_dict(full):
            raise CheckpointError(f"{source}: expected a dict of parameter name -> tensor")
        state_dict = _select_encoder(full, source)
    else:
        raise CheckpointError(
            f"{directory}: has config.json but no weights; expected {_SAFETENSORS}, {_SAFETENSORS_INDEX} "
            f"(+ shards) or {_TORCH_BIN}"
        )
    return config, state_dict, source


def _encoder_prefix(keys: set[str], source: Path) -> str:
    """The prefix under which the encoder's parameters live in this checkpoint."""
    for prefix in _HF_ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in keys:
            return prefix
    raise CheckpointError(
        f"{source}: no Whisper encoder found (looked for 'model.encoder.conv1.weight', "
        f"'encoder.conv1.weight' or 'conv1.weight' among {len(keys)} keys)"
    )


def _select_encoder(state_dict: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Keep the encoder's tensors and strip their prefix."""
    prefix = _encoder_prefix(set(state_dict), source)
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _read_safetensors_encoder(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read only the encoder tensors from one or more safetensors files (the decoder is never loaded)."""
    handles = {}
    try:
        for file in files:
            handles[file] = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    all_keys = {key: file for file, handle in handles.items() for key in handle.keys()}
    prefix = _encoder_prefix(set(all_keys), files[0] if len(files) == 1 else files[0].parent)
    return {
        key[len(prefix) :]: handles[file].get_tensor(key)
        for key, file in all_keys.items()
        if key.startswith(prefix)
    }


def _is_tensor_dict(obj: object) -> bool:
    """True for a non-empty dict mapping str to tensors."""
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _read_openai_checkpoint(path: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], Path]:
    """Config and HF-named encoder state dict of an OpenAI ``{"dims", "model_state_dict"}`` file."""
    ckpt = load_weights_only(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("dims"), dict) and "model_state_dict" in ckpt):
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict', "
            f"found {found}); for Hugging Face weights pass the directory holding config.json"
        )
    if not _is_tensor_dict(ckpt["model_state_dict"]):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a dict of parameter name -> tensor")
    try:
        config = hf_config_from_openai_dims(ckpt["dims"])
        hf_state = openai_to_hf_state_dict(ckpt["model_state_dict"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return config, _select_encoder(hf_state, path), path


def _strict_load(encoder: WhisperEncoder, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Load every encoder tensor with matching names and shapes, or raise naming the file and the keys."""
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing encoder keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected encoder keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append(f"shape mismatches (config vs weights) {mismatched[:5]}")
    if problems:
        raise CheckpointError(f"{source}: cannot load the Whisper encoder: " + "; ".join(problems))
    # assign=True swaps the meta tensors for the loaded ones (requires_grad of the module is kept).
    encoder.load_state_dict(state_dict, strict=True, assign=True)
