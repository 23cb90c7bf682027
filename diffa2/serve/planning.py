"""A validated chat request -> what to decode: the clips, the conversation and the `DecodeConfig`, or a
`RequestError`."""

from __future__ import annotations

from dataclasses import dataclass

from diffa2.chat import AudioRef, Conversation, Turn
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
    """The conversation to answer and its clips in order (with where each is in the request)."""

    conversation: Conversation
    clips: list[tuple[InputAudio, str]]


def read_conversation(request: ChatRequest, limits: Limits) -> Question:
    """The user and assistant turns and the clips; refuses what the chat format cannot express (docs/serving.md).

    A user message's clips go first, in order, then its text parts joined by spaces: the placement the model was
    trained on (`This is the audio: <audio>. {question}`), so a one-message request is the classic prompt.
    """
    clips: list[tuple[InputAudio, str]] = []
    turns: list[Turn] = []
    for i, message in enumerate(request.messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        audio = [(j, p.input_audio) for j, p in enumerate(parts) if isinstance(p, AudioPart)]
        if message.role not in ("user", "assistant"):
            if audio:
                raise RequestError(f"messages[{i}] is a {message.role} message with an input_audio part: audio "
                                   "goes in a user message", param=f"messages[{i}].content")
            raise RequestError(f"messages[{i}] has role {message.role!r}: the model's system prompt is fixed by the "
                               "checkpoint; send user and assistant messages", param=f"messages[{i}].role")
        if message.role == "assistant" and audio:
            raise RequestError(f"messages[{i}] is an assistant message with an input_audio part: audio goes in a user "
                               "message", param=f"messages[{i}].content")
        clips += [(data, f"messages[{i}].content[{j}].input_audio") for j, data in audio]
        text = " ".join(p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip())
        turns.append(Turn(message.role, (*(AudioRef() for _ in audio), text)))
    if len(clips) > limits.max_clips:
        raise RequestError(f"{len(clips)} input_audio parts: a request carries at most {limits.max_clips} clips",
                           param="messages", code="too_many_clips")
    if not clips:
        raise RequestError("no input_audio part: the model answers questions about audio clips",
                           param="messages", code="missing_audio")
    chars = sum(len(t.text) for t in turns)
    if chars > limits.max_question_chars:
        raise RequestError(f"the conversation's text has {chars} characters; the limit is "
                           f"{limits.max_question_chars}", param="messages", code="question_too_long")
    try:
        conversation = Conversation(tuple(turns))
    except ValueError as exc:
        raise RequestError(f"messages: {exc}", param="messages") from exc
    return Question(conversation, clips)


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
