"""Answer log-likelihoods under a DIFFA-2 model: the batched masked-answer forward and ELBO scoring of candidates.

`answer_token_logprobs` is the one forward that scores answers under noise draws (`diffa2.rl`'s
`BatchedTokenLogprobFn`): every draw of every answer goes through one call of the model, which computes each
prompt's speech and prefix once. VRPO (`diffa2.stages.vrpo`), the RL stage (`diffa2.stages.rollout`) and answer
scoring (`AudioQA.score`, `score_candidates`) all use it.

Scoring a question's candidates (docs/answer-scoring.md): each candidate is tokenised as trained (text, then
`<|eot_id|>`) and its ELBO estimated with `diffa2.rl`'s `ElboEstimator` (LLaDA's masked-token ELBO, form "count"
stratified by default: the lower-variance form LLaDA evaluates likelihoods with). The draws come from the question's
own seed and are shared by its candidates: every candidate is sampled from a generator reset to that seed on a
canvas of the question's widest candidate, so all get the same timesteps (mask counts) and the same per-position
noise, truncated to their own length (common random numbers: lower variance for comparisons). Draws are sampled on
the CPU, so they depend neither on the batch nor on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from diffa2.rl import ElboDraws, LikelihoodEstimator, get_likelihood_estimator

DEFAULT_DRAWS = 16  # Monte-Carlo draws per candidate (VRPO's evaluation budget, `pref_eval_samples`)
DEFAULT_FORM = "count"


class PromptInputs(Protocol):
    """The prompt side of a batch (`PromptBatch`, `PairBatch`, `QuestionInputs`): audio features and prompts."""

    input_features: torch.Tensor  # (P, n_mels, frames)
    feature_lengths: torch.Tensor  # (P,)
    prompt_ids: list[list[int]]
    audio_slots: list[int]


@dataclass(frozen=True)
class QuestionInputs:
    """One prompt with its audio features: the `PromptInputs` of a single question."""

    input_features: torch.Tensor  # (1, n_mels, frames)
    feature_lengths: torch.Tensor  # (1,)
    prompt_ids: list[list[int]]
    audio_slots: list[int]


def answer_token_logprobs(model, prompts: PromptInputs, answers: torch.Tensor, masks: torch.Tensor, mask_id: int,
                          region: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities `(n, R, L)` of `answers (R, L)` under `masks (n, R, L)` (True = [MASK]), in one call.

    Row `g·P + p` of `answers` answers prompt p of the P prompts. `region (R, L)` marks the positions each answer
    holds (the rest is left out of attention; None: all of them). `model` is a DIFFA-2 model, a distributed
    wrapper of one, or a `Reference`.
    """
    logits, targets = masked_answer_logits(model, prompts, answers, masks, mask_id, region)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), targets.flatten(0, 1), reduction="none")
    return logp.view(masks.shape)


def answer_token_logprobs_and_entropy(model, prompts: PromptInputs, answers: torch.Tensor, masks: torch.Tensor,
                                      mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`answer_token_logprobs` and, from the same forward, the entropy `(n, R, L)` of the model's distribution at
    each position (without gradient; DynaMO's token-level modulation reads it)."""
    logits, targets = masked_answer_logits(model, prompts, answers, masks, mask_id)
    log_probs = F.log_softmax(logits.float(), -1)
    logp = log_probs.gather(-1, targets.flatten(0, 1)[..., None]).squeeze(-1)
    entropy = -(log_probs.detach().exp() * log_probs.detach()).sum(-1)
    return logp.view(masks.shape), entropy.view(masks.shape)


def masked_answer_logits(model, prompts: PromptInputs, answers: torch.Tensor, masks: torch.Tensor, mask_id: int,
                         region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits `(n·R, L, V)` on `answers` masked by each of `masks (n, R, L)`, and the targets `(n, R, L)`."""
    n, rows, length = masks.shape
    targets = answers.expand(n, -1, -1)
    noisy = torch.where(masks, torch.full_like(targets, mask_id), targets)
    if region is None:
        region = torch.ones(rows, length, dtype=torch.bool, device=answers.device)
    logits = model(prompts.input_features, prompts.feature_lengths, prompts.prompt_ids, prompts.audio_slots,
                   noisy.flatten(0, 1), region.repeat(n, 1), answers_per_prompt=n * rows // len(prompts.prompt_ids))
    return logits, targets


def scoring_estimator(n_draws: int = DEFAULT_DRAWS, form: str = DEFAULT_FORM) -> LikelihoodEstimator:
    """The scoring estimator: LLaDA's ELBO with `n_draws` stratified timesteps, one mask each, in `form`."""
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    return get_likelihood_estimator("elbo")(n_t=n_draws, form=form, stratified=True)


def candidate_draws(estimator: LikelihoodEstimator, lengths: Sequence[int], seed: int) -> ElboDraws:
    """Draws `(n, C, W)` for candidates of `lengths` tokens (W = the longest), all from `seed`, shared."""
    width = max(lengths)
    positions = torch.arange(width)
    parts = [estimator.sample((positions < length)[None], generator=torch.Generator().manual_seed(seed))
             for length in lengths]
    first = parts[0]
    return ElboDraws(torch.cat([d.masks for d in parts], 1), torch.cat([d.weights for d in parts], 1),
                     torch.cat([d.answer_mask for d in parts]), first.n_t, first.n_yt)


@dataclass(frozen=True)
class Scores:
    """Per question, each candidate's ELBO estimate (nats) and its token count (text + end of turn)."""

    elbos: list[list[float]]
    tokens: list[list[int]]
    n_draws: int

    @property
    def per_token(self) -> list[list[float]]:
        """Each candidate's ELBO divided by its token count."""
        return [[e / t for e, t in zip(es, ts, strict=True)] for es, ts in zip(self.elbos, self.tokens, strict=True)]

    @property
    def best(self) -> list[int]:
        """Per question, the index of the candidate with the highest ELBO (the first on a tie)."""
        return [max(range(len(es)), key=es.__getitem__) for es in self.elbos]


@torch.no_grad()
def score_candidates(model, prompts: QuestionInputs, candidates: Sequence[Sequence[int]], mask_id: int, eos_id: int,
                     estimator: LikelihoodEstimator, seed: int) -> torch.Tensor:
    """ELBO estimates `(C,)` of one question's candidate token ids, all draws of all candidates in one forward."""
    if not candidates:
        raise ValueError("a question needs at least one candidate answer")
    lengths = [len(ids) for ids in candidates]
    draws = candidate_draws(estimator, lengths, seed)
    width = draws.masks.shape[-1]
    device = prompts.input_features.device
    answers = torch.tensor([list(ids) + [eos_id] * (width - len(ids)) for ids in candidates], device=device)
    draws = ElboDraws(draws.masks.to(device), draws.weights.to(device), draws.answer_mask.to(device), draws.n_t,
                      draws.n_yt)
    token_logp = answer_token_logprobs(model, prompts, answers, draws.masks, mask_id, draws.answer_mask)
    return estimator.estimate(token_logp, draws)
