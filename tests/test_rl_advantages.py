"""Group-relative and multi-turn advantage estimators against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl
from diffa2.rl import AdvantageInputs

# group 0: four rollouts, group 1: three, group 2: one
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 5.0])
INDEX = torch.tensor([7, 7, 7, 7, 3, 3, 3, 9])  # arbitrary labels
MASK = torch.ones(8, 3, dtype=torch.bool)
MASK[0, 2] = False
SQRT3 = math.sqrt(1 / 3)


def run(name, config=None, **fields):
    fields.setdefault("response_mask", MASK)
    return rl.get_advantage_estimator(name)(AdvantageInputs(**fields), config=config)


def per_rollout(advantages):
    return advantages[:, 0].tolist()


def test_grpo_by_hand():
    out = run("grpo", scores=SCORES, index=INDEX)
    # group 0: mean 0.5, unbiased std sqrt(4·0.25/3) = sqrt(1/3); group 1: mean 2/3, std sqrt((1/9+1/9+4/9)/2)
    # the singleton keeps mean 0 and std 1 (verl): 5 / (1 + 1e-6)
    expected = [0.5 / SQRT3, -0.5 / SQRT3] * 2 + [(1 / 3) / SQRT3] * 2 + [(-2 / 3) / SQRT3, 5 / (1 + 1e-6)]
    assert per_rollout(out.advantages) == pytest.approx(expected, rel=1e-5)
    assert out.advantages[0, 2] == 0  # outside the response mask


def test_grpo_advantages_sum_to_zero_per_group():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(24, generator=generator)
    index = torch.arange(24) // 6
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = per_rollout(run(name, scores=scores, index=index, response_mask=torch.ones(24, 2).bool()).advantages)
        for group in range(4):
            assert sum(adv[6 * group : 6 * group + 6]) == pytest.approx(0.0, abs=1e-5)


def test_dr_grpo_only_centres():
    out = run("dr_grpo", scores=SCORES, index=INDEX)
    assert per_rollout(out.advantages) == pytest.approx([0.5, -0.5, 0.5, -0.5, 1 / 3, 1 / 3, -2 / 3, 5.0])


def test_grpo_batch_scale_and_population_std():
    batch_std = SCORES.std().item()  # TRL scale_rewards="batch": std of all rewards
    out = run("grpo", rl.GRPOAdvantageConfig(scale="batch"), scores=SCORES, index=INDEX)
    assert per_rollout(out.advantages)[0] == pytest.approx(0.5 / (batch_std + 1e-6))
    out = run("grpo", rl.GRPOAdvantageConfig(unbiased_std=False), scores=SCORES, index=INDEX)
    assert per_rollout(out.advantages)[0] == pytest.approx(0.5 / 0.5, rel=1e-5)  # population std of {1,0,1,0}


def test_grpo_missing_and_invalid_scores_give_zero_and_are_not_counted():
    scores = torch.tensor([1.0, float("nan"), 0.0, 3.0])
    index = torch.zeros(4, dtype=torch.long)
    valid = torch.tensor([True, True, True, False])
    out = run("dr_grpo", scores=scores, index=index, valid=valid, response_mask=torch.ones(4, 1).bool())
    assert per_rollout(out.advantages) == pytest.approx([0.5, 0.0, -0.5, 0.0])


def test_rloo_by_hand():
    out = run("rloo", scores=SCORES, index=INDEX)
    # leave-one-out: 1 − mean(0, 1, 0) = 2/3; 0 − mean(1, 1, 0) = −2/3; group 1: 1 − 1/2, 0 − 1; lone: its score
    assert per_rollout(out.advantages) == pytest.approx([2 / 3, -2 / 3] * 2 + [0.5, 0.5, -1.0, 5.0])
    # = G/(G−1) · (R − mean)
    dr = per_rollout(run("dr_grpo", scores=SCORES, index=INDEX).advantages)
    assert per_rollout(out.advantages)[:4] == pytest.approx([4 / 3 * a for a in dr[:4]])


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match=r"'grpo' needs inputs.scores, inputs.index"):
        run("grpo")


# --- TRUST-SQL dual track -----------------------------------------------------------------------------------------


def test_dual_track_by_hand():
    final = torch.tensor([1.0, 0.2, 0.0, -1.0])  # the last rollout aborted
    schema = torch.tensor([0.4, 1.0, 1.0, 0.0])
    valid = torch.tensor([True, True, True, False])
    response = torch.ones(4, 4, dtype=torch.bool)
    schema_tokens = torch.zeros(4, 4, dtype=torch.bool)
    schema_tokens[:, :2] = True  # t < schema_end
    out = run(
        "dual_track",
        track_scores=torch.stack([schema, final]),
        track_masks=torch.stack([schema_tokens, response]),
        index=torch.zeros(4, dtype=torch.long),
        valid=valid,
        response_mask=response,
    )
    # final: mean 0.4, population std sqrt((0.36 + 0.04 + 0.16)/3); schema: mean 0.8, std sqrt((0.16+0.04+0.04)/3)
    std_final, std_schema = math.sqrt(0.56 / 3), math.sqrt(0.24 / 3)
    a_final = [0.6 / std_final, -0.2 / std_final, -0.4 / std_final, 0.0]
    a_schema = [-0.4 / std_schema, 0.2 / std_schema, 0.2 / std_schema, 0.0]
    schema_track, answer_track = out.tracks
    assert schema_track.weight == 0.5 and answer_track.weight == 1.0
    assert torch.equal(schema_track.mask, schema_tokens) and torch.equal(answer_track.mask, response)
    assert per_rollout(answer_track.advantages) == pytest.approx(a_final, rel=1e-5)
    assert per_rollout(schema_track.advantages) == pytest.approx(a_schema, rel=1e-5)
    assert (schema_track.advantages[:, 2:] == 0).all()
    combined = [f + 0.5 * s for f, s in zip(a_final, a_schema, strict=True)]
    assert per_rollout(out.advantages) == pytest.approx(combined, rel=1e-5)
    assert out.advantages[:, 3].tolist() == pytest.approx(a_final, rel=1e-5)  # answer track only after schema_end


def test_dual_track_clamps_and_zeroes_lone_groups():
    scores = torch.zeros(201)
    scores[0] = 1.0  # z of the outlier = sqrt(200) > 10 with the population std
    out = run(
        "dual_track",
        rl.DualTrackConfig(weights=(1.0,)),
        track_scores=scores[None],
        track_masks=torch.ones(1, 201, 1, dtype=torch.bool),
        index=torch.zeros(201, dtype=torch.long),
        response_mask=torch.ones(201, 1, dtype=torch.bool),
    )
    assert out.advantages[0, 0].item() == pytest.approx(10.0)
    lone = run(
        "dual_track",
        rl.DualTrackConfig(weights=(1.0,)),
        track_scores=torch.tensor([[3.0, 1.0]]),
        track_masks=torch.ones(1, 2, 1, dtype=torch.bool),
        index=torch.tensor([0, 1]),
        response_mask=torch.ones(2, 1, dtype=torch.bool),
    )
    assert (lone.advantages == 0).all()


def test_dual_track_checks_weights():
    with pytest.raises(ValueError, match="2 tracks but 1 weights"):
        run(
            "dual_track",
            rl.DualTrackConfig(weights=(1.0,)),
            track_scores=torch.zeros(2, 8),
            track_masks=torch.ones(2, 8, 3, dtype=torch.bool),
            index=INDEX,
        )


# --- multi-turn: HIAN and GTPO (reconstructed interfaces) -------------------------------------------------------

TURN_IDS = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1]])
TURN_MASK = torch.ones(2, 2, dtype=torch.bool)
TWO = torch.ones(2, 4, dtype=torch.bool)
Z = 1 / math.sqrt(2)  # z-score of two values with the unbiased std


def test_hian_by_hand():
    out = run(
        "hian",
        scores=torch.tensor([1.0, 0.0]),
        index=torch.zeros(2, dtype=torch.long),
        turn_rewards=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        turn_mask=TURN_MASK,
        turn_ids=TURN_IDS,
        response_mask=TWO,
    )
    # session: ±1/√2; turns over all four turns of the group: mean 2.5, std sqrt(5/3)
    sd = math.sqrt(5 / 3)
    turn = [[-1.5 / sd, -0.5 / sd], [0.5 / sd, 1.5 / sd]]
    expected = [
        [Z + turn[0][0], Z + turn[0][0], Z + turn[0][1], Z],  # last token: in no turn, session part only
        [-Z + turn[1][0], -Z + turn[1][1], -Z + turn[1][1], -Z + turn[1][1]],
    ]
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_hian_per_turn_scope_and_weights():
    config = rl.HIANConfig(session_weight=0.0, turn_weight=2.0, scope="per_turn_index")
    out = run(
        "hian",
        config,
        scores=torch.tensor([1.0, 0.0]),
        index=torch.zeros(2, dtype=torch.long),
        turn_rewards=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        turn_mask=TURN_MASK,
        turn_ids=TURN_IDS,
        response_mask=TWO,
    )
    expected = [[-2 * Z, -2 * Z, -2 * Z, 0.0], [2 * Z, 2 * Z, 2 * Z, 2 * Z]]  # each turn index: values ±1/√2
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_gtpo_credits_per_turn_improvement():
    out = run(
        "gtpo",
        index=torch.zeros(2, dtype=torch.long),
        turn_rewards=torch.tensor([[1.0, 3.0], [2.0, 2.0]]),  # cumulative → differences [[1, 2], [2, 0]]
        turn_mask=TURN_MASK,
        turn_ids=TURN_IDS,
        response_mask=TWO,
    )
    # per turn index: turn 0 {1, 2} → ∓1/√2; turn 1 {2, 0} → ±1/√2
    expected = [[-Z, -Z, Z, 0.0], [Z, -Z, -Z, -Z]]
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_gtpo_missing_turns_and_pooled_scope():
    out = run(
        "gtpo",
        rl.GTPOConfig(scope="group_all_turns"),
        index=torch.zeros(2, dtype=torch.long),
        turn_rewards=torch.tensor([[1.0, 3.0], [2.0, float("nan")]]),  # rollout 1 has one turn only
        turn_mask=torch.tensor([[True, True], [True, False]]),
        turn_ids=torch.tensor([[0, 1, 1, 1], [0, 0, -1, -1]]),
        response_mask=TWO,
    )
    # differences over existing turns {1, 2, 2}: mean 5/3, unbiased std sqrt((4/9 + 1/9 + 1/9)/2) = sqrt(1/3)
    sd = math.sqrt(1 / 3)
    expected = [[-2 / 3 / sd, 1 / 3 / sd, 1 / 3 / sd, 1 / 3 / sd], [1 / 3 / sd, 1 / 3 / sd, 0.0, 0.0]]
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-5)
