"""Masked-diffusion SFT loss: cross-entropy on masked answer tokens weighted by 1/p, then a named reduction.

The per-token matrix and its reduction are separate (as verl's `agg_loss`), so the normalisation is a
choice, not buried in the loss:
- `per_sample` (LLaDA, `GUIDELINES.md`): each sample's sum divided by its answer length, averaged over the batch;
- `batch` (the DIFFA/DIFFA-2 code): the batch's sum divided by the batch's total answer length.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["per_sample", "batch"]


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token loss `[B, L]`: CE(logits, target) / p at masked positions, 0 elsewhere (fp32)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, L)
    return torch.where(masked, ce / p_mask[:, None], torch.zeros_like(ce))


def reduce_loss(
    token_loss: torch.Tensor, answer_mask: torch.Tensor, reduction: Reduction = "per_sample"
) -> torch.Tensor:
    """Scalar loss from the per-token matrix; answer length counts every answer position (EOS padding too)."""
    lengths = answer_mask.sum(dim=1).clamp(min=1).to(token_loss.dtype)
    if reduction == "per_sample":
        return (token_loss.sum(dim=1) / lengths).mean()
    if reduction == "batch":
        return token_loss.sum() / lengths.sum()
    raise ValueError(f"unknown reduction {reduction!r}; choose 'per_sample' or 'batch'")
