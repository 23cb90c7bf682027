"""SPG's sandwiched likelihood bounds for diffusion LMs (Sandwiched Policy Gradient, arXiv:2510.09541).

Read in `facebookresearch/SPG spg/spg_trainer.py` (`forward_process`, `_get_per_seq_logps`). Draws use block-wise
masking (`block_random`): for each draw one block k of the completion is chosen; earlier blocks stay clean, block k
has a uniform number of its tokens masked, later blocks are fully masked; prompt tokens are masked with probability
`p_mask_prompt`. Positions after the completion (padding) are fed as mask tokens in SPG; that is the caller's.
With `t_j` the fraction of completion tokens masked in draw j, per response:

    lower  L̂ = mean_j [ mean of log p over the tokens masked in draw j ]                (ELBO-type, A > 0)
    upper  Û = (1/β) · mean_i log( mean_j [ p_ji^β · 1[i masked in j] / t_j ] )            (EUBO, A ≤ 0)
           (tokens never masked in any draw are left out of the mean over i, as in SPG)
    mix    = ω·Û + (1 − ω)·L̂

Both are per-token averages; SPG's loss is `Σ_i (−A_i · ℓ̂_i · |o_i|) / Σ_i |o_i|` with the lower bound where
A_i > 0 and the configured one elsewhere (`sandwich`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .elbo import ElboDraws, exactly_k_masks, register_likelihood_estimator


@register_likelihood_estimator("spg")
@dataclass(frozen=True)
class SPGEstimator:
    """Defaults from SPG's released `spg_mix` scripts (num_t 2, min_t 0, max_t 1, mix ω 0.5, β 1.5).

    β is 1.0 for Sudoku and 2.0 for Countdown there. `block_length` should equal the generation block length
    (32 in d1's `train.yaml`; SPG's config class defaults to 64). `p_mask_prompt` as d1's `train.yaml` (0.15).
    """

    bound: Literal["lower", "upper", "mix"] = "mix"  # the estimate used where A <= 0
    beta: float = 1.5  # EUBO exponent β
    omega: float = 0.5  # weight of the upper bound in "mix"
    n_t: int = 2  # draws per response
    block_length: int = 32
    min_t: float = 0.0  # masked fraction of the chosen block is drawn between min_t and max_t
    max_t: float = 1.0
    p_mask_prompt: float = 0.15

    def sample(
        self,
        answer_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> ElboDraws:
        """Block-wise draws for a left-aligned `answer_mask (B, L)`, L a multiple of `block_length`."""
        answer_mask = answer_mask.bool()
        batch, length = answer_mask.shape
        device = answer_mask.device
        if length % self.block_length:
            raise ValueError(f"answer length {length} is not a multiple of block_length {self.block_length}")
        num_blocks = length // self.block_length
        if self.n_t > num_blocks:
            raise ValueError(f"n_t={self.n_t} draws need at least as many blocks, got {num_blocks}")
        completion = answer_mask.sum(-1)  # (B,)
        completion_blocks = ((completion - 1) // self.block_length + 1).clamp_min(1)
        # distinct blocks per response (a random permutation), folded into the completion's own blocks
        order = torch.rand(batch, num_blocks, generator=generator, device=device).argsort(-1)[:, : self.n_t]
        block = (order % completion_blocks[:, None]).T  # (n_t, B)
        start = block * self.block_length
        in_block = (completion - start).clamp(0, self.block_length)  # (n_t, B) completion tokens in block k
        low = (in_block * self.min_t).long().clamp_min(1)
        high = torch.minimum((in_block * self.max_t).long(), in_block)
        u = torch.rand(self.n_t, batch, generator=generator, device=device)
        counts = low + (u * (high - low + 1)).long()  # uniform on low..high
        position = torch.arange(length, device=device)
        chosen = (position >= start[..., None]) & (position < start[..., None] + self.block_length) & answer_mask
        masks = exactly_k_masks(chosen, counts, generator) | (position >= (start + self.block_length)[..., None])
        masks = masks & answer_mask
        masked_fraction = masks.sum(-1) / completion.clamp_min(1)
        weights = 1.0 / masked_fraction.clamp_min(1e-8)
        prompt_masks = None
        if prompt_mask is not None and self.p_mask_prompt > 0:
            draws = torch.rand((self.n_t, *prompt_mask.shape), generator=generator, device=prompt_mask.device)
            prompt_masks = (draws < self.p_mask_prompt) & prompt_mask.bool()
        return ElboDraws(masks, weights.float(), answer_mask, self.n_t, 1, prompt_masks)

    def lower(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
        """L̂ `(B,)`: mean over draws of the mean log-prob of the masked answer tokens."""
        masked = torch.where(draws.masks, token_logp, torch.zeros_like(token_logp)).sum(-1)
        return (masked / draws.masks.sum(-1).clamp_min(1)).mean(0)

    def upper(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
        """Û `(B,)`, computed in log space: `log mean_j[...] = logsumexp_j(β logp + log w_j) − log n`."""
        log_terms = self.beta * token_logp + draws.weights.log()[..., None].to(token_logp.dtype)
        seen = draws.masks.any(0)  # (B, L) tokens masked in at least one draw
        log_terms = torch.where(draws.masks, log_terms, torch.full_like(log_terms, -math.inf))
        log_terms = torch.where(seen, log_terms, torch.zeros_like(log_terms))  # no all −inf column: finite grads
        log_mean = torch.logsumexp(log_terms, dim=0) - math.log(draws.n)  # (B, L)
        total = torch.where(seen, log_mean, torch.zeros_like(log_mean)).sum(-1)
        return total / seen.sum(-1).clamp_min(1) / self.beta

    def estimate(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
        """The configured `bound` `(B,)` from `token_logp (n, B, L)`."""
        if self.bound == "lower":
            return self.lower(token_logp, draws)
        if self.bound == "upper":
            return self.upper(token_logp, draws)
        return self.omega * self.upper(token_logp, draws) + (1.0 - self.omega) * self.lower(token_logp, draws)

    def sandwich(self, token_logp: torch.Tensor, draws: ElboDraws, advantages: torch.Tensor) -> torch.Tensor:
        """SPG's per-response choice `(B,)`: the lower bound where `advantages (B,) > 0`, else `estimate`."""
        return torch.where(advantages > 0, self.lower(token_logp, draws), self.estimate(token_logp, draws))
