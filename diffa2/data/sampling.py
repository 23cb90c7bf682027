"""Training orders that pad less: a batch pads every prompt to its longest, so batching prompts of similar length
spends less compute on padding.

Two orders, both reproducible per epoch (every process of a data-parallel run, and a resumed run, draws the same):
- `group_by_length`: transformers' `LengthGroupedSampler` (batches of nearly equal length);
- `length_buckets`: prompts split into a few coarse length buckets where the sorted lengths jump, each batch drawn
  at random from one bucket, so a batch still mixes item kinds but not short and long prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from diffa2.chat import ChatFormat
from diffa2.data.recipe import RecipeItem


def prompt_lengths(items: list[RecipeItem], chat: ChatFormat) -> list[int]:
    """Each item's prompt length in tokens (the part of a training sequence that varies with the item)."""
    return [len(chat.encode(item.prompt()[0])[0]) for item in items]


class EpochSeeded:
    """An order drawn from `seed + epoch`, not from the global RNG: every process of a data-parallel run draws the
    same order, and a resumed run the order of the run it continues."""

    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer at the start of every epoch."""
        self.epoch = epoch

    def epoch_generator(self) -> torch.Generator:
        """A generator seeded for the current epoch."""
        return torch.Generator().manual_seed(self.seed + self.epoch)


class EpochSeededLengthGroupedSampler(EpochSeeded, LengthGroupedSampler):
    """`LengthGroupedSampler` whose shuffle is drawn per epoch (`EpochSeeded`)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        self.generator = self.epoch_generator()
        return super().__iter__()


def length_buckets(lengths: Sequence[int], gap: int) -> list[list[int]]:
    """Item indices split into buckets of prompt length: a new bucket starts where the sorted lengths jump by more
    than `gap` tokens (short free-form questions vs. long prompts with lettered choices, in the synthetic mix)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    previous = None
    for i in order:
        if previous is None or lengths[i] - previous > gap:
            buckets.append([])
        buckets[-1].append(i)
        previous = lengths[i]
    return buckets


class EpochSeededLengthBucketSampler(EpochSeeded, torch.utils.data.Sampler[int]):
    """Batches of `batch_size` consecutive indices, each drawn from one length bucket (`length_buckets`), in a random
    order drawn per epoch (`EpochSeeded`).

    Every item comes once per epoch. A bucket's leftover items (fewer than a batch) are pooled into the epoch's last
    batches, the only ones that mix buckets; the one batch shorter than `batch_size`, if any, comes last, so
    Trainer's loader (which cuts the order into consecutive batches) sees the same batches.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int, gap: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.buckets = length_buckets(lengths, gap)
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def __iter__(self) -> Iterator[int]:
        generator = self.epoch_generator()
        size = self.batch_size
        full: list[list[int]] = []
        leftovers: list[int] = []
        for bucket in self.buckets:
            shuffled = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
            cut = len(shuffled) - len(shuffled) % size
            full += [shuffled[i : i + size] for i in range(0, cut, size)]
            leftovers += shuffled[cut:]
        batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        batches += [leftovers[i : i + size] for i in range(0, len(leftovers), size)]
        return iter([index for batch in batches for index in batch])
