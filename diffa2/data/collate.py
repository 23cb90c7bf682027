"""Batching audio-instruction-answer examples for masked-diffusion SFT, and preference pairs for VRPO.

Prompts stay lists (their speech is spliced in per row by the model); answers are `answer + <|eot_id|>`
right-padded with EOS, and the EOS padding is part of the answer the model learns (LLaDA's SFT convention,
which is what teaches it to fill the rest of a fixed-length canvas with EOS at decoding time).

An example's instruction may be a `Conversation` (docs/conversations.md) with its clips as a list of waves: the
batch's features then hold one row per clip (rows' clips in order) and its audio slots a list per such row; the
answer (the last assistant turn) is the only part trained, the earlier turns are prompt.

With `window_seconds` (`long_audio: window`, docs/long-audio.md) a clip longer than the encoder window is cut into
consecutive windows: the features hold one row per window and `window_counts` how many rows each clip took.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from diffa2.audio import LogMelFeaturizer, split_windows
from diffa2.chat import ChatFormat, Question


def clip_counts(audio_slots: list[int | list[int]]) -> list[int]:
    """How many clips (feature rows) each prompt holds: one per slot of a conversation's list, else one."""
    return [len(slot) if isinstance(slot, list) else 1 for slot in audio_slots]


class WithClips:
    """An example whose `wave` is one clip or a conversation's clips, and `audio_key` their key(s)."""

    def clips(self) -> list[tuple[np.ndarray, str | None]]:
        """(wave, audio key) of each clip, in order."""
        if isinstance(self.wave, np.ndarray):
            return [(self.wave, self.audio_key)]
        keys = self.audio_key if isinstance(self.audio_key, list) else [None] * len(self.wave)
        return list(zip(self.wave, keys, strict=True))


@dataclass
class SFTExample(WithClips):
    wave: np.ndarray | list[np.ndarray]  # 16 kHz mono float32 within the model window; a conversation's clips
    instruction: Question
    answer: str
    audio_key: str | list[str | None] | None = None  # identifies the clip(s), so features are cached across epochs


@dataclass
class SFTBatch:
    input_features: torch.Tensor  # (clips, n_mels, frames): one row per clip, B with one clip per example
    feature_lengths: torch.Tensor  # (clips,)
    prompt_ids: list[list[int]]
    audio_slots: list[int | list[int]]
    answer_ids: torch.Tensor  # (B, La) answer + eot + EOS padding
    answer_mask: torch.Tensor  # (B, La) bool: positions that belong to the answer region
    window_counts: list[int] | None = None  # long_audio window: feature rows (encoder windows) of each clip

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(
            self.input_features.to(device),
            self.feature_lengths.to(device),
            self.prompt_ids,
            self.audio_slots,
            self.answer_ids.to(device),
            self.answer_mask.to(device),
            self.window_counts,
        )


class CachedFeatures:
    """Log-mel features of clips, with an LRU cache for clips that carry an `audio_key` (features are pure
    functions of the audio, and a clip is seen once per epoch, so caching saves the STFT on every later visit)."""

    def __init__(self, featurizer: LogMelFeaturizer, max_items: int = 0) -> None:
        self.featurizer = featurizer
        self.max_items = max_items
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, clips: list[tuple[np.ndarray, str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and frame counts of (wave, audio key) clips, one row each."""
        keys = [key if self.max_items else None for _, key in clips]
        missing = [i for i, key in enumerate(keys) if key is None or key not in self.cache]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            features, lengths = self.featurizer([clips[i][0] for i in missing])
            fresh = {i: (features[j], lengths[j]) for j, i in enumerate(missing)}
        rows = dict(fresh)
        for i, key in enumerate(keys):  # read every cached clip before a fresh one can evict it
            if i not in fresh:
                self.cache.move_to_end(key)
                rows[i] = self.cache[key]
        for i, row in fresh.items():
            if keys[i] is not None:
                self.cache[keys[i]] = row
                if len(self.cache) > self.max_items:
                    self.cache.popitem(last=False)
        ordered = [rows[i] for i in range(len(clips))]
        return torch.stack([f for f, _ in ordered]), torch.stack([n for _, n in ordered])


class SFTCollator:
    """Examples -> `SFTBatch`; `answer_length` fixes the answer region (else the batch's longest answer).

    `text_window`, when given, is how many prompt + answer tokens a one-clip row may hold (the backbone's window minus
    the speech tokens of a full clip, `speech_tokens`); a row with k clips holds (k - 1) * `speech_tokens` fewer.
    Answer positions of a row past its room are left out of its answer region. With items checked against the
    window beforehand (`dataset.items_within`, which counts each item's clips the same way), only EOS padding a
    longer batch-mate forced on the row is ever left out. With `window_seconds` every encoder window of a clip
    counts as a clip here.
    """

    def __init__(
        self,
        chat: ChatFormat,
        featurizer: LogMelFeaturizer,
        answer_length: int | None = None,
        feature_cache_items: int = 0,
        text_window: int | None = None,
        speech_tokens: int = 0,
        window_seconds: float | None = None,
    ) -> None:
        self.chat = chat
        self.features = CachedFeatures(featurizer, feature_cache_items)
        self.answer_length = answer_length
        self.text_window = text_window
        self.speech_tokens = speech_tokens
        self.window_seconds = window_seconds

    def __call__(self, examples: list[SFTExample]) -> SFTBatch:
        if self.window_seconds is None:
            features, feature_lengths, prompt_ids, audio_slots = self.encode_inputs(examples)
            window_counts = None
            spans_per_row = clip_counts(audio_slots)
        else:
            features, feature_lengths, prompt_ids, audio_slots, window_counts = self.encode_windowed_inputs(examples)
            per_clip = iter(window_counts)
            spans_per_row = [sum(next(per_clip) for _ in range(clips)) for clips in clip_counts(audio_slots)]
        answer_ids = self.encode_answers([ex.answer for ex in examples])
        return SFTBatch(
            input_features=features,
            feature_lengths=feature_lengths,
            prompt_ids=prompt_ids,
            audio_slots=audio_slots,
            answer_ids=answer_ids,
            answer_mask=self.answer_region(prompt_ids, spans_per_row, answer_ids.shape[1]),
            window_counts=window_counts,
        )

    def answer_region(self, prompt_ids: list[list[int]], spans_per_row: list[int], width: int) -> torch.Tensor:
        """`(B, width)` bool: the answer positions each row holds, all of them unless `text_window` cuts a row
        (a row's speech spans: its clips, or with `window_seconds` its clips' windows)."""
        if self.text_window is None:
            return torch.ones(len(prompt_ids), width, dtype=torch.bool)
        room = torch.tensor([self.text_window - (spans - 1) * self.speech_tokens - len(ids)
                             for ids, spans in zip(prompt_ids, spans_per_row, strict=True)])
        return torch.arange(width)[None, :] < room[:, None]

    def encode_inputs(
        self, examples: list
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[int | list[int]]]:
        """Features (a row per clip), feature lengths, prompt ids and audio slots of examples with `clips()` and
        `instruction`."""
        features, feature_lengths = self.features([c for ex in examples for c in ex.clips()])
        return features, feature_lengths, *self.encode_prompts(examples)

    def encode_prompts(self, examples: list) -> tuple[list[list[int]], list[int | list[int]]]:
        """Prompt ids and audio slot(s) of each example's instruction."""
        prompts = [self.chat.encode(ex.instruction) for ex in examples]
        return [ids for ids, _ in prompts], [slot for _, slot in prompts]

    def encode_windowed_inputs(
        self, examples: list
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[int | list[int]], list[int]]:
        """`encode_inputs` with every clip cut into `window_seconds` windows (a row per window, cached per window),
        plus the number of windows of each clip."""
        windows: list[tuple[np.ndarray, str | None]] = []
        counts: list[int] = []
        for wave, key in (clip for ex in examples for clip in ex.clips()):
            pieces = split_windows(wave, self.window_seconds)
            windows += [(piece, None if key is None else f"{key}#window{j}") for j, piece in enumerate(pieces)]
            counts.append(len(pieces))
        features, feature_lengths = self.features(windows)
        return features, feature_lengths, *self.encode_prompts(examples), counts

    def encode_answers(self, texts: list[str]) -> torch.Tensor:
        """`(N, La)` answer ids: text + `<|eot_id|>`, EOS-padded to `answer_length` (else the longest)."""
        answers = [self.chat.encode_answer(text) for text in texts]
        width = self.answer_length or max(len(a) for a in answers)
        too_long = [(i, len(a)) for i, a in enumerate(answers) if len(a) > width]
        if too_long:
            raise ValueError(f"answers longer than answer_length={width} tokens (item, tokens): {too_long}")
        eos = self.chat.ids.eos
        return torch.tensor([a + [eos] * (width - len(a)) for a in answers], dtype=torch.long)


@dataclass
class PairExample(WithClips):
    """A preference pair: one clip and instruction, a chosen and a rejected answer (VRPO, stage 4)."""

    wave: np.ndarray | list[np.ndarray]
    instruction: Question
    chosen: str
    rejected: str
    audio_key: str | list[str | None] | None = None


@dataclass
class PairBatch:
    """P preference pairs sharing their audio and prompt; both answers are EOS-padded to one width La."""

    input_features: torch.Tensor  # (clips, n_mels, frames)
    feature_lengths: torch.Tensor  # (clips,)
    prompt_ids: list[list[int]]
    audio_slots: list[int | list[int]]
    chosen_ids: torch.Tensor  # (P, La)
    rejected_ids: torch.Tensor  # (P, La)
    answer_mask: torch.Tensor  # (P, La) bool, the answer region of either answer (EOS padding included)

    @property
    def answers(self) -> torch.Tensor:
        """`(2P, La)`: the chosen answers, then the rejected ones."""
        return torch.cat([self.chosen_ids, self.rejected_ids])

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.input_features.to(device), self.feature_lengths.to(device), self.prompt_ids,
                         self.audio_slots, self.chosen_ids.to(device), self.rejected_ids.to(device),
                         self.answer_mask.to(device))


class PairCollator(SFTCollator):
    """`PairExample`s -> `PairBatch`: features and prompt once per pair, answers as in SFT (same width for both)."""

    def __call__(self, examples: list[PairExample]) -> PairBatch:  # type: ignore[override]
        features, feature_lengths, prompt_ids, audio_slots = self.encode_inputs(examples)
        answers = self.encode_answers([ex.chosen for ex in examples] + [ex.rejected for ex in examples])
        chosen, rejected = answers.split(len(examples))
        return PairBatch(features, feature_lengths, prompt_ids, audio_slots, chosen, rejected,
                         torch.ones_like(chosen, dtype=torch.bool))
