"""Distillation as dense advantages: on-policy distillation (OPD) and SCOPE-style correctness-routed weighting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .advantages import AdvantageInputs, AdvantageOutput, broadcast_to_tokens, register_advantage_estimator
from .aggregation import masked_mean
from .groups import dense_groups, group_sum
from .registry import reconstructed


def _reverse_kl(inputs: AdvantageInputs, estimator: str) -> torch.Tensor:
    """`k_t = log π_S(y_t) − log π_T(y_t)` on the sampled tokens, `(B, T)`, 0 outside the response."""
    student, teacher = inputs.need(estimator, "old_log_prob", "teacher_log_prob")
    mask = inputs.response_mask.bool()
    return torch.where(mask, student - teacher, torch.zeros_like(student))


def discounted_sum(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """`Σ_{u ≥ t} γ^(u−t) r_u` along the last dim of `rewards (B, T)`."""
    if gamma == 0.0:
        return rewards
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


@dataclass(frozen=True)
class OPDConfig:
    """On-policy distillation; defaults from tinker-cookbook `distillation/train_on_policy.py`."""

    kl_penalty_coef: float = 1.0  # λ
    kl_discount_factor: float = 0.0  # γ; 0 = per-token advantage, no credit to earlier tokens


@register_advantage_estimator("opd", OPDConfig)
def opd_advantage(inputs: AdvantageInputs, *, config: OPDConfig) -> AdvantageOutput:
    """`A_t = Σ_{u≥t} γ^(u−t) · (−λ k_u)`, `k = log π_S − log π_T` on the student's own samples.

    The student samples, the teacher scores the student's tokens (tinker-cookbook `incorporate_kl_penalty`; the
    "on-policy distillation" of Agarwal et al., arXiv:2306.13649, with a reverse-KL single-sample estimate). Add it
    to any task advantage to combine OPD with RL. Reads `old_log_prob` (student), `teacher_log_prob`.
    """
    reverse_kl = _reverse_kl(inputs, "opd")
    advantages = discounted_sum(-config.kl_penalty_coef * reverse_kl, config.kl_discount_factor)
    advantages = torch.where(inputs.response_mask.bool(), advantages, torch.zeros_like(advantages))
    return AdvantageOutput(advantages, {"distill/reverse_kl": masked_mean(reverse_kl, inputs.response_mask)})


WeightNorm = Literal["softmax", "sum_to_one", "zscore"]


def pooled_weights(scores: torch.Tensor, pools: torch.Tensor, norm: WeightNorm, *, eps: float) -> torch.Tensor:
    """Weights `(N,)` with mean 1 in each pool, increasing with `scores (N,)` (pools: dense ids `(N,)`).

    "softmax": |pool| · softmax(scores); "sum_to_one": |pool| · s / Σ s (scores > 0); "zscore": max(1 + z, 0).
    """
    num_pools = int(pools.max()) + 1 if pools.numel() else 0
    count = group_sum(torch.ones_like(scores), pools, num_pools)[pools]
    if norm == "softmax":
        peak = torch.full((num_pools,), -torch.inf, dtype=scores.dtype, device=scores.device)
        peak = peak.scatter_reduce(0, pools, scores, reduce="amax")
        exp = (scores - peak[pools]).exp()
        return count * exp / group_sum(exp, pools, num_pools)[pools]
    if norm == "sum_to_one":
        return count * scores / group_sum(scores, pools, num_pools)[pools]
    if norm == "zscore":
        mean = group_sum(scores, pools, num_pools)[pools] / count
        std = (group_sum((scores - mean).square(), pools, num_pools)[pools] / count).sqrt()
        return (1.0 + (scores - mean) / (std + eps)).clamp_min(0.0)
    raise ValueError(f"unknown weight norm {norm!r}; valid: softmax, sum_to_one, zscore")


@dataclass(frozen=True)
class SCOPEConfig:
    """SCOPE (arXiv:2604.10688), reconstructed from the abstract: every default here is a guess, not the paper's."""

    temperature: float = 1.0  # τ of the softmax over perplexities
    teacher_ppl_sign: float = 1.0  # +1: higher teacher perplexity → more weight (direction unverified)
    weight_norm: WeightNorm = "softmax"
    kl_penalty_coef: float = 1.0  # λ of the distillation advantage
    eps: float = 1e-6


@register_advantage_estimator("scope", SCOPEConfig, note=reconstructed("arXiv:2604.10688"))
def scope_advantage(inputs: AdvantageInputs, *, config: SCOPEConfig) -> AdvantageOutput:
    """Correctness-routed, perplexity-weighted distillation and MLE, as one dense advantage.

    Reconstructed from the abstract (`docs/objectives.md` §4.2), not the paper's equation. Within each prompt group:
    incorrect rollouts get OPD advantages `−λ · w_i · k_t` with `w` from the teacher perplexity
    `PPL_T(i) = exp(−mean_t log π_T)` (scores `sign · PPL_T / τ`); correct rollouts get the MLE advantage `v_i`
    (`−v_i · ∇log π_S`, an SFT step at ratio 1) with `v` from the student perplexity (scores `PPL_S / τ`, so
    low-confidence samples weigh more). Weights have mean 1 within each (group, correctness) set, so uniform
    weights give plain OPD and plain SFT; use `seq-mean-token-mean` aggregation for the per-sequence token means.
    Reads `index`, `correct`, `old_log_prob` (student), `teacher_log_prob`.
    """
    index, correct, student, teacher = inputs.need("scope", "index", "correct", "old_log_prob", "teacher_log_prob")
    mask, correct = inputs.response_mask.bool(), correct.bool()
    teacher_ppl = masked_mean(-teacher.float(), mask, dim=-1).exp()  # (B,)
    student_ppl = masked_mean(-student.float(), mask, dim=-1).exp()
    if config.weight_norm == "sum_to_one":  # needs positive scores: PPL_S and PPL_T^sign (τ unused)
        scores = torch.where(correct, student_ppl, teacher_ppl**config.teacher_ppl_sign)
    else:
        scores = torch.where(correct, student_ppl, config.teacher_ppl_sign * teacher_ppl) / config.temperature
    pools = dense_groups(index)[0] * 2 + correct.long()
    weights = pooled_weights(scores, pools, config.weight_norm, eps=config.eps)
    reverse_kl = _reverse_kl(inputs, "scope")
    distill = -config.kl_penalty_coef * weights[:, None] * reverse_kl
    advantages = torch.where(correct[:, None], broadcast_to_tokens(weights, mask), distill)
    metrics = {
        "distill/reverse_kl": masked_mean(reverse_kl, mask & ~correct[:, None]),
        "distill/correct_fraction": correct.float().mean(),
    }
    return AdvantageOutput(torch.where(mask, advantages, torch.zeros_like(advantages)), metrics)
