"""Batching audio-instruction-answer examples for masked-diffusion SFT.

Prompts stay lists (their speech is spliced in per row by the model); answers are `answer + <|eot_id|>`
right-padded with EOS, and the EOS padding is part of the answer the model learns (LLaDA's SFT convention,
which is what teaches it to fill the rest of a fixed-length canvas with EOS at decoding time).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from diffa2.audio import LogMelFeaturizer
from diffa2.chat import ChatFormat


@dataclass
class SFTExample:
    wave: np.ndarray  # 16 kHz mono float32, already within the model window
    instruction: str
    answer: str
    audio_key: str | None = None  # identifies the clip, so its features can be cached across epochs


@dataclass
class SFTBatch:
    input_features: torch.Tensor  # (B, n_mels, frames)
    feature_lengths: torch.Tensor  # (B,)
    prompt_ids: list[list[int]]
    audio_slots: list[int]
    answer_ids: torch.Tensor  # (B, La) answer + eot + EOS padding
    answer_mask: torch.Tensor  # (B, La) bool: positions that belong to the answer region

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(
            self.input_features.to(device),
            self.feature_lengths.to(device),
            self.prompt_ids,
            self.audio_slots,
            self.answer_ids.to(device),
            self.answer_mask.to(device),
        )


class CachedFeatures:
    """Log-mel features of clips, with an LRU cache for clips that carry an `audio_key` (features are pure
    functions of the audio, and a clip is seen once per epoch, so caching saves the STFT on every later visit)."""

    def __init__(self, featurizer: LogMelFeaturizer, max_items: int = 0) -> None:
        self.featurizer = featurizer
        self.max_items = max_items
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, examples: list[SFTExample]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [ex.audio_key if self.max_items else None for ex in examples]
        missing = [i for i, key in enumerate(keys) if key is None or key not in self.cache]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            features, lengths = self.featurizer([examples[i].wave for i in missing])
            fresh = {i: (features[j], lengths[j]) for j, i in enumerate(missing)}
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                rows.append(fresh[i])
                if key is not None:
                    self.cache[key] = fresh[i]
                    if len(self.cache) > self.max_items:
                        self.cache.popitem(last=False)
            else:
                self.cache.move_to_end(key)
                rows.append(self.cache[key])
        return torch.stack([f for f, _ in rows]), torch.stack([n for _, n in rows])


class SFTCollator:
    """Examples -> `SFTBatch`; `answer_length` fixes the answer region (else the batch's longest answer)."""

    def __init__(
        self,
        chat: ChatFormat,
        featurizer: LogMelFeaturizer,
        answer_length: int | None = None,
        feature_cache_items: int = 0,
    ) -> None:
        self.chat = chat
        self.features = CachedFeatures(featurizer, feature_cache_items)
        self.answer_length = answer_length

    def __call__(self, examples: list[SFTExample]) -> SFTBatch:
        features, feature_lengths = self.features(examples)
        prompts = [self.chat.encode_prompt(ex.instruction) for ex in examples]
        answers = [self.chat.encode_answer(ex.answer) for ex in examples]
        width = self.answer_length or max(len(a) for a in answers)
        too_long = [(i, len(a)) for i, a in enumerate(answers) if len(a) > width]
        if too_long:
            raise ValueError(f"answers longer than answer_length={width} tokens (item, tokens): {too_long}")
        eos = self.chat.ids.eos
        answer_ids = torch.tensor([a + [eos] * (width - len(a)) for a in answers], dtype=torch.long)
        return SFTBatch(
            input_features=features,
            feature_lengths=feature_lengths,
            prompt_ids=[ids for ids, _ in prompts],
            audio_slots=[slot for _, slot in prompts],
            answer_ids=answer_ids,
            answer_mask=torch.ones_like(answer_ids, dtype=torch.bool),
        )
