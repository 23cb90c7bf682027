"""The composed model: speech paths, splicing, padding safety, adapter sizes of the real preset."""

from __future__ import annotations

import torch
from helpers import clip, make_tiny_model

from diffa2.audio import LogMelFeaturizer
from diffa2.modeling.adapters import AcousticAdapter, SemanticAdapter


def featurize(model, waves):
    return LogMelFeaturizer(model.config.n_mels, model.config.window_seconds)(waves)


def test_speech_token_counts_per_stage(chat):
    waves = [clip(1.0), clip(2.5)]  # 100 and 250 mel frames -> 50 and 125 encoder frames
    for stage, lead in ((1, 4), (2, 8)):
        model = make_tiny_model(chat, speech_path=stage)
        speech = model.encode_speech(*featurize(model, waves))
        assert speech.lengths.tolist() == [lead + 50 // 4, lead + 125 // 4]
        assert speech.embeds.shape == (2, lead + 125 // 4, 64)


def test_prefix_splices_speech_at_the_audio_slot(chat, tiny_model):
    speech = tiny_model.encode_speech(*featurize(tiny_model, [clip(1.0), clip(2.0)]))
    prompts = [chat.encode_prompt("What is the pitch of the tone?"), chat.encode_prompt("How many?")]
    prefix = tiny_model.build_prefix([p for p, _ in prompts], [s for _, s in prompts], speech)
    for row, (ids, slot) in enumerate(prompts):
        n_speech = int(speech.lengths[row])
        real = prefix.attention_mask[row].nonzero().squeeze(1)
        assert real.numel() == len(ids) + n_speech and real[-1] == prefix.embeds.shape[1] - 1  # left padded
        start = int(real[0])
        span = prefix.embeds[row, start + slot : start + slot + n_speech]
        torch.testing.assert_close(span, speech.embeds[row, :n_speech])
        assert not prefix.is_text[row, start + slot : start + slot + n_speech].any()
        assert int(prefix.is_text[row].sum()) == len(ids)
        text = tiny_model.backbone.embed(torch.tensor(ids))
        torch.testing.assert_close(prefix.embeds[row, start : start + slot], text[:slot])


def test_batch_logits_equal_one_by_one(chat, tiny_model):
    waves = [clip(0.7, 300, seed=1), clip(3.1, 900, seed=2)]
    questions = ["How many beeps are there?", "What is the pitch of the tone?"]
    prompts = [chat.encode_prompt(q) for q in questions]
    answers = torch.tensor([[5, 6, chat.ids.mask, 7], [chat.ids.mask, 9, 10, chat.ids.mask]])
    feats, lengths = featurize(tiny_model, waves)
    together = tiny_model(feats, lengths, [p for p, _ in prompts], [s for _, s in prompts], answers)
    for i in range(2):
        alone = tiny_model(feats[i : i + 1], lengths[i : i + 1], [prompts[i][0]], [prompts[i][1]], answers[i : i + 1])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_acoustic_queries_ignore_padding_frames():
    torch.manual_seed(0)
    adapter = AcousticAdapter(16, 24, tap_layers=[0, 1], num_queries=3, num_layers=1, num_heads=2,
                              intermediate_size=32, dropout=0.0).eval()
    hidden = tuple(torch.randn(1, 10, 16) for _ in range(2))
    alone = adapter(hidden, torch.tensor([6]))
    garbage = tuple(torch.cat([h[:, :6], 100 * torch.randn(1, 4, 16)], dim=1) for h in hidden)
    torch.testing.assert_close(adapter(garbage, torch.tensor([6])), alone, atol=1e-6, rtol=1e-6)
    assert alone.shape == (1, 3, 24)


def test_semantic_adapter_tokens_do_not_see_frames_past_the_clip():
    torch.manual_seed(0)
    adapter = SemanticAdapter(8, 12).eval()
    frames = torch.randn(1, 22, 8)
    out, n = adapter(frames, torch.tensor([22]))
    assert n.tolist() == [5] and out.shape == (1, 5, 12)
    longer = torch.cat([frames, torch.randn(1, 9, 8)], dim=1)
    out_longer, _ = adapter(longer, torch.tensor([22]))
    torch.testing.assert_close(out_longer[:, :5], out, atol=1e-6, rtol=1e-6)


def test_real_preset_adapter_sizes_match_the_reference_counts():
    # docs/model.md §2.2-2.3: about 36.4 M (semantic) and 47.9 M (Q-Former) parameters for large-v3.
    with torch.device("meta"):
        semantic = SemanticAdapter(1280, 4096)
        acoustic = AcousticAdapter(1280, 4096, tap_layers=[3, 7, 11, 15, 19, 23, 27, 31], num_queries=64,
                                   num_layers=2, num_heads=20, intermediate_size=3072)
    assert sum(p.numel() for p in semantic.parameters()) == 36_392_448
    assert sum(p.numel() for p in acoustic.parameters()) == 47_892_992


def test_gradient_checkpointing_keeps_gradients(chat):
    waves = [clip(1.0), clip(2.0, 900)]
    prompts = [chat.encode_prompt("Pitch?"), chat.encode_prompt("How many beeps are there?")]
    answers = torch.tensor([[5, chat.ids.mask, 7], [chat.ids.mask, 9, 10]])
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model(chat).train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        feats, lengths = featurize(model, waves)
        logits = model(feats, lengths, [p for p, _ in prompts], [s for _, s in prompts], answers)
        logits.logsumexp(-1).sum().backward()
        grads.append(model.backbone.lm.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0
