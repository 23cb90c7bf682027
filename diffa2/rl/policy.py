"""Token-level policy-gradient surrogates: per-token loss matrix plus metrics; aggregation is separate.

Registered signature (verl's `PolicyLossFn` without the reduction)::

    fn(log_prob (B, T), old_log_prob (B, T), advantages (B, T), response_mask (B, T), *, config,
       rollout_is_weights (B, T) | None = None) -> (loss_mat (B, T), metrics)

`loss_mat` is zero outside `response_mask` and is multiplied by `rollout_is_weights` (train/inference mismatch
correction) when given; reduce it with `aggregation.agg_loss(loss_mat, response_mask, config.loss_agg_mode, ...)`.
Each config's `loss_agg_mode` is the mode its reference uses. `metrics` are detached scalars, local masked means,
with verl's keys (`actor/pg_clipfrac`, `actor/ppo_kl`, `actor/pg_clipfrac_lower`).

All losses are minimised. With the token ratio `r = exp(clamp(logp − logp_old, −20, 20))` (verl's clamp), each
surrogate's gradient is `∇loss = −W(r, A) · A · ∇logp`; the weight W per region is in each docstring and in
`README.md` (table from `docs/objectives.md` §2.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .aggregation import masked_mean
from .registry import FunctionRegistry

POLICY_LOSSES = FunctionRegistry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get

LOG_RATIO_CLAMP = 20.0  # verl clamps logp − logp_old to ±20 before exponentiating

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
Metrics = dict[str, torch.Tensor]


def _log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    return (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _finish(loss: torch.Tensor, response_mask: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> torch.Tensor:
    if rollout_is_weights is not None:
        loss = loss * rollout_is_weights
    return torch.where(response_mask.bool(), loss, torch.zeros_like(loss))


def _frac(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(condition.float(), mask).detach()


def _ppo_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(-log_ratio, mask).detach()


def _gradient_preserving(bound: float | torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Forward value `bound`, gradient `bound · ∇logp` (GPPO's `b · r / sg(r)`)."""
    return bound * ratio / ratio.detach()


# ---------------------------------------------------------------------------------------------------------------
# PPO clip with asymmetric bounds and dual-clip; GRPO, Dr.GRPO and DAPO presets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOClipConfig:
    """PPO-clip hyper-parameters; defaults from verl `actor.yaml` / `ActorConfig` (`"vanilla"`)."""

    clip_ratio_low: float = 0.2  # ε_low: lower bound 1 − ε_low
    clip_ratio_high: float = 0.2  # ε_high: upper bound 1 + ε_high
    clip_ratio_c: float | None = 3.0  # dual-clip c > 1 for A < 0 (Ye et al., arXiv:1912.09729); None disables
    loss_agg_mode: AggMode = "token-mean"

    def __post_init__(self) -> None:
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")


@dataclass(frozen=True)
class GRPOLossConfig(PPOClipConfig):
    """GRPO (DeepSeekMath, arXiv:2402.03300): symmetric ε = 0.2, no dual-clip, per-sequence token mean.

    The paper also adds β·k3 KL to the reference (β = 0.04): compute it with `kl.get_kl_estimator("k3")`.
    """

    clip_ratio_c: float | None = None
    loss_agg_mode: AggMode = "seq-mean-token-mean"


@dataclass(frozen=True)
class DrGRPOLossConfig(PPOClipConfig):
    """Dr.GRPO (arXiv:2503.20783): GRPO's clip, constant normaliser (verl `seq-mean-token-sum-norm`), no KL."""

    clip_ratio_c: float | None = None
    loss_agg_mode: AggMode = "seq-mean-token-sum-norm"


@dataclass(frozen=True)
class DAPOLossConfig(PPOClipConfig):
    """DAPO (arXiv:2503.14476): clip-higher ε_low = 0.2, ε_high = 0.28, token-level mean, no KL."""

    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = None


@register_policy_loss("dapo", DAPOLossConfig)
@register_policy_loss("dr_grpo", DrGRPOLossConfig)
@register_policy_loss("grpo", GRPOLossConfig)
@register_policy_loss("vanilla", PPOClipConfig)
def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: PPOClipConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate `max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))`, then `min(·, −c·A)` where A < 0.

    Schulman et al., arXiv:1707.06347; dual-clip from Ye et al., arXiv:1912.09729; verl `compute_policy_loss_vanilla`.
    W = r inside the trust region and on the pessimistic side (A>0, r<1−ε_low; A<0, r>1+ε_high); W = 0 for
    A>0, r>1+ε_high and A<0, r<1−ε_low; with dual-clip also W = 0 for A<0, r>c.
    """
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(loss, dtype=torch.bool)
    if config.clip_ratio_c is not None:
        floor = -advantages * config.clip_ratio_c
        dual_clipped = (advantages < 0) & (loss > floor)
        loss = torch.where(advantages < 0, torch.minimum(loss, floor), loss)
    metrics = {
        "actor/pg_clipfrac": _frac(clipped > unclipped, response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
        "actor/pg_clipfrac_lower": _frac(dual_clipped, response_mask),
    }
    return _finish(loss, response_mask, rollout_is_weights), metrics


# ---------------------------------------------------------------------------------------------------------------
# GSPO: sequence-level ratio
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GSPOConfig:
    """GSPO (arXiv:2507.18071 §5: clipping ranges 3e-4 / 4e-4); verl forces `seq-mean-token-mean`."""

    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    loss_agg_mode: AggMode = "seq-mean-token-mean"


@register_policy_loss("gspo", GSPOConfig)
def gspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: GSPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clip on the length-normalised sequence ratio `s_i = exp(mean_t (logp − logp_old))` (verl `gspo`).

    Token surrogate ratio `exp(sg(log s_i) + logp − sg(logp))` (log clamped at max 10), so W = s_i on every
    token of sequence i when unclipped and 0 when clipped (A>0, s>1+ε_high or A<0, s<1−ε_low).
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, log_prob - old_log_prob, torch.zeros_like(log_prob))
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    token_log_ratio = (seq_log_ratio.detach() + log_prob - log_prob.detach()).clamp(max=10.0)
    ratio = token_log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    metrics = {
        "actor/pg_clipfrac": _frac(clipped > unclipped, response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
    }
    return _finish(torch.maximum(unclipped, clipped), response_mask, rollout_is_weights), metrics


# ---------------------------------------------------------------------------------------------------------------
# CISPO: clipped, detached IS weight on REINFORCE
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CISPOConfig:
    """CISPO (MiniMax-M1, arXiv:2506.13585); defaults: verl `"cispo"` (both sides, 1 ∓ ε).

    TRL's `loss_type="cispo"` is `clip_ratio_low=None, clip_ratio_high=5.0, upper_is_absolute=True`
    (ScaleRL, arXiv:2510.13786), with `loss_agg_mode="token-mean"` over the global batch.
    """

    clip_ratio_low: float | None = 0.2  # lower bound 1 − ε_low; None: no lower bound (the paper in practice)
    clip_ratio_high: float = 0.2  # upper bound 1 + ε_high, or ε_high itself when upper_is_absolute
    upper_is_absolute: bool = False
    loss_agg_mode: AggMode = "token-mean"


@register_policy_loss("cispo", CISPOConfig)
def cispo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: CISPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`−sg(clip(r, lower, upper)) · A · logp`: W = clip(r) for either sign of A, so every token keeps a gradient.

    The loss value contains `logp` itself; only its gradient is meaningful.
    """
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    upper = config.clip_ratio_high if config.upper_is_absolute else 1.0 + config.clip_ratio_high
    lower = None if config.clip_ratio_low is None else 1.0 - config.clip_ratio_low
    weight = ratio.clamp(min=lower, max=upper).detach()
    metrics = {
        "actor/pg_clipfrac": _frac(weight != ratio.detach(), response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
    }
    return _finish(-weight * advantages * log_prob, response_mask, rollout_is_weights), metrics


# ---------------------------------------------------------------------------------------------------------------
# SAPO: sigmoid soft gate
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAPOConfig:
    """SAPO (Qwen, arXiv:2511.20347); defaults from verl `actor.yaml` (= TRL `sapo_temperature_pos/neg`)."""

    tau_pos: float = 1.0  # gate temperature where A > 0
    tau_neg: float = 1.05  # gate temperature where A <= 0
    loss_agg_mode: AggMode = "seq-mean-token-mean"


@register_policy_loss("sapo", SAPOConfig)
def sapo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: SAPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`−f_τ(r) · A` with `f_τ(r) = (4/τ) σ(τ(r − 1))`: W = r · 4σ(1−σ) = r · sech²(τ(r−1)/2), 1 at r = 1."""
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    tau = torch.full_like(ratio, config.tau_neg).masked_fill(advantages > 0, config.tau_pos)
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    return _finish(-gate * advantages, response_mask, rollout_is_weights), {
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask)
    }


# ---------------------------------------------------------------------------------------------------------------
# GPPO / CE-GPPO: gradient-preserving clip
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPPOConfig:
    """GPPO (Klear-Reasoner, arXiv:2508.07629); Klear recipes: ε_low 0.2, ε_high 0.28, token-mean, dual-clip c=3.

    `beta1` / `beta2` scale the clipped-region gradients (CE-GPPO); 1 gives GPPO.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = 3.0
    beta1: float = 1.0  # weight of the low region (r < 1−ε_low, A < 0)
    beta2: float = 1.0  # weight of the high region (r > 1+ε_high, A > 0)
    loss_agg_mode: AggMode = "token-mean"

    def __post_init__(self) -> None:
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")


@dataclass(frozen=True)
class CEGPPOConfig(GPPOConfig):
    """CE-GPPO (arXiv:2509.20712) `compute_gppo_loss_general_beta` defaults β1 = 0.25, β2 = 1, ε = 0.2.

    Released scripts use β1 = 0.5 (1.5B) or 0.75 (7B) with β2 = 1.
    """

    clip_ratio_high: float = 0.2
    beta1: float = 0.25


@register_policy_loss("ce_gppo", CEGPPOConfig)
@register_policy_loss("gppo", GPPOConfig)
def gppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: GPPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's pessimistic clip whose clipped bounds keep a gradient: `b · r / sg(r)` (value b, gradient b·∇logp).

    W = β1(1−ε_low) for r < 1−ε_low, A < 0; W = β2(1+ε_high) for r > 1+ε_high, A > 0; W = r elsewhere, and the
    dual-clip `min(·, −c·A)` for A < 0 sets W = 0 for r > c.
    """
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    low = (ratio < 1.0 - config.clip_ratio_low) & (advantages < 0)
    high = (ratio > 1.0 + config.clip_ratio_high) & (advantages > 0)
    surrogate = torch.where(low, _gradient_preserving(config.beta1 * (1.0 - config.clip_ratio_low), ratio), ratio)
    surrogate = torch.where(high, _gradient_preserving(config.beta2 * (1.0 + config.clip_ratio_high), ratio), surrogate)
    loss = -advantages * surrogate
    dual_clipped = torch.zeros_like(low)
    if config.clip_ratio_c is not None:
        floor = -advantages * config.clip_ratio_c
        dual_clipped = (advantages < 0) & (loss > floor)
        loss = torch.where(advantages < 0, torch.minimum(loss, floor), loss)
    metrics = {
        "actor/pg_clipfrac": _frac(low | high, response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
        "actor/pg_clipfrac_lower": _frac(dual_clipped, response_mask),
    }
    return _finish(loss, response_mask, rollout_is_weights), metrics


# ---------------------------------------------------------------------------------------------------------------
# DGPO: decoupled decay in the two harmful regions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DGPOConfig:
    """DGPO (arXiv:2603.14389); defaults from DGPO-RL `actor.yaml` / README (n = m = 2 suggested for 1.5B)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    n: float = 1.0  # decay exponent in LN (r < 1−ε_low, A < 0); −1 gives GPPO's constant weight
    m: float = 2.0  # decay root in HP (r > 1+ε_high, A > 0); 1 gives GPPO's constant weight
    loss_agg_mode: AggMode = "token-mean"

    def __post_init__(self) -> None:
        if self.n < -1.0 or self.m < 1.0:
            raise ValueError(f"DGPO needs n >= -1 and m >= 1, got n={self.n}, m={self.m}")


@register_policy_loss("dgpo", DGPOConfig)
def dgpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: DGPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`−A · r'` with r' replaced in the two harmful regions (DGPO-RL `compute_policy_loss`, ratio_mode `dgpo`).

    With lb = 1−ε_low, ub = 1+ε_high: LN (r < lb, A < 0): r' = exp(lr + n·sg(lr)) / lbⁿ, so W = r^(n+1)/lbⁿ
    (= lb at the boundary, → 0 as r → 0); HP (r > ub, A > 0): r' = exp(lr − sg(lr)/m) · ub^(1/m), so
    W = ub^(1/m) · r^((m−1)/m) (= ub at the boundary, sub-linear growth); elsewhere W = r. No dual-clip.

    Reductions: m = 1 gives GPPO's constant ub on the high side. On the low side GPPO's constant lb is n = −1;
    n = 0 gives W = r there (the unclipped policy gradient), not GPPO.
    """
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    lower, upper = 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high
    low_negative = (ratio < lower) & (advantages < 0)
    high_positive = (ratio > upper) & (advantages > 0)
    decayed_low = torch.exp(log_ratio + config.n * log_ratio.detach()) / lower**config.n
    decayed_high = torch.exp(log_ratio - log_ratio.detach() / config.m) * upper ** (1.0 / config.m)
    surrogate = torch.where(low_negative, decayed_low, torch.where(high_positive, decayed_high, ratio))
    metrics = {
        "actor/pg_clipfrac": _frac(low_negative | high_positive, response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
    }
    return _finish(-advantages * surrogate, response_mask, rollout_is_weights), metrics


# ---------------------------------------------------------------------------------------------------------------
# MASPO: mass-adaptive Gaussian gate
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MASPOConfig:
    """MASPO (arXiv:2602.17550); defaults from MASPO-RL `actor.yaml` / README (α = 0.5 suggested for 1.5B)."""

    sigma_base: float = 1.0  # base gate width σ_base
    alpha: float = 0.3  # mass-adaptive exponent: width σ_base · π_old^(−α)
    sigma_high: float = 10.0  # cap on the mass-adaptive width
    a_low: float = 0.1  # clamp of the advantage-dependent width factor
    a_high: float = 10.0
    beta_pos: float = 0.03  # widening per unit of positive advantage
    beta_neg: float = 0.03  # narrowing per unit of negative advantage
    loss_agg_mode: AggMode = "token-mean"


@register_policy_loss("maspo", MASPOConfig)
def maspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: MASPOConfig,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`−A · g · r` with a detached Gaussian gate g on the update-aggressive side only (MASPO-RL, ratio_mode maspo).

    s = clamp(σ_base · π_old^(−α), σ_base, σ_high); σ+ = s · clamp(1 + β_pos·A, a_low, a_high);
    σ− = s · clamp(1 / (1 − β_neg·A), a_low, a_high); g(σ) = exp(−(sg(r) − 1)² / (2σ²)).
    W = g(σ+)·r for A > 0, r > 1; W = g(σ−)·r for A < 0, r < 1; W = r elsewhere.
    """
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = log_ratio.exp()
    width = (config.sigma_base * torch.exp(-config.alpha * old_log_prob)).clamp(config.sigma_base, config.sigma_high)
    width_pos = width * (1.0 + config.beta_pos * advantages).clamp(config.a_low, config.a_high)
    width_neg = width * (1.0 / (1.0 - config.beta_neg * advantages)).clamp(config.a_low, config.a_high)
    distance = (ratio.detach() - 1.0).square()
    gate_pos = torch.exp(-distance / (2.0 * width_pos.square()))
    gate_neg = torch.exp(-distance / (2.0 * width_neg.square()))
    damp_pos = (advantages > 0) & (ratio > 1.0)
    damp_neg = (advantages < 0) & (ratio < 1.0)
    gate = torch.where(damp_pos, gate_pos, torch.where(damp_neg, gate_neg, torch.ones_like(ratio))).detach()
    metrics = {
        "actor/pg_clipfrac": _frac(damp_pos | damp_neg, response_mask),
        "actor/ppo_kl": _ppo_kl(log_ratio, response_mask),
    }
    return _finish(-advantages * gate * ratio, response_mask, rollout_is_weights), metrics
