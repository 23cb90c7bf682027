"""Per-GPU memory of each DIFFA-2 stage at real scale (Whisper-large-v3 + LLaDA-8B, bf16), under ZeRO-1/2/3.

    python bench/memory_estimate.py            # markdown table; no weights, no GPU: the model is built on `meta`

Parameters are counted on the real architecture (built on the meta device) with each stage's trainable set
(`stages/<stage>.yaml`). Model states use DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) for the *trainable* parameters, which they assume are all trained; the
frozen Whisper and LLaDA weights add 2 bytes each (bf16) per GPU, or 2 / N bytes under ZeRO-3, which partitions
them too. ZeRO-1 and ZeRO-2 share DeepSpeed's `DeepSpeedZeroOptimizer` and, with the optimizer offloaded, both
keep only the bf16 weights on the GPU, so the ZeRO-2 offload estimator covers `zero1_offload.json`.

Activations are counted by hand (assumptions in `ACTIVATION_NOTES`): the adapters feed the backbone's input, so
backprop runs through all 32 LLaDA blocks and every block keeps its activations unless gradient checkpointing
(`--gradient_checkpointing true`) recomputes them. Not counted: the CUDA context (~0.5-1 GB), allocator
fragmentation, communication buckets and temporary buffers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import WhisperConfig

from diffa2.modeling.adapters import DOWNSAMPLE
from diffa2.modeling.backbone import llada_config
from diffa2.modeling.configuration import WHISPER_LARGE_V3, WHISPER_LARGE_V3_TAPS, DIFFA2Config, LoraSettings
from diffa2.modeling.model import DIFFA2Model
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

GB = 1e9
PROMPT_TOKENS = 48  # chat template + system prompt + question (LLaMA-3 style), an assumption
ACTIVATION_NOTES = (
    "bf16 activations; SDPA (flash / memory-efficient) attention, so no L x L score matrix is stored; per token "
    "and block: RMSNorm inputs and outputs, q, k, v, attention output, o_proj input, SwiGLU gate/up/SiLU/product "
    "= 18 h + 8 I bytes (h 4096, I 12288), plus LoRA dropout outputs and masks on the 5 adapted inputs (15 h) in "
    "stages 3-4; answer logits kept in bf16 and fp32 (6 bytes x vocab per answer token); 30 s clips (375 semantic "
    "tokens after the x4 downsampling), answers padded to 128 tokens. Checkpointed: one bf16 input per block per "
    "token plus one block's full activations during its recomputation."
)


@dataclass
class Stage:
    name: str
    speech_path: int  # 1: 20 prompt embeddings + semantic; 2: acoustic queries + semantic
    lora: bool
    per_device_batch: int
    sequences_per_item: int  # VRPO: chosen + rejected, 4 Monte-Carlo masks each, all with gradients
    nodes: int  # DIFFA-2's layout (docs/model.md §4.2), 8 GPUs per node


STAGES = [
    Stage("1 semantic", 1, False, 20, 1, 8),
    Stage("2 acoustic", 2, False, 3, 1, 8),
    Stage("3 sft (LoRA)", 2, True, 3, 1, 8),
    Stage("4 vrpo (LoRA)", 2, True, 1, 8, 2),
]


def real_model(stage: Stage) -> DIFFA2Model:
    """The real architecture on the meta device, with the stage's trainable parameters."""
    backbone = llada_config(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                            mask_token_id=126336, eos_token_id=126081)
    encoder = WhisperConfig(**WHISPER_LARGE_V3).to_dict()
    config = DIFFA2Config(encoder=encoder, backbone=backbone, encoder_source="whisper", backbone_source="llada",
                          tap_layers=list(WHISPER_LARGE_V3_TAPS), qformer_heads=20, speech_path=stage.speech_path)
    with torch.device("meta"):
        model = DIFFA2Model(config)
        if stage.lora:
            model.add_lora(LoraSettings())
    model.set_trainable(encoder=False, backbone=False)
    if stage.speech_path == 1:
        model.acoustic_adapter.requires_grad_(False)
    return model


def activation_bytes(stage: Stage, model: DIFFA2Model, checkpointing: bool) -> float:
    """Activations kept for the backward pass on one GPU (see ACTIVATION_NOTES)."""
    h = model.config.backbone["d_model"]
    inner = model.config.backbone["mlp_hidden_size"]
    layers = model.config.backbone["n_layers"]
    vocab = model.config.backbone["embedding_size"]
    answer = 128
    speech = model.config.encoder["max_source_positions"] // DOWNSAMPLE
    lead = model.config.num_prompt_embeddings if stage.speech_path == 1 else model.config.num_queries
    sequences = stage.per_device_batch * stage.sequences_per_item
    tokens = sequences * (PROMPT_TOKENS + lead + speech + answer)
    per_token_block = 18 * h + 8 * inner + (15 * h if stage.lora else 0)
    if checkpointing:
        blocks = tokens * (2 * h * layers + per_token_block)
    else:
        blocks = tokens * per_token_block * layers
    logits = sequences * answer * vocab * 6
    taps = stage.per_device_batch * len(model.config.tap_layers) * 1500 * model.config.encoder["d_model"] * 2
    return blocks + logits + (taps if stage.speech_path == 2 else 0)


def model_states(trainable: int, frozen: int, largest: int, gpus: int, zero: str) -> tuple[float, float]:
    """(GPU bytes, CPU bytes per node) of weights, gradients and Adam states under one ZeRO configuration."""
    nodes = max(gpus // 8, 1)
    if zero == "zero1_offload":
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, 8, nodes, cpu_offload=True)
        return gpu + 2 * frozen, cpu
    if zero == "zero2":
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, 8, nodes, cpu_offload=False)
        return gpu + 2 * frozen, cpu
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest, 8, nodes, cpu_offload=False,
                                                        cpu_offload_params=False)
    return gpu + 2 * frozen / gpus, cpu


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_threads_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    apply_threads(parse_checked(build_parser(), argv).threads)
    print("| stage | trainable | frozen | GPUs | per-GPU batch | model states ZeRO-1 offload / ZeRO-2 / ZeRO-3 "
          "(GB per GPU) | activations, no ckpt / ckpt (GB) | total ZeRO-1 offload, no ckpt / ckpt (GB) "
          "| CPU RAM per node, ZeRO-1 offload (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in STAGES:
        model = real_model(stage)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        vrpo = stage.name.startswith("4")
        for gpus in sorted({8, 8 * stage.nodes}):
            states = {z: model_states(trainable, frozen, largest, gpus, z) for z in ("zero1_offload", "zero2", "zero3")}
            # VRPO's reference: a bf16 copy of the trained tensors (ZeRO-1/2), or under ZeRO-3 a whole second model
            # partitioned like the policy (diffa2.stages.reference_models.ZeRO3Reference)
            reference = {"zero1_offload": 2 * trainable, "zero2": 2 * trainable,
                         "zero3": 2 * (trainable + frozen) / gpus} if vrpo else {}
            gpu = {z: s[0] + reference.get(z, 0) for z, s in states.items()}
            act, act_ckpt = activation_bytes(stage, model, False), activation_bytes(stage, model, True)
            print(f"| {stage.name} | {trainable / 1e6:.1f} M | {frozen / 1e9:.2f} B | {gpus} | "
                  f"{stage.per_device_batch}{' pair' if stage.sequences_per_item > 1 else ''} | "
                  f"{gpu['zero1_offload'] / GB:.1f} / {gpu['zero2'] / GB:.1f} / {gpu['zero3'] / GB:.1f} | "
                  f"{act / GB:.1f} / {act_ckpt / GB:.1f} | "
                  f"{(gpu['zero1_offload'] + act) / GB:.1f} / {(gpu['zero1_offload'] + act_ckpt) / GB:.1f} | "
                  f"{states['zero1_offload'][1] / GB:.1f} |")
    print(f"\nActivations: {ACTIVATION_NOTES}")


if __name__ == "__main__":
    main()
