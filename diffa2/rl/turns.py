"""Multi-turn advantage estimators: HIAN (DuCA) and GTPO (TRIP-Bench).

Both are **reconstructed from abstracts** (`docs/objectives.md` §5.1, §5.2): the papers' equations were not available,
so these implement the documented library interface, not a verified formula. Turns are given per rollout as
`turn_rewards (B, K)` with `turn_mask (B, K)` (the existing turns come first), and tokens are tied to turns by
`turn_ids (B, T)` (−1 outside any turn). Turn statistics are pooled by `scope`: all turns of the group
(`group_all_turns`), the same turn index across the group (`per_turn_index`), or the whole batch (`batch`).
A pool with one entry gives advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .advantages import AdvantageInputs, AdvantageOutput, broadcast_to_tokens, register_advantage_estimator
from .groups import dense_groups, normalise_in_groups
from .registry import reconstructed

TurnScope = Literal["group_all_turns", "per_turn_index", "batch"]


def normalise_turns(
    values: torch.Tensor, turn_mask: torch.Tensor, index: torch.Tensor, scope: TurnScope, *, eps: float, unbiased: bool
) -> torch.Tensor:
    """Z-score `values (B, K)` over the existing turns of each pool (see module docstring); `(B, K)`."""
    batch, turns = values.shape
    ids = dense_groups(index)[0][:, None].expand(batch, turns)
    if scope == "per_turn_index":
        pools = ids * turns + torch.arange(turns, device=values.device)
    elif scope == "group_all_turns":
        pools = ids
    elif scope == "batch":
        pools = torch.zeros_like(ids)
    else:
        raise ValueError(f"unknown turn scope {scope!r}; valid: batch, group_all_turns, per_turn_index")
    flat = normalise_in_groups(
        values.reshape(-1).float(), pools.reshape(-1), turn_mask.reshape(-1), eps=eps, unbiased=unbiased
    )
    return flat.reshape(batch, turns)


def turns_to_tokens(per_turn: torch.Tensor, turn_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Spread `per_turn (B, K)` onto the tokens of each turn, `(B, T)`; 0 outside turns and the response."""
    values = per_turn.gather(1, turn_ids.long().clamp_min(0))
    inside = (turn_ids >= 0) & response_mask.bool()
    return torch.where(inside, values, torch.zeros_like(values))


@dataclass(frozen=True)
class HIANConfig:
    """DuCA / HIAN (arXiv:2603.01481): λ_s = λ_t = 1 (unverified)."""

    session_weight: float = 1.0  # λ_s
    turn_weight: float = 1.0  # λ_t
    eps: float = 1e-6
    scope: TurnScope = "group_all_turns"
    unbiased_std: bool = True


@register_advantage_estimator("hian", HIANConfig, note=reconstructed("arXiv:2603.01481"))
def hian_advantage(inputs: AdvantageInputs, *, config: HIANConfig) -> AdvantageOutput:
    """Horizon-Independent Advantage Normalisation: session and turn rewards normalised apart, then fused.

    Reconstructed from the abstract: `A = λ_s · z_G(R_session) + λ_t · z_scope(r_turn)`, the session part on every
    response token, the turn part on the tokens of its turn. Reads `scores` (session reward), `index`, `valid`,
    `turn_rewards`, `turn_mask`, `turn_ids`.
    """
    scores, index, turn_rewards, turn_mask, turn_ids = inputs.need(
        "hian", "scores", "index", "turn_rewards", "turn_mask", "turn_ids"
    )
    session = normalise_in_groups(
        scores.float(), index, inputs.valid_rows(), eps=config.eps, unbiased=config.unbiased_std
    )
    turn = normalise_turns(turn_rewards, turn_mask, index, config.scope, eps=config.eps, unbiased=config.unbiased_std)
    session_tokens = broadcast_to_tokens(session, inputs.response_mask)
    turn_tokens = turns_to_tokens(turn, turn_ids, inputs.response_mask)
    return AdvantageOutput(config.session_weight * session_tokens + config.turn_weight * turn_tokens)


@dataclass(frozen=True)
class GTPOConfig:
    """GTPO of TRIP-Bench (arXiv:2602.01675), not the two other "GTPO"s (arXiv:2508.03772, arXiv:2511.14846)."""

    eps: float = 1e-6
    scope: TurnScope = "per_turn_index"
    unbiased_std: bool = True


@register_advantage_estimator("gtpo", GTPOConfig, note=reconstructed("arXiv:2602.01675"))
def gtpo_advantage(inputs: AdvantageInputs, *, config: GTPOConfig) -> AdvantageOutput:
    """Reward differencing plus normalisation: each turn is credited with the improvement it made.

    Reconstructed from the abstract: with `s_{i,k}` the cumulative score after turn k (`turn_rewards`) and
    `s_{i,0} = 0`, `d_{i,k} = s_{i,k} − s_{i,k−1}`, z-scored over `scope`, on the tokens of turn k.
    Reads `turn_rewards`, `turn_mask`, `turn_ids`, `index`.
    """
    cumulative, turn_mask, turn_ids, index = inputs.need("gtpo", "turn_rewards", "turn_mask", "turn_ids", "index")
    cumulative = cumulative.float()
    differences = cumulative - torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    turn = normalise_turns(differences, turn_mask, index, config.scope, eps=config.eps, unbiased=config.unbiased_std)
    return AdvantageOutput(turns_to_tokens(turn, turn_ids, inputs.response_mask))
