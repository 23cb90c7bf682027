"""Continuous batching: rows at different steps share a forward and each answer equals its one-by-one answer."""

from __future__ import annotations

import pytest
import torch
from helpers import clip

from diffa2.diffusion.continuous import ContinuousBatcher, DecodeJob, split_prefix
from diffa2.diffusion.decoding import DecodeConfig, generate
from diffa2.inference import AudioQA

QUESTIONS = ["What is the pitch of the tone?", "How many beeps are there?", "Is it loud?", "yes or no?",
             "Please transcribe the audio to text."]


@pytest.fixture
def qa(tiny_model, chat) -> AudioQA:
    return AudioQA(tiny_model, chat)


def batcher(qa: AudioQA, **kwargs) -> ContinuousBatcher:
    return ContinuousBatcher(qa.model, qa.chat.ids, lambda items: qa.prefix([w for w, _ in items],
                                                                             [q for _, q in items]), **kwargs)


def alone(qa: AudioQA, job: DecodeJob) -> torch.Tensor:
    wave, question = job.inputs
    return generate(qa.model, qa.prefix([wave], [question]), qa.chat.ids, job.config, seed=job.seed).token_ids[0]


def jobs() -> list[DecodeJob]:
    """Different clips, questions, lengths, block layouts and modes (reference, parallel, fpd, CFG, sampling)."""
    configs = [
        DecodeConfig(gen_length=8, block_length=8, steps=8),
        DecodeConfig.preset("parallel", gen_length=24, block_length=8, steps=12),
        DecodeConfig.preset("fpd", gen_length=16, block_length=16, steps=16),
        DecodeConfig(gen_length=12, block_length=4, steps=6, cfg_scale=1.5, confidence_eos_eot_inf=True),
        DecodeConfig(gen_length=16, block_length=8, steps=16, temperature=0.7, remasking="random"),
    ]
    return [DecodeJob((clip(0.3 + 0.2 * i, freq=300 + 90 * i, seed=i), QUESTIONS[i]), config, seed=7 + i)
            for i, config in enumerate(configs)]


def test_answers_equal_one_by_one_with_staggered_arrivals(qa):
    engine = batcher(qa, max_batch=3)
    todo = jobs()
    futures = [engine.submit(job) for job in todo[:2]]
    for _ in range(3):  # two rows decode alone for three steps before the others arrive
        assert engine.step()
    futures += [engine.submit(job) for job in todo[2:]]
    engine.run_until_idle()
    results = [f.result() for f in futures]
    assert [r.job_id for r in results] == [0, 1, 2, 3, 4]
    for job, result in zip(todo, results, strict=True):
        expected = alone(qa, job)
        assert torch.equal(result.token_ids, expected)
        assert (result.token_ids == qa.chat.ids.mask).sum() == 0
    # the NFE of a row is what decoding it alone takes: 8 steps for the reference at 8 tokens, 2 x 6 under CFG
    assert results[0].nfe == 8
    assert results[3].nfe == 12
    assert engine.active == 0 and engine.queued == 0


def test_finished_row_is_replaced_by_a_waiting_request(qa):
    engine = batcher(qa, max_batch=2)
    lengths = [4, 12, 8]  # reference decoding, one token per step: job 0 needs 4 forwards, job 1 12, job 2 8
    todo = [DecodeJob((clip(0.4, seed=i), QUESTIONS[i]), DecodeConfig(gen_length=n, block_length=n, steps=n))
            for i, n in enumerate(lengths)]
    futures = [engine.submit(job) for job in todo]
    engine.run_until_idle()
    trace = list(engine.trace)
    assert [record.rows for record in trace] == [(0, 1)] * 4 + [(1, 2)] * 8
    assert trace[0].joined == (0, 1)
    assert trace[3].left == (0,)  # job 0 is done after its 4th step ...
    assert trace[4].joined == (2,)  # ... and job 2 takes its slot at the next forward
    assert trace[11].left == (1, 2)
    assert sum(len(record.left) for record in trace) == 3
    for job, future in zip(todo, futures, strict=True):
        assert torch.equal(future.result().token_ids, alone(qa, job))


def test_background_thread_batches_requests_that_arrive_together(qa):
    engine = batcher(qa, max_batch=4, max_wait_ms=200)
    todo = jobs()[:3]
    engine.start()
    try:
        futures = [engine.submit(job) for job in todo]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.close()
    assert list(engine.trace)[0].rows == (0, 1, 2)
    for job, result in zip(todo, results, strict=True):
        assert torch.equal(result.token_ids, alone(qa, job))


def test_kv_cache_modes_are_refused(qa):
    engine = batcher(qa)
    with pytest.raises(ValueError, match="does not cover cache='dual'"):
        engine.submit(DecodeJob((clip(0.3), "q"), DecodeConfig.preset("fast")))


def test_encode_failure_fails_only_its_jobs(qa):
    def encode(items):
        if any(q == "bad" for _, q in items):
            raise ValueError("cannot encode")
        return qa.prefix([w for w, _ in items], [q for _, q in items])

    engine = ContinuousBatcher(qa.model, qa.chat.ids, encode, max_batch=1)
    config = DecodeConfig(gen_length=4, block_length=4, steps=4)
    bad = engine.submit(DecodeJob((clip(0.3), "bad"), config))
    good = engine.submit(DecodeJob((clip(0.3), "good"), config))
    engine.run_until_idle()
    with pytest.raises(ValueError, match="cannot encode"):
        bad.result()
    assert good.result().token_ids.shape == (4,)


def test_split_prefix_drops_left_padding(qa):
    prefix = qa.prefix([clip(0.3), clip(1.0)], ["a", "What is the pitch of the tone?"])
    rows = split_prefix(prefix)
    assert [r.embeds.shape[1] for r in rows] == prefix.attention_mask.sum(dim=1).tolist()
    assert all(bool(r.attention_mask.all()) for r in rows)
    assert torch.equal(rows[1].embeds[0], prefix.embeds[1, -rows[1].embeds.shape[1] :])
