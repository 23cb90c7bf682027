"""Policy losses: hand-computed values, the gradient weight W on A·∇logp in every (ratio, advantage) region, and
the documented reductions. W is read off autograd: ∂loss/∂logp = −W·A."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl

RATIOS = [0.5, 0.9, 1.1, 1.5, 4.0]  # below 1−ε, inside (twice), above 1+ε, above the dual-clip c = 3
ADVANTAGES = [2.0, -2.0]


def grid(old_log_prob: float = 0.0):
    """One token per (r, A) pair, in one sequence: logp, logp_old, A, mask, r and A as Python lists."""
    pairs = [(r, a) for r in RATIOS for a in ADVANTAGES]
    old = torch.full((1, len(pairs)), old_log_prob, dtype=torch.float64)
    log_prob = (old + torch.tensor([[math.log(r) for r, _ in pairs]], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([[a for _, a in pairs]], dtype=torch.float64)
    return log_prob, old, advantages, torch.ones_like(advantages, dtype=torch.bool), pairs


def loss_and_weight(name, config=None, old_log_prob=0.0):
    log_prob, old, advantages, mask, pairs = grid(old_log_prob)
    loss_mat, metrics = rl.get_policy_loss(name)(log_prob, old, advantages, mask, config=config)
    (grad,) = torch.autograd.grad(loss_mat.sum(), log_prob)
    weight = (-grad / advantages)[0].tolist()
    return loss_mat[0].tolist(), weight, pairs, metrics


# --- the formulas, written from docs/objectives.md §1.1 and §2 ------------------------------------------------------


def w_ppo(r, a, lo=0.2, hi=0.2, c=3.0):
    if a > 0:
        return 0.0 if r > 1 + hi else r
    if r < 1 - lo or (c is not None and r > c):
        return 0.0
    return r


def w_gppo(r, a, lo=0.2, hi=0.28, c=3.0, beta1=1.0, beta2=1.0):
    if a < 0 and r < 1 - lo:
        return beta1 * (1 - lo)
    if a > 0 and r > 1 + hi:
        return beta2 * (1 + hi)
    if a < 0 and c is not None and r > c:
        return 0.0
    return r


def w_cispo(r, a, lo=0.2, hi=0.2):
    return min(max(r, 1 - lo), 1 + hi)


def w_sapo(r, a, tau_pos=1.0, tau_neg=1.05):
    tau = tau_pos if a > 0 else tau_neg
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    return r * 4 * s * (1 - s)


def w_dgpo(r, a, lo=0.2, hi=0.2, n=1.0, m=2.0):
    lb, ub = 1 - lo, 1 + hi
    if r < lb and a < 0:
        return r ** (n + 1) / lb**n
    if r > ub and a > 0:
        return ub ** (1 / m) * r ** ((m - 1) / m)
    return r


def w_maspo(r, a, old_prob, sigma_base=1.0, alpha=0.3, sigma_high=10.0, a_low=0.1, a_high=10.0, beta=0.03):
    width = min(max(sigma_base * old_prob**-alpha, sigma_base), sigma_high)
    if a > 0 and r > 1:
        sigma = width * min(max(1 + beta * a, a_low), a_high)
    elif a < 0 and r < 1:
        sigma = width * min(max(1 / (1 - beta * a), a_low), a_high)
    else:
        return r
    return math.exp(-((r - 1) ** 2) / (2 * sigma**2)) * r


WEIGHT_CASES = [
    ("vanilla", None, w_ppo),
    ("grpo", None, lambda r, a: w_ppo(r, a, c=None)),
    ("dr_grpo", None, lambda r, a: w_ppo(r, a, c=None)),
    ("dapo", None, lambda r, a: w_ppo(r, a, hi=0.28, c=None)),
    ("vanilla", rl.PPOClipConfig(clip_ratio_low=0.3, clip_ratio_high=0.4, clip_ratio_c=2.0),
     lambda r, a: w_ppo(r, a, lo=0.3, hi=0.4, c=2.0)),
    ("cispo", None, w_cispo),
    ("cispo", rl.CISPOConfig(clip_ratio_low=None, clip_ratio_high=2.0, upper_is_absolute=True),
     lambda r, a: min(r, 2.0)),
    ("sapo", None, w_sapo),
    ("gppo", None, w_gppo),
    ("ce_gppo", None, lambda r, a: w_gppo(r, a, hi=0.2, beta1=0.25)),
    ("dgpo", None, w_dgpo),
    ("dgpo", rl.DGPOConfig(n=2.0, m=2.0), lambda r, a: w_dgpo(r, a, n=2.0, m=2.0)),
]


@pytest.mark.parametrize("name, config, formula", WEIGHT_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_gradient_weight_in_every_region(name, config, formula):
    _, weight, pairs, _ = loss_and_weight(name, config)
    expected = [formula(r, a) for r, a in pairs]
    assert weight == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_maspo_gradient_weight_in_every_region():
    old_prob = 0.1  # s_mass = clamp(0.1^−0.3, 1, 10) = 1.995: the low-probability token gets a wider gate
    _, weight, pairs, _ = loss_and_weight("maspo", old_log_prob=math.log(old_prob))
    assert weight == pytest.approx([w_maspo(r, a, old_prob) for r, a in pairs], rel=1e-9)
    # the gate is unilateral: W = r exactly on the non-aggressive side
    for (r, a), w in zip(pairs, weight, strict=True):
        if (a > 0) != (r > 1):
            assert w == pytest.approx(r)


def test_ppo_clip_values_by_hand():
    loss, _, pairs, _ = loss_and_weight("vanilla")
    values = dict(zip(pairs, loss, strict=True))
    assert values[(1.5, 2.0)] == pytest.approx(-2.4)  # max(−2·1.5, −2·1.2) = −2.4 (clipped)
    assert values[(0.5, 2.0)] == pytest.approx(-1.0)  # max(−2·0.5, −2·0.8) = −1.0 (pessimistic, unclipped)
    assert values[(0.5, -2.0)] == pytest.approx(1.6)  # max(2·0.5, 2·0.8) = 1.6 (clipped)
    assert values[(1.5, -2.0)] == pytest.approx(3.0)  # max(3, 2.4) = 3, min(3, 2·3) = 3
    assert values[(4.0, -2.0)] == pytest.approx(6.0)  # max(8, 2.4) = 8, dual-clip min(8, 2·3) = 6


def test_ppo_metrics_by_hand():
    _, _, pairs, metrics = loss_and_weight("vanilla")
    # clipped (L2 > L1): (0.5, −2), (1.5, +2), (4, +2) = 3 of 10; dual-clipped: (4, −2) = 1 of 10
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(0.3)
    assert metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(0.1)
    # ppo_kl = mean(logp_old − logp) = −mean(log r) over both signs of A
    assert metrics["actor/ppo_kl"].item() == pytest.approx(-sum(math.log(r) for r in RATIOS) / len(RATIOS))


@pytest.mark.parametrize("name, formula_value", [
    ("sapo", lambda r, a: -a * 4 / (1.0 if a > 0 else 1.05) / (1 + math.exp(-(1.0 if a > 0 else 1.05) * (r - 1)))),
    ("dgpo", lambda r, a: -a * w_dgpo(r, a)),  # r' = W for the power forms: value = −A·r^(n+1)/lbⁿ etc.
    ("gppo", lambda r, a: -a * (0.8 if (a < 0 and r < 0.8) else 1.28 if (a > 0 and r > 1.28) else r)
     if not (a < 0 and r > 3.0) else -a * 3.0),
])
def test_soft_loss_values(name, formula_value):
    loss, _, pairs, _ = loss_and_weight(name)
    assert loss == pytest.approx([formula_value(r, a) for r, a in pairs], rel=1e-9)


def test_cispo_value_is_weighted_reinforce():
    log_prob, old, advantages, mask, pairs = grid()
    loss, _ = rl.get_policy_loss("cispo")(log_prob, old, advantages, mask)
    expected = [-w_cispo(r, a) * a * math.log(r) for r, a in pairs]
    assert loss[0].tolist() == pytest.approx(expected)


def test_dgpo_reductions_to_gppo():
    """m = 1 gives GPPO's constant ub on the high side; n = −1 gives GPPO's constant lb on the low side.

    An earlier summary of DGPO (and issue 5) said n = 0 reduces to GPPO; from the implemented formula W = r^(n+1)/lbⁿ,
    n = 0 gives W = r (plain policy gradient) there, and GPPO's constant lb needs n = −1.
    """
    gppo = rl.GPPOConfig(clip_ratio_high=0.2, clip_ratio_c=None)  # DGPO has no dual-clip
    gppo_loss, gppo_weight, pairs, _ = loss_and_weight("gppo", gppo)
    dgpo_loss, dgpo_weight, _, _ = loss_and_weight("dgpo", rl.DGPOConfig(n=-1.0, m=1.0))
    assert dgpo_loss == pytest.approx(gppo_loss)
    assert dgpo_weight == pytest.approx(gppo_weight)
    _, n0_weight, _, _ = loss_and_weight("dgpo", rl.DGPOConfig(n=0.0, m=1.0))
    for (r, a), w, w_gppo_ in zip(pairs, n0_weight, gppo_weight, strict=True):
        if a > 0 and r > 1.2:
            assert w == pytest.approx(w_gppo_)  # m = 1: GPPO on the high side
        if a < 0 and r < 0.8:
            assert w == pytest.approx(r) and w != pytest.approx(w_gppo_)  # n = 0: W = r, not GPPO's 0.8


def test_ce_gppo_with_unit_betas_is_gppo():
    same = rl.CEGPPOConfig(beta1=1.0, beta2=1.0, clip_ratio_high=0.28)
    assert loss_and_weight("ce_gppo", same)[:2] == loss_and_weight("gppo")[:2]


def test_gspo_uses_the_sequence_ratio():
    # seq 0: token log-ratios (0.1, −0.1) → s = 1, unclipped; seq 1: (0.2, 0.0) → s = e^0.1 > 1 + 4e-4
    old = torch.zeros(3, 2, dtype=torch.float64)
    log_prob = torch.tensor([[0.1, -0.1], [0.2, 0.0], [0.2, 0.0]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss, metrics = rl.get_policy_loss("gspo")(log_prob, old, advantages, mask)
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    s = math.exp(0.1)
    # values: −A·s unclipped; A>0 above 1+ε_high → −(1 + 4e-4); A<0 above → pessimistic −A·s = s
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.0], [-(1 + 4e-4)] * 2, [s, s]], dtype=torch.float64))
    # W = s on every token when unclipped, 0 when clipped
    torch.testing.assert_close(-grad / advantages, torch.tensor([[1.0, 1.0], [0.0, 0.0], [s, s]], dtype=torch.float64))
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 6)


def test_gspo_ignores_padding_in_the_sequence_ratio():
    old = torch.zeros(1, 3)
    log_prob = torch.tensor([[0.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = rl.get_policy_loss("gspo")(log_prob, old, torch.ones(1, 3), mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.0, 0.0]]))


@pytest.mark.parametrize("name", rl.POLICY_LOSSES.names())
def test_mask_and_importance_weights(name):
    log_prob, old, advantages, mask, _ = grid()
    mask[0, :3] = False
    log_prob = log_prob.detach().clone()
    log_prob[0, 0] = float("nan")  # garbage at a masked position must not leak into the loss
    log_prob.requires_grad_()
    is_weights = torch.linspace(0.5, 1.5, advantages.shape[1], dtype=torch.float64)[None]
    plain, metrics = rl.get_policy_loss(name)(log_prob, old, advantages, mask)
    weighted, _ = rl.get_policy_loss(name)(log_prob, old, advantages, mask, rollout_is_weights=is_weights)
    assert torch.equal(plain[0, :3], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(weighted, plain * is_weights)
    assert all(key.startswith("actor/") and not value.requires_grad for key, value in metrics.items())


def test_gradient_preserving_clip_has_the_bound_as_value():
    ratio = torch.tensor([2.0], requires_grad=True)
    out = rl.policy._gradient_preserving(1.28, ratio)
    out.backward()
    assert out.item() == pytest.approx(1.28) and ratio.grad.item() == pytest.approx(1.28 / 2.0)


@pytest.mark.parametrize("name", rl.POLICY_LOSSES.names())
def test_on_policy_every_surrogate_is_reinforce(name):
    # at r = 1 every method's weight is 1: the gradient is −A·∇logp (CISPO's value differs, its gradient does not)
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    old = torch.log(torch.rand(3, 5, generator=generator, dtype=torch.float64))
    log_prob = old.clone().requires_grad_()
    loss, _ = rl.get_policy_loss(name)(log_prob, old, advantages, torch.ones(3, 5, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    torch.testing.assert_close(grad, -advantages)


def test_dgpo_weight_is_continuous_at_the_region_boundaries():
    lb, ub, tiny = 0.8, 1.2, 1e-9
    for n, m in [(1.0, 2.0), (2.0, 3.0)]:
        assert w_dgpo(lb - tiny, -1.0, n=n, m=m) == pytest.approx(lb) == pytest.approx(w_dgpo(lb + tiny, -1.0))
        assert w_dgpo(ub + tiny, 1.0, n=n, m=m) == pytest.approx(ub) == pytest.approx(w_dgpo(ub - tiny, 1.0))
    log_prob = torch.tensor([[math.log(lb - 1e-6), math.log(ub + 1e-6)]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    loss, _ = rl.get_policy_loss("dgpo")(log_prob, torch.zeros_like(advantages), advantages, torch.ones(1, 2).bool())
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    torch.testing.assert_close(-grad / advantages, torch.tensor([[lb, ub]], dtype=torch.float64), rtol=1e-5, atol=0)


def test_grpo_preset_reproduces_the_deepseekmath_objective():
    # J = (1/G) Σ_i (1/|o_i|) Σ_t min(r·A, clip(r, 0.8, 1.2)·A); two sequences of lengths 2 and 1
    r = [[1.5, 0.9], [0.5, 1.0]]
    a = [[1.0, 1.0], [-1.0, -1.0]]
    mask = torch.tensor([[True, True], [True, False]])
    log_prob = torch.log(torch.tensor(r, dtype=torch.float64))
    config = rl.GRPOLossConfig()
    loss_mat, _ = rl.get_policy_loss("grpo")(log_prob, torch.zeros(2, 2), torch.tensor(a), mask, config=config)
    loss = rl.agg_loss(loss_mat, mask, config.loss_agg_mode)
    seq0 = (min(1.5, 1.2) + min(0.9, 0.9)) / 2  # A = 1
    seq1 = min(0.5 * -1.0, 0.8 * -1.0) / 1  # A = −1: min(−0.5, −0.8) = −0.8
    assert loss.item() == pytest.approx(-(seq0 + seq1) / 2)
