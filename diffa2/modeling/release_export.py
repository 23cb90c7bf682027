"""Exporting a model as a released DIFFA-2 checkpoint folder (`DIFFAModel`, HF repo `zhoujiaming777/DIFFA-2`).

Writes what the reference training script's `trainer.save_model()` writes (`docs/release-format.md`), with the
layout and name mapping of `diffa2.modeling.release_layout`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from diffa2.io import atomic_directory
from diffa2.modeling.configuration import DIFFA2Config
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.release_layout import (
    BIN_NAME,
    CONFIG_NAME,
    DTYPE_NAMES,
    GENERATION_CONFIG_NAME,
    LLADA_AUTO_MAP,
    LLADA_HUB_ID,
    REFERENCE_LORA,
    REFERENCE_PROMPT_COUNT,
    REFERENCE_PROMPT_SIZE,
    REFERENCE_WHISPER_MODEL_ID,
    RELEASE_ARCHITECTURE,
    RELEASE_LEFTOVERS,
    RELEASE_TRANSFORMERS_VERSION,
    WHISPER_TAP_LAYERS,
    native_to_release,
    without_hub_keys,
)

# --------------------------------------------------------------------------------------------------
# Writing a release folder
# --------------------------------------------------------------------------------------------------


def whisper_model_id_of(tap_layers: list[int]) -> str:
    """The `whisper_model_id` the reference maps to these tap layers."""
    for model_id, taps in WHISPER_TAP_LAYERS.items():
        if taps == list(tap_layers):
            return model_id
    raise ValueError(f"tap layers {tap_layers} cannot be written in the release format: the reference knows only "
                     f"{WHISPER_TAP_LAYERS}")


def release_config_from_native(config: DIFFA2Config, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json the reference writes for this model (its key set; transformers sorts the keys)."""
    model_id = whisper_model_id_of(config.tap_layers)
    whisper = {**without_hub_keys(config.encoder), "_name_or_path": model_id,
               "transformers_version": RELEASE_TRANSFORMERS_VERSION}
    llm = {"auto_map": LLADA_AUTO_MAP, **without_hub_keys(config.backbone), "_name_or_path": LLADA_HUB_ID,
           "transformers_version": RELEASE_TRANSFORMERS_VERSION}
    return {
        **copy.deepcopy(RELEASE_LEFTOVERS),
        "architectures": [RELEASE_ARCHITECTURE],
        "llm_config": llm,
        "prompt_size": config.num_queries,
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": RELEASE_TRANSFORMERS_VERSION,
        "whisper_config": whisper,
        "whisper_model_id": model_id,
    }


def reference_incompatibilities(config: DIFFA2Config) -> list[str]:
    """What the reference code could not run as written (it hard-codes these values rather than reading them)."""
    notes = []
    if config.tap_layers != WHISPER_TAP_LAYERS[REFERENCE_WHISPER_MODEL_ID]:
        notes.append(f"tap layers {config.tap_layers}: the reference always taps {REFERENCE_WHISPER_MODEL_ID}'s")
    if config.num_queries != REFERENCE_PROMPT_SIZE:
        notes.append(f"{config.num_queries} acoustic queries: the reference always builds {REFERENCE_PROMPT_SIZE}")
    if config.num_prompt_embeddings != REFERENCE_PROMPT_COUNT:
        notes.append(f"{config.num_prompt_embeddings} prompt embeddings: the reference builds {REFERENCE_PROMPT_COUNT}")
    lora = config.lora
    if lora is not None and (lora.r, lora.alpha) != (REFERENCE_LORA.r, REFERENCE_LORA.alpha):
        notes.append(f"LoRA r {lora.r}, alpha {lora.alpha}: the reference's loader assumes r 8, alpha 16")
    # The reference's loader re-reads both bases from their original folders and keeps only adapters and LoRA.
    if config.backbone_trainable:
        notes.append("the backbone was trained or had LoRA merged into it: the reference replaces it with the "
                     "LLaDA folder's weights (export before merging LoRA)")
    if config.encoder_trainable:
        notes.append("the encoder was trained: the reference replaces it with the Whisper folder's weights")
    return notes


@dataclass
class ReleaseExport:
    """A written release folder, for a summary."""

    directory: Path
    tensors: int
    parameters: int
    dtype: torch.dtype
    notes: list[str]


def _plain(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached CPU copy in `dtype` with storage of its own: never a view into a model parameter."""
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def save_release(
    model: DIFFA2Model,
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = False,
) -> ReleaseExport:
    """Write `model` atomically in the release layout: config.json, generation_config.json, pytorch_model.bin.

    Every tensor is written, bases included, as the release does; the tokenizer (if given) goes beside them,
    where the reference's train.py saves it. config.json goes last.
    """
    directory = Path(directory)
    release = native_to_release(model.state_dict())
    tensors = {k: _plain(v, dtype) for k, v in tqdm(release.items(), desc="tensors", disable=not progress)}
    with atomic_directory(directory) as staging:
        torch.save(tensors, staging / BIN_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        generation = {"_from_model_config": True, "transformers_version": RELEASE_TRANSFORMERS_VERSION}
        _write_sorted_json(staging / GENERATION_CONFIG_NAME, generation)
        _write_sorted_json(staging / CONFIG_NAME, release_config_from_native(model.config, dtype))
    parameters = sum(t.numel() for t in tensors.values())
    return ReleaseExport(directory, len(tensors), parameters, dtype, reference_incompatibilities(model.config))


def _write_sorted_json(path: Path, data: dict[str, Any]) -> None:
    """JSON as transformers writes a config: indent 2, keys sorted."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
