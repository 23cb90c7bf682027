"""Parallel unmasking rules (Fast-dLLM, arXiv 2505.22618 §3.3) and EOS early exit (DIFFA-2's fast_dllm decoder).

Both rules see the confidences of one row's masked block positions sorted in descending order, c(1) >= c(2) >= ...,
and return how many of the most confident to commit this step (at least one):

- threshold tau: every masked position with c >= tau (Fast-dLLM `get_transfer_index` with `threshold`);
- factor f ("FPD"): the longest run n with c(k) >= 1 - f / (k + 1) for every 2 <= k <= n, i.e. Fast-dLLM's
  `(n + 1)(1 - c(n)) < f` bound (`NVlabs/Fast-dLLM:llada/generate.py` `get_transfer_index_dynamic`; reference
  DIFFA-2's `DIFFA-2/src/fast_dllm/diffa_generate.py`). With f = 1 the bars are 0.667, 0.75, 0.8, ... With
  `quirk`, the code's edge case too: when the first candidate to fail is the last one, every candidate is committed
  (so the last two masked tokens of a block always go together); DIFFA-2's published decoding has it.
"""

from __future__ import annotations

import torch

from diffa2.chat import SpecialIds


def parallel_count(
    sorted_confidence: torch.Tensor, threshold: float | None, factor: float | None, *, quirk: bool = False
) -> int:
    """How many of the descending confidences `[n]` a parallel rule commits (>= 1 when n > 0)."""
    n = sorted_confidence.numel()
    if n == 0:
        return 0
    if threshold is not None:
        passes = sorted_confidence >= threshold
    elif factor is not None:
        rank = torch.arange(1, n + 1, device=sorted_confidence.device, dtype=torch.float64)
        passes = sorted_confidence >= 1 - factor / (rank + 1)
    else:
        raise ValueError("parallel_count needs a threshold or a factor")
    passes[0] = True  # the most confident token is always committed
    count = int(passes.long().cumprod(0).sum())
    return n if quirk and factor is not None and count == n - 1 else count


def finish_at_eos(x: torch.Tensor, special: SpecialIds, *, with_eot: bool = True) -> torch.Tensor:
    """Rows `[B, G]` whose answer is decided: fill them with EOS after the stop and return which rows they are.

    A row is decided when it holds an EOS or end-of-turn token at some position e with no [MASK] before e:
    committed tokens are never remasked and the answer text ends at the first stop token
    (`ChatFormat.decode_answer`), so further steps could only change positions after e, which the text ignores.
    Those positions are set to EOS, the padding the model is trained to predict there. With `with_eot` False
    only EOS stops a row, as in DIFFA-2's published decoder (its answers keep text after an end-of-turn token).
    """
    length = x.shape[1]
    columns = torch.arange(length, device=x.device)
    stop = (x == special.eos) | (x == special.eot) if with_eot else x == special.eos
    masked = x == special.mask
    first_stop = torch.where(stop, columns, length).min(dim=1).values
    first_mask = torch.where(masked, columns, length).min(dim=1).values
    decided = first_stop < first_mask
    x.masked_fill_(decided[:, None] & (columns[None, :] > first_stop[:, None]), special.eos)
    return decided
