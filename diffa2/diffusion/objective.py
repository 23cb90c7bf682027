"""The masked-diffusion SFT objective on a DIFFA-2 batch: noise the answers, predict them, weight by 1/p."""

from __future__ import annotations

import torch

from diffa2.data.collate import SFTBatch
from diffa2.diffusion.loss import Reduction, masked_token_loss, reduce_loss
from diffa2.diffusion.masking import DEFAULT_EPS, MaskingForm, forward_process
from diffa2.modeling.model import DIFFA2Model


def sft_loss(
    model: DIFFA2Model,
    batch: SFTBatch,
    mask_id: int,
    *,
    eps: float = DEFAULT_EPS,
    form: MaskingForm = "ratio",
    reduction: Reduction = "per_sample",
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
    stop_weight: float = 1.0,
) -> torch.Tensor:
    """LLaDA SFT loss of one batch (prompt and speech never masked; EOS padding is part of the answer).

    Masked positions whose target is one of `stop_ids` (EOS padding, end of turn) are weighted `stop_weight`
    (1.0 = LLaDA); they fill most of a short-answer canvas, and a tiny model trained from scratch learns its
    answers faster when they count less (docs/experiment-log.md). `model` may be a distributed wrapper, only called.
    """
    noised = forward_process(batch.answer_ids, batch.answer_mask, mask_id, eps=eps, form=form, generator=generator)
    windows = {} if batch.window_counts is None else {"window_counts": batch.window_counts}  # long_audio window
    logits = model(
        batch.input_features,
        batch.feature_lengths,
        batch.prompt_ids,
        batch.audio_slots,
        noised.noisy_ids,
        batch.answer_mask,
        **windows,
    )
    token_loss = masked_token_loss(logits, batch.answer_ids, noised.masked, noised.p_mask)
    if stop_ids and stop_weight != 1.0:
        is_stop = torch.isin(batch.answer_ids, torch.tensor(stop_ids, device=batch.answer_ids.device))
        token_loss = token_loss * torch.where(is_stop, stop_weight, 1.0)
    return reduce_loss(token_loss, batch.answer_mask, reduction)
