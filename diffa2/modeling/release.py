"""The released DIFFA-2 checkpoint layout (`DIFFAModel`, HF repo `zhoujiaming777/DIFFA-2`): import and export.

The release is what the reference training script's `trainer.save_model()` writes for its `DIFFAModel`
(NKU-HLT/DIFFA, `DIFFA-2/src/modeling_DIFFA.py`, `DIFFA-2/train.py`): a `config.json` without `model_type`
that embeds the Whisper and LLaDA configs, and one state dict holding every tensor of the model under five
prefixes (`whisper_model.`, `trainable_prompts.`, `semantic_connector.`, `acoustic_connector.`, `llm_model.`),
the LLaDA part wrapped by peft when LoRA was trained. `docs/release-format.md` lists the layout and the
name mapping; this module holds that mapping as data plus the functions that apply it.
"""

from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from diffa2.chat import DEFAULT_SYSTEM_PROMPT, DIFFA2_TRAINING_SYSTEM_PROMPT
from diffa2.io import atomic_directory
from diffa2.modeling.backbone import LLADA_TO_LLAMA_MODULES, llada_to_llama_state_dict, llama_to_llada_state_dict
from diffa2.modeling.checkpoint import build_with_bases
from diffa2.modeling.configuration import DIFFA2Config, LoraSettings
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.safe_load import CheckpointError, load_weights_only

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
                            target_modules=[m for m in LLADA_TO_LLAMA_MODULES if m in modules])  # fmt: skip
    return _with_adapter_config(settings, directory)


def _with_adapter_config(settings: LoraSettings, directory: Path) -> LoraSettings:
    """`settings` with alpha and dropout from peft's adapter_config.json, where the release has one."""
    for name in ADAPTER_CONFIGS:
        if (directory / name).is_file():
            adapter = _read_json(directory / name)
            if adapter.get("r", settings.r) != settings.r:
                raise CheckpointError(f"{directory / name}: r {adapter['r']} but the LoRA tensors have rank "
                                      f"{settings.r}")  # fmt: skip
            settings.alpha = adapter.get("lora_alpha", settings.alpha)
            settings.dropout = adapter.get("lora_dropout", settings.dropout)
            break
    return settings


def _without_hub_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """An embedded config without the keys that say where and how it was saved."""
    return {k: v for k, v in config.items() if k not in HUB_ONLY_KEYS}


def native_config_from_release(
    release: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    lora: LoraSettings | None,
    speech_path: str,
    description: str,
) -> DIFFA2Config:
    """The `DIFFA2Config` of a release: sizes from its config.json, prompt count from the prompt tensor."""
    encoder = _without_hub_keys(release["whisper_config"])
    prompts = tensors.get("trainable_prompts.weight")
    settings = {
        "encoder": encoder,
        "backbone": _without_hub_keys(release["llm_config"]),
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


def expected_release_shapes(config: DIFFA2Config) -> dict[str, torch.Size]:
    """The release tensor names and shapes a model of `config` has (built weightless, on the meta device)."""
    with torch.device("meta"):
        model = DIFFA2Model(copy.deepcopy(config))
    return {k: v.shape for k, v in native_to_release(model.state_dict()).items()}


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
) -> DIFFA2Config:  # fmt: skip
    """The toolkit config of a release folder, with the tokenizer and base sources it will be loaded with."""
    lora = lora_settings_from(tensors, directory, lora_alpha, weights_file)
    config = native_config_from_release(release, tensors, lora=lora, speech_path=speech_path,
                                        description=f"{directory.resolve()} ({weights_file.name})")  # fmt: skip
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
                            speech_path=speech_path, whisper=whisper, llada=llada)  # fmt: skip
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
    whisper = {**_without_hub_keys(config.encoder), "_name_or_path": model_id,
               "transformers_version": RELEASE_TRANSFORMERS_VERSION}
    llm = {"auto_map": LLADA_AUTO_MAP, **_without_hub_keys(config.backbone), "_name_or_path": LLADA_HUB_ID,
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
