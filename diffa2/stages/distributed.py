"""Multi-process glue: process groups on CPU-only machines; whole weights and extra engines under ZeRO-3."""

from __future__ import annotations

import atexit
import copy
import os
from datetime import timedelta

import torch
from torch import nn
from transformers import Trainer

# The DeepSpeed settings transformers sizes from the model's hidden size when their value is "auto", and how
# (`HfTrainerDeepSpeedConfig.trainer_config_finalize`; TRL's `DPOTrainer._prepare_deepspeed` sets the same three).
HIDDEN_SIZE_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


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


def release_process_group() -> None:
    """Tear this process's process group down (a no-op without one); registered to run at interpreter exit.

    Left to the interpreter's own teardown, the group's worker threads were destroyed while still joinable
    ("terminate called without an active exception", exit status 250) in about 1 of 4 two-process ZeRO-3 VRPO runs
    on gloo, after the stage had finished and written everything.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(release_process_group)


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


def inference_config(config: dict, hidden_size: int) -> dict:
    """A copy of a training DeepSpeed `config` for an engine that only runs forwards.

    No optimizer or scheduler; ZeRO stage, bf16 and batch sizes stay as they are. The "auto" bucket sizes are
    resolved from `hidden_size`: transformers fills them in the policy's config only when training starts.
    """
    config = copy.deepcopy(config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.get("zero_optimization", {})
    for key, size in HIDDEN_SIZE_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = size(hidden_size)
    return config


def inference_engine(model: nn.Module, trainer: Trainer) -> nn.Module:
    """`model` as a DeepSpeed engine of its own, configured like `trainer`'s (ZeRO-3: partitioned), in eval mode.

    For a second, frozen model beside the trained one, as TRL's `DPOTrainer._prepare_deepspeed` builds its reference
    model. Collective under ZeRO-3 (every rank calls it, and later every forward of the engine), and it partitions
    `model`'s parameters in place. Call it after `Trainer.__init__` (which sets up the DeepSpeed config).
    """
    import deepspeed

    config = inference_config(trainer.accelerator.state.deepspeed_plugin.deepspeed_config, model.config.hidden_size)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
    return engine
