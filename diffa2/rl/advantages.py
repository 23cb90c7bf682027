"""Advantage estimators: a registry with one signature, and the group-relative estimators (GRPO, RLOO, dual-track).

Registered signature (verl's `register_adv_est` with the batch's optional keys gathered in one typed object)::

    fn(inputs: AdvantageInputs, *, config) -> AdvantageOutput

Each estimator reads the fields of `AdvantageInputs` it documents and raises a `ValueError` naming any that are
missing. `AdvantageOutput.advantages (B, T)` is zero outside `response_mask`. Multi-track estimators (TRUST-SQL)
also return their `tracks`: the objective is `Σ_k w_k · agg(policy_loss(A_k, M_k))`, one policy loss per track;
`advantages` is then `Σ_k w_k · A_k · M_k`, which has the same on-policy gradient.
Other estimators are in `turns.py` (HIAN, GTPO), `distillation.py` (OPD, SCOPE) and `dynamo.py` (DynaMO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .groups import Scale, dense_groups, group_sum, normalise_in_groups
from .registry import FunctionRegistry

ADVANTAGE_ESTIMATORS = FunctionRegistry("advantage estimator")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
get_advantage_estimator = ADVANTAGE_ESTIMATORS.get


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read; all optional except `response_mask`. `B` rollouts, `T` positions."""

    response_mask: torch.Tensor  # (B, T) bool, response tokens
    index: torch.Tensor | None = None  # (B,) group (prompt) label of each rollout
    scores: torch.Tensor | None = None  # (B,) outcome reward; NaN = missing (advantage 0)
    valid: torch.Tensor | None = None  # (B,) bool, rollouts that enter group statistics (default: all)
    advantages: torch.Tensor | None = None  # (B, T) advantages to modulate (DynaMO)
    log_prob: torch.Tensor | None = None  # (B, T) current policy, no grad (DynaMO)
    old_log_prob: torch.Tensor | None = None  # (B, T) behaviour policy = the student that sampled (OPD, SCOPE)
    entropy: torch.Tensor | None = None  # (B, T) entropy of the current policy per position (DynaMO)
    teacher_log_prob: torch.Tensor | None = None  # (B, T) teacher log-prob of the sampled tokens (OPD, SCOPE)
    correct: torch.Tensor | None = None  # (B,) bool, rollout judged correct (SCOPE)
    turn_ids: torch.Tensor | None = None  # (B, T) long, turn of each token, −1 outside turns (HIAN, GTPO)
    turn_rewards: torch.Tensor | None = None  # (B, K) per-turn reward (HIAN) or cumulative score after turn (GTPO)
    turn_mask: torch.Tensor | None = None  # (B, K) bool, turns that exist
    track_scores: torch.Tensor | None = None  # (K, B) one outcome reward per track (dual-track)
    track_masks: torch.Tensor | None = None  # (K, B, T) bool, tokens each track trains (dual-track)

    def need(self, estimator: str, *names: str) -> tuple[torch.Tensor, ...]:
        """The named fields, or a `ValueError` listing those that are missing."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"advantage estimator {estimator!r} needs inputs.{', inputs.'.join(missing)}")
        return tuple(getattr(self, name) for name in names)

    def valid_rows(self) -> torch.Tensor:
        """`valid`, or all rollouts when it is not given, `(B,)` bool."""
        if self.valid is None:
            return torch.ones(self.response_mask.shape[0], dtype=torch.bool, device=self.response_mask.device)
        return self.valid.bool()


@dataclass(frozen=True)
class AdvantageTrack:
    """One track of a multi-track objective: its advantages, the tokens it trains and its loss weight."""

    advantages: torch.Tensor  # (B, T), zero outside mask
    mask: torch.Tensor  # (B, T) bool
    weight: float


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: torch.Tensor  # (B, T), zero outside response_mask
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    tracks: tuple[AdvantageTrack, ...] = ()


def broadcast_to_tokens(per_rollout: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` values on every response token, `(B, T)`, zero elsewhere."""
    mask = response_mask.bool()
    values = per_rollout[:, None].expand(mask.shape)
    return torch.where(mask, values, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOAdvantageConfig:
    """GRPO outcome advantage (DeepSeekMath, arXiv:2402.03300); defaults: verl `compute_grpo_outcome_advantage`.

    `scale="batch"` is TRL's `scale_rewards="batch"`; TRL's own defaults are `eps=1e-4`. A group with one rollout
    keeps mean 0 and std 1, as in verl.
    """

    eps: float = 1e-6
    scale: Scale = "group"
    unbiased_std: bool = True


@dataclass(frozen=True)
class DrGRPOAdvantageConfig(GRPOAdvantageConfig):
    """Dr.GRPO (arXiv:2503.20783; verl `norm_adv_by_std_in_grpo=False`): `R − mean(R)`, also d1 / wd1 / SPG."""

    scale: Scale = "none"


@register_advantage_estimator("dr_grpo", DrGRPOAdvantageConfig)
@register_advantage_estimator("grpo", GRPOAdvantageConfig)
def grpo_advantage(inputs: AdvantageInputs, *, config: GRPOAdvantageConfig) -> AdvantageOutput:
    """`Â_i = (R_i − mean_G R) / (std_G R + eps)` on every response token; reads `scores`, `index`, `valid`."""
    scores, index = inputs.need("grpo", "scores", "index")
    advantage = normalise_in_groups(
        scores.float(),
        index,
        inputs.valid_rows(),
        eps=config.eps,
        scale=config.scale,
        unbiased=config.unbiased_std,
        singleton="raw",
    )
    return AdvantageOutput(broadcast_to_tokens(advantage, inputs.response_mask))


# ---------------------------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLOOConfig:
    """RLOO (Ahmadian et al., arXiv:2402.14740; verl `rloo`) has no hyper-parameters."""


@register_advantage_estimator("rloo", RLOOConfig)
def rloo_advantage(inputs: AdvantageInputs, *, config: RLOOConfig) -> AdvantageOutput:
    """Leave-one-out baseline `Â_i = R_i − mean_{j≠i} R_j` within the group; a lone rollout keeps `R_i` (verl).

    Reads `scores`, `index`, `valid` (invalid or NaN scores give 0 and are left out of the baselines).
    """
    scores, index = inputs.need("rloo", "scores", "index")
    valid = inputs.valid_rows() & ~torch.isnan(scores)
    scores = torch.where(valid, scores.float(), torch.zeros_like(scores, dtype=torch.float))
    ids, num_groups = dense_groups(index)
    count = group_sum(valid.float(), ids, num_groups)[ids]
    others = group_sum(scores, ids, num_groups)[ids] - scores
    baseline = torch.where(count > 1, others / (count - 1).clamp_min(1), torch.zeros_like(others))
    advantage = torch.where(valid, scores - baseline, torch.zeros_like(scores))
    return AdvantageOutput(broadcast_to_tokens(advantage, inputs.response_mask))


# ---------------------------------------------------------------------------------------------------------------
# Dual-track masked advantages (TRUST-SQL)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DualTrackConfig:
    """TRUST-SQL Dual-Track GRPO (arXiv:2603.16448); defaults from `stulove123/TRUST-SQL-` (provenance unverified).

    `weights` are per track, in the order of `track_scores`: (schema 0.5, answer 1.0) as in
    `examples/nl2sql/run_qwen3_unified.sh` (`submit_training.sh` uses 0.25 for the schema track).
    """

    weights: tuple[float, ...] = (0.5, 1.0)
    eps: float = 1e-6
    clip: float = 10.0  # advantages are clamped to ±clip
    unbiased_std: bool = False  # population std, as TRUST-SQL


@register_advantage_estimator("dual_track", DualTrackConfig)
def dual_track_advantage(inputs: AdvantageInputs, *, config: DualTrackConfig) -> AdvantageOutput:
    """Separately group-normalised advantages per track, each on its own tokens (TRUST-SQL `loss.py`).

    Reads `track_scores (K, B)`, `track_masks (K, B, T)`, `index`, `valid` (aborted rollouts: left out of the
    statistics, advantage 0). Per track: `clamp((R − mean_valid) / (std_pop_valid + eps), ±clip)`, 0 for a group
    with at most one valid rollout. `advantages` = `Σ_k w_k A_k M_k`, which is also TRUST-SQL's
    `--use_weighted_schema_advantage` mode; the default loss-weighted mode uses `tracks`.
    """
    track_scores, track_masks, index = inputs.need("dual_track", "track_scores", "track_masks", "index")
    if len(config.weights) != track_scores.shape[0]:
        raise ValueError(f"{track_scores.shape[0]} tracks but {len(config.weights)} weights")
    response_mask = inputs.response_mask.bool()
    tracks = []
    for scores, mask, weight in zip(track_scores, track_masks, config.weights, strict=True):
        advantage = normalise_in_groups(
            scores.float(), index, inputs.valid_rows(), eps=config.eps, unbiased=config.unbiased_std
        ).clamp(-config.clip, config.clip)
        track_mask = mask.bool() & response_mask
        tracks.append(AdvantageTrack(broadcast_to_tokens(advantage, track_mask), track_mask, weight))
    combined = torch.stack([track.weight * track.advantages for track in tracks]).sum(0)
    return AdvantageOutput(combined, tracks=tuple(tracks))
