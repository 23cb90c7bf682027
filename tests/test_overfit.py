"""End to end: the tiny DIFFA-2 memorises a handful of audio-question-answer items, then decodes them exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import clip, make_tiny_model

from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.diffusion.objective import sft_loss
from diffa2.inference import AudioQA


@pytest.mark.slow
def test_tiny_model_overfits_and_reference_decoder_reproduces_answers(chat):
    # Same question for two clips with different answers: only the audio can tell them apart.
    items = [
        SFTExample(clip(1.0, 300, seed=0), "What is the pitch of the tone?", "low"),
        SFTExample(clip(1.6, 1500, seed=1), "What is the pitch of the tone?", "high"),
        SFTExample(clip(1.3, 700, seed=2), "How many beeps are there?", "two"),
        SFTExample(clip(1.9, 1100, seed=3), "How many beeps are there?", "four"),
        SFTExample(clip(0.8, 500, seed=4), "Please transcribe the audio to text.", "one two three"),
    ]
    model = make_tiny_model(chat)
    qa = AudioQA(model, chat)
    batch = SFTCollator(chat, qa.featurizer, answer_length=12)(items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(300):
        loss = sft_loss(model, batch, chat.ids.mask, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20
    config = DecodeConfig(gen_length=12, block_length=4, steps=12)
    answers = qa.answer([it.wave for it in items], [it.instruction for it in items], config)
    assert answers.texts == [it.answer for it in items]
    assert answers.nfe == 12
