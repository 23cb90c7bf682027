"""Training order grouped by prompt length: a batch pads every prompt to its longest, so batching prompts of similar
length spends less compute on padding (transformers' `LengthGroupedSampler`, made reproducible per epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from diffa2.chat import ChatFormat
from diffa2.data.recipe import RecipeItem


def prompt_lengths(items: list[RecipeItem], chat: ChatFormat) -> list[int]:
    """Each item's prompt length in tokens (the part of a training sequence that varies with the item)."""
    return [len(chat.encode(item.prompt()[0])[0]) for item in items]


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose shuffle is drawn from `seed + epoch`, not from the global RNG: every process
    of a data-parallel run draws the same order, and a resumed run the order of the run it continues."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()
