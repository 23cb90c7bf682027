"""The RL stage with a reward that differs inside a group, launched by tests/test_rl_stage.py on 2 processes.

    python -m torch.distributed.run --nproc_per_node=2 tests/rl_distributed_entry.py [stage flags]

`LENGTH_REWARD` (the answer's length in characters) gives a random tiny model's answers different rewards, so the
advantages and the updates are not zero (MMAU correctness is 0 for all of them); the RL tests use it too.
"""

from __future__ import annotations

import sys

from diffa2.stages import rl
from diffa2.stages.rewards import RLItem, register_reward

LENGTH_REWARD = "test_answer_length"


@register_reward(LENGTH_REWARD)
def answer_length(item: RLItem, answer: str) -> float:
    """The answer's length in characters."""
    return float(len(answer))


if __name__ == "__main__":
    rl.main(sys.argv[1:])
