"""A stage run with the mask noise removed (every answer token masked), launched by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_entry.py sft [stage flags]

The masked-diffusion loss draws random masks on every rank from the same seed, so a 2-process run and a 1-process
run see different masks and their loss curves differ by sampling noise alone. With every answer token masked (the
t = 1 end of the same loss: `eps = 1`) the loss is a deterministic function of weights and data, and the two
layouts must agree up to floating-point reduction order.
"""

from __future__ import annotations

import sys

from diffa2.diffusion import objective
from diffa2.stages import acoustic, semantic, sft

_forward_process = objective.forward_process


def every_token_masked(answer_ids, answer_mask, mask_id, *, eps, form, generator=None):
    """The forward process at p = 1: each answer position is masked, with loss weight 1."""
    return _forward_process(answer_ids, answer_mask, mask_id, eps=1.0, form="ratio", generator=generator)


def remove_mask_noise() -> None:
    objective.forward_process = every_token_masked


if __name__ == "__main__":
    remove_mask_noise()
    stage = {"semantic": semantic, "acoustic": acoustic, "sft": sft}[sys.argv[1]]
    stage.main(sys.argv[2:])
