"""The dLLM backbone: a LLaDA checkpoint served by transformers' Llama modules run without a causal mask.

LLaDA's `LLaDALlamaBlock` is exactly a Llama decoder layer (RMSNorm, rotate-half RoPE, SwiGLU with
`ff_proj` as the gate, no biases) with bidirectional attention; only the parameter names differ. This
module keeps LLaDA's on-disk format (its `config.json` keys and `model.transformer.*` names, see
`docs/checkpoint-formats.md` §1.2-1.3) at the edges and transformers' `LlamaForCausalLM` inside.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from diffa2.modeling.safe_load import load_weights_only

# --------------------------------------------------------------------------------------------------
# Name and config mapping (pure data; `{}` stands for the block index)
# --------------------------------------------------------------------------------------------------

LLADA_TO_LLAMA_KEYS: dict[str, str] = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
    "model.transformer.blocks.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "model.transformer.blocks.{}.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "model.transformer.blocks.{}.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "model.transformer.blocks.{}.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "model.transformer.blocks.{}.attn_out.weight": "model.layers.{}.self_attn.o_proj.weight",
    "model.transformer.blocks.{}.ff_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "model.transformer.blocks.{}.ff_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "model.transformer.blocks.{}.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "model.transformer.blocks.{}.ff_out.weight": "model.layers.{}.mlp.down_proj.weight",
}
LLAMA_TO_LLADA_KEYS: dict[str, str] = {v: k for k, v in LLADA_TO_LLAMA_KEYS.items()}

# LLaDA module names of the LoRA targets and their names inside the Llama modules.
LLADA_TO_LLAMA_MODULES: dict[str, str] = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "attn_out": "o_proj",
    "ff_proj": "gate_proj",
    "up_proj": "up_proj",
    "ff_out": "down_proj",
}

# Architectural keys a LLaDA config must have, with the only values this implementation supports.
_REQUIRED_LLADA_VALUES: dict[str, Any] = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
}
_REQUIRED_LLADA_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "embedding_size", "rope_theta")

_INDEX = re.compile(r"\.(\d+)\.")


def _rename(key: str, table: dict[str, str]) -> str:
    match = _INDEX.search(key)
    template = _INDEX.sub(".{}.", key, count=1) if match else key
    if template not in table:
        raise KeyError(f"unknown parameter name {key!r} (expected one of the names in {sorted(table)[:3]}...)")
    return table[template].format(match.group(1)) if match else table[template]


def llada_to_llama_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LLaDA state dict (`model.transformer.*`) to transformers' Llama names; raise on unknown keys."""
    return {_rename(k, LLADA_TO_LLAMA_KEYS): v for k, v in state_dict.items()}


def llama_to_llada_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Llama state dict back to LLaDA's names, so LLaDA's own code can read what we save."""
    return {_rename(k, LLAMA_TO_LLADA_KEYS): v for k, v in state_dict.items()}


def llama_config_from_llada(llada: dict[str, Any], source: str = "config") -> LlamaConfig:
    """Build the bidirectional `LlamaConfig` equivalent to a LLaDA `config.json` dict (checked, not guessed)."""
    missing = [k for k in _REQUIRED_LLADA_KEYS if k not in llada]
    if missing:
        raise ValueError(f"{source}: LLaDA config lacks {missing}; every architectural key must be explicit")
    for key, expected in _REQUIRED_LLADA_VALUES.items():
        if llada.get(key, expected) != expected:
            raise NotImplementedError(
                f"{source}: {key}={llada[key]!r} is not supported (this backbone implements {key}={expected!r})"
            )
    n_heads = llada["n_heads"]
    config = LlamaConfig(
        vocab_size=llada["embedding_size"],
        hidden_size=llada["d_model"],
        intermediate_size=llada["mlp_hidden_size"],
        num_hidden_layers=llada["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=llada.get("n_kv_heads") or n_heads,
        max_position_embeddings=llada.get("max_sequence_length", 4096),
        rms_norm_eps=llada.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(llada["rope_theta"])},
        tie_word_embeddings=bool(llada.get("weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attention_dropout=float(llada.get("attention_dropout", 0.0)),
        pad_token_id=llada.get("pad_token_id"),
        eos_token_id=llada.get("eos_token_id"),
    )
    config.is_causal = False  # transformers then builds bidirectional masks that still honour padding
    return config


def llada_config(
    *,
    d_model: int,
    n_heads: int,
    n_layers: int,
    mlp_hidden_size: int,
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
    n_kv_heads: int | None = None,
    rope_theta: float = 500000.0,
    max_sequence_length: int = 4096,
) -> dict[str, Any]:
    """A complete LLaDA `config.json` dict in the published key set (§1.2), for any size."""
    embedding_size = -(-vocab_size // 128) * 128  # LLaDA pads the embedding rows to a multiple of 128
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_dropout": 0.0,
        "embedding_size": embedding_size,
        "eos_token_id": eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": mask_token_id,
        "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads,
        "n_layers": n_layers,
        "pad_token_id": eos_token_id if pad_token_id is None else pad_token_id,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": rope_theta,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
    }


# --------------------------------------------------------------------------------------------------
# Checkpoint I/O in LLaDA's on-disk format
# --------------------------------------------------------------------------------------------------


def read_llada_config(directory: str | Path) -> dict[str, Any]:
    """Read and check a LLaDA checkpoint's `config.json`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; expected a LLaDA checkpoint directory")
    config = json.loads(path.read_text())
    llama_config_from_llada(config, source=str(path))  # validates
    return config


def load_state_dict_files(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read every weight of a Hugging Face-style directory: single or sharded safetensors, else a .bin."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    if single.is_file():
        return load_file(single)
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        # Never unpickle arbitrary objects from a checkpoint: tensors only.
        return load_weights_only(binary)
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions `[B, L]`: each row counts its real tokens from 0, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LLaDABackbone(nn.Module):
    """Bidirectional Llama-style mask predictor: embeddings in, logits over the vocabulary out."""

    def __init__(self, llada_config_dict: dict[str, Any]) -> None:
        super().__init__()
        self.llada_config = dict(llada_config_dict)
        self.lm = LlamaForCausalLM(llama_config_from_llada(self.llada_config))

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def mask_token_id(self) -> int:
        return int(self.llada_config["mask_token_id"])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[B, L, D]` (LLaDA does not scale them by sqrt(D))."""
        return self.lm.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Logits `[B, L, V]` for embeddings `[B, L, D]`; padded keys (mask 0) are invisible to every query.

        Positions default to each row's count of real tokens so far (`positions_from_mask`), so a left-padded
        row gets exactly the positions it would have alone. With a `cache` (block decoding, see
        `diffa2.diffusion.kv_cache`) the queries also attend to the cached keys, `attention_mask` covers the
        cached columns then the new ones, `position_ids` must be given, and the new K/V are appended to the cache.
        """
        if position_ids is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a forward pass on a filled cache needs explicit position_ids")
            position_ids = positions_from_mask(attention_mask)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), position_ids=position_ids,
                      cache=cache, use_cache=cache is not None)
        return out.logits

    def new_cache(self) -> DynamicCache:
        """An empty transformers K/V cache laid out for this backbone's layers."""
        return DynamicCache(config=self.lm.config)

    # -- LLaDA-format checkpoints -------------------------------------------------------------------

    @classmethod
    def from_llada_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> LLaDABackbone:
        """Load a LLaDA checkpoint directory as published (config.json + safetensors, LLaDA names)."""
        config = read_llada_config(directory)
        backbone = cls(config)
        backbone.load_llada_state_dict(load_state_dict_files(directory), source=str(directory))
        if dtype is not None:
            backbone.to(dtype)
        return backbone

    def load_llada_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strictly load LLaDA-named weights, naming missing, unexpected and mis-shaped tensors."""
        try:
            renamed = llada_to_llama_state_dict(state_dict)
        except KeyError as err:
            raise ValueError(f"{source}: {err.args[0]}") from None
        own = self.lm.state_dict()
        if self.lm.config.tie_word_embeddings:
            own.pop("lm_head.weight", None)
        missing = sorted(set(own) - set(renamed))
        unexpected = sorted(set(renamed) - set(own))
        shapes = [
            f"{_llada_name(k)}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in renamed.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{source}: checkpoint does not match the config: "
                f"missing {[_llada_name(k) for k in missing]}, unexpected {[_llada_name(k) for k in unexpected]}, "
                f"shape mismatches (file vs model) {shapes}"
            )
        self.lm.load_state_dict(renamed, strict=not self.lm.config.tie_word_embeddings)

    def llada_state_dict(self) -> dict[str, torch.Tensor]:
        """This backbone's weights under LLaDA's names (what LLaDA's own modeling code loads)."""
        state = self.lm.state_dict()
        if self.lm.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return llama_to_llada_state_dict(state)

    def save_llada_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors in LLaDA's format (e.g. a merged LoRA backbone)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.llada_config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.llada_state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _llada_name(key: str) -> str:
    """A Llama-side parameter name in LLaDA's vocabulary (the one users know from the checkpoint)."""
    try:
        return _rename(key, LLAMA_TO_LLADA_KEYS)
    except KeyError:
        return key
