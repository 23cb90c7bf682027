"""Forward process and masked-diffusion loss against hand computations."""

from __future__ import annotations

import math

import torch
from helpers import clip

from diffa2.audio import LogMelFeaturizer
from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.diffusion.loss import masked_token_loss, reduce_loss
from diffa2.diffusion.masking import forward_process, mask_probability
from diffa2.diffusion.objective import sft_loss


def test_forward_process_masks_only_answer_positions_with_p():
    answers = torch.arange(2 * 4000).reshape(2, 4000) % 50 + 1
    answer_mask = torch.ones_like(answers, dtype=torch.bool)
    answer_mask[1, 3000:] = False
    gen = torch.Generator().manual_seed(0)
    out = forward_process(answers, answer_mask, mask_id=99, generator=gen)
    assert not out.masked[1, 3000:].any()
    assert torch.equal(out.noisy_ids == 99, out.masked)
    assert torch.equal(out.noisy_ids[~out.masked], answers[~out.masked])
    rates = out.masked[0].float().mean(), out.masked[1, :3000].float().mean()
    for rate, p in zip(rates, out.p_mask, strict=True):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 3000) + 1e-3
    again = forward_process(answers, answer_mask, mask_id=99, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.noisy_ids, out.noisy_ids) and torch.equal(again.p_mask, out.p_mask)


def test_mask_probability_bounds():
    torch.testing.assert_close(mask_probability(torch.tensor([0.0, 1.0, 0.5])), torch.tensor([1e-3, 1.0, 0.5005]))


def test_loss_equals_hand_computation():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
                                     [[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = torch.tensor([[0, 1, 2], [1, 2, 0]])
    masked = torch.tensor([[True, False, True], [True, True, False]])
    p = torch.tensor([0.5, 0.25])
    token = masked_token_loss(logits, targets, masked, p)
    expected = torch.tensor([[-math.log(0.5) / 0.5, 0.0, -math.log(0.6) / 0.5],
                             [-math.log(0.2) / 0.25, -math.log(0.4) / 0.25, 0.0]])
    torch.testing.assert_close(token, expected)
    answer_mask = torch.tensor([[True, True, True], [True, True, False]])
    per_sample = (expected[0].sum() / 3 + expected[1].sum() / 2) / 2
    torch.testing.assert_close(reduce_loss(token, answer_mask, "per_sample"), per_sample)
    torch.testing.assert_close(reduce_loss(token, answer_mask, "batch"), expected.sum() / 5)


def test_collated_answers_are_eot_then_eos_padding(chat, tiny_model):
    featurizer = LogMelFeaturizer(tiny_model.config.n_mels, tiny_model.config.window_seconds)
    examples = [SFTExample(clip(1.0), "How many?", "two three"), SFTExample(clip(2.0), "Pitch?", "high")]
    batch = SFTCollator(chat, featurizer, answer_length=12)(examples)
    eos = chat.ids.eos
    for row, example in zip(batch.answer_ids.tolist(), examples, strict=True):
        answer = chat.encode_answer(example.answer)
        assert answer[-1] == chat.ids.eot and row == answer + [eos] * (12 - len(answer))
    assert batch.answer_mask.all()
    assert batch.input_features.shape == (2, 80, 400) and batch.feature_lengths.tolist() == [100, 200]


def test_sft_loss_is_seeded_and_trains_both_adapters(chat, tiny_model):
    featurizer = LogMelFeaturizer(tiny_model.config.n_mels, tiny_model.config.window_seconds)
    batch = SFTCollator(chat, featurizer, answer_length=16)([SFTExample(clip(1.0), "How many beeps?", "three"),
                                           SFTExample(clip(2.0, 800), "What is the pitch of the tone?", "high")])
    tiny_model.train()
    a = sft_loss(tiny_model, batch, chat.ids.mask, generator=torch.Generator().manual_seed(3))
    b = sft_loss(tiny_model, batch, chat.ids.mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.isfinite(a) and a > 0
    a.backward()
    assert tiny_model.semantic_adapter.conv1.weight.grad.abs().sum() > 0
    assert tiny_model.acoustic_adapter.queries.grad.abs().sum() > 0


def test_stop_weight_scales_only_eos_and_end_of_turn_targets(chat, tiny_model):
    featurizer = LogMelFeaturizer(tiny_model.config.n_mels, tiny_model.config.window_seconds)
    batch = SFTCollator(chat, featurizer, answer_length=16)([SFTExample(clip(1.0), "How many beeps?", "three"),
                                                            SFTExample(clip(2.0, 800), "Words?", "red blue gold")])
    tiny_model.eval()
    stops = (chat.ids.eos, chat.ids.eot)
    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(5)

    loss = {w: sft_loss(tiny_model, batch, chat.ids.mask, generator=seeded(), stop_ids=stops, stop_weight=w)
            for w in (0.0, 0.5, 1.0)}
    assert torch.equal(loss[1.0], sft_loss(tiny_model, batch, chat.ids.mask, generator=seeded()))
    torch.testing.assert_close(loss[0.5], (loss[0.0] + loss[1.0]) / 2)
    # By hand: at weight 0 only the content targets ("three"; "red blue gold") count.
    noised = forward_process(batch.answer_ids, batch.answer_mask, chat.ids.mask, generator=seeded())
    with torch.no_grad():
        logits = tiny_model(batch.input_features, batch.feature_lengths, batch.prompt_ids, batch.audio_slots,
                            noised.noisy_ids, batch.answer_mask)
    token = masked_token_loss(logits, batch.answer_ids, noised.masked, noised.p_mask)
    content = ~torch.isin(batch.answer_ids, torch.tensor(stops))
    assert content.sum(dim=1).tolist() == [len(chat.encode_answer(a)) - 1 for a in ("three", "red blue gold")]
    torch.testing.assert_close(loss[0.0], reduce_loss(token * content, batch.answer_mask))
    assert 0 < loss[0.0] < loss[1.0]


def test_feature_cache_gives_the_same_batches(chat, tiny_model):
    featurizer = LogMelFeaturizer(tiny_model.config.n_mels, tiny_model.config.window_seconds)
    examples = [SFTExample(clip(1.0 + i / 4, 300 * (i + 1)), "Pitch?", "high", audio_key=f"clip{i}") for i in range(3)]
    plain = SFTCollator(chat, featurizer)(examples)
    cached = SFTCollator(chat, featurizer, feature_cache_items=2)
    first = cached(examples)
    again = cached(examples[::-1])
    assert len(cached.features.cache) == 2
    assert torch.equal(first.input_features, plain.input_features)
    assert torch.equal(again.input_features, plain.input_features.flip(0))
    assert torch.equal(again.feature_lengths, plain.feature_lengths.flip(0))
    # a clip read fresh ahead of cached ones must not evict them before they are read (the cache now holds 1 and 0)
    third = cached(examples[::-1])
    assert torch.equal(third.input_features, plain.input_features.flip(0))


def test_count_form_masks_exactly_k_and_weights_l_over_k():
    answers = torch.arange(6 * 8).reshape(6, 8) % 40 + 1
    answer_mask = torch.ones_like(answers, dtype=torch.bool)
    answer_mask[3:, 5:] = False
    out = forward_process(answers, answer_mask, mask_id=99, form="count", generator=torch.Generator().manual_seed(1))
    lengths = answer_mask.sum(1)
    k = out.masked.sum(1)
    assert ((k >= 1) & (k <= lengths)).all() and not out.masked[3:, 5:].any()
    torch.testing.assert_close(out.p_mask, k.float() / lengths.float())


def test_count_form_draws_every_k_uniformly():
    answers = torch.ones(20000, 4, dtype=torch.long)
    out = forward_process(answers, torch.ones_like(answers, dtype=torch.bool), mask_id=9, form="count",
                          generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.masked.sum(1), minlength=5)[1:].float() / 20000
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.015, rtol=0)
    position_rate = out.masked.float().mean(0)  # each position equally likely to be masked: E[k]/L = 2.5/4
    torch.testing.assert_close(position_rate, torch.full((4,), 0.625), atol=0.015, rtol=0)
