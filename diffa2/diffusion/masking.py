"""The forward (noising) process of masked diffusion, LLaDA style, in its two unbiased forms.

- `ratio` (`ML-GSAI/LLaDA:GUIDELINES.md`): one ratio per sample, t ~ U(0, 1), p = (1 - eps) t + eps; each
  answer token is replaced by [MASK] independently with probability p; the loss weight is 1/p.
- `count` (`ML-GSAI/LLaDA:get_log_likelihood.py`): k ~ U{1..L} per sample and exactly k of its L answer
  tokens masked; the weight is L/k <= L, so a rare lightly-masked sample cannot dominate a batch with a
  1/p of up to 1000. Same expectation, much lower variance for short answers.

Prompt and speech positions are not part of the answer tensor, so they can never be masked. The two forms are one
vocabulary with the RL library's ELBO estimators (`diffa2.rl.elbo.MaskingForm`, where the type lives so that `rl/`
stays free of other diffa2 imports; the papers' letters "t" and "l" are accepted for "ratio" and "count").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffa2.rl.elbo import MaskingForm, masking_form

DEFAULT_EPS = 1e-3


@dataclass
class NoisedAnswers:
    noisy_ids: torch.Tensor  # (B, L) answer ids with masked positions set to the mask id
    masked: torch.Tensor  # (B, L) bool, True where a token was masked (always inside answer_mask)
    p_mask: torch.Tensor  # (B,) masking probability of each sample (k / L in the count form); loss weight 1/p


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """p = (1 - eps) t + eps: keeps p > 0 so the 1/p weight of the loss stays finite."""
    return (1 - eps) * t + eps


def forward_process(
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_id: int,
    *,
    eps: float = DEFAULT_EPS,
    form: MaskingForm = "ratio",
    generator: torch.Generator | None = None,
) -> NoisedAnswers:
    """Mask each sample's answer tokens (never positions outside answer_mask) in the given form."""
    batch = answer_ids.shape[0]
    device = answer_ids.device
    u = torch.rand(batch, generator=generator, device=device)  # t (ratio form) or the draw of k (count form)
    draws = torch.rand(answer_ids.shape, generator=generator, device=device)
    inside = answer_mask.bool()
    if masking_form(form) == "ratio":
        p_mask = mask_probability(u, eps)
        masked = (draws < p_mask[:, None]) & inside
    else:  # count
        lengths = inside.sum(dim=1).clamp(min=1)
        k = (u * lengths).long() + 1  # U{1..L}
        # The k answer positions with the smallest draws: a uniformly random subset of size k.
        rank = draws.masked_fill(~inside, 2.0).argsort(dim=1).argsort(dim=1)
        masked = (rank < k[:, None]) & inside
        p_mask = k.float() / lengths.float()
    noisy = torch.where(masked, torch.full_like(answer_ids, mask_id), answer_ids)
    return NoisedAnswers(noisy, masked, p_mask)
