"""Likelihood estimators for diffusion LMs: noise draws, the ELBO on toys with an exact value, antithetic sharing,
optimal allocation, d1's one-step estimate and SPG's bounds."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl
from diffa2.rl import ElboDraws

ANSWER = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # L = 6 and L = 4
LOG_Q = torch.log(torch.tensor([[0.9, 0.5, 0.2, 0.7, 0.3, 0.6], [0.4, 0.8, 0.1, 0.5, 0.5, 0.5]], dtype=torch.float64))


def independent_model(masked, prompt_masked):
    """Every masked token predicted with its own q_i whatever else is masked: the ELBO is exactly Σ log q_i."""
    return LOG_Q.expand(masked.shape)


def crowded_model(crowding: float):
    """log p_i = log q_i − c·k/L, with k the number of masked answer tokens: the ELBO is below Σ log q_i."""

    def fn(masked, prompt_masked):
        length = ANSWER.sum(-1, keepdim=True)
        return LOG_Q - crowding * masked.sum(-1, keepdim=True) / length

    return fn


def estimate_with_error(fn, estimator, seed=0):
    draws = estimator.sample(ANSWER, generator=torch.Generator().manual_seed(seed))
    terms = rl.elbo_terms(rl.token_logprobs(fn, draws), draws)  # (n, B)
    return terms.mean(0), terms.std(0) / math.sqrt(terms.shape[0])


def test_elbo_terms_by_hand():
    masks = torch.tensor([[[1, 0, 1]], [[0, 1, 0]]], dtype=torch.bool)  # (n=2, B=1, L=3)
    draws = ElboDraws(masks, torch.tensor([[2.0], [4.0]]), torch.ones(1, 3, dtype=torch.bool), n_t=2, n_yt=1)
    token_logp = torch.tensor([[[-1.0, -2.0, -3.0]], [[-0.5, -0.25, -4.0]]])
    # draw 0: 2·(−1 − 3) = −8; draw 1: 4·(−0.25) = −1; estimate (−8 − 1)/2
    assert rl.elbo_terms(token_logp, draws).tolist() == [[-8.0], [-1.0]]
    assert rl.elbo_from_token_logprobs(token_logp, draws).tolist() == [-4.5]


@pytest.mark.parametrize("form", ["t", "l"])
def test_draws_shapes_seeding_and_support(form):
    estimator = rl.ElboEstimator(n_t=5, n_yt=3, form=form)
    draws = estimator.sample(ANSWER, generator=torch.Generator().manual_seed(1))
    again = estimator.sample(ANSWER, generator=torch.Generator().manual_seed(1))
    assert draws.masks.shape == (15, 2, 6) and draws.weights.shape == (15, 2) and draws.n == estimator.budget == 15
    assert torch.equal(draws.masks, again.masks) and torch.equal(draws.weights, again.weights)
    assert not (draws.masks & ~ANSWER).any()
    # n_yt masks per timestep: the weight (a function of t) repeats within each block of n_yt draws
    blocks = draws.weights.reshape(5, 3, 2)
    assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))
    assert not torch.equal(draws.masks[0::3], draws.masks[1::3])  # but each draw has its own mask


def test_t_form_weights_are_inverse_mask_probabilities():
    draws = rl.sample_elbo_draws(ANSWER, n_t=2000, eps=1e-3, generator=torch.Generator().manual_seed(2))
    p = 1 / draws.weights
    assert (p >= 1e-3).all() and (p <= 1).all()
    rate = draws.masks[:, 0].float().mean(-1)  # row 0 has 6 answer tokens
    assert (rate - p[:, 0]).mean().abs() < 0.02  # each token masked with probability p


def test_l_form_masks_exactly_l_tokens():
    draws = rl.sample_elbo_draws(ANSWER, n_t=200, form="l", generator=torch.Generator().manual_seed(3))
    counts = draws.masks.sum(-1)  # (n, B)
    length = ANSWER.sum(-1)
    assert ((counts >= 1) & (counts <= length)).all()
    torch.testing.assert_close(counts * draws.weights, length.expand_as(counts).float())  # w = L / l
    assert set(counts[:, 1].tolist()) == {1, 2, 3, 4}


def test_empty_answer_gets_zero():
    answer = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    for form in ("t", "l"):
        draws = rl.sample_elbo_draws(answer, n_t=4, form=form, generator=torch.Generator().manual_seed(0))
        assert not draws.masks[:, 1].any()
        assert rl.elbo_from_token_logprobs(torch.full((4, 2, 3), -1.0), draws)[1] == 0.0


def test_stratified_draws_spread_evenly():
    generator = torch.Generator().manual_seed(4)
    counts = rl.sample_elbo_draws(ANSWER, n_t=4, form="l", stratified=True, generator=generator).masks.sum(-1)
    assert sorted(counts[:, 1].tolist()) == [1, 2, 3, 4]  # n_t = L: every count once
    draws = rl.sample_elbo_draws(ANSWER, n_t=4, stratified=True, eps=0.0, generator=generator)
    t = (1 / draws.weights[:, 0]).sort().values
    torch.testing.assert_close(t.diff(), torch.full((3,), 0.25))  # one timestep in each quarter


@pytest.mark.parametrize("form", ["t", "l"])
@pytest.mark.parametrize("stratified", [False, True])
def test_elbo_is_unbiased_for_a_per_token_independent_model(form, stratified):
    exact = torch.where(ANSWER, LOG_Q, 0.0).sum(-1)  # the ELBO equals the true log-likelihood here
    estimate, error = estimate_with_error(
        independent_model, rl.ElboEstimator(n_t=4000, form=form, stratified=stratified)
    )
    assert ((estimate - exact).abs() < 4 * error + 1e-9).all(), (estimate, exact, error)


@pytest.mark.parametrize("form", ["t", "l"])
def test_elbo_matches_the_exact_value_for_a_context_dependent_model(form):
    c, eps = 1.5, 1e-3
    length = ANSWER.sum(-1).double()
    base = torch.where(ANSWER, LOG_Q, 0.0).sum(-1)
    if form == "t":
        # k ~ Bin(L, p): E[(1/p) Σ_masked (log q_i − c k/L)] = Σ log q − c(1 + (L−1)p); E[p] = (1 + eps)/2
        exact = base - c * (1 + (length - 1) * (1 + eps) / 2)
    else:
        # exactly l masked: E[(L/l) Σ_masked (log q_i − c l/L)] = Σ log q − c·l; E[l] = (L + 1)/2
        exact = base - c * (length + 1) / 2
    estimate, error = estimate_with_error(crowded_model(c), rl.ElboEstimator(n_t=4000, form=form, eps=eps))
    assert ((estimate - exact).abs() < 4 * error).all(), (estimate, exact, error)
    assert (exact < base).all()  # a proper lower bound on this toy


def test_antithetic_draws_cancel_for_identical_models():
    estimator = rl.ElboEstimator(n_t=2)
    fn = crowded_model(0.5)
    shared = rl.paired_elbo(fn, fn, ANSWER, estimator, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared.policy, shared.reference) and shared.policy_terms.shape == (2, 2)
    apart = rl.paired_elbo(fn, fn, ANSWER, estimator, antithetic=False, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(apart.policy, apart.reference)


def score_variance(estimator, antithetic, rows=600):
    """Variance across `rows` independent copies of one response of B̂_θ − B̂_ref (the preference score's part)."""
    answer = ANSWER[:1].expand(rows, -1)
    log_q = LOG_Q[:1]

    def model(shift, crowding):
        return lambda masked, _: log_q + shift - crowding * masked.sum(-1, keepdim=True) / 6

    pair = rl.paired_elbo(
        model(0.0, 1.0),
        model(-0.05, 1.1),
        answer,
        estimator,
        antithetic=antithetic,
        generator=torch.Generator().manual_seed(6),
    )
    return (pair.policy - pair.reference).var().item()


def test_antithetic_sampling_and_optimal_allocation_reduce_variance_at_equal_budget():
    optimal = rl.ElboEstimator(n_t=4, n_yt=1)
    one_timestep = rl.ElboEstimator(n_t=1, n_yt=4)
    independent = score_variance(optimal, antithetic=False)
    assert score_variance(optimal, antithetic=True) < independent / 10
    assert score_variance(optimal, antithetic=False) < score_variance(one_timestep, antithetic=False)


def test_token_logprobs_calls_the_model_once_per_draw():
    calls = []

    def fn(masked, prompt_masked):
        calls.append((masked.clone(), prompt_masked))
        return torch.zeros(masked.shape)

    draws = rl.ElboEstimator(n_t=3).sample(ANSWER, generator=torch.Generator().manual_seed(0))
    assert rl.token_logprobs(fn, draws).shape == (3, 2, 6)
    assert [torch.equal(m, draws.masks[j]) for j, (m, _) in enumerate(calls)] == [True] * 3
    assert all(p is None for _, p in calls)


# --- d1 -----------------------------------------------------------------------------------------------------------


def test_d1_one_step_masks_everything_and_sums():
    prompt_mask = torch.ones(2, 1000, dtype=torch.bool)
    estimator = rl.get_likelihood_estimator("d1_one_step")()
    draws = estimator.sample(ANSWER, prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws.masks[0], ANSWER) and draws.n == 1
    assert abs(draws.prompt_masks.float().mean().item() - 0.15) < 0.02
    expected = torch.where(ANSWER, LOG_Q, 0).sum(-1)
    torch.testing.assert_close(estimator.estimate(LOG_Q[None], draws), expected)
    with pytest.raises(ValueError, match="prompt_mask"):
        estimator.sample(ANSWER)
    assert rl.D1Estimator(p_mask_prompt=0.0).sample(ANSWER).prompt_masks is None


# --- SPG ----------------------------------------------------------------------------------------------------------


def test_spg_block_draws():
    answer = torch.zeros(3, 8, dtype=torch.bool)
    for row, length in enumerate([8, 5, 2]):
        answer[row, :length] = True
    estimator = rl.SPGEstimator(n_t=3, block_length=2)
    prompt_mask = torch.ones(3, 4, dtype=torch.bool)
    draws = estimator.sample(answer, prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(7))
    assert draws.masks.shape == (3, 3, 8) and draws.prompt_masks.shape == (3, 3, 4)
    assert not (draws.masks & ~answer).any()
    for row, length in enumerate([8, 5, 2]):
        chosen_blocks = []
        for j in range(3):
            blocks = draws.masks[j, row, :length].split(2)
            k = min(b for b, block in enumerate(blocks) if block.any())  # first block with a masked token
            chosen_blocks.append(k)
            assert all(block.all() for block in blocks[k + 1 :])  # later blocks fully masked
            assert draws.weights[j, row].item() == pytest.approx(length / draws.masks[j, row].sum().item())
        if row == 0:
            assert len(set(chosen_blocks)) == 3  # distinct blocks while the completion has enough
        if row == 2:
            assert chosen_blocks == [0, 0, 0]


def spg_hand_case():
    # B = 1, L = 5, n = 2 draws; token 4 is never masked
    masks = torch.tensor([[[1, 1, 0, 0, 0]], [[0, 1, 1, 1, 0]]], dtype=torch.bool)
    weights = torch.tensor([[5 / 2], [5 / 3]])  # 1 / t_emp, t_emp = masked fraction
    draws = ElboDraws(masks, weights, torch.ones(1, 5, dtype=torch.bool), n_t=2, n_yt=1)
    probs = torch.tensor([[[0.5, 0.4, 0.9, 0.9, 0.9]], [[0.9, 0.2, 0.6, 0.8, 0.9]]], dtype=torch.float64)
    return draws, probs


def test_spg_bounds_by_hand():
    draws, probs = spg_hand_case()
    beta = 1.5
    estimator = rl.SPGEstimator(beta=beta, omega=0.5)
    token_logp = probs.log()
    lower = ((math.log(0.5) + math.log(0.4)) / 2 + (math.log(0.2) + math.log(0.6) + math.log(0.8)) / 3) / 2
    per_token = [  # mean over the 2 draws of p^β·1[masked]/t_emp, for the 4 tokens masked at least once
        (0.5**beta * 5 / 2) / 2,
        (0.4**beta * 5 / 2 + 0.2**beta * 5 / 3) / 2,
        (0.6**beta * 5 / 3) / 2,
        (0.8**beta * 5 / 3) / 2,
    ]
    upper = sum(math.log(v) for v in per_token) / 4 / beta
    assert estimator.lower(token_logp, draws).item() == pytest.approx(lower)
    assert estimator.upper(token_logp, draws).item() == pytest.approx(upper)
    assert estimator.estimate(token_logp, draws).item() == pytest.approx(0.5 * upper + 0.5 * lower)
    assert rl.SPGEstimator(bound="upper").estimate(token_logp, draws).item() != pytest.approx(lower)
    positive, negative = torch.tensor([1.0]), torch.tensor([-1.0])
    assert estimator.sandwich(token_logp, draws, positive).item() == pytest.approx(lower)
    assert estimator.sandwich(token_logp, draws, negative).item() == pytest.approx(0.5 * upper + 0.5 * lower)


def test_spg_upper_gradient_is_finite_with_unmasked_tokens():
    draws, probs = spg_hand_case()
    token_logp = probs.log().requires_grad_()
    rl.SPGEstimator(bound="upper").estimate(token_logp, draws).sum().backward()
    assert torch.isfinite(token_logp.grad).all()
    assert token_logp.grad[:, 0, 4].abs().sum() == 0  # the never-masked token gets no gradient


@pytest.mark.parametrize("name", rl.LIKELIHOOD_ESTIMATORS.names())
def test_every_estimator_runs_end_to_end(name):
    estimator = rl.get_likelihood_estimator(name)()
    answer = torch.ones(2, 64, dtype=torch.bool)
    draws = estimator.sample(answer, generator=torch.Generator().manual_seed(0), prompt_mask=torch.ones(2, 3).bool())
    token_logp = torch.full((draws.n, 2, 64), -0.5)
    value = estimator.estimate(token_logp, draws)
    assert value.shape == (2,) and torch.isfinite(value).all()
