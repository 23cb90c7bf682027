"""On-policy distillation, SCOPE-style weighting and DynaMO against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl
from diffa2.rl import AdvantageInputs


def run(name, config=None, **fields):
    return rl.get_advantage_estimator(name)(AdvantageInputs(**fields), config=config)


# --- OPD ----------------------------------------------------------------------------------------------------------

STUDENT = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
TEACHER = torch.tensor([[-1.5, -1.0, -0.5, 9.0]])
OPD_MASK = torch.tensor([[True, True, True, False]])  # k = (0.5, −1, 0) on the response


def test_opd_by_hand():
    out = run("opd", old_log_prob=STUDENT, teacher_log_prob=TEACHER, response_mask=OPD_MASK)
    assert out.advantages.tolist() == [[-0.5, 1.0, 0.0, 0.0]]  # A = −λk, λ = 1
    assert out.metrics["distill/reverse_kl"].item() == pytest.approx((0.5 - 1.0 + 0.0) / 3)


def test_opd_discount_and_coefficient():
    config = rl.OPDConfig(kl_penalty_coef=2.0, kl_discount_factor=0.5)
    out = run("opd", config, old_log_prob=STUDENT, teacher_log_prob=TEACHER, response_mask=OPD_MASK)
    # per-token −2k = (−1, 2, 0); A_2 = 0, A_1 = 2 + 0.5·0 = 2, A_0 = −1 + 0.5·2 = 0
    assert out.advantages.tolist() == [[0.0, 2.0, 0.0, 0.0]]


# --- SCOPE (reconstructed interface) ----------------------------------------------------------------------------

SCOPE_STUDENT = torch.tensor([[-0.1, -0.3], [-1.0, -1.4], [-0.5, -0.5], [-0.2, -0.4]])
SCOPE_TEACHER = torch.tensor([[-0.2, -0.2], [-0.6, -0.6], [-2.0, -1.0], [-0.1, -0.3]])
CORRECT = torch.tensor([True, True, False, False])


def scope(config=None, index=None):
    return run(
        "scope",
        config,
        index=torch.zeros(4, dtype=torch.long) if index is None else index,
        correct=CORRECT,
        old_log_prob=SCOPE_STUDENT,
        teacher_log_prob=SCOPE_TEACHER,
        response_mask=torch.ones(4, 2, dtype=torch.bool),
    )


def softmax_times_count(values):
    exps = [math.exp(v) for v in values]
    return [len(values) * e / sum(exps) for e in exps]


def test_scope_by_hand():
    out = scope()
    # correct rollouts: student perplexities exp(0.2), exp(1.2) → MLE weights, constant over their tokens
    v = softmax_times_count([math.exp(0.2), math.exp(1.2)])
    # incorrect rollouts: teacher perplexities exp(1.5), exp(0.2) → distillation weights on −k
    w = softmax_times_count([math.exp(1.5), math.exp(0.2)])
    k = [[-0.5 + 2.0, -0.5 + 1.0], [-0.2 + 0.1, -0.4 + 0.3]]
    expected = [[v[0], v[0]], [v[1], v[1]], [-w[0] * k[0][0], -w[0] * k[0][1]], [-w[1] * k[1][0], -w[1] * k[1][1]]]
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.metrics["distill/correct_fraction"].item() == 0.5


def test_scope_uniform_weights_reduce_to_opd_and_sft():
    out = scope(rl.SCOPEConfig(temperature=1e9))
    opd = run(
        "opd",
        old_log_prob=SCOPE_STUDENT,
        teacher_log_prob=SCOPE_TEACHER,
        response_mask=torch.ones(4, 2, dtype=torch.bool),
    )
    torch.testing.assert_close(out.advantages[2:], opd.advantages[2:])
    torch.testing.assert_close(out.advantages[:2], torch.ones(2, 2))


@pytest.mark.parametrize("norm", ["softmax", "sum_to_one", "zscore"])
def test_scope_weights_have_mean_one_per_set(norm):
    out = scope(rl.SCOPEConfig(weight_norm=norm))
    assert out.advantages[:2, 0].mean().item() == pytest.approx(1.0)  # correct set: the weights themselves
    assert (out.advantages[:2] >= 0).all()


def test_scope_pools_are_per_prompt_group():
    out = scope(index=torch.tensor([0, 1, 0, 1]))  # every (group, correctness) set has one rollout: weight 1
    torch.testing.assert_close(out.advantages[:2], torch.ones(2, 2))


# --- DynaMO: advantage modulation -----------------------------------------------------------------------------

PROBS = [0.5, 0.25, 0.8]
ENTROPY = torch.tensor([[1.0, 2.0, 0.5]])


def dynamo(advantages, log_prob=None):
    old = torch.log(torch.tensor([PROBS]))
    return run(
        "dynamo",
        advantages=advantages,
        log_prob=old if log_prob is None else log_prob,
        old_log_prob=old,
        entropy=ENTROPY,
        response_mask=torch.ones(1, 3, dtype=torch.bool),
    )


def hand_stab():
    # on-policy (r = 1), |A| = 1: ξ = ±1; π·Λ = π(log π + H) per token
    prob_lambda = [p * (math.log(p) + h) for p, h in zip(PROBS, ENTROPY[0].tolist(), strict=True)]
    mean = sum(prob_lambda) / 3
    change = [abs(v - mean) for v in prob_lambda]
    x = [c / max(change) for c in change]  # = (0.5, 0.5, 1.0)
    return [0.6 + 0.4 / (1 + math.exp(50 * (xi - 0.99))) for xi in x]


def test_dynamo_positive_advantage_by_hand():
    stab = hand_stab()
    # β_comp = 1 + 0.2 · (H_max − H) / (H_max − H_min), H = (1, 2, 0.5): (1 + 0.2/1.5·1, 1, 1.2)
    comp = [1 + 0.2 * (2.0 - 1.0) / 1.5, 1.0, 1.2]
    out = dynamo(torch.ones(1, 3))
    assert out.advantages[0].tolist() == pytest.approx([s * c for s, c in zip(stab, comp, strict=True)], rel=1e-5)
    assert stab[2] == pytest.approx(0.6 + 0.4 / (1 + math.exp(0.5)))  # the largest entropy change is damped


def test_dynamo_negative_advantage_is_only_stabilised():
    out = dynamo(-torch.ones(1, 3))
    assert out.advantages[0].tolist() == pytest.approx([-s for s in hand_stab()], rel=1e-5)


def test_dynamo_clipped_tokens_carry_no_entropy_change():
    old = torch.log(torch.tensor([PROBS]))
    log_prob = old + torch.log(torch.tensor([[1.0, 1.0, 1.5]]))  # token 2: r = 1.5 > 1.28 with A > 0: clipped
    out = dynamo(torch.ones(1, 3), log_prob=log_prob)
    # ξ_2 = 0, so ΔH_2 = 0; tokens 0 and 1 share the largest |ΔH|: x = 1 for both
    stab_top = 0.6 + 0.4 / (1 + math.exp(50 * (1 - 0.99)))
    assert out.advantages[0, 0].item() == pytest.approx(stab_top * (1 + 0.2 / 1.5), rel=1e-5)
    assert out.advantages[0, 2].item() == pytest.approx(1.0 * 1.2, rel=1e-5)  # β_stab(0) ≈ 1


# --- DynaMO: rollout allocation --------------------------------------------------------------------------------


def test_priority_by_hand():
    success = torch.tensor([0.3, 0.9, 0.5, 0.0, 0.25])
    seen = torch.tensor([False, True, True, True, True])
    assert rl.dynamo_priority(success, seen).tolist() == pytest.approx([1.0, 0.01, 1.0, 0.01, 0.75])


def test_allocation_is_proportional_with_largest_remainders():
    counts = rl.dynamo_allocate_rollouts(
        torch.tensor([1.0, 0.5, 0.01, 0.01]), torch.full((4,), 10), 40, n_min=4, n_max=20
    )
    # floor 4 each, 24 left: quotas 24·(1, .5, .01, .01)/1.52 = (15.79, 7.89, 0.16, 0.16) → (16, 8, 0, 0)
    assert counts.tolist() == [20, 12, 4, 4]


def test_allocation_caps_and_falls_back_to_even_shares():
    counts = rl.dynamo_allocate_rollouts(torch.tensor([1.0, 0, 0, 0]), torch.full((4,), 10), 40, n_min=4, n_max=12)
    # 24 left all go to prompt 0, capped at 12; 16 left split evenly over the rest: 6, 5, 5
    assert counts.tolist() == [12, 10, 9, 9]


def test_allocation_explores_unseen_prompts_first():
    seen = torch.tensor([0, 10, 10, 10])
    counts = rl.dynamo_allocate_rollouts(torch.tensor([0.0, 1, 1, 1]), seen, 8, n_min=1, n_max=8)
    assert counts[0] >= 4 and counts.sum() == 8
    tight = rl.dynamo_allocate_rollouts(torch.ones(3), torch.zeros(3), 5, n_min=1, n_max=8)
    assert tight.tolist() == [2, 2, 1]  # 4 each wanted: the extra 3 each is scaled to 2/3 and rounded


def test_allocation_power():
    kwargs = dict(n_min=0, n_max=100)
    priority, seen = torch.tensor([4.0, 1.0]), torch.full((2,), 10)
    assert rl.dynamo_allocate_rollouts(priority, seen, 30, **kwargs).tolist() == [24, 6]  # ∝ variance
    assert rl.dynamo_allocate_rollouts(priority, seen, 30, power=0.5, **kwargs).tolist() == [20, 10]  # ∝ std


def test_allocation_sums_to_budget_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        priority = torch.rand(9, generator=generator)
        seen = torch.randint(0, 6, (9,), generator=generator)
        budget = int(torch.randint(9 * 2, 9 * 30 + 1, (), generator=generator))
        counts = rl.dynamo_allocate_rollouts(priority, seen, budget, n_min=2, n_max=30)
        assert counts.sum() == budget and counts.min() >= 2 and counts.max() <= 30
    with pytest.raises(ValueError, match="outside"):
        rl.dynamo_allocate_rollouts(torch.ones(2), torch.zeros(2), 100, n_min=1, n_max=8)
