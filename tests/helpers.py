"""Small builders shared by tests: a seeded tiny DIFFA-2 and synthetic clips."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from diffa2.chat import ChatFormat
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.presets import tiny_config
from diffa2.run_lock import pid_alive

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


def sft_stage_options(argv: list[str]) -> tuple:
    """The option dataclasses `python -m diffa2.stages.sft` parses from `argv`: its embedded defaults (a 2 s window,
    say), then the flags."""
    from diffa2.config import parse_config
    from diffa2.stages import sft
    from diffa2.stages.cli import SFT_ARG_TYPES, stage_overrides

    return parse_config(SFT_ARG_TYPES, argv, "test", overrides=stage_overrides("sft", sft.DEFAULTS, argv))


def process_tree(pid: int) -> list[int]:
    """`pid` and every process it started, directly or not (read from Linux /proc), parents before children."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # it ended meanwhile
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        tree += [child for child, of in parents.items() if of == parent]
    return tree


def sigkill_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> list[int]:
    """SIGKILL a launcher started with `start_new_session=True` and everything it started, and wait until all are
    dead; returns their PIDs (the launcher first).

    torchrun's agent runs each worker in a session of its own, so killing the agent's process group alone orphans
    the workers, which then train on to the end. Every process group of the tree is first stopped (SIGSTOP: nothing
    runs on while the others are being killed), then killed; an orphaned worker may stay a zombie, which counts as
    dead (`pid_alive`)."""
    tree = process_tree(process.pid)
    groups = {}
    for pid in tree:
        with suppress(ProcessLookupError):
            groups[os.getpgid(pid)] = pid
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for group in groups:
            with suppress(ProcessLookupError):
                os.killpg(group, sig)
    assert process.wait(timeout) == -signal.SIGKILL
    deadline = time.monotonic() + timeout
    while any(map(pid_alive, tree[1:])):
        assert time.monotonic() < deadline, f"processes of {tree} still alive {timeout} s after SIGKILL"
        time.sleep(0.01)
    return tree


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `bench/<name>.py` (bench scripts are files, not package modules)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.build_parser()


def bench_parsers() -> dict[str, argparse.ArgumentParser]:
    """`bench/<name>` -> its parser, for every script in bench/."""
    return {f"bench/{path.stem}": bench_parser(path.stem) for path in sorted(BENCH.glob("*.py"))}
