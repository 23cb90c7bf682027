"""Fast decoding: parallel rules, EOS early exit, block KV caches; each against the reference decoder."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import clip, make_tiny_model
from test_decoding import IDS, FixedDenoiser, prefix_of

from diffa2.diffusion.decoding import PRESETS, DecodeConfig, generate
from diffa2.diffusion.kv_cache import BlockCache, FullPass
from diffa2.diffusion.parallel import finish_at_eos, parallel_count
from diffa2.inference import AudioQA

WAVES = [clip(0.6, 300, seed=1), clip(3.2, 1200, seed=2), clip(1.5, 700, seed=3)]  # different lengths: left padding
QUESTIONS = ["How many beeps are there?", "What is the pitch?", "Please transcribe the audio to text."]


@pytest.fixture(scope="module")
def confident_qa(chat) -> AudioQA:
    """A random tiny DIFFA-2 whose predictions depend on context and reach confidences of 0.1-0.4 (the default
    init gives a flat ~0.05 everywhere), and which predicts EOS wherever it would predict token 50."""
    model = make_tiny_model(chat)
    with torch.no_grad():
        for param in model.backbone.parameters():
            if param.dim() == 2:
                param.mul_(5)
        head = model.backbone.lm.lm_head.weight
        head.mul_(3)
        head[chat.ids.eos] = 1.05 * head[50]
    return AudioQA(model, chat)


@pytest.fixture(scope="module")
def prefix(confident_qa):
    return confident_qa.prefix(WAVES, QUESTIONS)


def trajectory(model: FixedDenoiser, out) -> list[list[int]]:
    return [c[0].tolist() for c in model.calls] + [out.token_ids[0].tolist()]


# -- the rules, by hand ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "threshold", "factor", "count"), [
    ([0.99, 0.95, 0.9, 0.5], 0.9, None, 3),  # >= tau, inclusive
    ([0.99, 0.98], 1.0, None, 1),
    ([0.5, 0.4], 0.99, None, 1),  # at least one
    ([0.95, 0.7, 0.69], None, 1.0, 2),  # bars 2/3, 3/4: 0.69 < 0.75
    ([0.99, 0.9, 0.85, 0.81, 0.2], None, 1.0, 4),  # bars .667 .75 .8 .833; Fast-dLLM's quirk would commit all 5
    ([0.99, 0.97, 0.97], None, 0.1, 2),  # bars 1 - 0.1/3 = .967, 1 - 0.1/4 = .975
    ([], 0.9, None, 0),
])
def test_parallel_count(confidence, threshold, factor, count):
    assert parallel_count(torch.tensor(confidence, dtype=torch.float64), threshold, factor) == count


def test_finish_at_eos_is_decided_only_when_nothing_before_the_stop_is_masked():
    x = torch.tensor([[1, 8, 9, 3], [9, 8, 2, 3], [1, 2, 7, 9], [1, 2, 3, 4], [8, 9, 9, 9]])  # mask 9, eos 8, eot 7
    decided = finish_at_eos(x, IDS)
    assert decided.tolist() == [True, False, True, False, True]
    assert x.tolist() == [[1, 8, 8, 8], [9, 8, 2, 3], [1, 2, 7, 8], [1, 2, 3, 4], [8, 8, 8, 8]]


def test_finish_at_eos_without_eot_waits_for_an_eos_as_the_published_decoder_does():
    x = torch.tensor([[1, 7, 2, 9], [1, 7, 8, 9], [9, 7, 8, 3]])  # mask 9, eos 8, eot 7
    decided = finish_at_eos(x, IDS, with_eot=False)
    assert decided.tolist() == [False, True, False]
    assert x.tolist() == [[1, 7, 2, 9], [1, 7, 8, 8], [9, 7, 8, 3]]


# -- exact NFE on a model whose logits are fixed ---------------------------------------------------------------

PROBS = [0.999, 0.99, 0.95, 0.5]


@pytest.mark.parametrize(("kwargs", "calls"), [
    ({"threshold": 1.0}, [[9, 9, 9, 9], [1, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]),  # = reference
    ({"threshold": 0.9}, [[9, 9, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]),
    ({"factor": 1.0}, [[9, 9, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]),
    ({"factor": 0.1}, [[9, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]),
    ({"threshold": 0.9, "block_length": 2}, [[9, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]),
    ({"threshold": 0.99999, "steps": 2}, [[9, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 4]]),  # steps bound the NFE
])
def test_parallel_rules_commit_and_count_passes_exactly(kwargs, calls):
    model = FixedDenoiser([1, 2, 3, 4], PROBS)
    out = generate(model, prefix_of(1), IDS, DecodeConfig(**{"gen_length": 4, "block_length": 4, "steps": 4} | kwargs))
    assert trajectory(model, out) == calls
    assert out.nfe == len(calls) - 1 and out.row_nfe.tolist() == [out.nfe]


def test_guidance_counts_two_passes_per_parallel_step():
    out = generate(FixedDenoiser([1, 2, 3, 4], PROBS), prefix_of(2), IDS,
                   DecodeConfig(gen_length=4, block_length=4, steps=4, threshold=0.9, cfg_scale=1.0))
    assert out.nfe == 4 and out.row_nfe.tolist() == [4, 4]


def test_eos_early_exit_stops_when_the_text_is_decided():
    eos = IDS.eos
    targets, probs = [1, eos, 3, 4, 5, 6, 7, 1], [0.9, 0.99, 0.6, 0.7, 0.9, 0.9, 0.9, 0.9]
    model = FixedDenoiser(targets, probs)
    out = generate(model, prefix_of(1), IDS, DecodeConfig(gen_length=8, block_length=4, steps=8, eos_early_exit=True))
    # Step 1 commits the EOS, but position 0 is still masked; step 2 decides the text and ends decoding.
    assert trajectory(model, out) == [[9] * 8, [9, eos, 9, 9, 9, 9, 9, 9], [1, eos, eos, eos, eos, eos, eos, eos]]
    assert out.nfe == 2
    full = generate(FixedDenoiser(targets, probs), prefix_of(1), IDS,
                    DecodeConfig(gen_length=8, block_length=4, steps=8))
    assert full.nfe == 8 and full.token_ids[0].tolist() == targets


# -- the KV cache on a real (tiny) model: padded batch, spliced speech ------------------------------------------


@pytest.mark.parametrize("dual", [False, True], ids=["prefix", "dual"])
@pytest.mark.parametrize("guided", [False, True], ids=["cond", "uncond"])
def test_cached_step_on_a_fresh_cache_equals_a_full_pass(confident_qa, prefix, dual, guided):
    model = confident_qa.model
    p = model.unconditional_prefix(prefix) if guided else prefix
    x = torch.full((3, 12), confident_qa.chat.ids.mask)
    x[:, :4] = torch.tensor([[50, 257, 18, 491], [383, 50, 50, 257], [18, 18, 491, 50]])
    full, cached = FullPass(model, p), BlockCache(model, p, dual=dual)
    first = cached.block_logits(x, 4, 8, step=0)  # refresh: a full pass that fills the cache
    torch.testing.assert_close(first, full.block_logits(x, 4, 8, 0), atol=0, rtol=0)
    again = cached.block_logits(x, 4, 8, step=1)  # same canvas through the cache
    torch.testing.assert_close(again, first, atol=2e-5, rtol=1e-5)
    kept = p.embeds.shape[1] + (8 if dual else 4)
    assert cached.cache.get_seq_length() == kept  # the step's own K/V were cropped again

    x[:, 5] = 257  # a block token changes: it is fed, so the cached step sees it
    block_changed = cached.block_logits(x, 4, 8, 2)
    assert (block_changed - again).abs().max() > 1e-3
    x[:, 10] = 491  # a suffix token changes: the prefix cache feeds the suffix, the dual cache keeps its old K/V
    moved = (cached.block_logits(x, 4, 8, 3) - block_changed).abs().max()
    assert (moved == 0) if dual else (moved > 1e-3)


@pytest.mark.parametrize("kwargs", [
    {"cache": "prefix"},
    {"cache": "dual"},
    {"cache": "dual", "cfg_scale": 0.5},
    {"cache": "prefix", "threshold": 0.3},
], ids=["prefix", "dual", "dual-cfg", "prefix-threshold"])
def test_cache_refreshed_every_step_equals_the_uncached_decoder(confident_qa, prefix, kwargs):
    base = DecodeConfig(gen_length=12, block_length=4, steps=12, **{k: v for k, v in kwargs.items() if k != "cache"})
    expected = generate(confident_qa.model, prefix, confident_qa.chat.ids, base)
    got = generate(confident_qa.model, prefix, confident_qa.chat.ids,
                   replace(base, cache=kwargs["cache"], refresh_every=1))
    assert torch.equal(got.token_ids, expected.token_ids)
    assert got.nfe == expected.nfe


def test_threshold_one_is_the_reference_decoder(confident_qa, prefix):
    config = DecodeConfig(gen_length=12, block_length=4, steps=12)
    reference = generate(confident_qa.model, prefix, confident_qa.chat.ids, config)
    strict = generate(confident_qa.model, prefix, confident_qa.chat.ids, replace(config, threshold=1.0))
    assert torch.equal(strict.token_ids, reference.token_ids) and strict.nfe == reference.nfe == 12


@pytest.mark.parametrize("kwargs", [
    {},
    {"threshold": 0.3, "eos_early_exit": True},
    {"factor": 3.0, "eos_early_exit": True},
    {"cache": "prefix"},
    {"cache": "dual", "threshold": 0.3, "eos_early_exit": True},
    {"cache": "dual", "cfg_scale": 0.5, "temperature": 1.0, "eos_early_exit": True},
], ids=["reference", "threshold", "factor", "prefix-cache", "fast", "dual-cfg-sampled"])
def test_batch_equals_one_by_one(confident_qa, kwargs):
    config = DecodeConfig(gen_length=12, block_length=4, steps=12, **kwargs)
    seeds = [11, 22, 33]
    batch = confident_qa.answer(WAVES, QUESTIONS, config, seed=seeds)
    for i, seed in enumerate(seeds):
        single = confident_qa.answer(WAVES[i : i + 1], QUESTIONS[i : i + 1], config, seed=[seed])
        assert batch.token_ids[i].tolist() == single.token_ids[0].tolist()
        assert batch.row_nfe[i] == single.nfe
    assert batch.nfe == max(batch.row_nfe)


def test_fast_modes_are_faster_and_early_exit_keeps_the_text(confident_qa, prefix):
    ids = confident_qa.chat.ids
    reference = generate(confident_qa.model, prefix, ids, DecodeConfig(gen_length=12, block_length=4, steps=12))
    parallel = generate(confident_qa.model, prefix, ids, DecodeConfig.preset("parallel", gen_length=12, block_length=4,
                                                                             steps=12, threshold=0.3))
    no_exit = generate(confident_qa.model, prefix, ids, DecodeConfig.preset("parallel", gen_length=12, block_length=4,
                                                                            steps=12, threshold=0.3,
                                                                            eos_early_exit=False))
    texts = [confident_qa.chat.decode_answer(row.tolist()) for row in parallel.token_ids]
    assert texts == [confident_qa.chat.decode_answer(row.tolist()) for row in no_exit.token_ids]
    # Pinned from the printed trajectories of this seeded model: every row commits its EOS runs in block 0 and
    # its first token last, so its text is decided after 4 passes; without the exit, row 2's last block commits 4
    # tokens in one step (8 passes) while rows 0 and 1 need one per step like the reference.
    assert parallel.row_nfe.tolist() == [4, 4, 4]
    assert no_exit.row_nfe.tolist() == [12, 12, 8] and reference.nfe == 12
    assert parallel.tokens_per_second > 0 and parallel.seconds > 0


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": 0.9, "factor": 1.0}, "at most one"),
    ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
    ({"threshold": 1.5}, r"threshold must be in \(0, 1\]"),
    ({"factor": 0}, "factor must be > 0"),
    ({"threshold": 0.9, "remasking": "random"}, "low_confidence"),
    ({"cache": "suffix"}, "cache must be"),
    ({"refresh_every": 2}, "needs cache="),
    ({"cache": "dual", "refresh_every": 0}, ">= 1"),
])
def test_invalid_fast_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_presets_and_modes():
    assert set(PRESETS) == {"reference", "parallel", "cache", "fast", "fpd"}
    fast = DecodeConfig.preset("fast", gen_length=64)
    assert (fast.threshold, fast.cache, fast.eos_early_exit, fast.gen_length) == (0.9, "dual", True, 64)
    assert DecodeConfig.preset("reference") == DecodeConfig()
    assert fast.with_mode("reference") == DecodeConfig(gen_length=64)
    with pytest.raises(ValueError, match="unknown decoding preset 'turbo'"):
        DecodeConfig.preset("turbo")


def test_cache_needs_a_model_with_a_backbone():
    with pytest.raises(TypeError, match="KV cache needs a DIFFA2Model"):
        generate(FixedDenoiser([1], [0.9]), prefix_of(1), IDS, DecodeConfig(gen_length=1, block_length=1, steps=1,
                                                                             cache="prefix"))
