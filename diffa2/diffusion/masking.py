"""The forward (noising) process of masked diffusion, LLaDA style (`ML-GSAI/LLaDA:GUIDELINES.md`).

One ratio per sample, t ~ U(0, 1), p = (1 - eps) t + eps; each answer token is replaced by [MASK]
independently with probability p. Prompt and speech positions are not part of the answer tensor, so they
can never be masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EPS = 1e-3


@dataclass
class NoisedAnswers:
    noisy_ids: torch.Tensor  # (B, L) answer ids with masked positions set to the mask id
    masked: torch.Tensor  # (B, L) bool, True where a token was masked (always inside answer_mask)
    p_mask: torch.Tensor  # (B,) masking probability of each sample


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """p = (1 - eps) t + eps: keeps p > 0 so the 1/p weight of the loss stays finite."""
    return (1 - eps) * t + eps


def forward_process(
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_id: int,
    *,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
) -> NoisedAnswers:
    """Mask each sample's answer tokens i.i.d. with its own probability p (positions outside answer_mask never)."""
    batch = answer_ids.shape[0]
    t = torch.rand(batch, generator=generator, device=answer_ids.device)
    p_mask = mask_probability(t, eps)
    draws = torch.rand(answer_ids.shape, generator=generator, device=answer_ids.device)
    masked = (draws < p_mask[:, None]) & answer_mask.bool()
    noisy = torch.where(masked, torch.full_like(answer_ids, mask_id), answer_ids)
    return NoisedAnswers(noisy, masked, p_mask)
