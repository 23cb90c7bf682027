"""π_ref of stage 4 (VRPO): the policy as loaded, frozen, sharing everything it can with the policy.

`FrozenReference` keeps a frozen copy of the *trainable* tensors only (adapters, prompt embeddings, LoRA; the whole
model when everything trains, as in the tiny default) and runs the policy's own module with those tensors swapped in
(`torch.func.functional_call`, under `no_grad`, in eval mode), so the frozen Whisper and LLaDA weights exist once.
The reference is the stage-3 model *with* its LoRA and adapters, so "the policy with LoRA disabled" would be the
wrong reference.

Under DeepSpeed ZeRO-3 the policy's parameters are partitioned across ranks, so there is no whole module to swap
tensors into: `ZeRO3Reference` is a copy of the model as loaded, made its own DeepSpeed inference engine with the same
ZeRO-3 partitioning (as TRL's DPOTrainer builds its reference). Its forwards are collective, so every rank runs the
same policy and reference forwards in lockstep. The evaluation after training runs on the main process alone: on
the whole policy reloaded from `final/`, its reference a `FrozenReference` over that reload holding the trainable
tensors as loaded (`ZeRO3Reference.over`). `make_reference` picks the kind.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call
from transformers import Trainer

from diffa2.stages.distributed import inference_engine, zero3_enabled


class FrozenReference:
    """π_ref: `model` as it is now, kept as a frozen copy of its trainable tensors only (see the module docstring).

    Calling it runs `model`'s forward with those tensors in place of the current ones, without gradients and in eval
    mode (no dropout, as DIFFA-2's reference). The copy follows the model's device and dtype on first use (so it is
    bf16 where DeepSpeed casts the model to bf16). Parameters must be whole where it runs: one process, DDP,
    ZeRO-1/2, or the main process's reload of a ZeRO-3 run's `final/` (`over`); during ZeRO-3 training the
    reference is a `ZeRO3Reference`.
    """

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        if tensors is None:
            tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.tensors = tensors

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        for name, tensor in self.tensors.items():
            self.tensors[name] = tensor.to(device=params[name].device, dtype=params[name].dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return functional_call(self.model, self.tensors, args, kwargs, strict=False)
        finally:
            self.model.train(was_training)

    def over(self, model: nn.Module) -> FrozenReference:
        """The same frozen tensors swapped into `model`: the reference for a reload of the policy (same modules)."""
        return FrozenReference(model, dict(self.tensors))


class ZeRO3Reference:
    """π_ref under ZeRO-3: a copy of the model as loaded, its own DeepSpeed inference engine (see the module docstring).

    ZeRO-3 partitions the policy's parameters, so `FrozenReference` has nothing whole to swap its tensors into. Here
    the copy is partitioned the same way and runs in eval mode under `no_grad`; every call is collective (all ranks
    make it together). The main process also keeps a `FrozenReference` snapshot of the trainable tensors, for its
    evaluation after training on the whole policy reloaded from `final/` (`over`).
    """

    def __init__(self, model: nn.Module, trainer: Trainer) -> None:
        self.snapshot = FrozenReference(model) if trainer.is_world_process_zero() else None
        self.engine = inference_engine(copy.deepcopy(model).requires_grad_(False), trainer)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.engine(*args, **kwargs)

    def over(self, model: nn.Module) -> FrozenReference:
        """The reference as a `FrozenReference` of `model`, the whole policy on the main process after training."""
        if self.snapshot is None:
            raise RuntimeError("only the main process keeps the reference's snapshot for evaluation")
        return self.snapshot.over(model)


Reference = FrozenReference | ZeRO3Reference


def make_reference(model: nn.Module, trainer: Trainer) -> Reference:
    """π_ref for `trainer`'s policy `model` as it is now (before any step): its own engine under ZeRO-3, else shared.

    Call it after `Trainer.__init__` and before `train()`, which partitions `model` under ZeRO-3.
    """
    return ZeRO3Reference(model, trainer) if zero3_enabled(trainer) else FrozenReference(model)
