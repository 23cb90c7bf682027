"""Training orders grouped by prompt length: less padding, the same items, reproducible per epoch, exact on resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import small_run_args
from safetensors.torch import load_file

from diffa2.data.sampling import EpochSeededLengthBucketSampler, EpochSeededLengthGroupedSampler, length_buckets
from diffa2.stages import sft

LENGTHS = [35, 95, 40, 97, 36, 60, 61, 94, 38, 59, 37, 96] * 8  # 96 prompts of three lengths, as the SFT mix has


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def padded_tokens(order: list[int], size: int) -> int:
    return sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in batches(order, size))


@pytest.mark.parametrize("sampler", [EpochSeededLengthGroupedSampler, EpochSeededLengthBucketSampler])
def test_every_item_once_per_epoch_and_the_same_order_for_the_same_seed_and_epoch(sampler):
    first, again = (sampler(8, LENGTHS, seed=3) for _ in range(2))
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
    assert padded_tokens(grouped, size) < 0.8 * padded_tokens(shuffled, size)
    assert max(LENGTHS[i] for i in grouped[:size]) == max(LENGTHS)  # Trainer's sampler puts the longest batch first


def test_length_buckets_split_where_the_sorted_lengths_jump():
    assert length_buckets([5, 6, 50, 52, 7, 66, 90], gap=16) == [[0, 1, 4], [2, 3, 5], [6]]
    assert length_buckets([5, 6, 50], gap=100) == [[0, 1, 2]]
    assert length_buckets([], gap=16) == []


def test_bucket_batches_come_from_one_bucket_mix_lengths_within_it_and_pad_less_than_random():
    size = 8
    order = list(EpochSeededLengthBucketSampler(size, LENGTHS, seed=0))
    # LENGTHS has three buckets of 40, 24 and 32 items: 5 + 3 + 4 full batches, nothing left over
    bucket_of = {i: b for b, bucket in enumerate(length_buckets(LENGTHS, gap=16)) for i in bucket}
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in batches(order, size))
    assert any(len({LENGTHS[i] for i in batch}) > 1 for batch in batches(order, size))  # not sorted within a bucket
    sequence = [bucket_of[batch[0]] for batch in batches(order, size)]
    assert sequence != sorted(sequence)  # the buckets' batches are shuffled together
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    assert padded_tokens(order, size) < 0.8 * padded_tokens(shuffled, size)


def test_bucket_leftovers_are_pooled_into_the_last_batches_and_the_short_batch_comes_last():
    lengths = [10] * 11 + [60] * 6  # buckets of 11 and 6 items, batches of 4: 2 + 1 full, 3 + 2 left over
    order = list(EpochSeededLengthBucketSampler(4, lengths, seed=5))
    assert sorted(order) == list(range(len(lengths)))
    cut = batches(order, 4)
    assert [len(batch) for batch in cut] == [4, 4, 4, 4, 1]
    assert all(len({lengths[i] for i in batch}) == 1 for batch in cut[:3])
    assert {lengths[i] for i in cut[3] + cut[4]} == {10, 60}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["group_by_length", "length_buckets"])
def test_resuming_a_grouped_run_ends_with_the_uninterrupted_weights(tmp_path, small_corpus, strategy):
    # The small corpus has 28 SFT items: 7 steps of 4 per epoch. Resuming from checkpoint-10 (3 steps into the
    # second epoch) needs that epoch's order drawn again, which the global RNG would not reproduce.
    steps, grouped = 12, ["--train_sampling_strategy", strategy]
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
    with pytest.raises(ValueError, match="batch_rebalance is not supported.*length_buckets, group_by_length or random"):
        sft.main(small_run_args(tmp_path / "run", small_corpus, 2, ["--train_sampling_strategy", "batch_rebalance"]))
