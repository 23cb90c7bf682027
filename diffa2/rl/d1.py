"""d1's one-step (mean-field) log-likelihood estimate for diffu-GRPO (Zhao et al., arXiv:2504.12216).

One forward pass with the whole completion masked and each prompt token masked independently with probability
`p_mask_prompt`; `log π(o) ≈ Σ_k log p_θ(o_k | q', all-mask)`, summed over completion tokens
(`dllm-reasoning/d1 diffu-grpo/diffu_grpo_trainer.py::forward_process`). d1 draws a new mask seed per inner
iteration and shares it between the old, reference and current policies within the iteration: sample the draws
once and reuse them for all three. d1 feeds every position after the prompt as a mask token, padding included;
the estimate sums over the answer tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .elbo import ElboDraws, elbo_from_token_logprobs, register_likelihood_estimator


@register_likelihood_estimator("d1_one_step")
@dataclass(frozen=True)
class D1Estimator:
    """Defaults: d1's released `slurm_scripts/train.yaml` (p = 0.15; the config class defaults to 0.3)."""

    p_mask_prompt: float = 0.15

    def sample(
        self,
        answer_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> ElboDraws:
        """One draw: every answer token of `answer_mask (B, L)` masked; `prompt_mask (B, P)` tokens w.p. p."""
        answer_mask = answer_mask.bool()
        prompt_masks = None
        if self.p_mask_prompt > 0:
            if prompt_mask is None:
                raise ValueError("d1_one_step masks prompt tokens: pass prompt_mask (B, P), or set p_mask_prompt=0")
            draws = torch.rand((1, *prompt_mask.shape), generator=generator, device=prompt_mask.device)
            prompt_masks = (draws < self.p_mask_prompt) & prompt_mask.bool()
        weights = torch.ones(1, answer_mask.shape[0], device=answer_mask.device)
        return ElboDraws(answer_mask[None], weights, answer_mask, n_t=1, n_yt=1, prompt_masks=prompt_masks)

    def estimate(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
        """`Σ_k log p(o_k | ·)` over the answer tokens, `(B,)`."""
        return elbo_from_token_logprobs(token_logp, draws)
