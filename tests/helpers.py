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


def small_run_args(output_dir, synth_dir, steps, extra=()) -> list[str]:
    """Flags of a tiny stage run: a 2-layer 64-wide model, batch 4, a few steps, 4 test items, no tensorboard, no
    ASR warm-up."""
    return ["--synth_dir", str(synth_dir), "--synth_size", "small", "--output_dir", str(output_dir),
            "--max_steps", str(steps),
            "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "1",
            "--tiny_encoder_dim", "32", "--tiny_llm_dim", "64", "--tiny_llm_layers", "2", "--eval_limit", "4",
            "--gen_length", "8", "--block_length", "8", "--decode_steps", "4", "--report_to", "none",
            "--asr_warmup_steps", "0",
            "--disable_tqdm", "true", *extra]
