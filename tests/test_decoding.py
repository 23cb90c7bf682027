"""Reference decoder: schedule, commit order, EOS options, guidance, batch == one-by-one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import clip

from diffa2.chat import SpecialIds
from diffa2.diffusion.decoding import DecodeConfig, generate, num_transfer_tokens
from diffa2.inference import AudioQA

IDS = SpecialIds(mask=9, eos=8, pad=8, eot=7, bos=6)


class FixedDenoiser:
    """Logits that do not depend on the input: position j predicts token targets[j] with prob probs[j]."""

    def __init__(self, targets: list[int], probs: list[float], vocab: int = 10) -> None:
        logits = torch.full((len(targets), vocab), -20.0)
        for j, (tok, p) in enumerate(zip(targets, probs, strict=True)):
            logits[j] = torch.log(torch.full((vocab,), (1 - p) / (vocab - 1)))
            logits[j, tok] = torch.log(torch.tensor(p))
        self.logits = logits
        self.calls: list[torch.Tensor] = []

    def answer_logits(self, prefix, x):
        self.calls.append(x.clone())
        return self.logits[None].repeat(x.shape[0], 1, 1)

    def unconditional_prefix(self, prefix):
        return prefix


def prefix_of(batch: int):
    return SimpleNamespace(embeds=torch.zeros(batch, 1, 1))


def test_transfer_schedule_is_even_with_remainder_first():
    assert num_transfer_tokens(torch.tensor([10, 7, 0]), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gen_length": 30, "block_length": 8}, "multiple of block_length"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "multiple of the number of blocks"),
    ({"gen_length": 8, "block_length": 8, "steps": 16}, "steps 16 > gen_length 8"),
    ({"remasking": "top_p"}, "remasking"),
])
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_commits_most_confident_first_within_the_block():
    model = FixedDenoiser([1, 2, 3, 4], [0.5, 0.9, 0.6, 0.99])
    out = generate(model, prefix_of(1), IDS, DecodeConfig(gen_length=4, block_length=2, steps=4))
    x = [c[0].tolist() for c in model.calls] + [out.token_ids[0].tolist()]
    # block 0 = positions 0,1: most confident (pos 1) first, although pos 3 is more confident overall
    assert x == [[9, 9, 9, 9], [9, 2, 9, 9], [1, 2, 9, 9], [1, 2, 9, 4], [1, 2, 3, 4]]
    assert out.nfe == 4


def test_eos_options():
    model = FixedDenoiser([1, IDS.eos, 3], [0.5, 0.99, 0.6])
    out = generate(model, prefix_of(1), IDS, DecodeConfig(gen_length=3, block_length=3, steps=3,
                                                           confidence_eos_eot_inf=True))
    assert [c[0].tolist() for c in model.calls][1:] == [[9, 9, 3], [1, 9, 3]]  # EOS committed last
    assert out.token_ids[0].tolist() == [1, IDS.eos, 3]
    banned = generate(FixedDenoiser([1, IDS.eos, 3], [0.5, 0.99, 0.6]), prefix_of(1), IDS,
                      DecodeConfig(gen_length=3, block_length=3, steps=3, logits_eos_inf=True))
    assert IDS.eos not in banned.token_ids[0].tolist()


def test_guidance_costs_two_passes_per_step_and_no_mask_survives():
    model = FixedDenoiser([1, 2, 3, 4], [0.5, 0.9, 0.6, 0.99])
    out = generate(model, prefix_of(2), IDS, DecodeConfig(gen_length=4, block_length=4, steps=2, cfg_scale=1.0))
    assert out.nfe == 4 and len(model.calls) == 4
    assert (out.token_ids != IDS.mask).all()


def answer_batch_and_singles(qa: AudioQA, config: DecodeConfig, seeds: list[int]):
    waves = [clip(0.6, 300, seed=1), clip(3.2, 1200, seed=2), clip(1.5, 700, seed=3)]
    questions = ["How many beeps are there?", "What is the pitch?", "Please transcribe the audio to text."]
    batch = qa.answer(waves, questions, config, seed=seeds)
    singles = [qa.answer([w], [q], config, seed=[s]) for w, q, s in zip(waves, questions, seeds, strict=True)]
    return batch, singles


@pytest.mark.parametrize("config", [
    DecodeConfig(gen_length=8, block_length=4, steps=8),
    DecodeConfig(gen_length=8, block_length=8, steps=4, temperature=1.0),
    DecodeConfig(gen_length=8, block_length=4, steps=4, remasking="random", cfg_scale=0.5),
], ids=["greedy-blocks", "gumbel", "random-remask-cfg"])
def test_batch_answers_equal_one_by_one(chat, tiny_model, config):
    qa = AudioQA(tiny_model, chat)
    batch, singles = answer_batch_and_singles(qa, config, seeds=[11, 22, 33])
    for i, single in enumerate(singles):
        assert batch.token_ids[i].tolist() == single.token_ids[0].tolist()
        assert batch.texts[i] == single.texts[0]
    assert batch.nfe == config.steps * (2 if config.cfg_scale else 1)


def test_seed_changes_sampled_answers(chat, tiny_model):
    qa = AudioQA(tiny_model, chat)
    config = DecodeConfig(gen_length=8, block_length=8, steps=8, temperature=2.0)
    a = qa.answer([clip(1.0)], ["What is the pitch?"], config, seed=1).token_ids
    b = qa.answer([clip(1.0)], ["What is the pitch?"], config, seed=1).token_ids
    c = qa.answer([clip(1.0)], ["What is the pitch?"], config, seed=2).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_step_callback_sees_masks_disappear(chat, tiny_model):
    seen: list[int] = []
    AudioQA(tiny_model, chat).answer([clip(1.0)], ["Pitch?"], DecodeConfig(gen_length=8, block_length=8, steps=4),
                                     on_step=lambda nfe, x: seen.append(int((x == chat.ids.mask).sum())))
    assert seen == [6, 4, 2, 0]
