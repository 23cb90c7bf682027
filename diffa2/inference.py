"""Answer questions about audio with a DIFFA-2 checkpoint: waveforms + questions in, texts + NFE out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffa2.audio import LogMelFeaturizer
from diffa2.chat import COMPAT_MODES, ChatFormat
from diffa2.diffusion.continuous import ContinuousBatcher
from diffa2.diffusion.decoding import DEFAULT_MODE, DecodeConfig, StepCallback, generate
from diffa2.likelihood import DEFAULT_DRAWS, DEFAULT_FORM, QuestionInputs, Scores, score_candidates, scoring_estimator
from diffa2.modeling.checkpoint import load_pretrained, resolve_source
from diffa2.modeling.model import DIFFA2Model, Prefix


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


class AudioQA:
    """A model with its tokenizer/chat format and feature extractor, ready to answer.

    `compat` ("toolkit" or "reference", docs/reference-compat.md) overrides the model's `config.compat`; the chat
    format follows the model's setting either way.
    """

    def __init__(self, model: DIFFA2Model, chat: ChatFormat, compat: str | None = None) -> None:
        if compat is not None:
            if compat not in COMPAT_MODES:
                raise ValueError(f"compat must be one of {list(COMPAT_MODES)}, got {compat!r}")
            model.config.compat = compat
        self.model = model.eval()
        self.chat = chat.with_compat(model.config.compat)
        self.featurizer = LogMelFeaturizer(n_mels=model.config.n_mels, window_seconds=model.config.window_seconds)
        chat.ids.check_backbone(model.config.backbone)

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", compat: str | None = None
    ) -> AudioQA:
        """Load a DIFFA-2 checkpoint and the tokenizer it records; `compat` overrides the checkpoint's setting."""
        directory = Path(directory)
        model = load_pretrained(directory, device=device)
        tokenizer_dir = resolve_source(model.config.tokenizer_source, directory)
        if tokenizer_dir is None:
            raise ValueError(f"{directory}: config.json records no tokenizer_source")
        return cls(model, ChatFormat.from_pretrained(tokenizer_dir, model.config.system_prompt), compat)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def prefix(self, waves: Sequence[np.ndarray], questions: Sequence[str]) -> Prefix:
        """Features -> speech embeddings -> prompts with the speech spliced in."""
        if len(waves) != len(questions):
            raise ValueError(f"{len(waves)} clips but {len(questions)} questions")
        features, lengths = self.featurizer(list(waves))
        speech = self.model.encode_speech(features.to(self.device), lengths.to(self.device))
        prompts = [self.chat.encode_prompt(q) for q in questions]
        return self.model.build_prefix([p for p, _ in prompts], [s for _, s in prompts], speech)

    def batcher(self, *, max_batch: int = 8, max_wait_ms: float = 5.0) -> ContinuousBatcher:
        """A continuous batcher over this model whose jobs' inputs are (wave, question) pairs."""
        return ContinuousBatcher(self.model, self.chat.ids, lambda pairs: self.prefix(*zip(*pairs, strict=True)),
                                 max_batch=max_batch, max_wait_ms=max_wait_ms)

    def answer(
        self,
        waves: Sequence[np.ndarray],
        questions: Sequence[str],
        config: DecodeConfig | None = None,
        *,
        seed: int | Sequence[int] = 0,
        on_step: StepCallback | None = None,
    ) -> Answers:
        """Decode one answer per (clip, question) pair; `config` defaults to the `DEFAULT_MODE` preset."""
        start = time.perf_counter()
        config = config or DecodeConfig.preset(DEFAULT_MODE)
        out = generate(self.model, self.prefix(waves, questions), self.chat.ids, config, seed=seed, on_step=on_step)
        texts = [self.chat.decode_answer(row.tolist()) for row in out.token_ids]
        return Answers(texts, out.token_ids, out.nfe, time.perf_counter() - start, out.row_nfe.tolist(), out.seconds)

    def score(
        self,
        waves: Sequence[np.ndarray],
        questions: Sequence[str],
        candidates: Sequence[Sequence[str]],
        *,
        n_draws: int = DEFAULT_DRAWS,
        seed: int | Sequence[int] = 0,
        form: str = DEFAULT_FORM,
    ) -> Scores:
        """Each candidate answer's ELBO under the model, per (clip, question) pair (`diffa2.likelihood`).

        `n_draws` Monte-Carlo draws per candidate, shared by a question's candidates and derived from its seed
        (`seed`: one for every question, or one per question), so a question's scores do not depend on its batch.
        """
        if not len(waves) == len(questions) == len(candidates):
            raise ValueError(f"{len(waves)} clips, {len(questions)} questions and {len(candidates)} candidate lists")
        seeds = [seed] * len(questions) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(questions):
            raise ValueError(f"{len(seeds)} seeds for {len(questions)} questions")
        estimator = scoring_estimator(n_draws, form)
        features, lengths = self.featurizer(list(waves))
        features, lengths = features.to(self.device), lengths.to(self.device)
        elbos, tokens = [], []
        for q, (question, texts) in enumerate(zip(questions, candidates, strict=True)):
            prompt_ids, slot = self.chat.encode_prompt(question)
            inputs = QuestionInputs(features[q : q + 1], lengths[q : q + 1], [prompt_ids], [slot])
            ids = [self.chat.encode_answer(text) for text in texts]
            values = score_candidates(self.model, inputs, ids, self.chat.ids.mask, self.chat.ids.eos, estimator,
                                      seeds[q])
            elbos.append(values.tolist())
            tokens.append([len(a) for a in ids])
        return Scores(elbos, tokens, n_draws)
