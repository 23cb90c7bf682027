"""Where a decoding step's logits come from: a full forward pass, or Fast-dLLM's block-wise approximate KV cache.

Fast-dLLM (arXiv 2505.22618 §3.2; `NVlabs/Fast-dLLM:llada/generate.py`, `docs/decoding.md` §4): at the
first step of a block the whole sequence is run and the keys/values of every position outside the block are
kept; the block's other steps feed only the positions whose K/V change, and they attend to the kept ones.

- prefix cache: keeps everything left of the block (system prompt, speech span, decoded blocks) and feeds the
  block plus the masked suffix to its right;
- dual cache: keeps the suffix too and feeds only the block.

The cache is transformers' `DynamicCache`, filled by the backbone's own attention. Attention is bidirectional,
so the order of keys does not matter: the dual cache keeps [left | suffix] and the fed block's K/V are appended
after them for one step, then cropped. RoPE positions are rotated into the keys when they are computed, from
the same per-row `positions_from_mask` as a full pass, so left-padded rows keep their own positions, and padded
columns stay masked in every step. Each classifier-free-guidance branch has its own cache.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import DynamicCache

from diffa2.modeling.backbone import positions_from_mask


class BlockLogits(Protocol):
    """One branch (conditional or unconditional) of a decoding step."""

    def block_logits(self, x: torch.Tensor, lo: int, hi: int, step: int) -> torch.Tensor: ...


class FullPass:
    """No cache: every step runs prefix + whole canvas (LLaDA's reference decoding)."""

    def __init__(self, model, prefix) -> None:
        self.model = model
        self.prefix = prefix

    def block_logits(self, x: torch.Tensor, lo: int, hi: int, step: int) -> torch.Tensor:
        """Logits `[B, hi-lo, V]` of block [lo, hi) of the answer canvas `x` `[B, G]`."""
        return self.model.answer_logits(self.prefix, x)[:, lo:hi]


class BlockCache:
    """Block-wise approximate KV cache (prefix or dual) for one prefix, refreshed at the start of every block."""

    def __init__(self, model, prefix, *, dual: bool, refresh_every: int | None = None) -> None:
        if not (hasattr(model, "backbone_inputs") and hasattr(model, "backbone")):
            raise TypeError(f"a KV cache needs a DIFFA2Model-like model (backbone_inputs, backbone); "
                            f"got {type(model).__name__}")
        self.model = model
        self.prefix = prefix
        self.dual = dual
        self.refresh_every = refresh_every
        self.width = prefix.embeds.shape[1]
        self.cache: DynamicCache | None = None

    def block_logits(self, x: torch.Tensor, lo: int, hi: int, step: int) -> torch.Tensor:
        """Logits `[B, hi-lo, V]` of block [lo, hi): a full pass that refills the cache at the block's first step
        (and every `refresh_every` steps), otherwise only the fed span run against the cached K/V."""
        periodic = self.refresh_every is not None and step % self.refresh_every == 0
        return self._refresh(x, lo, hi) if self.cache is None or step == 0 or periodic else self._reuse(x, lo, hi)

    def _fed_span(self, x: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
        """Answer columns fed at a cached step: the block, plus the suffix for a prefix cache."""
        return lo, hi if self.dual else x.shape[1]

    def _refresh(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        embeds, mask = self.model.backbone_inputs(self.prefix, x)
        positions = positions_from_mask(mask)
        cache = self.model.backbone.new_cache()
        logits = self.model.backbone(embeds, mask, positions, cache=cache)
        a, b = (self.width + c for c in self._fed_span(x, lo, hi))
        kept = torch.cat([torch.arange(a), torch.arange(b, mask.shape[1])]).to(mask.device)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
        self.cache = cache
        self.kept_mask, self.fed_mask, self.fed_positions = mask[:, kept], mask[:, a:b], positions[:, a:b]
        return logits[:, self.width + lo : self.width + hi]

    def _reuse(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        a, b = self._fed_span(x, lo, hi)
        embeds = self.model.backbone.embed(x[:, a:b]).to(self.prefix.embeds.dtype)
        mask = torch.cat([self.kept_mask, self.fed_mask], dim=1)
        logits = self.model.backbone(embeds, mask, self.fed_positions, cache=self.cache)
        self.cache.crop(-(b - a))  # drop this step's K/V: the cache again holds only the kept columns
        return logits[:, : hi - lo]
