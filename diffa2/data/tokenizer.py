"""A small LLaDA-style tokenizer for the embedded default, trained on the synthetic corpus.

The real LLaDA-8B-Instruct tokenizer has a vocabulary of 126k tokens: far too large for a tiny model trained
on a CPU in minutes. This module trains a byte-level BPE (``tokenizers``) on the corpus texts *and* on the
strings of the chat template and of the evaluation prompts, so that everything the tiny model reads or writes
tokenises compactly (the corpus' answer words end up as single tokens). It carries LLaDA's special tokens
under their real strings; their ids are small, so code must read them from the tokenizer
(``tokenizer.mask_token_id`` and so on), never hard-code LLaDA's 126336 / 126081.

Like LLaDA's tokenizer, nothing is added automatically around an encoded text (no BOS, no EOS): the chat
template writes ``<|startoftext|>`` itself. ``<|endoftext|>`` is both the EOS and the padding token, as DIFFA
sets it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from diffa2.chat import DEFAULT_SYSTEM_PROMPT, DIFFA2_TRAINING_SYSTEM_PROMPT

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
CLS_TOKEN = "[CLS]"

# Order fixes the ids: <|endoftext|> (EOS = PAD) is 0, <|startoftext|> 1, <|mdm_mask|> 2, ...
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    BOS_TOKEN,
    MASK_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    CLS_TOKEN,
)
# Registered as extra special tokens (beyond bos/eos/pad/mask), so that skip_special_tokens drops them too.
EXTRA_SPECIAL_TOKENS: tuple[str, ...] = (START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, CLS_TOKEN)

# Strings of the prompt template (docs/model.md §2.6) and of the evaluation prompts (§7). They
# are training texts of the tokenizer only; the template itself is written by ``diffa2.chat``.
SYSTEM_PROMPT_SHORT = DEFAULT_SYSTEM_PROMPT
SYSTEM_PROMPT_LONG = DIFFA2_TRAINING_SYSTEM_PROMPT
AUDIO_PREFIX = "This is the audio: <audio>. "
MMAU_INSTRUCTION = (
    "You are given the audio and a multiple-choice question. Choose the best answer based only on the speech "
    "content and style."
)
MMSU_INSTRUCTION = (
    "Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
    "**you should only choose A or B or C or D.** Do not provide any additional explanations or content."
)
ASR_INSTRUCTION = "Please transcribe the audio to text."

TEMPLATE_TEXTS: tuple[str, ...] = (
    SYSTEM_PROMPT_SHORT,
    SYSTEM_PROMPT_LONG,
    AUDIO_PREFIX,
    "This is the audio:",
    "system",
    "user",
    "assistant",
    "\n\n",
    "\n",
    MMAU_INSTRUCTION,
    MMSU_INSTRUCTION,
    ASR_INSTRUCTION,
    "Question: ",
    "Choices:",
    "Answer:",
    "A. ",
    "B. ",
    "C. ",
    "D. ",
    "E. ",
    "(A) ",
    "(B) ",
    "(C) ",
    "(D) ",
    "A",
    "B",
    "C",
    "D",
)
# How often each template text is (at least) repeated in the training stream: the template is in every
# example, so it should win merges over rarer corpus strings. Corpus texts count as often as they occur, up to
# the cap.
TEMPLATE_WEIGHT = 32
TEXT_WEIGHT_CAP = 64

# Pre-tokenisation: a word with at most one leading space, single digits, punctuation runs (with an optional
# leading space), newline runs (so "\n\n" of the template can become one token), other whitespace runs.
PRETOKENIZE_PATTERN = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s*[\r\n]+|\s+(?!\S)|\s+"

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def template_training_texts() -> list[str]:
    """The template strings plus whole rendered prompts (so their joins are learned as they really occur)."""
    texts = list(TEMPLATE_TEXTS)
    for system in (SYSTEM_PROMPT_SHORT, SYSTEM_PROMPT_LONG):
        texts.append(
            f"{BOS_TOKEN}{START_HEADER_TOKEN}system{END_HEADER_TOKEN}\n\n{system}{EOT_TOKEN}"
            f"{START_HEADER_TOKEN}user{END_HEADER_TOKEN}\n\n{AUDIO_PREFIX}{ASR_INSTRUCTION}{EOT_TOKEN}"
            f"{START_HEADER_TOKEN}assistant{END_HEADER_TOKEN}\n\n"
        )
    texts.append(f"{MMAU_INSTRUCTION}\nQuestion: ?\nChoices:\nA. \nB. \nC. \nD. \nAnswer:")
    texts.append(f"{MMSU_INSTRUCTION}\n\nQuestion: ?\n\nA. \nB. \nC. \nD. ")
    return texts


def _training_pieces(texts: Iterable[str], cap: int = TEXT_WEIGHT_CAP) -> list[str]:
    """The training stream: texts cut at the special tokens, each distinct piece repeated as often as it
    occurs (at most ``cap`` times), in sorted order, so that the result does not depend on the order of
    ``texts``.

    The BPE trainer does not know about added tokens, so a literal ``<|eot_id|>`` in a training text would be
    learned as ordinary merges; cutting the texts at the special tokens keeps merges for real text. Keeping
    (capped) repetitions lets frequent strings -- the answers -- win merges over one-off ones.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(p for p in _SPECIAL_SPLIT.split(text) if p)
    for text in template_training_texts():
        for piece in _SPECIAL_SPLIT.split(text):
            if piece:
                counts[piece] = max(counts[piece], TEMPLATE_WEIGHT)
    return [piece for piece in sorted(counts) for _ in range(min(counts[piece], cap))]


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    vocab_size: int = 1024,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` plus the template strings; save it to ``out_dir`` if given.

    Deterministic: the same texts (in any order) give the same files. ``vocab_size`` is an upper bound: on a
    small corpus training stops when no pair occurs ``min_frequency`` times.
    """
    special = list(SPECIAL_TOKENS)
    if vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size must be at least {256 + len(special)} (bytes + special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_pieces(texts), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=list(EXTRA_SPECIAL_TOKENS),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=4096,
    )
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """``save_pretrained`` plus a ``special_tokens_map.json`` (which newer transformers no longer write)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": list(EXTRA_SPECIAL_TOKENS),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out
