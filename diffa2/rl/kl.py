"""Per-token KL estimators between the policy and a reference policy, from sampled tokens only.

With `δ = log π_θ(o_t) − log π_ref(o_t)` on tokens sampled from π_θ (Schulman, "Approximating KL divergence",
2020; verl `kl_penalty_forward`, volcengine/verl @b178a3cd5):

| name (alias)           | value                       | note                                                   |
|------------------------|-----------------------------|--------------------------------------------------------|
| `k1` (`kl`)            | δ                           | unbiased value, high variance                          |
| `abs`                  | abs(δ)                      |                                                        |
| `k2` (`mse`)           | ½ δ²                        | its gradient δ·∇logπ is the KL gradient                |
| `k3` (`low_var_kl`)    | exp(−δ) + δ − 1             | −δ clamped to [−20, 20], result to [−10, 10] (verl)    |
| `k1+`, `k3+`           | value of k1 / k3            | straight-through: backward of k2 (unbiased KL gradient) |

GRPO (arXiv:2402.03300) adds β·k3 to the loss (β = 0.04 in the paper; verl `kl_loss_coef=0.001`), aggregated with
the policy loss's mode. Registered signature: `fn(log_prob (B, T), ref_log_prob (B, T)) -> (B, T)`.
"""

from __future__ import annotations

import torch

from .registry import FunctionRegistry

KL_ESTIMATORS = FunctionRegistry("KL estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get


@register_kl_estimator("kl")
@register_kl_estimator("k1")
def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k1 = δ = log π_θ − log π_ref, `(B, T)`."""
    return log_prob - ref_log_prob


@register_kl_estimator("abs")
def kl_abs(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """|δ|, `(B, T)`."""
    return (log_prob - ref_log_prob).abs()


@register_kl_estimator("mse")
@register_kl_estimator("k2")
def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k2 = ½ δ², `(B, T)`."""
    return 0.5 * (log_prob - ref_log_prob).square()


@register_kl_estimator("low_var_kl")
@register_kl_estimator("k3")
def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """k3 = π_ref/π − log(π_ref/π) − 1 ≥ 0, `(B, T)`, with verl's clamps."""
    neg_delta = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
    return (neg_delta.exp() - neg_delta - 1.0).clamp(-10.0, 10.0)


def _straight_through(value: torch.Tensor, log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Forward `value`, backward the k2 gradient: `k2 − sg(k2) + sg(value)` (verl `kl_penalty`)."""
    k2 = kl_k2(log_prob, ref_log_prob)
    return k2 - k2.detach() + value.detach()


@register_kl_estimator("k1+")
def kl_k1_straight_through(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Value of k1, gradient of k2, `(B, T)`."""
    return _straight_through(kl_k1(log_prob, ref_log_prob), log_prob, ref_log_prob)


@register_kl_estimator("k3+")
def kl_k3_straight_through(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Value of k3, gradient of k2, `(B, T)`."""
    return _straight_through(kl_k3(log_prob, ref_log_prob), log_prob, ref_log_prob)
