"""Loss aggregation modes and KL estimators against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

import diffa2.rl as rl
from diffa2.rl.aggregation import Normalisers, agg_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # the third sequence is fully masked


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 4) / 3),  # 3 valid tokens
    ("seq-mean-token-sum", (3 + 4) / 2),  # 2 sequences with tokens; the empty one is not counted
    ("seq-mean-token-mean", (1.5 + 4) / 2),
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / 3),  # S defaults to the padded length T = 3
])
def test_modes_by_hand(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_dr_grpo_constant_and_no_sequence_division():
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", Normalisers(constant=10.0)).item() == pytest.approx(0.7)


def test_masked_positions_never_leak():
    loss = LOSS.clone()
    loss[2, 2] = float("nan")
    for mode in rl.AGGREGATIONS.names():
        assert torch.isfinite(agg_loss(loss, MASK, mode))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_global_normalisers_make_micro_batching_and_dp_invisible(mode):
    full = agg_loss(LOSS, MASK, mode)
    norm = Normalisers(tokens=3, seqs=2)
    # gradient accumulation over two micro-batches sums their losses
    micro = agg_loss(LOSS[:1], MASK[:1], mode, norm) + agg_loss(LOSS[1:], MASK[1:], mode, norm)
    assert micro.item() == pytest.approx(full.item())
    # two data-parallel ranks, gradients averaged: each rank multiplies by dp_size
    ranks = Normalisers(tokens=3, seqs=2, dp_size=2)
    averaged = (agg_loss(LOSS[:1], MASK[:1], mode, ranks) + agg_loss(LOSS[1:], MASK[1:], mode, ranks)) / 2
    assert averaged.item() == pytest.approx(full.item())


def test_masked_mean():
    assert rl.masked_mean(LOSS, MASK).item() == pytest.approx(7 / 3)
    assert rl.masked_mean(LOSS, MASK, dim=-1).tolist() == pytest.approx([1.5, 4.0, 0.0])


# --- KL -----------------------------------------------------------------------------------------------------------

LOG_HALF, LOG_QUARTER = math.log(0.5), math.log(0.25)
DELTA = LOG_HALF - LOG_QUARTER  # = log 2


def kl_value_and_grad(name, log_prob=LOG_HALF, ref=LOG_QUARTER):
    lp = torch.tensor([[log_prob]], dtype=torch.float64, requires_grad=True)
    value = rl.get_kl_estimator(name)(lp, torch.tensor([[ref]], dtype=torch.float64))
    value.sum().backward()
    return value.item(), lp.grad.item()


@pytest.mark.parametrize("name, value, grad", [
    ("k1", DELTA, 1.0),
    ("kl", DELTA, 1.0),
    ("abs", DELTA, 1.0),
    ("k2", 0.5 * DELTA**2, DELTA),  # ½δ², gradient δ
    ("mse", 0.5 * DELTA**2, DELTA),
    ("k3", 0.5 + DELTA - 1.0, 1.0 - 0.5),  # exp(−δ) + δ − 1 = 0.5 + ln2 − 1; gradient 1 − exp(−δ)
    ("low_var_kl", 0.5 + DELTA - 1.0, 0.5),
    ("k1+", DELTA, DELTA),  # straight-through: value of k1, gradient of k2
    ("k3+", 0.5 + DELTA - 1.0, DELTA),
])
def test_kl_estimators_by_hand(name, value, grad):
    got_value, got_grad = kl_value_and_grad(name)
    assert got_value == pytest.approx(value)
    assert got_grad == pytest.approx(grad)


def test_k3_is_non_negative_and_clamped_like_verl():
    assert kl_value_and_grad("k3", log_prob=0.0, ref=0.0)[0] == 0.0
    # δ = −30: −δ is clamped to 20, exp(20) − 20 − 1 is clamped to 10
    assert kl_value_and_grad("k3", log_prob=-30.0, ref=0.0)[0] == 10.0


def test_abs_is_symmetric():
    assert kl_value_and_grad("abs", log_prob=LOG_QUARTER, ref=LOG_HALF) == pytest.approx((DELTA, -1.0))


def test_k3_is_an_unbiased_kl_estimate_on_a_categorical():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    # expectation under tokens sampled from p, computed exactly by weighting each token by p
    for name in ("k1", "k3"):
        estimate = (p * rl.get_kl_estimator(name)(p.log(), q.log())).sum()
        torch.testing.assert_close(estimate, exact)
