"""The released DIFFA-2 checkpoint layout as data: file names, the tensor name mapping and the layout check.

The release is what the reference training script's `trainer.save_model()` writes for its `DIFFAModel`
(NKU-HLT/DIFFA, `DIFFA-2/src/modeling_DIFFA.py`, `DIFFA-2/train.py`): a `config.json` without `model_type`
that embeds the Whisper and LLaDA configs, and one state dict holding every tensor of the model under five
prefixes (`whisper_model.`, `trainable_prompts.`, `semantic_connector.`, `acoustic_connector.`, `llm_model.`),
the LLaDA part wrapped by peft when LoRA was trained. `docs/release-format.md` lists the layout and the
name mapping; this module holds that mapping as data plus the functions that apply and check it. Import is
`diffa2.modeling.release`, export `diffa2.modeling.release_export`.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from diffa2.modeling.backbone import llada_to_llama_state_dict, llama_to_llada_state_dict
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.safe_load import CheckpointError

# --------------------------------------------------------------------------------------------------
# The release format, as data
# --------------------------------------------------------------------------------------------------

RELEASE_ARCHITECTURE = "DIFFAModel"
RELEASE_TRANSFORMERS_VERSION = "4.49.0"  # the version the reference pins (DIFFA-2/requirements.txt)
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
BIN_NAME = "pytorch_model.bin"
# Weight files in order of preference: safetensors (no pickle at all) before the pickled state dict.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", BIN_NAME, "pytorch_model.bin.index.json")
# peft's file beside LoRA weights; the reference training script saves one under `lora_weights/`.
ADAPTER_CONFIGS = ("adapter_config.json", "lora_weights/adapter_config.json")
TOKENIZER_DIR = "tokenizer"

# `QformerConnector` picks its tap layers from `whisper_model_id` (NKU-HLT/DIFFA, DIFFA-2/src/modeling_DIFFA.py).
WHISPER_TAP_LAYERS: dict[str, list[int]] = {
    "openai/whisper-large-v3": [3, 7, 11, 15, 19, 23, 27, 31],
    "openai/whisper-medium": [5, 11, 17, 23],
    "openai/whisper-small": [2, 5, 8, 11],
    "openai/whisper-tiny": [0, 1, 2, 3],
}
# What the reference code can run: its `DIFFAConfig.__init__` overwrites `prompt_size` with 64 and
# `whisper_model_id` with large-v3 whatever config.json says, and `DIFFAModel` builds 20 prompt embeddings.
REFERENCE_WHISPER_MODEL_ID = "openai/whisper-large-v3"
REFERENCE_PROMPT_SIZE = 64
REFERENCE_PROMPT_COUNT = 20
# The reference's LoRA (train.py defaults, and the values `extract_and_load_lora_weights` hard-codes).
REFERENCE_LORA = LoraSettings(r=8, alpha=16, dropout=0.05)
# Unused keys `DIFFAConfig` always writes (its constructor defaults).
RELEASE_LEFTOVERS: dict[str, Any] = {
    "conv_kernel_sizes": "5,5,5",
    "adapter_inner_dim": 512,
    "acoustic_connector_config": {},
}
LLADA_HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}
# Keys of the embedded configs that describe where and how a config was saved, not the model: dropped on
# import, `_name_or_path` and `transformers_version` written back on export.
HUB_ONLY_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Adapter and prompt tensors renamed one to one (release name -> native name).
RELEASE_TO_NATIVE: dict[str, str] = {
    "trainable_prompts.weight": "prompt_embeddings.weight",
    "acoustic_connector.layer_weights": "acoustic_adapter.tap_logits",
    **{
        f"{release}.{param}": f"{native}.{param}"
        for release, native in (
            ("semantic_connector.conv.0", "semantic_adapter.conv1"),
            ("semantic_connector.conv.2", "semantic_adapter.conv2"),
            ("semantic_connector.linear_connector.0", "semantic_adapter.fc1"),
            ("semantic_connector.linear_connector.2", "semantic_adapter.fc2"),
            ("semantic_connector.layernorm", "semantic_adapter.norm"),
            ("acoustic_connector.proj.0", "acoustic_adapter.norm"),
            ("acoustic_connector.proj.1", "acoustic_adapter.proj"),
        )
        for param in ("weight", "bias")
    },
}
NATIVE_TO_RELEASE: dict[str, str] = {v: k for k, v in RELEASE_TO_NATIVE.items()}
# Parts whose parameter names are the same on both sides below a prefix (HF Whisper encoder, BERT layers).
RELEASE_TO_NATIVE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("whisper_model.", "encoder.encoder."),
    ("acoustic_connector.qformer.", "acoustic_adapter.qformer."),
)
# One query tensor [1, Q, d] per tap in the release, one stacked [n_taps, Q, d] parameter here.
LAYER_PROMPT = re.compile(r"acoustic_connector\.layer_prompts\.(\d+)")
NATIVE_QUERIES = "acoustic_adapter.queries"
# The backbone: LLaDA names (`model.transformer.*`) in the release, transformers' Llama names here; peft adds
# `base_model.model.` in front on both sides when LoRA is attached.
LLM_PREFIXES: dict[bool, tuple[str, str]] = {  # has LoRA -> (release prefix, native prefix)
    True: ("llm_model.base_model.model.", "backbone.lm.base_model.model."),
    False: ("llm_model.", "backbone.lm."),
}
PEFT_PARAM = re.compile(r"(?P<module>.+)\.(?P<infix>base_layer|lora_A\.default|lora_B\.default)\.weight")
RELEASE_LORA_A = re.compile(
    r"llm_model\.base_model\.model\.model\.transformer\.blocks\.\d+\.(\w+)\.lora_A\.default\.weight"
)


# --------------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------------


def has_lora(keys: Iterable[str]) -> bool:
    """True when a state dict (release or native names) holds LoRA matrices."""
    return any(".lora_A." in key for key in keys)


def _rename_peft(state: Mapping[str, torch.Tensor], rename: Callable[[dict], dict]) -> dict[str, torch.Tensor]:
    """Apply a LLaDA <-> Llama renaming to names that may carry peft's `base_layer` / `lora_X.default` infix."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        match = PEFT_PARAM.fullmatch(key)
        groups[match["infix"] if match else ""][f"{match['module']}.weight" if match else key] = tensor
    renamed = {}
    for infix, group in groups.items():
        for name, tensor in rename(group).items():
            renamed[f"{name.removesuffix('.weight')}.{infix}.weight" if infix else name] = tensor
    return renamed


def _split_llm(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """(tensors under `prefix` with it removed, all other tensors)."""
    inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in state.items() if not k.startswith(prefix)}


def _rename_prefix(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    """`key` with the first matching old prefix of `pairs` replaced by its new one."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key.removeprefix(old)
    raise KeyError(f"{key!r} is not a DIFFA-2 release tensor name")


def release_to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release tensor names -> this toolkit's names (queries stacked, LLaDA names -> Llama names)."""
    release_prefix, native_prefix = LLM_PREFIXES[has_lora(state)]
    llm, rest = _split_llm(state, release_prefix)
    native = {native_prefix + k: v for k, v in _rename_peft(llm, llada_to_llama_state_dict).items()}
    queries = {}
    for key, tensor in rest.items():
        if match := LAYER_PROMPT.fullmatch(key):
            queries[int(match[1])] = tensor
        elif key in RELEASE_TO_NATIVE:
            native[RELEASE_TO_NATIVE[key]] = tensor
        else:
            native[_rename_prefix(key, RELEASE_TO_NATIVE_PREFIXES)] = tensor
    if queries:
        native[NATIVE_QUERIES] = torch.cat([queries[i] for i in range(len(queries))], dim=0)
    return native


def native_to_release(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This toolkit's tensor names -> the release's (queries split per tap, Llama names -> LLaDA names)."""
    release_prefix, native_prefix = LLM_PREFIXES[has_lora(state)]
    llm, rest = _split_llm(state, native_prefix)
    release = {release_prefix + k: v for k, v in _rename_peft(llm, llama_to_llada_state_dict).items()}
    inverse = [(new, old) for old, new in RELEASE_TO_NATIVE_PREFIXES]
    for key, tensor in rest.items():
        if key == NATIVE_QUERIES:
            release.update({f"acoustic_connector.layer_prompts.{i}": tensor[i : i + 1] for i in range(len(tensor))})
        elif key in NATIVE_TO_RELEASE:
            release[NATIVE_TO_RELEASE[key]] = tensor
        else:
            release[_rename_prefix(key, inverse)] = tensor
    return release


def without_hub_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """An embedded config without the keys that say where and how it was saved."""
    return {k: v for k, v in config.items() if k not in HUB_ONLY_KEYS}


# --------------------------------------------------------------------------------------------------
# Checking a state dict against the layout
# --------------------------------------------------------------------------------------------------


def expected_release_shapes(config: DIFFA2Config) -> dict[str, torch.Size]:
    """The release tensor names and shapes a model of `config` has (built weightless, on the meta device)."""
    with torch.device("meta"):
        model = DIFFA2Model(copy.deepcopy(config))
    return {k: v.shape for k, v in native_to_release(model.state_dict()).items()}


def check_release_tensors(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: Path
) -> None:
    """Every expected tensor present with its shape, nothing else; an error names each offender and the file."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: {tuple(found[k].shape)} in the file vs {tuple(expected[k])} from config.json"
              for k in sorted(set(found) & set(expected)) if tuple(found[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source}: does not match the DIFFA-2 release layout its config.json describes: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, shape mismatches {_few(shapes)}"
        )


def _few(items: list[str], limit: int = 10) -> str:
    """The first `limit` items, and how many there are when there are more."""
    return f"{items[:limit]}{f' ... ({len(items)} in all)' if len(items) > limit else ''}"

