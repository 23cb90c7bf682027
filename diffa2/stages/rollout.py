"""The RL stage's rollouts and losses: G sampled answers per prompt, their rewards, advantages and likelihoods.

Layout: P prompts, G answers each, `R = G·P` rows; row `g·P + p` answers prompt p (the model's
`answers_per_prompt` layout, so each prompt's speech and prefix are computed once for all its answers and draws).
With DynaMO's allocation (`RolloutAllocator`) the prompts get different numbers of answers: the rows are then
prompt-major, each row with its own copy of its prompt (`PromptBatch.rows`). `Rollout.index` says which prompt each
row answers, in both layouts.

Advantages: per answer from the rewards within each prompt's group (GRPO, Dr.GRPO, RLOO; DynaMO's base is GRPO's,
modulated per token at every update by `Objective.modulation`), or per token from a teacher's likelihood of the
student's answers (OPD, SCOPE: `distillation_advantages`, the teacher scored with the same draws).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from diffa2.chat import ChatFormat, Question
from diffa2.data.collate import clip_counts
from diffa2.diffusion.decoding import DecodeConfig, generate
from diffa2.likelihood import answer_token_logprobs, answer_token_logprobs_and_entropy
from diffa2.rl import (
    AdvantageInputs,
    ElboDraws,
    LikelihoodEstimator,
    RegisteredFn,
    SPGEstimator,
    agg_loss,
    dynamo_allocate_rollouts,
    dynamo_priority,
)
from diffa2.stages.rewards import RewardFn, RLItem, mc_correct

DISTILLATION = ("opd", "scope")  # advantage estimators that read a teacher's likelihood of the student's answers
TURN_LEVEL = ("hian", "gtpo")  # advantage estimators of multi-turn sessions (`turn_rollout.py`)


@dataclass(frozen=True)
class PromptBatch:
    """P prompts with their audio: what the model needs to answer them, and what the rewards need."""

    input_features: torch.Tensor  # (clips, n_mels, frames): one row per clip, prompts' clips in order
    feature_lengths: torch.Tensor  # (clips,)
    prompt_ids: list[list[int]]
    audio_slots: list[int | list[int]]  # a prompt's slot, or one per clip (a conversation)
    items: list[RLItem]
    keys: list[str] | None = None  # identifies each prompt across steps (DynaMO's history); None: not tracked
    questions: list[Question] | None = None  # what each prompt asks (a conversation: its turns; `turn_rollout.py`)

    def rows(self, index: torch.Tensor) -> PromptBatch:
        """The prompts of `index (R,)`, one per row: a prompt repeated once for each of its answers, with its clips."""
        rows = index.tolist()
        starts = np.cumsum([0, *clip_counts(self.audio_slots)]).tolist()
        clips = torch.tensor([c for r in rows for c in range(starts[r], starts[r + 1])], dtype=torch.long)
        return PromptBatch(self.input_features[clips.to(self.input_features.device)],
                           self.feature_lengths[clips.to(self.feature_lengths.device)],
                           [self.prompt_ids[r] for r in rows], [self.audio_slots[r] for r in rows],
                           [self.items[r] for r in rows], None if self.keys is None else [self.keys[r] for r in rows],
                           None if self.questions is None else [self.questions[r] for r in rows])


@dataclass(frozen=True)
class Objective:
    """The registered pieces of one RL step, resolved and checked by the stage (`rl.resolve_objective`)."""

    estimator: LikelihoodEstimator
    advantage: RegisteredFn
    policy_loss: RegisteredFn
    policy_config: object  # the policy loss's config, with the stage's aggregation mode
    kl: RegisteredFn
    kl_coef: float
    modulation: RegisteredFn | None = None  # DynaMO: the token-level modulation of the advantages at each update

    @property
    def loss_agg_mode(self) -> str:
        return self.policy_config.loss_agg_mode


@dataclass(frozen=True)
class Rollout:
    """One rollout batch: G answers per prompt, scored, with their draws and the old and reference values."""

    prompts: PromptBatch  # the prompts of the forward: P (row g·P + p answers prompt p) or R (one per row)
    index: torch.Tensor  # (R,) long: the prompt each row answers, its group for the advantages
    answers: torch.Tensor  # (R, L) generated ids: the whole canvas (answer, end of turn, EOS padding)
    texts: list[str]
    rewards: torch.Tensor  # (R,) as the reward returned them (NaN/inf included)
    correct: torch.Tensor  # (R,) MMAU correctness of each answer, whatever the reward
    advantages: torch.Tensor  # (R,) 0 for dropped answers (OPD, SCOPE: the mean of the answer's token advantages)
    draws: ElboDraws
    old_values: torch.Tensor  # (R, T) under the policy that sampled
    ref_values: torch.Tensor  # (R, T) under the frozen reference
    mask: torch.Tensor  # (R, T) bool: the values the loss counts (dropped answers excluded)
    token_advantages: torch.Tensor | None = None  # (R, T) OPD, SCOPE; None: `advantages` on every token
    metrics: dict[str, float] = field(default_factory=dict)  # the advantage estimator's (OPD, SCOPE)

    @property
    def valid(self) -> torch.Tensor:
        """(R,) bool: answers whose reward is finite."""
        return torch.isfinite(self.rewards)


@dataclass(frozen=True)
class RolloutSeeds:
    """The noise of one rollout batch, a function of the run's seed, the optimizer step and the micro-batch.

    Each answer's decoding seed comes from its prompt's number in the step's global batch (`first_prompt`, this
    process's first, plus its place here) and its number within the prompt's group, so an answer's noise is the
    same however the batch is laid out: on one process or several, in groups or allocated by DynaMO.
    """

    seed: int
    step: int
    micro_batch: int
    first_prompt: int = 0

    def answers(self, prompts: Sequence[int], numbers: Sequence[int]) -> list[int]:
        """One decoding seed per answer: number `numbers[r]` of this process's prompt `prompts[r]`."""
        return [int(np.random.SeedSequence([self.seed, self.step, self.micro_batch, self.first_prompt + p, g])
                    .generate_state(1)[0]) for p, g in zip(prompts, numbers, strict=True)]

    def group(self, prompts: int, group_size: int) -> list[int]:
        """The seeds of `group_size` answers per prompt in the group layout (row `g·P + p`)."""
        rows = range(prompts * group_size)
        return self.answers([r % prompts for r in rows], [r // prompts for r in rows])

    @property
    def draws(self) -> int:
        """The seed of the likelihood estimator's noise draws."""
        return int(np.random.SeedSequence([self.seed, self.step, self.micro_batch, self.first_prompt])
                   .generate_state(1)[0])


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
    """Rewards and MMAU correctness `(R,)` of the answers; row r answers `items[r % len(items)]` (both layouts)."""
    rows = [(items[r % len(items)], text) for r, text in enumerate(texts)]
    rewards = torch.tensor([reward_value(reward, item, text) for item, text in rows], dtype=torch.float)
    correct = torch.tensor([mc_correct(item, text) for item, text in rows], dtype=torch.float)
    return rewards, correct


def rollout_and_reference_values(policy: torch.nn.Module, reference: torch.nn.Module, values: Callable) -> tuple:
    """`values(policy)` in eval mode (the rollout policy's: old log-probs and their mask, train mode restored) and
    `values(reference)`'s first item: (old, mask, ref)."""
    was_training = policy.training
    policy.eval()
    try:
        old, mask = values(policy)
    finally:
        policy.train(was_training)
    return old, mask, values(reference)[0]


def group_advantages(objective: Objective, rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`(R,)` advantages by the registered estimator, groups = `index (R,)`; dropped (non-finite) rewards get 0."""
    valid = torch.isfinite(rewards)
    index = index.to(rewards.device)
    inputs = AdvantageInputs(response_mask=torch.ones(len(rewards), 1, dtype=torch.bool), index=index,
                             scores=torch.where(valid, rewards, torch.zeros_like(rewards)), valid=valid)
    advantages = objective.advantage(inputs).advantages[:, 0]
    return torch.where(valid, advantages, torch.zeros_like(advantages))


def distillation_advantages(objective: Objective, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                            index: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """OPD's or SCOPE's per-token advantages `(R, T)` and metrics, from the rollout policy's (`student`) and the
    teacher's values `(R, T)` of the student's answers; SCOPE routes by `correct (R,)`."""
    inputs = AdvantageInputs(response_mask=mask, index=index, old_log_prob=student, teacher_log_prob=teacher,
                             correct=correct.bool())
    output = objective.advantage(inputs)
    return output.advantages, output.metrics


@torch.no_grad()
def make_rollout(policy, reference, chat: ChatFormat, prompts: PromptBatch, objective: Objective, *,
                 reward: RewardFn, group_size: int, decode: DecodeConfig, seeds: RolloutSeeds, teacher=None,
                 counts: torch.Tensor | None = None) -> Rollout:
    """Sample, score and evaluate one rollout batch; `policy` is the unwrapped model.

    `counts (P,)`: answers per prompt (DynaMO's allocation; None: `group_size` each). `teacher`: the model whose
    likelihood of the answers gives OPD's and SCOPE's advantages. HIAN and GTPO play multi-turn sessions instead
    (`turn_rollout.make_turn_rollout`).
    """
    if objective.advantage.name in TURN_LEVEL:
        from diffa2.stages.turn_rollout import make_turn_rollout  # it builds on this module

        return make_turn_rollout(policy, reference, chat, prompts, objective, reward=reward, group_size=group_size,
                                 decode=decode, seeds=seeds)
    if counts is None:
        index = torch.arange(len(prompts.items)).repeat(group_size)
        answers = sample_group(policy, chat, prompts, group_size, decode, seeds.group(len(prompts.items), group_size))
    else:
        counts = counts.cpu()
        index = torch.repeat_interleave(torch.arange(len(prompts.items)), counts)
        numbers = torch.cat([torch.arange(int(count)) for count in counts])
        prompts = prompts.rows(index)
        answers = sample_group(policy, chat, prompts, 1, decode, seeds.answers(index.tolist(), numbers.tolist()))
    generator = torch.Generator(device=answers.device).manual_seed(seeds.draws)
    return evaluate_answers(policy, reference, chat, prompts, index, answers, objective, reward=reward,
                            generator=generator, teacher=teacher)


@torch.no_grad()
def evaluate_answers(policy, reference, chat: ChatFormat, prompts: PromptBatch, index: torch.Tensor,
                     answers: torch.Tensor, objective: Objective, *, reward: RewardFn, generator: torch.Generator,
                     teacher=None) -> Rollout:
    """Score sampled `answers (R, L)` (row r answers prompt `index[r]`) and compute their advantages and their
    likelihoods under the rollout policy, the reference (and the teacher), all with the same draws."""
    texts = [chat.decode_answer(row.tolist()) for row in answers]
    rewards, correct = score(reward, prompts.items, texts)
    device = answers.device
    index, correct = index.to(device), correct.to(device)
    distill = objective.advantage.name in DISTILLATION
    advantages = torch.zeros(len(texts), device=device) if distill else group_advantages(objective, rewards, index)
    advantages = advantages.to(device)
    draws = objective.estimator.sample(torch.ones_like(answers, dtype=torch.bool), generator=generator)

    def values(model) -> tuple[torch.Tensor, torch.Tensor]:
        token_logp = answer_token_logprobs(model, prompts, answers, draws.masks, chat.ids.mask)
        return likelihood_view(objective.estimator, token_logp, draws, advantages)

    old, mask, ref = rollout_and_reference_values(policy, reference, values)
    mask = mask & torch.isfinite(rewards).to(device)[:, None]
    token_advantages, metrics = None, {}
    if distill:
        token_advantages, metrics = distillation_advantages(objective, old, values(teacher)[0], mask, index, correct)
        advantages = token_advantages.sum(-1) / mask.sum(-1).clamp_min(1)
    return Rollout(prompts, index, answers, texts, rewards, correct, advantages, draws, old, ref, mask,
                   token_advantages, {name: float(value) for name, value in metrics.items()})


def entropy_view(entropy: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
    """Per-token entropies `(R, L)` from `entropy (n, R, L)`: the mean over the draws that mask the token."""
    masks = draws.masks.to(entropy.dtype)
    return (entropy * masks).sum(0) / masks.sum(0).clamp_min(1)


def rollout_loss(model, rollout: Rollout, objective: Objective, mask_id: int) -> tuple[torch.Tensor, dict]:
    """The loss of one update on `rollout`: aggregated policy loss + kl_coef x aggregated KL, and its metrics."""
    draws, mask = rollout.draws, rollout.mask
    if objective.modulation is None:
        token_logp = answer_token_logprobs(model, rollout.prompts, rollout.answers, draws.masks, mask_id)
    else:
        token_logp, entropy = answer_token_logprobs_and_entropy(model, rollout.prompts, rollout.answers, draws.masks,
                                                                mask_id)
    values, _ = likelihood_view(objective.estimator, token_logp, draws, rollout.advantages)
    advantages = rollout.token_advantages
    if advantages is None:
        advantages = rollout.advantages[:, None].expand_as(mask)
    advantages = torch.where(mask, advantages, torch.zeros_like(values))
    modulation_metrics = {}
    if objective.modulation is not None:  # DynaMO: A' = A · β_stab · β_comp from the current policy, no gradient
        modulated = objective.modulation(AdvantageInputs(
            response_mask=mask, advantages=advantages, log_prob=values.detach(), old_log_prob=rollout.old_values,
            entropy=entropy_view(entropy, draws)))
        advantages, modulation_metrics = modulated.advantages, modulated.metrics
    loss_mat, metrics = objective.policy_loss(values, rollout.old_values, advantages, mask,
                                              config=objective.policy_config)
    policy_loss = agg_loss(loss_mat, mask, objective.loss_agg_mode)
    kl = agg_loss(objective.kl(values, rollout.ref_values), mask, objective.loss_agg_mode)
    loss = policy_loss + objective.kl_coef * kl if objective.kl_coef else policy_loss
    metrics = {**metrics, **modulation_metrics, "actor/pg_loss": policy_loss.detach(), "actor/kl": kl.detach()}
    return loss, metrics


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Mean reward and accuracy of the rollout's kept answers, and how many were dropped."""
    valid = rollout.valid
    kept = rollout.rewards[valid]
    return {
        "reward/mean": kept.mean().item() if len(kept) else math.nan,
        "rollout/accuracy": rollout.correct[valid].mean().item() if len(kept) else math.nan,
        "rollout/dropped": float((~valid).sum()),
        **rollout.metrics,
    }


def with_agg_mode(config: object, mode: str | None) -> object:
    """The policy loss's config with `loss_agg_mode` replaced (None: the loss's own mode)."""
    return config if mode is None else replace(config, loss_agg_mode=mode)


@dataclass
class RolloutAllocator:
    """DynaMO's rollout allocation: a step's `group_size × P` answers split across its P prompts by the variance proxy
    of each prompt's success rate so far (`diffa2.rl.dynamo_priority`), the budget exactly spent
    (`dynamo_allocate_rollouts`).

    A prompt gets `group_size` answers until it has been sampled that often (exploration), then between
    `n_min = max(2, G // 2)` and `n_max = G + G // 2` (DynaMO's example script: 8 and 24 around a mean of 16). Its
    success rate is DynaMO's: the fraction of its latest answers whose reward beat the rollout batch's mean.
    """

    group_size: int
    rates: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def bounds(self) -> tuple[int, int]:
        """(n_min, n_max): the fewest and the most answers a prompt seen before gets."""
        return max(2, self.group_size // 2), self.group_size + self.group_size // 2

    def allocate(self, keys: Sequence[str]) -> torch.Tensor:
        """Answers per prompt `(P,)` long, summing to `group_size × P`."""
        seen = torch.tensor([key in self.rates for key in keys])
        rates = torch.tensor([self.rates.get(key, 0.0) for key in keys], dtype=torch.double)
        samples = torch.tensor([self.samples.get(key, 0) for key in keys])
        n_min, n_max = self.bounds
        return dynamo_allocate_rollouts(dynamo_priority(rates, seen), samples, self.group_size * len(keys),
                                        n_min=n_min, n_max=n_max, initial_budget=self.group_size)

    def update(self, keys: Sequence[str], index: torch.Tensor, rewards: torch.Tensor) -> None:
        """Record a rollout: each prompt's success rate (answers with a finite reward) and its answer count."""
        index, rewards = index.cpu(), rewards.cpu()
        valid = torch.isfinite(rewards)
        beat = (rewards > rewards[valid].mean()) & valid if valid.any() else valid
        for prompt, key in enumerate(keys):
            rows = index == prompt
            if (rows & valid).any():
                self.rates[key] = beat[rows & valid].float().mean().item()
            self.samples[key] = self.samples.get(key, 0) + int(rows.sum())
