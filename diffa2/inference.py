"""Answer questions about audio with a DIFFA-2 checkpoint: waveforms + questions in, texts + NFE out.

A question is an instruction about one clip, or a `Conversation` (earlier turns, any number of clips; its clips
are given as a list of waveforms in the clip's row of `waves`, in order; docs/conversations.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffa2.audio import DEFAULT_MAX_AUDIO_SECONDS, LogMelFeaturizer, check_long_audio, split_windows
from diffa2.chat import COMPAT_MODES, ChatFormat, Conversation, Question
from diffa2.diffusion.continuous import ContinuousBatcher
from diffa2.diffusion.decoding import DEFAULT_MODE, DecodeConfig, StepCallback, generate
from diffa2.likelihood import DEFAULT_DRAWS, DEFAULT_FORM, QuestionInputs, Scores, score_candidates, scoring_estimator
from diffa2.modeling.checkpoint import load_pretrained, resolve_source
from diffa2.modeling.model import DIFFA2Model, Prefix, SpeechEmbeddings, join_windows
from diffa2.modeling.presets import tiny_config


def checkpoint_or_random_tiny(
    path: str | Path | None, synth_tokenizer: Path, seed: int
) -> tuple[DIFFA2Model, ChatFormat]:
    """A checkpoint and the tokenizer it records, or (no path) a random tiny DIFFA-2 on the synthetic corpus's
    tokenizer, initialised under `seed`: what a benchmark measures when it is given no trained model."""
    if path is None:
        chat = ChatFormat.from_pretrained(synth_tokenizer)
        torch.manual_seed(seed)
        return DIFFA2Model(tiny_config(chat.ids, len(chat.tokenizer))), chat
    model = load_pretrained(path)
    return model, ChatFormat.from_pretrained(resolve_source(model.config.tokenizer_source, Path(path)))


@dataclass
class Answers:
    texts: list[str]
    token_ids: torch.Tensor  # (B, gen_length)
    nfe: int  # forward passes over the batch
    seconds: float  # the whole call: features, encoder, prefix, decoding
    row_nfe: list[int] = field(default_factory=list)  # per answer: its NFE when decoded alone
    decode_seconds: float = 0.0  # the decoder alone

    @property
    def tokens_per_second(self) -> float:
        """Answer-canvas positions decided per second of the whole call."""
        return self.token_ids.numel() / max(self.seconds, 1e-9)


Clips = np.ndarray | Sequence[np.ndarray]  # a row of `waves`: one clip, or a conversation's clips in order


def row_clips(waves: Sequence[Clips], questions: Sequence[Question]) -> list[np.ndarray]:
    """Every row's clips in order, flat: one per instruction, a conversation's list (its clip count) otherwise."""
    if len(waves) != len(questions):
        raise ValueError(f"{len(waves)} clips but {len(questions)} questions")
    flat: list[np.ndarray] = []
    for i, (wave, question) in enumerate(zip(waves, questions, strict=True)):
        if not isinstance(question, Conversation):
            flat.append(wave)
            continue
        clips = [wave] if isinstance(wave, np.ndarray) else list(wave)
        if len(clips) != len(question.clips):
            raise ValueError(f"row {i}: the conversation has {len(question.clips)} clip(s) but {len(clips)} "
                             "waveform(s) were given")
        flat += clips
    return flat


class AudioQA:
    """A model with its tokenizer/chat format and feature extractor, ready to answer.

    `compat` ("toolkit" or "reference", docs/reference-compat.md) overrides the model's `config.compat`; the chat
    format follows the model's setting either way. `long_audio` ("trim" or "window", docs/long-audio.md) overrides
    the model's `config.long_audio` for this AudioQA (and `prefix`/`answer` take a per-call override); windowed
    clips longer than `max_audio_seconds` are refused.
    """

    def __init__(
        self, model: DIFFA2Model, chat: ChatFormat, compat: str | None = None, *, long_audio: str | None = None,
        max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    ) -> None:
        if compat is not None:
            if compat not in COMPAT_MODES:
                raise ValueError(f"compat must be one of {list(COMPAT_MODES)}, got {compat!r}")
            model.config.compat = compat
        if not max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {max_audio_seconds}")
        self.long_audio = check_long_audio(long_audio or model.config.long_audio)
        self.max_audio_seconds = float(max_audio_seconds)
        self.model = model.eval()
        self.chat = chat.with_compat(model.config.compat)
        self.featurizer = LogMelFeaturizer(n_mels=model.config.n_mels, window_seconds=model.config.window_seconds)
        chat.ids.check_backbone(model.config.backbone)

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", compat: str | None = None, *,
        long_audio: str | None = None, max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    ) -> AudioQA:
        """Load a DIFFA-2 checkpoint and the tokenizer it records; `compat` and `long_audio` override the
        checkpoint's settings."""
        directory = Path(directory)
        model = load_pretrained(directory, device=device)
        tokenizer_dir = resolve_source(model.config.tokenizer_source, directory)
        if tokenizer_dir is None:
            raise ValueError(f"{directory}: config.json records no tokenizer_source")
        return cls(model, ChatFormat.from_pretrained(tokenizer_dir, model.config.system_prompt), compat,
                   long_audio=long_audio, max_audio_seconds=max_audio_seconds)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def speech(self, waves: Sequence[np.ndarray], long_audio: str | None = None) -> SpeechEmbeddings:
        """Features -> speech embeddings, one span per clip. Under `long_audio` "window" (default: this AudioQA's
        setting) a clip is encoded in consecutive encoder windows, at most one batch of windows per encoder call,
        and its windows' spans are concatenated in order; "trim" takes clips that fit the window."""
        if check_long_audio(long_audio or self.long_audio) == "trim":
            features, lengths = self.featurizer(list(waves))
            return self.model.encode_speech(features.to(self.device), lengths.to(self.device))
        if not waves:
            raise ValueError("AudioQA.speech got an empty batch")
        window = self.featurizer.window_seconds
        pieces = [split_windows(np.asarray(w), window, max_seconds=self.max_audio_seconds) for w in waves]
        flat = [piece for row in pieces for piece in row]
        spans: list[torch.Tensor] = []
        for lo in range(0, len(flat), len(waves)):
            features, lengths = self.featurizer(flat[lo : lo + len(waves)])
            spans += self.model.encode_speech(features.to(self.device), lengths.to(self.device)).spans()
        return join_windows(spans, [len(row) for row in pieces])

    @torch.no_grad()
    def prefix(
        self, waves: Sequence[Clips], questions: Sequence[Question], *, long_audio: str | None = None
    ) -> Prefix:
        """Features -> speech embeddings -> prompts with the speech spliced in (`speech` for `long_audio`); a
        conversation's row of `waves` is its list of clips."""
        prompts = [self.chat.encode(q) for q in questions]
        speech = self.speech(row_clips(waves, questions), long_audio)
        return self.model.build_prefix([p for p, _ in prompts], [s for _, s in prompts], speech)

    def batcher(self, *, max_batch: int = 8, max_wait_ms: float = 5.0) -> ContinuousBatcher:
        """A continuous batcher over this model whose jobs' inputs are (wave(s), question or conversation) pairs."""
        return ContinuousBatcher(self.model, self.chat.ids, lambda pairs: self.prefix(*zip(*pairs, strict=True)),
                                 max_batch=max_batch, max_wait_ms=max_wait_ms)

    def answer(
        self,
        waves: Sequence[Clips],
        questions: Sequence[Question],
        config: DecodeConfig | None = None,
        *,
        seed: int | Sequence[int] = 0,
        on_step: StepCallback | None = None,
        long_audio: str | None = None,
    ) -> Answers:
        """Decode one answer per (clip, question) pair, or per (clips, conversation) pair: the answer to its last user
        turn; `config` defaults to the `DEFAULT_MODE` preset, `long_audio` to this AudioQA's setting."""
        start = time.perf_counter()
        config = config or DecodeConfig.preset(DEFAULT_MODE)
        prefix = self.prefix(waves, questions, long_audio=long_audio)
        out = generate(self.model, prefix, self.chat.ids, config, seed=seed, on_step=on_step)
        texts = [self.chat.decode_answer(row.tolist()) for row in out.token_ids]
        return Answers(texts, out.token_ids, out.nfe, time.perf_counter() - start, out.row_nfe.tolist(), out.seconds)

    def score(
        self,
        waves: Sequence[Clips],
        questions: Sequence[Question],
        candidates: Sequence[Sequence[str]],
        *,
        n_draws: int = DEFAULT_DRAWS,
        seed: int | Sequence[int] = 0,
        form: str = DEFAULT_FORM,
    ) -> Scores:
        """Each candidate answer's ELBO under the model, per (clip, question) or (clips, conversation) pair
        (`diffa2.likelihood`).

        `n_draws` Monte-Carlo draws per candidate, shared by a question's candidates and derived from its seed
        (`seed`: one for every question, or one per question), so a question's scores do not depend on its batch.
        Each clip is one encoder window (`long_audio` "window" does not apply here: cut clips to the window).
        """
        if not len(waves) == len(questions) == len(candidates):
            raise ValueError(f"{len(waves)} clips, {len(questions)} questions and {len(candidates)} candidate lists")
        seeds = [seed] * len(questions) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(questions):
            raise ValueError(f"{len(seeds)} seeds for {len(questions)} questions")
        estimator = scoring_estimator(n_draws, form)
        features, lengths = self.featurizer(row_clips(waves, questions))
        features, lengths = features.to(self.device), lengths.to(self.device)
        elbos, tokens, lo = [], [], 0
        for q, (question, texts) in enumerate(zip(questions, candidates, strict=True)):
            prompt_ids, slot = self.chat.encode(question)
            hi = lo + (len(question.clips) if isinstance(question, Conversation) else 1)
            inputs = QuestionInputs(features[lo:hi], lengths[lo:hi], [prompt_ids], [slot])
            lo = hi
            ids = [self.chat.encode_answer(text) for text in texts]
            values = score_candidates(self.model, inputs, ids, self.chat.ids.mask, self.chat.ids.eos, estimator,
                                      seeds[q])
            elbos.append(values.tolist())
            tokens.append([len(a) for a in ids])
        return Scores(elbos, tokens, n_draws)
