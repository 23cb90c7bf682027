"""Pairwise preference losses on sequence log-likelihoods (or their estimates): DPO, IPO, SimPO, VRPO.

Registered signature::

    fn(policy_chosen (P,), policy_rejected (P,), ref_chosen (P,) | None, ref_rejected (P,) | None, *, config,
       chosen_lengths (P,) | None = None, rejected_lengths (P,) | None = None) -> (losses (P,), metrics)

The four scores are sequence log-likelihoods summed over completion tokens: exact for an autoregressive model,
ELBO estimates for a masked diffusion model (VRPO; see `elbo.py`). `losses` are per pair, to be averaged by the
caller; `metrics` are the implicit rewards (TRL's keys `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`), detached batch means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import FunctionRegistry

PREFERENCE_LOSSES = FunctionRegistry("preference loss")
register_preference_loss = PREFERENCE_LOSSES.register
get_preference_loss = PREFERENCE_LOSSES.get

Metrics = dict[str, torch.Tensor]


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """Mean implicit rewards `(P,)`, their margin, and the preference accuracy (chosen reward > rejected)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`−(1−ε) log σ(x) − ε log σ(−x)` (conservative DPO; TRL `loss_type="sigmoid"`)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _needed(value: torch.Tensor | None, what: str, loss: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{loss} needs {what}")
    return value


@dataclass(frozen=True)
class DPOConfig:
    """DPO (Rafailov et al., arXiv:2305.18290); defaults from TRL `DPOConfig` (`loss_type="sigmoid"`)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # ε of conservative DPO; 0 is plain DPO


@dataclass(frozen=True)
class VRPOConfig(DPOConfig):
    """VRPO (LLaDA 1.5, arXiv:2505.19223): DPO on ELBO estimates; β = 0.2 as given in this project's issue 5.

    The estimates come from `elbo.paired_elbo` with the variance reductions (budget, n_yt = 1, antithetic draws).
    """

    beta: float = 0.2


@register_preference_loss("vrpo", VRPOConfig)
@register_preference_loss("dpo", DPOConfig)
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    config: DPOConfig,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`−log σ(β h)`, `h = (π_c − ref_c) − (π_r − ref_r)`; rewards `β(π − ref)`. Lengths are not used."""
    chosen_rewards = config.beta * (policy_chosen - _needed(ref_chosen, "ref_chosen", "dpo"))
    rejected_rewards = config.beta * (policy_rejected - _needed(ref_rejected, "ref_rejected", "dpo"))
    losses = _sigmoid_loss(chosen_rewards - rejected_rewards, config.label_smoothing)
    return losses, preference_metrics(chosen_rewards, rejected_rewards)


@dataclass(frozen=True)
class IPOConfig:
    """IPO (Azar et al., arXiv:2310.12036); TRL `DPOConfig(loss_type="ipo")`, τ = `beta` = 0.1."""

    beta: float = 0.1  # τ: the target margin is 1/(2τ)


@register_preference_loss("ipo", IPOConfig)
def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    config: IPOConfig,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`(h̄ − 1/(2τ))²` with `h̄` from per-token averaged log-ratios (as TRL, confirmed with the IPO authors)."""
    chosen = (policy_chosen - _needed(ref_chosen, "ref_chosen", "ipo")) / _needed(
        chosen_lengths, "chosen_lengths", "ipo"
    )
    rejected = (policy_rejected - _needed(ref_rejected, "ref_rejected", "ipo")) / _needed(
        rejected_lengths, "rejected_lengths", "ipo"
    )
    losses = (chosen - rejected - 1.0 / (2.0 * config.beta)).square()
    return losses, preference_metrics(config.beta * chosen, config.beta * rejected)


@dataclass(frozen=True)
class SimPOConfig:
    """SimPO (Meng et al., arXiv:2405.14734); defaults from TRL `CPOConfig(loss_type="simpo")`.

    The paper tunes a much larger β (order 2) with γ/β around 0.5; do not read TRL's β = 0.1 as the paper's.
    """

    beta: float = 0.1
    gamma: float = 0.5  # TRL `simpo_gamma`: target reward margin
    label_smoothing: float = 0.0


@register_preference_loss("simpo", SimPOConfig)
def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    config: SimPOConfig,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Reference-free `−log σ(β(avg_c − avg_r) − γ)` on length-normalised log-likelihoods; rewards `β·avg`.

    As TRL: logits `avg_c − avg_r − γ/β`, loss `−log σ(β · logits)` with optional label smoothing; the reference
    scores are ignored.
    """
    chosen_avg = policy_chosen / _needed(chosen_lengths, "chosen_lengths", "simpo")
    rejected_avg = policy_rejected / _needed(rejected_lengths, "rejected_lengths", "simpo")
    logits = chosen_avg - rejected_avg - config.gamma / config.beta
    losses = _sigmoid_loss(config.beta * logits, config.label_smoothing)
    return losses, preference_metrics(config.beta * chosen_avg, config.beta * rejected_avg)
