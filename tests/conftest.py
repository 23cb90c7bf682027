"""Shared fixtures: a tokenizer with LLaDA's special tokens and a seeded tiny DIFFA-2."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread for every test and every process a test starts (diffa2.threads honours OMP_NUM_THREADS): the tiny
# model's tensors are so small that intra-op threads only add overhead (10x on a busy machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import TOKENIZER_TEXTS, make_tiny_model  # noqa: E402
from tiny_checkpoints import write_tiny_hf_whisper  # noqa: E402
from tiny_llada import write_tiny_llada  # noqa: E402

from diffa2.chat import ChatFormat  # noqa: E402
from diffa2.data.tokenizer import build_tokenizer  # noqa: E402
from diffa2.modeling.checkpoint import save_pretrained  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TOKENIZER_TEXTS, directory, vocab_size=400, min_frequency=1)
    return directory


@pytest.fixture(scope="session")
def chat(tokenizer_dir) -> ChatFormat:
    return ChatFormat.from_pretrained(tokenizer_dir)


@pytest.fixture
def tiny_model(chat):
    return make_tiny_model(chat)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs on one torch thread (see OMP_NUM_THREADS above)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint(chat, tmp_path_factory):
    """A saved tiny DIFFA-2 checkpoint with its tokenizer (random weights)."""
    directory = tmp_path_factory.mktemp("ckpt")
    save_pretrained(make_tiny_model(chat), directory, tokenizer=chat.tokenizer)
    return directory


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The synthetic corpus at its "small" size, built once per test session."""
    from diffa2.data.synth import build_synth_corpus

    return build_synth_corpus(tmp_path_factory.mktemp("synth"), seed=0, size="small").root


@pytest.fixture
def real_format_bases(tmp_path, chat, tokenizer_dir):
    """Whisper (32 layers, so DIFFA-2's large-v3 taps exist) and LLaDA dirs in the published formats, tiny sizes."""
    whisper = write_tiny_hf_whisper(tmp_path / "whisper", d_model=32, layers=32, max_source_positions=100)
    llada = tmp_path / "llada"
    write_tiny_llada(llada, vocab=len(chat.tokenizer), mask_id=chat.ids.mask, eos_id=chat.ids.eos)
    for file in tokenizer_dir.iterdir():  # the real LLaDA directory carries its tokenizer
        shutil.copy(file, llada / file.name)
    audio = tmp_path / "audio"
    audio.mkdir()
    records = []
    for i in range(3):
        sf.write(audio / f"{i}.wav", (0.1 * np.sin(np.arange(8000) * (0.05 + 0.02 * i))).astype(np.float32), 16000)
        records.append({"audio_id": str(i), "audio_filepath": f"{i}.wav", "transcription": "one two",
                        "input": "What is the pitch?", "target": "high", "rejected": "low", "dataset": "t",
                        "duration": 0.5})
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\ntrain:\n  - path: {tmp_path / 'data.json'}\n    audio_root: {audio}\n"
                      f"validation:\n  - path: {tmp_path / 'data.json'}\n    audio_root: {audio}\n")
    return whisper, llada, recipe
