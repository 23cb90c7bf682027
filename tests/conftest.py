"""Shared fixtures: a tokenizer with LLaDA's special tokens and a seeded tiny DIFFA-2."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import TOKENIZER_TEXTS, make_tiny_model  # noqa: E402

from diffa2.chat import ChatFormat  # noqa: E402
from diffa2.data.tokenizer import build_tokenizer  # noqa: E402


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
