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

A `Conversation` (docs/conversations.md) generalises the prompt: earlier user and assistant turns, and any number of
clips, each written as `This is the audio: <audio>. ` where it stands in its user turn and spliced right after its
lead-in. A single-turn, single-clip conversation is exactly the prompt above (same text, ids and slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
class AudioRef:
    """Where a clip stands in a user turn; `source` is what names the clip (a path, an array, an upload) or None."""

    source: Any = field(default=None, compare=False)


Part = str | AudioRef
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One turn: its role and its parts (text, and for a user turn clips) in order."""

    role: Literal["user", "assistant"]
    parts: tuple[Part, ...]

    @property
    def clips(self) -> list[AudioRef]:
        return [p for p in self.parts if isinstance(p, AudioRef)]

    @property
    def text(self) -> str:
        """The turn's text parts, stripped and joined by spaces."""
        return " ".join(p.strip() for p in self.parts if isinstance(p, str) and p.strip())


@dataclass(frozen=True)
class Conversation:
    """Turns (user and assistant) ending with the user turn to answer; `system` overrides the chat's system prompt.

    Clips are numbered in order of appearance over the whole conversation; `clips` lists them (their sources).
    """

    turns: tuple[Turn, ...]
    system: str | None = None

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")
        for i, t in enumerate(self.turns):
            if t.role not in ROLES:
                raise ValueError(f"turn {i}: role must be one of {list(ROLES)}, got {t.role!r}")
            if t.role == "assistant" and t.clips:
                raise ValueError(f"turn {i}: an assistant turn cannot hold audio (clips go in user turns)")
            if not t.clips and not t.text:
                raise ValueError(f"turn {i} ({t.role}) is empty: it needs text or a clip")
        if self.turns[-1].role != "user":
            raise ValueError(f"the last turn must be the user turn to answer, got {self.turns[-1].role!r}")

    @classmethod
    def single(cls, instruction: str, source: Any = None) -> Conversation:
        """The classic prompt: one user turn with one clip, then the instruction."""
        return cls((Turn("user", (AudioRef(source), instruction)),))

    @property
    def clips(self) -> list[AudioRef]:
        return [clip for t in self.turns for clip in t.clips]

    @property
    def user_turns(self) -> int:
        return sum(t.role == "user" for t in self.turns)

    def is_single(self) -> bool:
        """Whether this is the classic prompt (one user turn: one clip, then text), what `compat="reference"` takes."""
        only = self.turns[0]
        return (len(self.turns) == 1 and self.system is None and len(only.parts) == 2
                and isinstance(only.parts[0], AudioRef) and isinstance(only.parts[1], str))


def turns_from_messages(messages: Any) -> tuple[list[Turn], str | None]:
    """Messages-style chat -> (turns, system prompt or None): `[{"role": "system"|"user"|"assistant", "content": text
    or [{"type": "text", "text": ...}, {"type": "audio", "audio": source}, ...]}, ...]`; errors name messages[i]."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} objects, got {messages!r:.80}")
    turns: list[Turn] = []
    system = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message.get("role"), message["content"]
        if role not in ("system", *ROLES):
            raise ValueError(f"{where}.role must be one of ['system', 'user', 'assistant'], got {role!r}")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        out: list[Part] = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, str):
                out.append(part)
            elif kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind == "audio" and part.get("audio") is not None:
                out.append(AudioRef(part["audio"]))
            else:
                raise ValueError(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} or "
                                 f"{{'type': 'audio', 'audio': path}}, got {part!r:.80}")
        if role == "system":
            if i or any(isinstance(p, AudioRef) for p in out):
                raise ValueError(f"{where}: a system message comes first and holds text only")
            system = Turn("user", tuple(out)).text
        else:
            turns.append(Turn(role, tuple(out)))
    return turns, system


Question = str | Conversation  # what a prompt is built from: an instruction about one clip, or a conversation


def user_content_texts(parts: Sequence[Part]) -> list[str]:
    """A user turn's content as the texts around its clips (one more than clips): each clip reads
    `This is the audio:` [speech] ` <audio>. `; text parts are stripped, and a space separates a text part from
    whatever follows it."""
    texts = [""]
    for i, part in enumerate(parts):
        if isinstance(part, AudioRef):
            texts[-1] += AUDIO_LEAD_IN
            texts.append(AUDIO_PLACEHOLDER)
        else:
            texts[-1] += part.strip() + (" " if i + 1 < len(parts) else "")
    return texts


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
        before, after = self.conversation_texts(Conversation.single(instruction))
        return before, after

    def conversation_texts(self, conversation: Conversation) -> list[str]:
        """A conversation's prompt as the texts around its clips (one more than clips), the assistant header last."""
        texts = [f"{BOS_TOKEN}{turn('system', conversation.system or self.system_prompt)}"]
        for t in conversation.turns:
            if t.role == "assistant":
                texts[-1] += turn("assistant", t.text)
                continue
            content = user_content_texts(t.parts)
            texts[-1] += f"{START_HEADER}user{END_HEADER}\n\n{content[0]}"
            texts += content[1:]
            texts[-1] += EOT_TOKEN
        texts[-1] += f"{START_HEADER}assistant{END_HEADER}\n\n"
        return texts

    def encode_prompt(self, instruction: str) -> tuple[list[int], int]:
        """Prompt token ids and the audio slot: the number of prompt tokens that precede the speech."""
        if self.compat == "reference":
            return self.encode_prompt_reference(instruction)
        ids, slots = self.encode_conversation(Conversation.single(instruction))
        return ids, slots[0]

    def encode_conversation(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """Prompt ids and one audio slot per clip (in order): the texts around the clips tokenised separately.

        `compat="reference"` takes only the classic prompt (its released template has one clip in one user turn).
        """
        if self.compat == "reference":
            if not conversation.is_single():
                raise ValueError(f"compat='reference' encodes one user turn with one clip then text (the released "
                                 f"DIFFA-2 template); this conversation has {len(conversation.turns)} turn(s) and "
                                 f"{len(conversation.clips)} clip(s): use compat='toolkit'")
            ids, slot = self.encode_prompt_reference(conversation.turns[0].parts[1])
            return ids, [slot]
        ids: list[int] = []
        slots: list[int] = []
        for text in self.conversation_texts(conversation):
            if ids:
                slots.append(len(ids))
            ids += self._encode(text)
        return ids, slots

    def encode(self, question: Question) -> tuple[list[int], int | list[int]]:
        """Prompt ids and slot(s) of an instruction (one slot, `encode_prompt`) or a conversation (a slot per clip)."""
        if isinstance(question, Conversation):
            return self.encode_conversation(question)
        return self.encode_prompt(question)

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
