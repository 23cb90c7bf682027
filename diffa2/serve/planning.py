"""A validated chat request -> what to decode: the clip, the question and the `DecodeConfig`, or a `RequestError`."""

from __future__ import annotations

from dataclasses import dataclass

from diffa2.diffusion.decoding import DecodeConfig
from diffa2.serve.audio import RequestError
from diffa2.serve.schema import SERVED_MODES, AudioPart, ChatRequest, InputAudio, Limits, TextPart


@dataclass(frozen=True)
class Defaults:
    """The server's decoding settings for fields a request leaves out."""

    decode_mode: str = "parallel"
    gen_length: int = 32


@dataclass(frozen=True)
class Question:
    """The one clip and the question text of a conversation."""

    audio: InputAudio
    audio_param: str
    text: str


def read_conversation(request: ChatRequest, limits: Limits) -> Question:
    """The user's clip and question; refuses what the chat format cannot express (module docs: docs/serving.md)."""
    clips: list[tuple[InputAudio, str]] = []
    texts: list[str] = []
    users = 0
    for i, message in enumerate(request.messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        if message.role != "user":
            if any(isinstance(p, AudioPart) for p in parts):
                raise RequestError(f"messages[{i}] is a {message.role} message with an input_audio part: audio "
                                   "goes in a user message", param=f"messages[{i}].content")
            raise RequestError(f"messages[{i}] has role {message.role!r}: the model answers one user message "
                               "(its system prompt is fixed by the checkpoint, and multi-turn chats are not "
                               "supported)", param=f"messages[{i}].role")
        users += 1
        for j, part in enumerate(parts):
            if isinstance(part, AudioPart):
                clips.append((part.input_audio, f"messages[{i}].content[{j}].input_audio"))
            else:
                texts.append(part.text)
    if users > 1:
        raise RequestError(f"{users} user messages: the model answers one question per request (multi-turn chats "
                           "are not supported)", param="messages")
    if len(clips) > limits.max_clips:
        raise RequestError(f"{len(clips)} input_audio parts: the chat format has one audio slot, so a request "
                           f"carries at most {limits.max_clips} clip (send one request per clip)",
                           param="messages", code="too_many_clips")
    if not clips:
        raise RequestError("no input_audio part: the model answers questions about one audio clip",
                           param="messages", code="missing_audio")
    text = " ".join(t.strip() for t in texts if t.strip())
    if len(text) > limits.max_question_chars:
        raise RequestError(f"the question has {len(text)} characters; the limit is {limits.max_question_chars}",
                           param="messages", code="question_too_long")
    return Question(clips[0][0], clips[0][1], text)


def decode_config(request: ChatRequest, defaults: Defaults, limits: Limits) -> DecodeConfig:
    """The decoding settings of a request: `decode_mode` preset, lengths, sampling; inconsistencies -> 400."""
    mode = request.decode_mode or defaults.decode_mode
    if mode not in SERVED_MODES:
        raise RequestError(f"decode_mode {mode!r} is not served; choose one of {list(SERVED_MODES)} (the KV-cache "
                           "modes are not covered by continuous batching, docs/serving.md)", param="decode_mode")
    bounds = {"max_tokens": request.max_tokens, "max_completion_tokens": request.max_completion_tokens,
              "gen_length": request.gen_length}
    given = {name: value for name, value in bounds.items() if value is not None}
    if len(set(given.values())) > 1:
        raise RequestError(f"{' and '.join(given)} disagree ({given}); give one of them", param="max_tokens")
    gen_length = next(iter(given.values()), defaults.gen_length)
    if gen_length > limits.max_gen_length:
        raise RequestError(f"{next(iter(given), 'gen_length')} {gen_length} is over the limit of "
                           f"{limits.max_gen_length} answer tokens", param=next(iter(given), "gen_length"))
    overrides = {"gen_length": gen_length, "block_length": request.block_length or gen_length,
                 "steps": request.steps or gen_length, "temperature": request.temperature or 0.0}
    for name in ("threshold", "factor", "cfg_scale", "eos_early_exit"):
        if getattr(request, name) is not None:
            overrides[name] = getattr(request, name)
    # The two parallel rules are alternatives: the one a request names replaces the mode's other one.
    if request.factor is not None and request.threshold is None:
        overrides["threshold"] = None
    if request.threshold is not None and request.factor is None:
        overrides["factor"] = None
    try:
        return DecodeConfig.preset(mode, **overrides)
    except ValueError as exc:
        raise RequestError(f"decoding settings: {exc}", param="decode_mode") from exc
