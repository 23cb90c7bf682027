"""DynaMO (arXiv:2602.19208): variance-based rollout allocation and entropy-aware advantage modulation.

Read in `GithubX-F/DynaMO-RL` (@63e5ec9): `recipe/dynamo/dynamo_ray_trainer.py::get_rollout_n_per_prompt`,
`recipe/dynamo/rl_dataset.py::update_rank` and `verl/workers/actor/dp_actor.py::_compute_entropy_estimation`
(mode `decay6_linearnorm`). The allocation below is written from that description (exploration first, a floor,
then proportional water-filling whose sum is exactly the budget), not transcribed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import AdvantageInputs, AdvantageOutput, register_advantage_estimator
from .aggregation import masked_mean
from .policy import LOG_RATIO_CLAMP

# ---------------------------------------------------------------------------------------------------------------
# Sequence level: how many rollouts each prompt gets
# ---------------------------------------------------------------------------------------------------------------


def dynamo_priority(
    success_rate: torch.Tensor, seen: torch.Tensor, *, mastered: float = 0.85, floor: float = 0.01
) -> torch.Tensor:
    """Informativeness `(N,)` of each prompt from its historical `success_rate (N,)` (DynaMO `update_rank`).

    1 for unseen prompts; `floor` once mastered (rate ≥ `mastered`); else `max(4·acc·(1 − acc), floor)`, the
    Bernoulli variance scaled to 1 at acc = 0.5. DynaMO's rate is the fraction of the prompt's samples whose
    reward beat the batch mean.
    """
    variance = (4.0 * success_rate * (1.0 - success_rate)).clamp_min(floor)
    learned = torch.where(success_rate >= mastered, torch.full_like(variance, floor), variance)
    return torch.where(seen.bool(), learned, torch.ones_like(learned))


def largest_remainder(quotas: torch.Tensor, total: int) -> torch.Tensor:
    """Round non-negative `quotas (N,)` summing to `total` to integers with the same sum (Hamilton's method)."""
    base = quotas.floor().long()
    missing = total - int(base.sum())
    order = torch.argsort(quotas - base, descending=True, stable=True)
    base[order[:missing]] += 1
    return base


def dynamo_allocate_rollouts(
    priority: torch.Tensor,
    sample_count: torch.Tensor,
    budget: int,
    *,
    n_min: int,
    n_max: int,
    initial_budget: int = 4,
    power: float = 1.0,
) -> torch.Tensor:
    """Rollouts per prompt `(N,)` long, summing exactly to `budget`, each in `[n_min, n_max]`.

    1. Exploration: a prompt sampled fewer than `initial_budget` times (`sample_count (N,)`) gets the missing
       rollouts first (at least `n_min`); if that exceeds the budget, the extra above `n_min` is scaled down.
    2. The rest is split in proportion to `priority ** power` with largest-remainder rounding, capped at `n_max`,
       repeated until spent (evenly among uncapped prompts when their priorities are all zero).
    `power = 1` allocates ∝ variance as DynaMO's code does; `power = 0.5` ∝ std as its README's Neyman formula.
    The example script uses a mean of 16 rollouts with `n_min = 8`, `n_max = 24`.
    """
    num_prompts = priority.shape[0]
    if not num_prompts * n_min <= budget <= num_prompts * n_max:
        raise ValueError(f"budget {budget} is outside [{num_prompts * n_min}, {num_prompts * n_max}]")
    allocation = (initial_budget - sample_count.long()).clamp(n_min, n_max)
    if int(allocation.sum()) > budget:
        extra = (allocation - n_min).double()
        spare = budget - num_prompts * n_min
        return n_min + largest_remainder(extra * spare / extra.sum(), spare)
    weight = priority.double().clamp_min(0.0) ** power
    remaining = budget - int(allocation.sum())
    while remaining > 0:
        room = n_max - allocation
        share = torch.where(room > 0, weight, torch.zeros_like(weight))
        if share.sum() == 0:
            share = (room > 0).double()
        grant = torch.minimum(largest_remainder(share * remaining / share.sum(), remaining), room)
        allocation = allocation + grant
        remaining -= int(grant.sum())
    return allocation


# ---------------------------------------------------------------------------------------------------------------
# Token level: entropy-aware advantage modulation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynaMOConfig:
    """Defaults: DynaMO mode `decay6_linearnorm` (λ_min 0.6, μ_max 1.2, slope 50, knee 0.99).

    The ε's are the *effective* ones of the example script: the actor silently multiplies `clip_ratio_high = 0.2`
    by 1.4, giving 0.28. Mode `decay5_linearnorm` with α = 0.4 is `lambda_min=0.6, mu_max=1.4, knee=0.9`.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    lambda_min: float = 0.6  # floor of the stabilising factor β_stab
    mu_max: float = 1.2  # ceiling of the compensation factor β_comp
    slope: float = 50.0  # steepness of β_stab's sigmoid
    knee: float = 0.99  # normalised |ΔH| at which β_stab is half-way down


@register_advantage_estimator("dynamo", DynaMOConfig)
def dynamo_advantage(inputs: AdvantageInputs, *, config: DynaMOConfig) -> AdvantageOutput:
    """`A' = A · sg(β_stab · β_comp)`, computed without gradient on the (micro-)batch.

    I = 1[(A>0, r ≤ 1+ε_high) or (A<0, r ≥ 1−ε_low)] (token not hard-clipped); ξ = I·r·A; Λ = logp + H;
    ΔH = −ξ · (π·Λ − mean_seq(π·Λ)) (mean over the sequence's valid tokens); x = |ΔH| / max |ΔH|;
    β_stab = λ_min + (1 − λ_min) / (1 + exp(slope·(x − knee))) damps the tokens with the largest entropy change;
    β_comp = 1 + (μ_max − 1) · (H_max − H) / (H_max − H_min) where A > 0, else 1, boosts confident correct
    tokens. Reads `advantages`, `log_prob`, `old_log_prob`, `entropy`.
    """
    advantages, log_prob, old_log_prob, entropy = (
        t.detach() for t in inputs.need("dynamo", "advantages", "log_prob", "old_log_prob", "entropy")
    )
    mask = inputs.response_mask.bool()
    ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    unclipped = ((advantages > 0) & (ratio <= 1.0 + config.clip_ratio_high)) | (
        (advantages < 0) & (ratio >= 1.0 - config.clip_ratio_low)
    )
    xi = torch.where(unclipped, ratio * advantages, torch.zeros_like(ratio))
    prob_lambda = log_prob.exp() * (log_prob + entropy)
    entropy_change = -xi * (prob_lambda - masked_mean(prob_lambda, mask, dim=-1)[:, None])
    magnitude = torch.where(mask, entropy_change.abs(), torch.zeros_like(entropy_change))
    x = magnitude / magnitude.max().clamp_min(torch.finfo(magnitude.dtype).tiny)
    stab = config.lambda_min + (1.0 - config.lambda_min) * torch.sigmoid(-config.slope * (x - config.knee))
    h_max = torch.where(mask, entropy, torch.full_like(entropy, -torch.inf)).max()
    h_min = torch.where(mask, entropy, torch.full_like(entropy, torch.inf)).min()
    h_norm = (h_max - entropy) / (h_max - h_min).clamp_min(torch.finfo(entropy.dtype).tiny)
    comp = torch.where(advantages > 0, 1.0 + (config.mu_max - 1.0) * h_norm, torch.ones_like(h_norm))
    modulated = torch.where(mask, advantages * stab * comp, torch.zeros_like(advantages))
    metrics = {"dynamo/beta_stab": masked_mean(stab, mask), "dynamo/beta_comp": masked_mean(comp, mask)}
    return AdvantageOutput(modulated, metrics)
