"""Answer scoring (issue 18, part 3): candidates' ELBOs under the model (`AudioQA.score`), multiple choice by
likelihood (`python -m diffa2.eval run --mcq likelihood`) and the `score_answers` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import clip

from diffa2.eval.__main__ import main as eval_main
from diffa2.eval.loaders import read_predictions
from diffa2.eval.prompts import get_prompt
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA
from diffa2.likelihood import candidate_draws, scoring_estimator

FIXTURES = Path(__file__).parent / "fixtures"
QUESTION = "What is the pitch of the tone?"
CANDIDATES = ["high", "low", "one two three four"]


@pytest.fixture
def qa(tiny_model, chat) -> AudioQA:
    return AudioQA(tiny_model, chat)


def test_elbo_equals_the_hand_computation_on_fixed_draws(qa, chat):
    wave = clip(1.0, 300.0)
    scores = qa.score([wave], [QUESTION], [CANDIDATES], n_draws=4, seed=3)
    ids = [chat.encode_answer(text) for text in CANDIDATES]
    assert scores.tokens == [[len(a) for a in ids]] and scores.n_draws == 4
    draws = candidate_draws(scoring_estimator(4), [len(a) for a in ids], seed=3)  # the draws `score` uses
    features, lengths = qa.featurizer([wave])
    prompt, slot = chat.encode_prompt(QUESTION)
    by_hand = []
    with torch.no_grad():
        for c, answer in enumerate(ids):
            size = len(answer)
            terms = []
            for j in range(4):
                masked = draws.masks[j, c, :size]
                assert not draws.masks[j, c, size:].any() and 1 <= int(masked.sum()) <= size
                noisy = torch.where(masked, torch.tensor(chat.ids.mask), torch.tensor(answer))
                logits = qa.model(features, lengths, [prompt], [slot], noisy[None])[0]  # this answer alone
                logp = torch.log_softmax(logits.double(), -1)[torch.arange(size), torch.tensor(answer)]
                terms.append(size / int(masked.sum()) * float(logp[masked].sum()))  # form "count": weight L/l
            by_hand.append(sum(terms) / 4)
    assert scores.elbos[0] == pytest.approx(by_hand, rel=1e-5)
    assert scores.per_token[0] == pytest.approx([e / len(a) for e, a in zip(by_hand, ids, strict=True)], rel=1e-5)
    assert all(e < 0 for e in scores.elbos[0])
    assert scores.best == [int(np.argmax(by_hand))]


def test_draws_are_shared_by_the_candidates_of_a_question():
    count = candidate_draws(scoring_estimator(6), [6, 6, 4], seed=0)
    assert count.masks.shape == (6, 3, 6)
    assert torch.equal(count.masks[:, 0], count.masks[:, 1])  # same length: the very same masks
    # Stratified counts: n_draws = L gives every count 1..L once.
    assert sorted(count.masks[:, 0].sum(-1).tolist()) == [1, 2, 3, 4, 5, 6]
    counts = count.masks[:, 2].sum(-1).tolist()  # L = 4: shifts floor(j·4/6) of one uniform count, wrapped
    assert counts == [(counts[0] - 1 + shift) % 4 + 1 for shift in (0, 0, 1, 2, 2, 3)]
    for j in range(6):  # the same per-position noise: both mask the lowest-ranked positions, so one nests in the other
        short, long = count.masks[j, 2, :4], count.masks[j, 0, :4]
        assert torch.equal(short & long, short) or torch.equal(short & long, long)
    ratio = candidate_draws(scoring_estimator(6, "ratio"), [6, 4], seed=0)
    assert torch.equal(ratio.masks[:, 1, :4], ratio.masks[:, 0, :4])  # same timesteps and noise, truncated
    assert torch.equal(ratio.weights[:, 0], ratio.weights[:, 1])


def test_a_batch_scores_as_one_question_at_a_time(qa):
    waves = [clip(0.6, 220.0, seed=1), clip(1.4, 880.0, seed=2), clip(0.9, 500.0, seed=3)]
    questions = [QUESTION, "How many beeps are there?", "Is it loud?"]
    candidates = [CANDIDATES, ["one", "two three"], ["yes", "no", "loud quiet", "quiet"]]
    seeds = [5, 6, 7]
    batch = qa.score(waves, questions, candidates, n_draws=3, seed=seeds)
    alone = [qa.score([w], [q], [c], n_draws=3, seed=s) for w, q, c, s in
             zip(waves, questions, candidates, seeds, strict=True)]
    assert [len(e) for e in batch.elbos] == [3, 2, 4]
    for got, one in zip(batch.elbos, alone, strict=True):
        assert got == pytest.approx(one.elbos[0], abs=1e-4)
    reordered = qa.score(waves[::-1], questions[::-1], candidates[::-1], n_draws=3, seed=seeds[::-1])
    for got, one in zip(reordered.elbos[::-1], batch.elbos, strict=True):
        assert got == pytest.approx(one, abs=1e-4)


def test_same_seed_same_scores_and_more_draws_less_spread(qa):
    wave = clip(1.0, 440.0)
    first = qa.score([wave], [QUESTION], [CANDIDATES], n_draws=4, seed=11)
    assert qa.score([wave], [QUESTION], [CANDIDATES], n_draws=4, seed=11).elbos == first.elbos
    assert qa.score([wave], [QUESTION], [CANDIDATES], n_draws=4, seed=12).elbos != first.elbos
    spread = {}
    for budget in (1, 4, 16):
        runs = [qa.score([wave], [QUESTION], [["one two three four"]], n_draws=budget, seed=s).elbos[0][0]
                for s in range(12)]
        spread[budget] = float(np.std(runs))
    assert spread[1] > spread[4] > spread[16] > 0, spread


def test_score_refuses_mismatched_inputs(qa):
    with pytest.raises(ValueError, match="1 clips, 1 questions and 2 candidate lists"):
        qa.score([clip(0.5)], [QUESTION], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one candidate"):
        qa.score([clip(0.5)], [QUESTION], [[]])
    with pytest.raises(ValueError, match="n_draws must be >= 1, got 0"):
        qa.score([clip(0.5)], [QUESTION], [["a"]], n_draws=0)


@pytest.fixture(scope="module")
def mmau_dir(tmp_path_factory) -> Path:
    """The MMAU fixture's first 6 items, with tones at their audio paths."""
    root = tmp_path_factory.mktemp("mmau")
    records = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:6]
    (root / "mmau.json").write_text(json.dumps(records), encoding="utf-8")
    for i, record in enumerate(records):
        path = root / record["audio_id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, clip(0.5 + 0.25 * i, 200.0 + 60 * i, seed=i), 16000)
    return root


def test_mcq_likelihood_writes_choices_scored_by_the_official_rule(checkpoint, mmau_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(mmau_dir / "mmau.json"),
            "--out", str(out), "--no_progress", "--mcq", "likelihood", "--n_draws", "2", "--batch_size", "4"]
    assert eval_main(argv) == 0
    records = json.loads((mmau_dir / "mmau.json").read_text(encoding="utf-8"))
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert len(predictions) == 6
    for prediction, record in zip(predictions, records, strict=True):
        assert prediction["model_output"] == prediction["model_prediction"] and \
            prediction["model_output"] in record["choices"]
    # The chosen choice is each item's best-scoring one, under the item's own decoding seed.
    qa = AudioQA.from_checkpoint(checkpoint)
    partial = [json.loads(line) for f in sorted((out / "partial").iterdir()) for line in f.read_text().splitlines()]
    assert {e["id"]: e["output"] for e in partial} == {p["id"]: p["model_output"] for p in predictions}
    first = partial[0]
    wave, _ = sf.read(mmau_dir / records[0]["audio_id"], dtype="float32")
    prompt = get_prompt(load_spec("mmau").prompt)(records[0]["question"], records[0]["choices"])
    again = qa.score([wave], [prompt], [records[0]["choices"]], n_draws=2, seed=first["seed"])
    assert first["choice_elbos"] == pytest.approx(again.elbos[0], abs=1e-4)
    assert first["output"] == records[0]["choices"][again.best[0]]
    # The official rule scores the predictions as it would any model's.
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    official = score_records(read_predictions(out / "predictions.json"), load_spec("mmau"), "official")
    correct = sum(p["model_output"] == r["answer"] for p, r in zip(predictions, records, strict=True))
    assert report["overall"]["total"] == official.overall()["total"] == 6
    assert report["overall"]["correct"] == official.overall()["correct"] == correct
    assert report["run"]["mcq"] == "likelihood" and report["run"]["n_draws"] == 2
    # Decoding is another run: its own fingerprint, its own log.
    assert eval_main([*argv[:-6], "--limit", "1", "--gen_length", "4", "--block_length", "4", "--steps", "4"]) == 0
    assert len(list((out / "partial").iterdir())) == 2


def test_score_answers_prints_each_candidates_elbo(checkpoint, tmp_path, capsys):
    wave = clip(1.0, 330.0)
    audio = tmp_path / "a.wav"
    sf.write(audio, wave, 16000)
    argv = ["score_answers", "--model", str(checkpoint), "--audio", str(audio), "--question", QUESTION,
            "--n-draws", "3", "--seed", "4", "--elbo_form", "l"]
    for text in CANDIDATES:
        argv += ["--candidate", text]
    assert eval_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 draws, seed 4" in lines[0] and len(lines) == 1 + len(CANDIDATES)
    expected = AudioQA.from_checkpoint(checkpoint).score([sf.read(audio, dtype="float32")[0]], [QUESTION],
                                                         [CANDIDATES], n_draws=3, seed=4)
    for line, text, elbo, mean in zip(lines[1:], CANDIDATES, expected.elbos[0], expected.per_token[0], strict=True):
        fields = line.split(maxsplit=3)
        assert fields[3] == text
        assert float(fields[0]) == pytest.approx(elbo, abs=1e-3) and float(fields[1]) == pytest.approx(mean, abs=1e-3)
    with pytest.raises(SystemExit):
        eval_main([*argv, "--n_draws", "0"])
    assert "--n_draws 0 is out of range: must be >= 1" in capsys.readouterr().err


def test_mcq_mode_is_checked():
    from diffa2.eval.runner import RunOptions, run_benchmark

    with pytest.raises(ValueError, match=r"mcq must be one of \['generate', 'likelihood'\], got 'vote'"):
        run_benchmark(RunOptions(benchmark="mmau", model="m", data="d", mcq="vote"), log=lambda _: None)

