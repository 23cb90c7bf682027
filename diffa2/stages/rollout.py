"""The RL stage's rollouts and losses: G sampled answers per prompt, their rewards, advantages and likelihoods.

Layout: P prompts, G answers each, `R = G·P` rows; row `g·P + p` answers prompt p (the model's
`answers_per_prompt` layout, so each prompt's speech and prefix are computed once for all its answers and draws).

Likelihoods come from a registered estimator of `diffa2.rl` (`Objective.estimator`). The noise draws of a rollout
are sampled once and shared by the rollout (old) policy, the reference and every update of the current policy, so
at the first update the ratio is exactly 1 (as d1 shares one mask seed between the three within an iteration).
The policy losses are per token: `likelihood_view` turns the estimator's per-draw log-probs into per-token values
`(R, T)` whose sum over tokens is the estimate (`elbo`, `d1_one_step`: `T` = the answer canvas, the tokens masked
in some draw), or into one value per answer (`spg`: `T = 1`, SPG's sandwich of its bounds by the advantage's sign).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from diffa2.chat import ChatFormat
from diffa2.diffusion.decoding import DecodeConfig, generate
from diffa2.likelihood import answer_token_logprobs
from diffa2.rl import (
    AdvantageInputs,
    ElboDraws,
    LikelihoodEstimator,
    RegisteredFn,
    SPGEstimator,
    agg_loss,
)
from diffa2.stages.rewards import RewardFn, RLItem, mc_correct


@dataclass(frozen=True)
class PromptBatch:
    """P prompts with their audio: what the model needs to answer them, and what the rewards need."""

    input_features: torch.Tensor  # (P, n_mels, frames)
    feature_lengths: torch.Tensor  # (P,)
    prompt_ids: list[list[int]]
    audio_slots: list[int]
    items: list[RLItem]


@dataclass(frozen=True)
class Objective:
    """The registered pieces of one RL step, resolved and checked by the stage (`rl.resolve_objective`)."""

    estimator: LikelihoodEstimator
    advantage: RegisteredFn
    policy_loss: RegisteredFn
    policy_config: object  # the policy loss's config, with the stage's aggregation mode
    kl: RegisteredFn
    kl_coef: float

    @property
    def loss_agg_mode(self) -> str:
        return self.policy_config.loss_agg_mode


@dataclass(frozen=True)
class Rollout:
    """One rollout batch: G answers per prompt, scored, with their draws and the old and reference values."""

    prompts: PromptBatch
    answers: torch.Tensor  # (R, L) generated ids: the whole canvas (answer, end of turn, EOS padding)
    texts: list[str]
    rewards: torch.Tensor  # (R,) as the reward returned them (NaN/inf included)
    correct: torch.Tensor  # (R,) MMAU correctness of each answer, whatever the reward
    advantages: torch.Tensor  # (R,) 0 for dropped answers
    draws: ElboDraws
    old_values: torch.Tensor  # (R, T) under the policy that sampled
    ref_values: torch.Tensor  # (R, T) under the frozen reference
    mask: torch.Tensor  # (R, T) bool: the values the loss counts (dropped answers excluded)

    @property
    def valid(self) -> torch.Tensor:
        """(R,) bool: answers whose reward is finite."""
        return torch.isfinite(self.rewards)


def rollout_seeds(seed: int, step: int, micro_batch: int, rows: int) -> list[int]:
    """One decoding seed per answer, a function of the run's seed, the optimizer step and the micro-batch alone."""
    return np.random.SeedSequence([seed, step, micro_batch]).generate_state(rows).tolist()


@torch.no_grad()
def sample_group(model, chat: ChatFormat, prompts: PromptBatch, group_size: int, decode: DecodeConfig,
                 seeds: Sequence[int]) -> torch.Tensor:
    """`(G·P, gen_length)` answers: `group_size` per prompt, decoded in one batch in eval mode, one seed per row."""
    was_training = model.training
    model.eval()
    try:
        speech = model.encode_speech(prompts.input_features, prompts.feature_lengths)
        prefix = model.build_prefix(prompts.prompt_ids, prompts.audio_slots, speech).repeat(group_size)
        return generate(model, prefix, chat.ids, decode, seed=list(seeds)).token_ids
    finally:
        model.train(was_training)


def likelihood_view(estimator: LikelihoodEstimator, token_logp: torch.Tensor, draws: ElboDraws,
                    advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values `(R, T)` and the mask of those that carry signal, from `token_logp (n, R, L)`."""
    if isinstance(estimator, SPGEstimator):
        values = estimator.sandwich(token_logp, draws, advantages)[:, None]
        return values, torch.ones_like(values, dtype=torch.bool)
    masked = torch.where(draws.masks, token_logp, torch.zeros_like(token_logp))
    return (draws.weights[..., None].to(masked.dtype) * masked).mean(0), draws.masks.any(0)


def reward_value(reward: RewardFn, item: RLItem, text: str) -> float:
    """`reward(item, text)` as a float; a value that is not a real number is an error naming the reward and the value
    (a NaN or inf is a number: the caller drops it and counts it)."""
    value = reward(item, text)
    if not isinstance(value, numbers.Real) and not (isinstance(value, torch.Tensor) and value.numel() == 1):
        name = getattr(reward, "__name__", repr(reward))
        raise ValueError(f"reward {name!r} returned {value!r} ({type(value).__name__}) for the answer {text!r}; "
                        f"a reward must return a real number")
    return float(value)


def score(reward: RewardFn, items: Sequence[RLItem], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and MMAU correctness `(R,)` of the answers; row `g·P + p` answers `items[p]`."""
    rows = [(items[r % len(items)], text) for r, text in enumerate(texts)]
    rewards = torch.tensor([reward_value(reward, item, text) for item, text in rows], dtype=torch.float)
    correct = torch.tensor([mc_correct(item, text) for item, text in rows], dtype=torch.float)
    return rewards, correct


def group_advantages(objective: Objective, rewards: torch.Tensor, prompts: int) -> torch.Tensor:
    """`(R,)` advantages by the registered estimator, groups = prompts; dropped (non-finite) rewards get 0."""
    valid = torch.isfinite(rewards)
    index = torch.arange(prompts).repeat(len(rewards) // prompts)
    inputs = AdvantageInputs(response_mask=torch.ones(len(rewards), 1, dtype=torch.bool), index=index,
                             scores=torch.where(valid, rewards, torch.zeros_like(rewards)), valid=valid)
    advantages = objective.advantage(inputs).advantages[:, 0]
    return torch.where(valid, advantages, torch.zeros_like(advantages))


@torch.no_grad()
def make_rollout(policy, reference, chat: ChatFormat, prompts: PromptBatch, objective: Objective, *,
                 reward: RewardFn, group_size: int, decode: DecodeConfig, seeds: Sequence[int],
                 generator: torch.Generator) -> Rollout:
    """Sample, score and evaluate one rollout batch; `policy` is the unwrapped model, `generator` seeds the draws."""
    answers = sample_group(policy, chat, prompts, group_size, decode, seeds)
    texts = [chat.decode_answer(row.tolist()) for row in answers]
    rewards, correct = score(reward, prompts.items, texts)
    device = answers.device
    advantages = group_advantages(objective, rewards, len(prompts.items)).to(device)
    draws = objective.estimator.sample(torch.ones_like(answers, dtype=torch.bool), generator=generator)
    was_training = policy.training
    policy.eval()
    try:
        old_logp = answer_token_logprobs(policy, prompts, answers, draws.masks, chat.ids.mask)
    finally:
        policy.train(was_training)
    old, mask = likelihood_view(objective.estimator, old_logp, draws, advantages)
    ref_logp = answer_token_logprobs(reference, prompts, answers, draws.masks, chat.ids.mask)
    ref, _ = likelihood_view(objective.estimator, ref_logp, draws, advantages)
    mask = mask & torch.isfinite(rewards).to(device)[:, None]
    return Rollout(prompts, answers, texts, rewards, correct, advantages, draws, old, ref, mask)


def rollout_loss(model, rollout: Rollout, objective: Objective, mask_id: int) -> tuple[torch.Tensor, dict]:
    """The loss of one update on `rollout`: aggregated policy loss + kl_coef x aggregated KL, and its metrics."""
    token_logp = answer_token_logprobs(model, rollout.prompts, rollout.answers, rollout.draws.masks, mask_id)
    values, _ = likelihood_view(objective.estimator, token_logp, rollout.draws, rollout.advantages)
    mask = rollout.mask
    advantages = torch.where(mask, rollout.advantages[:, None].expand_as(mask), torch.zeros_like(values))
    loss_mat, metrics = objective.policy_loss(values, rollout.old_values, advantages, mask,
                                              config=objective.policy_config)
    policy_loss = agg_loss(loss_mat, mask, objective.loss_agg_mode)
    kl = agg_loss(objective.kl(values, rollout.ref_values), mask, objective.loss_agg_mode)
    loss = policy_loss + objective.kl_coef * kl if objective.kl_coef else policy_loss
    metrics = {**metrics, "actor/pg_loss": policy_loss.detach(), "actor/kl": kl.detach()}
    return loss, metrics


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Mean reward and accuracy of the rollout's kept answers, and how many were dropped."""
    valid = rollout.valid
    kept = rollout.rewards[valid]
    return {
        "reward/mean": kept.mean().item() if len(kept) else math.nan,
        "rollout/accuracy": rollout.correct[valid].mean().item() if len(kept) else math.nan,
        "rollout/dropped": float((~valid).sum()),
    }


def with_agg_mode(config: object, mode: str | None) -> object:
    """The policy loss's config with `loss_agg_mode` replaced (None: the loss's own mode)."""
    return config if mode is None else replace(config, loss_agg_mode=mode)
