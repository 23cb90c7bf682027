"""Importing a released DIFFA-2 checkpoint folder (`DIFFAModel`, HF repo `zhoujiaming777/DIFFA-2`).

The layout and its name mapping are data in `diffa2.modeling.release_layout` (described in
`docs/release-format.md`); export is `diffa2.modeling.release_export`, whose `save_release` and `ReleaseExport`
are importable from here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm
from transformers.initialization import no_init_weights

from diffa2.chat import DEFAULT_SYSTEM_PROMPT, DIFFA2_TRAINING_SYSTEM_PROMPT
from diffa2.modeling.backbone import LLADA_TO_LLAMA_MODULES
from diffa2.modeling.checkpoint import build_with_bases
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.release_export import ReleaseExport as ReleaseExport  # re-exported (the `as` says so)
from diffa2.modeling.release_export import save_release as save_release
from diffa2.modeling.release_layout import (
    ADAPTER_CONFIGS,
    CONFIG_NAME,
    DTYPE_NAMES,
    REFERENCE_LORA,
    REFERENCE_PROMPT_COUNT,
    RELEASE_ARCHITECTURE,
    RELEASE_LORA_A,
    TOKENIZER_DIR,
    WEIGHT_FILES,
    WHISPER_TAP_LAYERS,
    check_release_tensors,
    expected_release_shapes,
    release_to_native,
    without_hub_keys,
)
from diffa2.modeling.safe_load import CheckpointError, load_weights_only

# --------------------------------------------------------------------------------------------------
# Reading a release folder
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else is an error naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data

def is_release_dir(path: str | Path) -> bool:
    """True for a folder whose config.json describes the reference's `DIFFAModel` (the released layout)."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("architectures") == [RELEASE_ARCHITECTURE] and "model_type" not in data

def read_release_config(directory: str | Path) -> dict[str, Any]:
    """The release's config.json, checked for the keys the model is built from."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not is_release_dir(directory):
        raise CheckpointError(
            f"{directory}: not a DIFFA-2 release folder (expected {CONFIG_NAME} with architectures "
            f"[{RELEASE_ARCHITECTURE!r}] and no model_type, as the reference's trainer.save_model() writes)"
        )
    data = _read_json(path)
    missing = [k for k in ("whisper_config", "llm_config", "whisper_model_id", "prompt_size") if k not in data]
    if missing:
        raise CheckpointError(f"{path}: a DIFFAModel config needs {missing}")
    if data["whisper_model_id"] not in WHISPER_TAP_LAYERS:
        raise CheckpointError(f"{path}: whisper_model_id {data['whisper_model_id']!r} has no tap layers in the "
                              f"reference (known: {sorted(WHISPER_TAP_LAYERS)})")
    return data


def release_weights_file(directory: Path) -> Path:
    """The weight file to read, safetensors first; an error lists what a release folder holds."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: a DIFFA-2 release folder but no weights; expected one of {list(WEIGHT_FILES)}")


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    """One weight file: safetensors, or a pickled state dict read with weights_only=True and mmap."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    state = load_weights_only(path, mmap=True)
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor")
    return state


def read_release_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of a release folder (single file or shards listed by an index) and the file read."""
    path = release_weights_file(Path(directory))
    if not path.name.endswith(".index.json"):
        return _read_one(path), path
    try:
        shards = sorted(set(_read_json(path)["weight_map"].values()))
    except (KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a weight index (needs a 'weight_map')") from err
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_read_one(path.parent / shard))
    return state, path


def lora_settings_from(
    tensors: Mapping[str, torch.Tensor], directory: Path, lora_alpha: float, source: Path
) -> LoraSettings | None:
    """LoRA settings of a release: rank and targets from the tensors, alpha from adapter_config.json or `lora_alpha`."""
    found = [(match[1], t.shape[0]) for k, t in tensors.items() if (match := RELEASE_LORA_A.fullmatch(k))]
    if not found:
        return None
    modules, ranks = {m for m, _ in found}, {r for _, r in found}
    unknown = sorted(modules - set(LLADA_TO_LLAMA_MODULES))
    if unknown:
        raise CheckpointError(f"{source}: LoRA on {unknown}, not LLaDA modules {sorted(LLADA_TO_LLAMA_MODULES)}")
    if len(ranks) > 1:
        raise CheckpointError(f"{source}: LoRA matrices of different ranks {sorted(ranks)}")
    settings = LoraSettings(r=ranks.pop(), alpha=lora_alpha, dropout=REFERENCE_LORA.dropout,
                            target_modules=[m for m in LLADA_TO_LLAMA_MODULES if m in modules])
    return _with_adapter_config(settings, directory)


def _with_adapter_config(settings: LoraSettings, directory: Path) -> LoraSettings:
    """`settings` with alpha and dropout from peft's adapter_config.json, where the release has one."""
    for name in ADAPTER_CONFIGS:
        if (directory / name).is_file():
            adapter = _read_json(directory / name)
            if adapter.get("r", settings.r) != settings.r:
                raise CheckpointError(f"{directory / name}: r {adapter['r']} but the LoRA tensors have rank "
                                      f"{settings.r}")
            settings.alpha = adapter.get("lora_alpha", settings.alpha)
            settings.dropout = adapter.get("lora_dropout", settings.dropout)
            break
    return settings

def native_config_from_release(
    release: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    lora: LoraSettings | None,
    speech_path: str,
    description: str,
) -> DIFFA2Config:
    """The `DIFFA2Config` of a release: sizes from its config.json, prompt count from the prompt tensor."""
    encoder = without_hub_keys(release["whisper_config"])
    prompts = tensors.get("trainable_prompts.weight")
    settings = {
        "encoder": encoder,
        "backbone": without_hub_keys(release["llm_config"]),
        "tap_layers": list(WHISPER_TAP_LAYERS[release["whisper_model_id"]]),
        "num_queries": int(release["prompt_size"]),
        "qformer_layers": 2,
        "qformer_heads": int(encoder["encoder_attention_heads"]),
        "qformer_intermediate": 3072,  # BertConfig's default, which the reference's Q-Former keeps
        "qformer_dropout": 0.1,
        # A missing prompt tensor is reported with the other missing tensors; build the reference's count.
        "num_prompt_embeddings": REFERENCE_PROMPT_COUNT if prompts is None else int(prompts.shape[0]),
        "speech_path": speech_path,
        "system_prompt": DEFAULT_SYSTEM_PROMPT,  # the reference answers with the short prompt ...
        "training_system_prompt": DIFFA2_TRAINING_SYSTEM_PROMPT,  # ... and trained with the long one
        "compat": "reference",
        "release": description,
        "lora": lora,
    }
    try:
        return DIFFA2Config(**settings)
    except ValueError as err:
        raise CheckpointError(f"{description}: {err}") from err


def _tokenizer_source(directory: Path, tokenizer: str | Path | None) -> str:
    """Where the tokenizer comes from: the argument, a `tokenizer/` folder, or tokenizer files beside config.json."""
    if tokenizer is not None:
        return str(Path(tokenizer).resolve())
    if (directory / TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return TOKENIZER_DIR
    if (directory / "tokenizer_config.json").is_file():  # where the reference's train.py saves it
        return "."
    raise CheckpointError(
        f"{directory}: a DIFFA-2 release folder holds no tokenizer; pass the LLaDA tokenizer folder "
        f"(tokenizer=... / --llada) or put it in {directory / TOKENIZER_DIR}"
    )


@dataclass
class ReleaseImport:
    """An imported release: the model and what the import did, for a summary."""

    model: DIFFA2Model
    weights_file: Path
    lora: str  # "kept (r 8, alpha 16)", "merged (r 8, alpha 16)" or "none"
    base_checks: list[str] = field(default_factory=list)  # the release's base copies vs the given bases


BASE_PARTS = {"encoder.": ("whisper_model.*", "--whisper"), "backbone.": ("llm_model.* base", "--llada")}


def _is_base(native_key: str, parts: Iterable[str] = tuple(BASE_PARTS)) -> bool:
    """True for a Whisper or LLaDA base tensor (not an adapter, prompt or LoRA matrix) of one of `parts`."""
    return native_key.startswith(tuple(parts)) and "lora_" not in native_key


def compare_bases(model: DIFFA2Model, native: Mapping[str, torch.Tensor], parts: list[str]) -> list[str]:
    """How the release's own Whisper / LLaDA tensors compare with the loaded bases, at the release's precision."""
    own = model.state_dict()
    lines = []
    for prefix in parts:
        part, flag = BASE_PARTS[prefix]
        keys = [k for k in native if _is_base(k, [prefix])]
        differ = [k for k in keys if not torch.equal(own[k].to(native[k].dtype), native[k])]
        if not differ:
            lines.append(f"{part}: {len(keys)} tensors identical to {flag} (at {DTYPE_NAMES[native[keys[0]].dtype]})")
            continue
        worst = max(float((own[k].float() - native[k].float()).abs().max()) for k in differ)
        lines.append(f"{part}: {len(differ)} of {len(keys)} tensors differ from {flag} (max |diff| {worst:.3g}); "
                     f"the model uses {flag}'s, as the reference does")
    return lines


def _import_config(
    directory: Path, release: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], weights_file: Path, *,
    tokenizer: str | Path | None, lora_alpha: float, speech_path: str, whisper: str | Path | None,
    llada: str | Path | None,
) -> DIFFA2Config:
    """The toolkit config of a release folder, with the tokenizer and base sources it will be loaded with."""
    lora = lora_settings_from(tensors, directory, lora_alpha, weights_file)
    config = native_config_from_release(release, tensors, lora=lora, speech_path=speech_path,
                                        description=f"{directory.resolve()} ({weights_file.name})")
    config.tokenizer_source = _tokenizer_source(directory, tokenizer)
    config.encoder_source = None if whisper is None else str(Path(whisper).resolve())
    config.backbone_source = None if llada is None else str(Path(llada).resolve())
    config.name_or_path = str(directory)  # relative sources (the tokenizer) resolve against it
    return config


def _lora_summary(lora: LoraSettings | None, merged: bool) -> str:
    """How LoRA came out of the import, for the summary."""
    return "none" if lora is None else f"{'merged' if merged else 'kept'} (r {lora.r}, alpha {lora.alpha})"


def import_release(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | Path | None = None,
    merge_lora: bool = False,
    lora_alpha: float = REFERENCE_LORA.alpha,
    speech_path: str = "acoustic+semantic",
    whisper: str | Path | None = None,
    llada: str | Path | None = None,
    progress: bool = False,
) -> ReleaseImport:
    """Build the model a release folder holds (fp32 unless `dtype`), strictly: every tensor named and shaped right.

    `lora_alpha` is used when no adapter_config.json says otherwise: the release stores LoRA matrices, not their
    scale, and the reference loader hard-codes alpha 16 for r 8. `speech_path` is not recorded by the release
    (the reference passes its stage on the command line): stage-1 releases need "prompt+semantic". With
    `whisper` / `llada`, the base weights come from those folders, as the reference loads them, and the
    release's own copies are compared with them. `progress` shows a bar over the (at full size, slow) steps.
    """
    directory = Path(directory)
    bar = tqdm(total=3, desc="import: read, build, load", disable=not progress)
    release = read_release_config(directory)  # before the weights: a folder that is not a release is not read
    tensors, weights_file = read_release_tensors(directory)
    config = _import_config(directory, release, tensors, weights_file, tokenizer=tokenizer, lora_alpha=lora_alpha,
                            speech_path=speech_path, whisper=whisper, llada=llada)
    check_release_tensors(tensors, expected_release_shapes(config), weights_file)  # before any slow base load
    bar.update()
    with no_init_weights():  # every parameter is overwritten below; skip the random initialisation
        model = build_with_bases(config)
    bar.update()
    native = release_to_native(tensors)
    given = [prefix for prefix, path in (("encoder.", whisper), ("backbone.", llada)) if path is not None]
    checks = compare_bases(model, native, given)
    model.load_state_dict({k: v for k, v in native.items() if not _is_base(k, given)}, strict=not given)
    summary = _lora_summary(config.lora, merge_lora)
    if merge_lora and config.lora is not None:
        model.merge_lora()  # in fp32, before any cast: the merged weight is rounded once
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    bar.update()
    bar.close()
    return ReleaseImport(model.eval(), weights_file, summary, checks)


def load_release(directory: str | Path, **options: Any) -> DIFFA2Model:
    """The model of a release folder (see `import_release` for the options)."""
    return import_release(directory, **options).model
