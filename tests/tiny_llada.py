"""A tiny LLaDA checkpoint in exactly the published on-disk format, and LLaDA's forward written from its spec.

Written independently of `diffa2.modeling.backbone` on purpose: config keys and parameter names are the
ones listed for `GSAI-ML/LLaDA-8B-Instruct` in `docs/checkpoint-formats.md` §1.2-1.4, and
`llada_reference_logits` restates LLaDA's `LLaDALlamaBlock` math (RMSNorm, rotate-half RoPE in fp32,
non-causal SDPA, SwiGLU with `ff_proj` as the gate) so a renaming mistake in the toolkit cannot hide.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Every key of the published config.json (§1.2), with the 8B values for the non-size keys.
LLADA_8B_CONFIG = {
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
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
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
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
    "transformers_version": "4.46.3",
}

BLOCK_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def tiny_llada_config(
    *, d_model: int = 32, n_heads: int = 4, n_layers: int = 2, mlp: int = 64, vocab: int = 300,
    mask_id: int = 290, eos_id: int = 291,
) -> dict:
    return LLADA_8B_CONFIG | {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "n_layers": n_layers,
        "mlp_hidden_size": mlp,
        "embedding_size": -(-vocab // 128) * 128,
        "vocab_size": vocab,
        "mask_token_id": mask_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def tiny_llada_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's names and shapes (§1.3), norms perturbed away from 1."""
    gen = torch.Generator().manual_seed(seed)
    d, f, e = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    kv = d // config["n_heads"] * config["n_kv_heads"]
    shapes = {
        "attn_norm": (d,), "q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d),
        "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f),
    }

    def rand(*shape: int, norm: bool = False) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen)
        return 1 + 0.1 * noise if norm else 0.2 * noise

    state = {
        "model.transformer.wte.weight": rand(e, d),
        "model.transformer.ln_f.weight": rand(d, norm=True),
        "model.transformer.ff_out.weight": rand(e, d),
    }
    for i in range(config["n_layers"]):
        for name in BLOCK_PARAMS:
            state[f"model.transformer.blocks.{i}.{name}.weight"] = rand(*shapes[name], norm=name.endswith("norm"))
    return state


def write_tiny_llada(directory: Path, *, sharded: bool = False, seed: int = 0, **sizes: int) -> dict:
    """Write config.json + bf16 safetensors (single file, or 2 shards with an index) like the hub repo."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_llada_config(**sizes)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.to(torch.bfloat16) for k, v in tiny_llada_state_dict(config, seed).items()}
    if not sharded:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return config
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return config


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(t: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    head = t.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head, 2, dtype=torch.float32) / head)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # (T, head)
    first, second = t.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (t.float() * angles.cos() + rotated * angles.sin()).to(t.dtype)


def llada_reference_logits(state: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward for one unpadded sequence `[T]` -> logits `[T, V]`, straight from the spec (fp32)."""
    p = "model.transformer."
    w = {k: v.float() for k, v in state.items()}
    heads, eps, theta = config["n_heads"], config["rms_norm_eps"], config["rope_theta"]
    x = w[p + "wte.weight"][input_ids]
    positions = torch.arange(input_ids.shape[0])
    for i in range(config["n_layers"]):
        b = f"{p}blocks.{i}."
        h = _rms(x, w[b + "attn_norm.weight"], eps)
        q, k, v = (h @ w[b + f"{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj"))
        q, k, v = (t.view(t.shape[0], heads, -1).transpose(0, 1) for t in (q, k, v))  # (H, T, hd)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + att.transpose(0, 1).reshape(x.shape) @ w[b + "attn_out.weight"].T
        h = _rms(x, w[b + "ff_norm.weight"], eps)
        x = x + (F.silu(h @ w[b + "ff_proj.weight"].T) * (h @ w[b + "up_proj.weight"].T)) @ w[b + "ff_out.weight"].T
    return _rms(x, w[p + "ln_f.weight"], eps) @ w[p + "ff_out.weight"].T
