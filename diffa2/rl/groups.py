"""Vectorised statistics over groups of rollouts (the G responses to one prompt), shared by the estimators."""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]


def dense_groups(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels `(N,)` to ids `0..G-1` `(N,)`; returns the ids and G."""
    unique, ids = torch.unique(labels, return_inverse=True)
    return ids, unique.numel()


def group_sum(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group sums `(G,)` of `values (N,)`."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, values)


def group_mean_std(
    values: torch.Tensor, groups: torch.Tensor, num_groups: int, valid: torch.Tensor, *, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and standard deviation `(G,)` of the valid entries of each group (std 0 below two entries)."""
    zeros = torch.zeros_like(values)
    count = group_sum(valid.to(values.dtype), groups, num_groups)
    mean = group_sum(torch.where(valid, values, zeros), groups, num_groups) / count.clamp_min(1)
    squares = group_sum(torch.where(valid, (values - mean[groups]).square(), zeros), groups, num_groups)
    dof = count - 1 if unbiased else count
    std = torch.where(count > 1, squares / dof.clamp_min(1), torch.zeros_like(squares)).sqrt()
    return count, mean, std


def normalise_in_groups(
    values: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    *,
    eps: float,
    scale: Scale = "group",
    unbiased: bool = True,
    singleton: Literal["zero", "raw"] = "zero",
) -> torch.Tensor:
    """`(v − group mean) / (std + eps)` for `values (N,)` in `groups (N,)`; invalid entries give 0.

    `scale`: "group" divides by the group's std, "batch" by the std of all valid values, "none" only centres.
    `singleton`: a group with one valid entry gives 0 ("zero"), or keeps mean 0 and std 1 as verl does ("raw").
    Groups with no valid entry give 0.
    """
    valid = valid.bool() & ~torch.isnan(values)
    values = torch.where(valid, values, torch.zeros_like(values))
    ids, num_groups = dense_groups(groups)
    count, mean, std = group_mean_std(values, ids, num_groups, valid, unbiased=unbiased)
    if scale == "batch":
        _, _, batch_std = group_mean_std(values, torch.zeros_like(ids), 1, valid, unbiased=unbiased)
        std = batch_std.expand(num_groups)
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    if scale == "group":
        std = torch.where(single, torch.ones_like(std), std)
    normalised = values - mean[ids] if scale == "none" else (values - mean[ids]) / (std[ids] + eps)
    keep = valid & (count[ids] > 1) if singleton == "zero" else valid
    return torch.where(keep, normalised, torch.zeros_like(normalised))
