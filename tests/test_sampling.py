"""Training order grouped by prompt length: less padding, the same items, reproducible per epoch, exact on resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import small_run_args
from safetensors.torch import load_file

from diffa2.data.sampling import EpochSeededLengthGroupedSampler
from diffa2.stages import sft

LENGTHS = [35, 95, 40, 97, 36, 60, 61, 94, 38, 59, 37, 96] * 8  # 96 prompts of three lengths, as the SFT mix has


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_every_item_once_per_epoch_and_the_same_order_for_the_same_seed_and_epoch():
    first, again = (EpochSeededLengthGroupedSampler(8, LENGTHS, seed=3) for _ in range(2))
    order = list(first)
    assert sorted(order) == list(range(len(LENGTHS)))
    assert list(again) == order  # a second process (or a resumed run) draws the same order
    first.set_epoch(1)
    assert list(first) != order and sorted(first) == list(range(len(LENGTHS)))
    again.set_epoch(1)
    assert list(again) == list(first)


def test_grouped_batches_pad_less_than_random_ones():
    size = 8
    grouped = list(EpochSeededLengthGroupedSampler(size, LENGTHS, seed=0))
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()

    def padded_tokens(order):
        return sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in batches(order, size))

    assert padded_tokens(grouped) < 0.8 * padded_tokens(shuffled)
    assert max(LENGTHS[i] for i in grouped[:size]) == max(LENGTHS)  # Trainer's sampler puts the longest batch first


@pytest.mark.slow
def test_resuming_a_grouped_run_ends_with_the_uninterrupted_weights(tmp_path, small_corpus):
    # The small corpus has 28 SFT items: 7 steps of 4 per epoch. Resuming from checkpoint-10 (3 steps into the
    # second epoch) needs that epoch's order drawn again, which the global RNG would not reproduce.
    steps, grouped = 12, ["--train_sampling_strategy", "group_by_length"]
    full = sft.main(small_run_args(tmp_path / "full", small_corpus, steps, grouped))
    assert full["steps"] == steps
    cut = tmp_path / "cut"
    sft.main(small_run_args(cut, small_corpus, steps, grouped))
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / f"checkpoint-{steps}")  # resume from checkpoint-10
    resumed = sft.main(small_run_args(cut, small_corpus, steps, [*grouped, "--resume", "true"]))
    assert resumed["steps"] == steps
    a, b = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / "full", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_rebalance_is_refused_with_the_alternatives(tmp_path, small_corpus):
    with pytest.raises(ValueError, match="batch_rebalance is not supported.*group_by_length or random"):
        sft.main(small_run_args(tmp_path / "run", small_corpus, 2, ["--train_sampling_strategy", "batch_rebalance"]))
