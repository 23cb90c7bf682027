"""Preference losses by hand, their reward metrics, and VRPO = DPO on ELBO estimates."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl

# policy / reference sequence log-likelihoods of one pair
PC, RC, PR, RR = -10.0, -12.0, -15.0, -14.0  # h = (−10 + 12) − (−15 + 14) = 2 + 1 = 3


def scores(*values):
    return [torch.tensor([v], dtype=torch.float64) for v in values]


def softplus(x):
    return math.log1p(math.exp(x))


def test_dpo_by_hand():
    losses, metrics = rl.get_preference_loss("dpo")(*scores(PC, PR, RC, RR))
    assert losses.item() == pytest.approx(softplus(-0.1 * 3))  # −log σ(βh) = log(1 + e^(−βh))
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * 2)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1 * -1)
    assert metrics["rewards/margins"].item() == pytest.approx(0.3)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_dpo_label_smoothing():
    losses, _ = rl.get_preference_loss("dpo")(*scores(PC, PR, RC, RR), config=rl.DPOConfig(label_smoothing=0.1))
    assert losses.item() == pytest.approx(0.9 * softplus(-0.3) + 0.1 * softplus(0.3))


def test_dpo_gradient():
    policy_chosen = torch.tensor([PC], requires_grad=True)
    losses, _ = rl.get_preference_loss("dpo")(policy_chosen, *scores(PR, RC, RR))
    losses.sum().backward()
    # ∂/∂π_c of −log σ(βh) = −β σ(−βh)
    assert policy_chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.3)), rel=1e-6)


def test_ipo_by_hand():
    chosen_len, rejected_len = scores(4.0, 2.0)
    losses, metrics = rl.get_preference_loss("ipo")(
        *scores(PC, PR, RC, RR), chosen_lengths=chosen_len, rejected_lengths=rejected_len
    )
    # h̄ = 2/4 − (−1)/2 = 1; target 1/(2τ) = 5; (1 − 5)² = 16
    assert losses.item() == pytest.approx(16.0)
    assert metrics["rewards/margins"].item() == pytest.approx(0.1 * 1.0)


def test_simpo_by_hand_and_reference_free():
    chosen_len, rejected_len = scores(4.0, 5.0)
    losses, metrics = rl.get_preference_loss("simpo")(
        *scores(PC, PR), None, None, chosen_lengths=chosen_len, rejected_lengths=rejected_len
    )
    # averages −2.5 and −3; logits = 0.5 − γ/β = 0.5 − 5 = −4.5; −log σ(β·logits) = softplus(0.45)
    assert losses.item() == pytest.approx(softplus(0.45))
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.25)
    assert metrics["rewards/accuracies"].item() == 1.0


@pytest.mark.parametrize("name", ["ipo", "simpo"])
def test_length_normalised_losses_need_lengths(name):
    with pytest.raises(ValueError, match="chosen_lengths"):
        rl.get_preference_loss(name)(*scores(PC, PR, RC, RR))


def test_dpo_needs_reference_scores():
    with pytest.raises(ValueError, match="ref_chosen"):
        rl.get_preference_loss("dpo")(*scores(PC, PR), None, None)


def test_accuracy_counts_pairs():
    chosen = torch.tensor([0.0, 0.0, 0.0, 0.0])
    rejected = torch.tensor([-1.0, 1.0, -2.0, 0.0])  # chosen wins 2 of 4 pairs; a tie is not a win
    metrics = rl.preference_metrics(chosen, rejected)
    assert metrics["rewards/accuracies"].item() == 0.5


def test_vrpo_is_dpo_with_its_own_beta():
    vrpo, _ = rl.get_preference_loss("vrpo")(*scores(PC, PR, RC, RR))
    dpo, _ = rl.get_preference_loss("dpo")(*scores(PC, PR, RC, RR), config=rl.DPOConfig(beta=0.2))
    assert vrpo.item() == dpo.item()


def toy_model(log_q: torch.Tensor, crowding: float):
    """Per-draw token log-probs: log q_i minus a penalty growing with the number of masked tokens."""

    def fn(masked: torch.Tensor, prompt_masked: torch.Tensor | None) -> torch.Tensor:
        return log_q - crowding * masked.sum(-1, keepdim=True) / masked.shape[-1]

    return fn


def test_vrpo_with_one_sample_and_no_sharing_equals_dpo_on_single_sample_estimates():
    # rows 0–1 chosen, 2–3 rejected, stacked in one batch as a trainer does
    answer_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    policy_fn = toy_model(torch.log(torch.full((4, 4), 0.5)), crowding=0.3)
    reference_fn = toy_model(torch.log(torch.full((4, 4), 0.4)), crowding=0.1)
    one = rl.ElboEstimator(n_t=1, n_yt=1)
    pair = rl.paired_elbo(
        policy_fn, reference_fn, answer_mask, one, antithetic=False, generator=torch.Generator().manual_seed(3)
    )
    vrpo, _ = rl.get_preference_loss("vrpo")(pair.policy[:2], pair.policy[2:], pair.reference[:2], pair.reference[2:])

    generator = torch.Generator().manual_seed(3)
    policy_draws = rl.sample_elbo_draws(answer_mask, n_t=1, generator=generator)
    reference_draws = rl.sample_elbo_draws(answer_mask, n_t=1, generator=generator)  # independent draws
    assert not torch.equal(policy_draws.masks, reference_draws.masks)
    policy = rl.elbo_from_token_logprobs(rl.token_logprobs(policy_fn, policy_draws), policy_draws)
    reference = rl.elbo_from_token_logprobs(rl.token_logprobs(reference_fn, reference_draws), reference_draws)
    dpo, _ = rl.get_preference_loss("dpo")(
        policy[:2], policy[2:], reference[:2], reference[2:], config=rl.DPOConfig(beta=0.2)
    )
    torch.testing.assert_close(vrpo, dpo)
