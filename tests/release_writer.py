"""Tiny DIFFA-2 release folders, written the way the reference's `trainer.save_model()` writes `DIFFAModel`.

Independent of `diffa2.modeling.release` on purpose: every key name, shape and config field is spelled out
here from the reference code (NKU-HLT/DIFFA: `DIFFA-2/src/modeling_DIFFA.py` for the module tree,
`src/subsample.py` for `WhisperProjector`, `DIFFA-2/src/configuration_DIFFA.py` for config.json,
`DIFFA-2/train.py` for the peft-wrapped LLaDA), so a naming mistake in the toolkit's mapping cannot hide.
Tensors are kept by role in `TinyRelease`, so a test can also load them into a model by attribute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_llada import tiny_llada_config, tiny_llada_state_dict
from transformers import WhisperConfig

WHISPER_TINY_TAPS = [0, 1, 2, 3]  # the reference's taps for "openai/whisper-tiny"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")  # train.py's default LLaDA targets
SEMANTIC_NAMES = {  # role -> the reference's name: conv = Sequential(conv, GELU, conv), MLP = Sequential(...)
    "conv1": "conv.0", "conv2": "conv.2", "fc1": "linear_connector.0", "fc2": "linear_connector.2", "norm": "layernorm",
}
BERT_INTERMEDIATE = 3072  # BertConfig() default, kept by the reference's Q-Former


@dataclass
class TinyRelease:
    """The tensors of a tiny DIFFA-2, by role, and the two configs the release embeds."""

    whisper_config: dict
    llm_config: dict
    whisper: dict[str, torch.Tensor]  # HF WhisperEncoder parameter names
    llada: dict[str, torch.Tensor]  # LLaDA names, model.transformer.*
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (block, module) -> (A [r, in], B [out, r])
    prompts: torch.Tensor  # [20, d_llm]
    semantic: dict[str, tuple[torch.Tensor, torch.Tensor]]  # role -> (weight, bias)
    queries: list[torch.Tensor]  # one [1, Q, d_whisper] per tap
    tap_weights: torch.Tensor  # [Q, n_taps]
    qformer: dict[str, torch.Tensor]  # BertEncoder names
    out_norm: tuple[torch.Tensor, torch.Tensor]
    out_proj: tuple[torch.Tensor, torch.Tensor]
    whisper_model_id: str = "openai/whisper-tiny"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole `DIFFAModel` state dict under the reference's names."""
        state = {f"whisper_model.{k}": v for k, v in self.whisper.items()}
        state["trainable_prompts.weight"] = self.prompts
        for role, (weight, bias) in self.semantic.items():
            state[f"semantic_connector.{SEMANTIC_NAMES[role]}.weight"] = weight
            state[f"semantic_connector.{SEMANTIC_NAMES[role]}.bias"] = bias
        for i, query in enumerate(self.queries):
            state[f"acoustic_connector.layer_prompts.{i}"] = query
        state["acoustic_connector.layer_weights"] = self.tap_weights
        state.update({f"acoustic_connector.qformer.{k}": v for k, v in self.qformer.items()})
        state["acoustic_connector.proj.0.weight"], state["acoustic_connector.proj.0.bias"] = self.out_norm
        state["acoustic_connector.proj.1.weight"], state["acoustic_connector.proj.1.bias"] = self.out_proj
        state.update(self._llm_state())
        return state

    def _llm_state(self) -> dict[str, torch.Tensor]:
        """LLaDAModelLM's names; with LoRA behind peft's PeftModelForCausalLM (`llm_model.base_model.model.`)."""
        if not self.lora:
            return {f"llm_model.{k}": v for k, v in self.llada.items()}
        targeted = {f"model.transformer.blocks.{i}.{m}.weight" for i, m in self.lora}
        state = {}
        for key, value in self.llada.items():
            name = key.removesuffix(".weight") + ".base_layer.weight" if key in targeted else key
            state[f"llm_model.base_model.model.{name}"] = value
        for (i, module), (a, b) in self.lora.items():
            stem = f"llm_model.base_model.model.model.transformer.blocks.{i}.{module}"
            state[f"{stem}.lora_A.default.weight"] = a
            state[f"{stem}.lora_B.default.weight"] = b
        return state

    def config(self, dtype: torch.dtype) -> dict:
        """config.json as `DIFFAConfig` saves under transformers 4.49 (keys sorted when written)."""
        dtype_name = str(dtype).removeprefix("torch.")
        return {
            "acoustic_connector_config": {},
            "adapter_inner_dim": 512,
            "architectures": ["DIFFAModel"],
            "conv_kernel_sizes": "5,5,5",
            "llm_config": self.llm_config,
            "prompt_size": self.tap_weights.shape[0],
            "torch_dtype": dtype_name,
            "transformers_version": "4.49.0",
            "whisper_config": self.whisper_config,
            "whisper_model_id": self.whisper_model_id,
        }


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn(shape, generator=gen)


def _norm(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _rand(gen, size), _rand(gen, size)


def _linear(gen: torch.Generator, out: int, inp: int, *extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rand(gen, out, inp, *extra, scale=inp**-0.5), _rand(gen, out)


def tiny_whisper_config(*, d_model: int = 32, layers: int = 4, heads: int = 4, positions: int = 100) -> dict:
    """An HF WhisperConfig dict as the reference's train.py embeds it (`WhisperConfig(...).to_dict()`)."""
    config = WhisperConfig(num_mel_bins=80, d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                           encoder_ffn_dim=4 * d_model, decoder_layers=1, decoder_attention_heads=heads,
                           decoder_ffn_dim=4 * d_model, max_source_positions=positions, max_target_positions=32,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).to_dict()
    return config | {"_name_or_path": "/path/to/models/whisper-large-v3", "transformers_version": "4.49.0",
                     "torch_dtype": "float16"}


def whisper_encoder_tensors(config: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under HF WhisperEncoder's names (k_proj has no bias)."""
    d, ffn = config["d_model"], config["encoder_ffn_dim"]
    state = {}
    state["conv1.weight"], state["conv1.bias"] = _linear(gen, d, config["num_mel_bins"], 3)
    state["conv2.weight"], state["conv2.bias"] = _linear(gen, d, d, 3)
    state["embed_positions.weight"] = _rand(gen, config["max_source_positions"], d)
    for i in range(config["encoder_layers"]):
        p = f"layers.{i}."
        state[p + "self_attn.k_proj.weight"] = _linear(gen, d, d)[0]
        for name in ("v_proj", "q_proj", "out_proj"):
            state[p + f"self_attn.{name}.weight"], state[p + f"self_attn.{name}.bias"] = _linear(gen, d, d)
        state[p + "self_attn_layer_norm.weight"], state[p + "self_attn_layer_norm.bias"] = _norm(gen, d)
        state[p + "fc1.weight"], state[p + "fc1.bias"] = _linear(gen, ffn, d)
        state[p + "fc2.weight"], state[p + "fc2.bias"] = _linear(gen, d, ffn)
        state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"] = _norm(gen, d)
    state["layer_norm.weight"], state["layer_norm.bias"] = _norm(gen, d)
    return state


def qformer_tensors(d: int, gen: torch.Generator, layers: int = 2) -> dict[str, torch.Tensor]:
    """Random tensors under transformers' BertEncoder names (self- and cross-attention, FFN 3072)."""
    state = {}
    for i in range(layers):
        for block in ("attention", "crossattention"):
            p = f"layer.{i}.{block}."
            for name in ("query", "key", "value"):
                state[p + f"self.{name}.weight"], state[p + f"self.{name}.bias"] = _linear(gen, d, d)
            state[p + "output.dense.weight"], state[p + "output.dense.bias"] = _linear(gen, d, d)
            state[p + "output.LayerNorm.weight"], state[p + "output.LayerNorm.bias"] = _norm(gen, d)
        p, inner = f"layer.{i}.", BERT_INTERMEDIATE
        state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"] = _linear(gen, inner, d)
        state[p + "output.dense.weight"], state[p + "output.dense.bias"] = _linear(gen, d, inner)
        state[p + "output.LayerNorm.weight"], state[p + "output.LayerNorm.bias"] = _norm(gen, d)
    return state


def lora_tensors(llm_config: dict, rank: int, gen: torch.Generator) -> dict[tuple[int, str], tuple]:
    """LoRA A [r, in] and B [out, r] on train.py's targets; B non-zero so that LoRA changes the outputs."""
    d, mlp = llm_config["d_model"], llm_config["mlp_hidden_size"]
    out = {"q_proj": d, "k_proj": d, "v_proj": d, "ff_proj": mlp, "up_proj": mlp}
    return {(i, m): (_rand(gen, rank, d, scale=d**-0.5), _rand(gen, out[m], rank, scale=0.05))
            for i in range(llm_config["n_layers"]) for m in LORA_TARGETS}


def make_tiny_release(
    *,
    llm_config: dict | None = None,
    whisper_config: dict | None = None,
    whisper: dict[str, torch.Tensor] | None = None,
    llada: dict[str, torch.Tensor] | None = None,
    prompt_size: int = 8,
    lora_rank: int | None = 8,
    seed: int = 0,
) -> TinyRelease:
    """Random tiny DIFFA-2 tensors (Whisper/LLaDA bases may be given, e.g. read from tiny base folders)."""
    gen = torch.Generator().manual_seed(seed)
    whisper_config = whisper_config or tiny_whisper_config()
    llm_config = (llm_config or tiny_llada_config()) | {"_name_or_path": "/path/to/models/LLaDA-8B-Instruct",
                                                         "transformers_version": "4.49.0", "torch_dtype": "bfloat16"}
    dw, dl = whisper_config["d_model"], llm_config["d_model"]
    return TinyRelease(
        whisper_config=whisper_config,
        llm_config=llm_config,
        whisper=whisper or whisper_encoder_tensors(whisper_config, gen),
        llada=llada or tiny_llada_state_dict(llm_config, seed),
        lora=lora_tensors(llm_config, lora_rank, gen) if lora_rank else {},
        prompts=_rand(gen, 20, dl, scale=1.0),
        semantic={"conv1": _linear(gen, dw, dw, 3), "conv2": _linear(gen, 4 * dw, dw, 3),
                  "fc1": _linear(gen, dw, 4 * dw), "fc2": _linear(gen, dl, dw), "norm": _norm(gen, dl)},
        queries=[_rand(gen, 1, prompt_size, dw, scale=1.0) for _ in WHISPER_TINY_TAPS],
        tap_weights=_rand(gen, prompt_size, len(WHISPER_TINY_TAPS), scale=1.0),
        qformer=qformer_tensors(dw, gen),
        out_norm=_norm(gen, dw),
        out_proj=_linear(gen, dl, dw),
    )


def write_release(
    release: TinyRelease,
    directory: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    state: dict[str, torch.Tensor] | None = None,
    safetensors_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json, generation_config.json and pytorch_model.bin (torch.save of a plain tensor dict).

    `state` replaces the release's state dict (to write broken folders); `safetensors_state` adds a
    model.safetensors holding those tensors.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in (state or release.state_dict()).items()}
    torch.save(tensors, directory / "pytorch_model.bin")
    if safetensors_state is not None:
        save_file({k: v.to(dtype).contiguous() for k, v in safetensors_state.items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})
    generation = {"_from_model_config": True, "transformers_version": "4.49.0"}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    (directory / "config.json").write_text(json.dumps(release.config(dtype), indent=2, sort_keys=True) + "\n")
    return directory
