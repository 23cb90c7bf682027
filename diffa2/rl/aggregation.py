"""Loss aggregation: reduce a per-token loss matrix `(B, T)` to a scalar, by named mode.

The modes and their normalisers follow verl's `agg_loss` (`verl/trainer/ppo/core_algos.py`, volcengine/verl
@b178a3cd5). The normalisers are passed in (`Normalisers`), never inferred from the micro-batch, so the value of a
mini-batch does not depend on how it is split over micro-batches and data-parallel ranks: pass the global token
and sequence counts of the mini-batch and the data-parallel size, and average gradients over ranks as DDP does.

Registered modes (signature `fn(loss_mat (B, T), loss_mask (B, T), norm: Normalisers | None = None) -> ()`):

- `token-mean`: `Σ(L·M) / N_tok · dp_size` (DAPO, arXiv:2503.14476; TRL `loss_type="dapo"`).
- `seq-mean-token-sum`: `Σ_i (Σ_t L·M)_i / N_seq · dp_size`.
- `seq-mean-token-mean`: `Σ_i ((Σ_t L·M)_i / |M_i|) / N_seq · dp_size` (GRPO, arXiv:2402.03300).
- `seq-mean-token-sum-norm`: `Σ(L·M) / S`, S a constant (Dr.GRPO, arXiv:2503.20783); no division by the number
  of sequences and no dp_size factor, as in verl. For TRL's `dr_grpo` pass `constant = B · max_completion_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import FunctionRegistry

AGGREGATIONS = FunctionRegistry("loss aggregation mode")
register_aggregation = AGGREGATIONS.register
get_aggregation = AGGREGATIONS.get


@dataclass(frozen=True)
class Normalisers:
    """Global normalisers of one optimiser mini-batch; `None` means "this batch's own value"."""

    tokens: float | None = None  # valid tokens in the global mini-batch (token-mean)
    seqs: float | None = None  # sequences with at least one valid token in the global mini-batch (seq-mean-*)
    dp_size: int = 1  # data-parallel ranks whose gradients are averaged
    constant: float | None = None  # Dr.GRPO's S (seq-mean-token-sum-norm); default: the padded length T


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (0 where nothing is); masked-out entries never propagate NaN."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / mask.sum().clamp_min(1)
    return total.sum(dim) / mask.sum(dim).clamp_min(1)


def _masked(loss_mat: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(loss_mask.bool(), loss_mat, torch.zeros_like(loss_mat))


def _num_seqs(loss_mask: torch.Tensor, norm: Normalisers) -> float | torch.Tensor:
    if norm.seqs is not None:
        return norm.seqs
    return (loss_mask.bool().sum(-1) > 0).sum().clamp_min(1)


@register_aggregation("token-mean")
def token_mean(loss_mat: torch.Tensor, loss_mask: torch.Tensor, norm: Normalisers | None = None) -> torch.Tensor:
    """`Σ(L·M) / N_tok · dp_size`; every valid token of the mini-batch weighs the same."""
    norm = norm or Normalisers()
    tokens = loss_mask.bool().sum().clamp_min(1) if norm.tokens is None else norm.tokens
    return _masked(loss_mat, loss_mask).sum() / tokens * norm.dp_size


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(
    loss_mat: torch.Tensor, loss_mask: torch.Tensor, norm: Normalisers | None = None
) -> torch.Tensor:
    """`Σ_i (Σ_t L·M)_i / N_seq · dp_size`; fully masked sequences are not counted in N_seq."""
    norm = norm or Normalisers()
    return _masked(loss_mat, loss_mask).sum() / _num_seqs(loss_mask, norm) * norm.dp_size


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(
    loss_mat: torch.Tensor, loss_mask: torch.Tensor, norm: Normalisers | None = None
) -> torch.Tensor:
    """`Σ_i ((Σ_t L·M)_i / (|M_i| + 1e-8)) / N_seq · dp_size`: every sequence weighs the same (original GRPO)."""
    norm = norm or Normalisers()
    seq_loss = _masked(loss_mat, loss_mask).sum(-1) / (loss_mask.bool().sum(-1) + 1e-8)  # (B,)
    return seq_loss.sum() / _num_seqs(loss_mask, norm) * norm.dp_size


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss_mat: torch.Tensor, loss_mask: torch.Tensor, norm: Normalisers | None = None
) -> torch.Tensor:
    """`Σ(L·M) / S` with a constant S (default the padded length T): Dr.GRPO's length-unbiased reduction."""
    norm = norm or Normalisers()
    constant = loss_mat.shape[-1] if norm.constant is None else norm.constant
    return _masked(loss_mat, loss_mask).sum() / constant


def agg_loss(
    loss_mat: torch.Tensor, loss_mask: torch.Tensor, mode: str, norm: Normalisers | None = None
) -> torch.Tensor:
    """Reduce `loss_mat (B, T)` over `loss_mask (B, T)` with the registered `mode` (verl `agg_loss`)."""
    return get_aggregation(mode)(loss_mat, loss_mask, norm)
