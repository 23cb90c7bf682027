"""A stage run with the mask noise removed (fixed masks), launched by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_entry.py sft [stage flags]
    python -m deepspeed.launcher.runner --num_gpus 2 tests/distributed_entry.py vrpo [stage flags]

The masked-diffusion loss draws random masks on every rank from the same seed, so a 2-process run and a 1-process
run see different masks and their loss curves differ by sampling noise alone. With every answer token masked (the
t = 1 end of the same loss: `eps = 1`) the loss is a deterministic function of weights and data, and the two
layouts must agree up to floating-point reduction order. VRPO's ELBO draws get a fixed pattern instead: every other
answer token masked, alternating between draws. (Masking every token would make the chosen and rejected inputs
identical: the gradient of their ELBO difference then cancels exactly for most weights, and Adam's normalisation
turns what is left, rounding noise, into ±lr updates that differ between the layouts.)
"""

from __future__ import annotations

import sys

import torch

from diffa2.diffusion import objective
from diffa2.rl import ElboDraws, ElboEstimator
from diffa2.stages import acoustic, semantic, sft, vrpo

_forward_process = objective.forward_process


def every_token_masked(answer_ids, answer_mask, mask_id, *, eps, form, generator=None):
    """The forward process at p = 1: each answer position is masked, with loss weight 1."""
    return _forward_process(answer_ids, answer_mask, mask_id, eps=1.0, form="ratio", generator=generator)


def alternate_answer_tokens_masked(self, answer_mask, *, generator=None, prompt_mask=None) -> ElboDraws:
    """`ElboEstimator.sample` without noise: draw j masks the answer positions i with i + j even (weight L/k)."""
    answer_mask = answer_mask.bool()
    positions = torch.arange(answer_mask.shape[-1], device=answer_mask.device)
    draws = torch.arange(self.budget, device=answer_mask.device)
    masks = answer_mask & ((draws[:, None, None] + positions) % 2 == 0)  # (n, B, L)
    weights = answer_mask.sum(-1) / masks.sum(-1).clamp_min(1)
    return ElboDraws(masks, weights.float(), answer_mask, self.n_t, self.n_yt)


def remove_mask_noise() -> None:
    objective.forward_process = every_token_masked
    ElboEstimator.sample = alternate_answer_tokens_masked


if __name__ == "__main__":
    remove_mask_noise()
    stages = {"semantic": semantic, "acoustic": acoustic, "sft": sft, "vrpo": vrpo}
    argv = sys.argv[1:]
    name = next(arg for arg in argv if arg in stages)  # DeepSpeed's launcher puts --local_rank=N before it
    argv.remove(name)
    stages[name].main(argv)
