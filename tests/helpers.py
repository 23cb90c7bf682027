"""Small builders shared by tests: a seeded tiny DIFFA-2 and synthetic clips."""

from __future__ import annotations

import numpy as np
import torch

from diffa2.chat import ChatFormat
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.presets import tiny_config

TOKENIZER_TEXTS = [
    "What is the pitch of the tone?",
    "How many beeps are there?",
    "high low medium one two three four loud quiet yes no",
    "Please transcribe the audio to text.",
]


def make_tiny_model(chat: ChatFormat, seed: int = 0, **overrides) -> DIFFA2Model:
    """A small random DIFFA-2 (stage 2 path unless overridden), deterministic for a seed."""
    torch.manual_seed(seed)
    sizes = {"encoder_dim": 32, "llm_dim": 64, "llm_layers": 2} | overrides
    return DIFFA2Model(tiny_config(chat.ids, len(chat.tokenizer), **sizes)).eval()


def clip(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A noisy tone of the given length at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
