"""The LLaMA-3-style chat prompt DIFFA-2 uses, where the speech goes, and the tokenizer's special ids.

Prompt (as NKU-HLT/DIFFA DIFFA-2/src/dataloader.py, `build_chat_prompt`, writes it): `<|startoftext|>` then, per
turn, `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the assistant header. The user
turn is `This is the audio: <audio>. {instruction}`; the speech embeddings are spliced right after
`This is the audio:` and the literal `<audio>` text stays, as in the reference.

`compat="toolkit"` (the default) differs from the reference code deliberately, each a fix of a train/test mismatch:
- the assistant header is part of the prompt in training too (the reference masks and trains it);
- the text before and after the audio slot is tokenised separately, so the slot is exact rather than
  "prefix length - 1", which depends on tokenizer details;
- a generated answer ends at its first EOS or end-of-turn token.
`compat="reference"` reproduces the released code instead (docs/reference-compat.md): the whole prompt tokenised
at once with the reference's slot rule, and answers decoded whole with special tokens skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant."
# The system prompt of DIFFA-2's training data (NKU-HLT/DIFFA DIFFA-2/src/dataloader.py, collate_fn); its inference
# code answers with DEFAULT_SYSTEM_PROMPT (docs/reference-compat.md).
DIFFA2_TRAINING_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Imagine you can hear the audio clips. Focus on the audios and "
    "respond directly to the prompts."
)
# "toolkit": the toolkit's batch-safe fixes; "reference": the released DIFFA-2 code's behaviour
# (docs/reference-compat.md). `DIFFA2Config.compat` and every `--compat` flag take these.
Compat = Literal["toolkit", "reference"]
COMPAT_MODES: tuple[Compat, ...] = ("toolkit", "reference")
AUDIO_LEAD_IN = "This is the audio:"
AUDIO_PLACEHOLDER = " <audio>. "

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"


def turn(role: str, content: str) -> str:
    """One chat turn in LLaDA's template."""
    return f"{START_HEADER}{role}{END_HEADER}\n\n{content.strip()}{EOT_TOKEN}"


def reference_chat(turns: list[tuple[str, str]], *, generation_prompt: bool) -> str:
    """A chat as the reference's `build_chat_prompt` writes it: BOS, the turns verbatim, optionally the assistant
    header (NKU-HLT/DIFFA DIFFA-2/src/dataloader.py)."""
    text = BOS_TOKEN + "".join(f"{START_HEADER}{role}{END_HEADER}\n\n{content}{EOT_TOKEN}" for role, content in turns)
    return text + (f"{START_HEADER}assistant{END_HEADER}\n\n" if generation_prompt else "")


@dataclass(frozen=True)
class SpecialIds:
    """LLaDA's special token ids, read from the tokenizer and checked against the backbone config."""

    mask: int
    eos: int
    pad: int
    eot: int
    bos: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        def token_id(token: str) -> int:
            found = tokenizer.convert_tokens_to_ids(token)
            if found is None or found == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no special token {token!r}")
            return int(found)

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else token_id(EOS_TOKEN)
        return cls(mask=token_id(MASK_TOKEN), eos=token_id(EOS_TOKEN), pad=int(pad), eot=token_id(EOT_TOKEN),
                   bos=token_id(BOS_TOKEN))

    def check_backbone(self, llada_config: dict) -> None:
        """Fail early if tokenizer and backbone disagree on the ids decoding depends on."""
        for name, ours in (("mask_token_id", self.mask), ("eos_token_id", self.eos)):
            theirs = llada_config.get(name)
            if theirs is not None and int(theirs) != ours:
                raise ValueError(f"tokenizer says {name}={ours} but the backbone config says {theirs}")
        if self.pad == self.mask:
            raise ValueError("pad token id equals the mask token id; padding would look like noise")


class ChatFormat:
    """Tokenises prompts (with the audio slot) and answers; decodes generated answers; `compat` picks the rules."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, system_prompt: str = DEFAULT_SYSTEM_PROMPT, compat: str = "toolkit"
    ) -> None:
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {list(COMPAT_MODES)}, got {compat!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.compat = compat
        self.ids = SpecialIds.from_tokenizer(tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, compat: str = "toolkit"
    ) -> ChatFormat:
        """Load the tokenizer of a backbone or checkpoint directory (never with remote code)."""
        return cls(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False), system_prompt, compat)

    def with_compat(self, compat: str) -> ChatFormat:
        """This format (same tokenizer and system prompt) under `compat`'s rules."""
        return self if compat == self.compat else ChatFormat(self.tokenizer, self.system_prompt, compat)

    def _encode(self, text: str) -> list[int]:
        # The template writes BOS itself; LLaDA's tokenizer adds none, and neither must we.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_texts(self, instruction: str) -> tuple[str, str]:
        """The prompt as (text before the speech, text after it)."""
        before = f"{BOS_TOKEN}{turn('system', self.system_prompt)}{START_HEADER}user{END_HEADER}\n\n{AUDIO_LEAD_IN}"
        after = f"{AUDIO_PLACEHOLDER}{instruction.strip()}{EOT_TOKEN}{START_HEADER}assistant{END_HEADER}\n\n"
        return before, after

    def encode_prompt(self, instruction: str) -> tuple[list[int], int]:
        """Prompt token ids and the audio slot: the number of prompt tokens that precede the speech."""
        if self.compat == "reference":
            return self.encode_prompt_reference(instruction)
        before, after = self.prompt_texts(instruction)
        before_ids = self._encode(before)
        return before_ids + self._encode(after), len(before_ids)

    def reference_prompt_texts(self, instruction: str) -> tuple[str, str]:
        """The reference's (slot-counting text, whole prompt): the chat of [system, user "This is the audio: "]
        minus its last 10 characters (`<|eot_id|>`), and the chat with the real user turn and the assistant
        header (NKU-HLT/DIFFA DIFFA-2/src/modeling_DIFFA.py, `DIFFAModel.generate`); contents are not stripped."""
        system = ("system", self.system_prompt)
        lead = reference_chat([system, ("user", f"{AUDIO_LEAD_IN} ")], generation_prompt=False)
        whole = reference_chat([system, ("user", f"{AUDIO_LEAD_IN}{AUDIO_PLACEHOLDER}{instruction}")],
                               generation_prompt=True)
        return lead[: -len(EOT_TOKEN)], whole

    def encode_prompt_reference(self, instruction: str) -> tuple[list[int], int]:
        """Prompt ids and audio slot by the reference's rule: the whole prompt tokenised at once (the tokenizer's
        default special tokens, as the reference calls it), slot = token count of the slot-counting text - 1."""
        lead, whole = self.reference_prompt_texts(instruction)
        return self.tokenizer(whole)["input_ids"], len(self.tokenizer(lead)["input_ids"]) - 1

    def encode_answer(self, answer: str) -> list[int]:
        """Answer ids as trained: the text, then `<|eot_id|>` (EOS padding is added by the collator)."""
        return self._encode(answer.strip()) + [self.ids.eot]

    def decode_answer(self, token_ids: list[int]) -> str:
        """Text of a generated answer: toolkit, everything before the first EOS or end-of-turn token; reference,
        every generated id with special tokens skipped, stripped (DIFFA-2/src/utils.py, `generate_response`)."""
        if self.compat == "reference":
            return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        stop = {self.ids.eos, self.ids.eot}
        end = next((i for i, t in enumerate(token_ids) if t in stop), len(token_ids))
        return self.tokenizer.decode(token_ids[:end], skip_special_tokens=True).strip()
