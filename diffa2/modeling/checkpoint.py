"""DIFFA-2 checkpoints: `config.json` + `model.safetensors` (+ `tokenizer/`), holding only what was trained.

Which tensors a checkpoint stores follows one rule: the adapters and prompt embeddings always; a base
model (encoder or backbone) in full when it has no source checkpoint or was trained; otherwise only its
LoRA matrices. Loading rebuilds the model from `config.json`, loads the bases from the sources recorded
there, re-applies LoRA, then loads the stored tensors strictly (every expected key present, nothing
extra), so an adapter that silently failed to load is impossible.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from diffa2.io import atomic_directory
from diffa2.modeling.backbone import LLaDABackbone
from diffa2.modeling.configuration import DIFFA2Config
from diffa2.modeling.encoder import WhisperSpeechEncoder
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.safe_load import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class NonFiniteWeightsError(ValueError):
    """Refusal to save tensors holding NaN/inf: such a checkpoint would poison every run that loads it."""


def stored_keys(model: DIFFA2Model) -> list[str]:
    """Names of the tensors a checkpoint of `model` holds (see the module docstring for the rule)."""
    config = model.config
    whole_encoder = config.encoder_trainable or config.encoder_source is None
    whole_backbone = config.backbone_trainable or config.backbone_source is None
    keys = []
    for key in model.state_dict():
        part = key.split(".", 1)[0]
        if part == "encoder" and not whole_encoder:
            continue
        if part == "backbone" and not whole_backbone and "lora_" not in key:
            continue
        keys.append(key)
    return keys


def save_pretrained(
    model: DIFFA2Model,
    directory: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically, with a copy of the tokenizer so the checkpoint is self-contained.

    `tokenizer` defaults to the one the model's config records. `state_dict` replaces `model.state_dict()` where
    a distributed engine holds the weights (ZeRO-3 gathers them).
    """
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        write_checkpoint_files(model, staging, tokenizer, state_dict)
    return directory


def write_checkpoint_files(
    model: DIFFA2Model,
    directory: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config, stored tensors (taken from `state_dict` when a distributed engine gathered it) and tokenizer.

    Without `tokenizer`, the tokenizer recorded in the config is copied, if it can be found. The config goes
    last, so a directory without `config.json` is recognisably incomplete.
    """
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: state[k].detach().contiguous().cpu() for k in stored_keys(model)}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"{directory}: refusing to save a checkpoint whose tensor(s) {bad[:10]}{'...' if len(bad) > 10 else ''} "
            f"hold NaN/inf values; the previous checkpoint is kept"
        )
    config = copy.deepcopy(model.config)
    tokenizer = tokenizer if tokenizer is not None else recorded_tokenizer(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        config.tokenizer_source = TOKENIZER_DIR
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "producer": "diffa2"})
    config.save(directory / CONFIG_NAME)


def recorded_tokenizer(model: DIFFA2Model) -> PreTrainedTokenizerBase | None:
    """The tokenizer the model's config records (relative to the directory it was loaded from), if present."""
    loaded_from = Path(model.config.name_or_path or ".")
    directory = resolve_source(model.config.tokenizer_source, loaded_from)
    if directory is None or not directory.is_dir():
        return None
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def resolve_source(source: str | None, checkpoint_dir: Path) -> Path | None:
    """A recorded source path; relative paths are relative to the checkpoint directory."""
    if source is None:
        return None
    path = Path(source)
    return path if path.is_absolute() else checkpoint_dir / path


def load_pretrained(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
) -> DIFFA2Model:
    """Rebuild a model from a checkpoint directory, loading its bases from their recorded sources.

    A DIFFA-2 release folder (docs/release-format.md) is imported as it is; `tokenizer` names the tokenizer
    folder for it (by default its `tokenizer/` or root tokenizer files). Toolkit checkpoints record their own.
    """
    directory = Path(directory)
    from diffa2.modeling import release  # release.py builds on this module

    if release.is_release_dir(directory):
        return release.load_release(directory, dtype=dtype, device=device, tokenizer=tokenizer)
    config = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_NAME}{_pickle_note(directory)}")
    model = build_with_bases(config, directory)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    load_stored_tensors(model, tensors, source=str(weights))
    model.config.name_or_path = str(directory)  # relative sources (the tokenizer) resolve against it
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model


def read_checkpoint_config(directory: Path) -> DIFFA2Config:
    """The `config.json` of a checkpoint directory, with errors that say what a checkpoint directory holds."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a complete DIFFA-2 checkpoint: missing {CONFIG_NAME} (save_pretrained writes "
            f"{CONFIG_NAME} + {WEIGHTS_NAME} [+ {TOKENIZER_DIR}/]; {CONFIG_NAME} last){_pickle_note(directory)}"
        )
    try:
        return DIFFA2Config.from_checkpoint_dict(json.loads(path.read_text()), source=str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _pickle_note(directory: Path) -> str:
    """A hint when the directory holds pickled weights, which DIFFA-2 checkpoints never use."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return f"; found pickled weights {pickles}, which are not read (safetensors only)" if pickles else ""


def build_with_bases(config: DIFFA2Config, relative_to: Path = Path(".")) -> DIFFA2Model:
    """The one builder of a model from a config: build it, load the bases from their recorded sources (parts without
    a source keep their fresh initialisation), then apply LoRA."""
    lora = config.lora
    bare = copy.deepcopy(config)
    bare.lora = None
    model = DIFFA2Model(bare)
    encoder_source = resolve_source(config.encoder_source, relative_to)
    if encoder_source is not None:
        model.encoder.load_state_dict(WhisperSpeechEncoder.from_pretrained(encoder_source).state_dict())
    backbone_source = resolve_source(config.backbone_source, relative_to)
    if backbone_source is not None:
        model.backbone.load_state_dict(LLaDABackbone.from_llada_pretrained(backbone_source).state_dict())
    if lora is not None:
        model.add_lora(lora)
    model.config = config
    return model


def load_stored_tensors(model: DIFFA2Model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load exactly the expected stored tensors, naming every missing, unexpected or mis-shaped one."""
    expected = set(stored_keys(model))
    own = model.state_dict()
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: does not match its config.json: missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
            f", unexpected {unexpected[:10]}, shape mismatches (file vs model) {shapes[:10]}"
        )
    model.load_state_dict(tensors, strict=False)
