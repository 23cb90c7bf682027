"""Multi-process glue of the stages: process groups on CPU-only machines, and whole weights under ZeRO-3."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from transformers import Trainer


def cpu_multiprocess() -> bool:
    """Launched as one of several processes (torchrun, the deepspeed launcher) on a machine without CUDA."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def gloo_deepspeed_state(timeout_s: int) -> None:
    """Set up accelerate's process state for DeepSpeed on gloo: without CUDA, accelerate finds no backend itself."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState; transformers sets it the same way
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=timeout_s))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def zero3_enabled(trainer: Trainer) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters of `trainer`'s model across ranks."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3


def full_state_dict(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, the model's whole state dict on the main process (None on the others); else None.

    Collective under ZeRO-3: every rank must call it. Uses DeepSpeed's own gather of the module's weights in their
    training dtype (`engine._zero3_consolidated_16bit_state_dict`, which `accelerator.get_state_dict` wraps; it
    needs `stage3_gather_16bit_weights_on_model_save: true`, set in stages/deepspeed/zero3.json).
    """
    if not zero3_enabled(trainer):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)
