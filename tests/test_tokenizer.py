"""The LLaDA-style tokenizer of the embedded default."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diffa2.data import tokenizer as tk
from diffa2.data.synth import COUNT_WORDS, QUESTION_KINDS, STAGES, VOCABULARY, build_synth_corpus

TEXTS = [
    "What is the pitch of the sound?",
    "Is there background noise?",
    "How many beeps are there?",
    "red cat",
    "blue dog moon",
    "three loud high beeps with noise",
] * 5 + ["low", "medium", "high", "yes", "no", "quiet", "loud"] * 10


def _template(system: str, instruction: str, answer: str | None = None) -> str:
    text = (
        f"{tk.BOS_TOKEN}{tk.START_HEADER_TOKEN}system{tk.END_HEADER_TOKEN}\n\n{system}{tk.EOT_TOKEN}"
        f"{tk.START_HEADER_TOKEN}user{tk.END_HEADER_TOKEN}\n\n{tk.AUDIO_PREFIX}{instruction}{tk.EOT_TOKEN}"
        f"{tk.START_HEADER_TOKEN}assistant{tk.END_HEADER_TOKEN}\n\n"
    )
    return text if answer is None else f"{text}{answer}{tk.EOT_TOKEN}{tk.EOS_TOKEN}"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tk.build_tokenizer(TEXTS, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_saved_as_a_hugging_face_tokenizer_directory(tok_dir, tok):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    assert isinstance(tok, PreTrainedTokenizerFast)
    special_map = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert special_map["mask_token"] == "<|mdm_mask|>"


def test_llada_special_tokens(tok):
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    assert tok.mask_token == "<|mdm_mask|>"
    for t in tk.SPECIAL_TOKENS:
        assert t in tok.all_special_tokens
        ids = tok(t)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(t)], t  # one token, never split
    assert len({tok.convert_tokens_to_ids(t) for t in tk.SPECIAL_TOKENS}) == len(tk.SPECIAL_TOKENS)
    assert tok.mask_token_id == tok.convert_tokens_to_ids("<|mdm_mask|>")


def test_no_bos_or_eos_added(tok):
    specials = {tok.convert_tokens_to_ids(t) for t in tk.SPECIAL_TOKENS}
    for text in ("red cat", "How many beeps are there?", ""):
        ids = tok(text)["input_ids"]
        assert not specials & set(ids)
        assert tok.encode(text) == ids
    prompt = _template(tk.SYSTEM_PROMPT_SHORT, "Is there background noise?")
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids


def test_exact_round_trips(tok):
    for text in TEXTS + ["A. medium\nB. low", "  two  spaces ", "ünïcode ✓ 42", tk.MMSU_INSTRUCTION]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    for system in (tk.SYSTEM_PROMPT_SHORT, tk.SYSTEM_PROMPT_LONG):
        full = _template(system, "How many beeps are there?", "three")
        ids = tok(full)["input_ids"]
        assert tok.decode(ids) == full
        stripped = full
        for t in tk.SPECIAL_TOKENS:
            stripped = stripped.replace(t, "")
        assert tok.decode(ids, skip_special_tokens=True) == stripped
        # the answer span decodes alone to exactly the answer
        answer_ids = ids[ids.index(tok.convert_tokens_to_ids(tk.END_HEADER_TOKEN), -6) + 1 :]
        assert tok.decode(answer_ids, skip_special_tokens=True) == "\n\nthree"


def test_template_strings_tokenise_compactly(tok):
    assert len(tok(tk.SYSTEM_PROMPT_SHORT)["input_ids"]) <= 8
    assert len(tok(tk.AUDIO_PREFIX.strip())["input_ids"]) <= 8  # the trailing space joins the next word
    assert len(tok("\n\n")["input_ids"]) == 1
    for role in ("system", "user", "assistant"):
        assert len(tok(role)["input_ids"]) == 1
    for word in ("low", "medium", "high", "yes", "no"):
        assert len(tok(word)["input_ids"]) == 1, word


def test_deterministic_and_order_independent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tk.build_tokenizer(TEXTS, a)
    shuffled = list(TEXTS)
    random.Random(0).shuffle(shuffled)
    tk.build_tokenizer(shuffled, b)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (
            hashlib.sha256((a / name).read_bytes()).digest()
            == hashlib.sha256((b / name).read_bytes()).digest()
        )


def test_vocab_size_is_a_bound(tmp_path):
    small = tk.build_tokenizer(TEXTS, vocab_size=300)
    assert len(small) <= 300
    with pytest.raises(ValueError):
        tk.build_tokenizer(TEXTS, vocab_size=100)


def test_corpus_tokenizer_round_trips_every_answer(tmp_path):
    corpus = build_synth_corpus(tmp_path / "c", seed=0, size="small")
    tok = AutoTokenizer.from_pretrained(str(corpus.tokenizer_dir))
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.mask_token == "<|mdm_mask|>"
    strings = set()
    for stage in STAGES:
        for split in ("train", "validation"):
            for r in json.loads(corpus.manifest(stage, split).read_text()):
                strings |= {r["input"], r["target"], r["transcription"], r.get("rejected", "")}
    for r in json.loads(corpus.test_mmau.read_text()):
        strings |= {r["question"], r["answer"], *r["choices"]}
    strings.discard("")
    for s in strings:
        assert tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s
    # every closed-set answer and vocabulary word is one token, at the start of an answer and after a space
    answers = set(VOCABULARY) | set(COUNT_WORDS)
    for kind in QUESTION_KINDS.values():
        answers |= set(kind.values or ())
    for word in sorted(answers):
        assert len(tok(word)["input_ids"]) == 1, word
        assert len(tok(" " + word)["input_ids"]) == 1, word
