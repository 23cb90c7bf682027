"""The request and response bodies of the OpenAI chat API subset the server speaks, and its limits.

Request fields are OpenAI's (`model`, `messages`, `max_tokens`, `temperature`, `stream`, `n`, `seed`) plus the
decoding fields a client sends through the official client's `extra_body` (`DECODING_FIELDS`); any other field is
refused, so a typo never silently falls back to a default. Content parts are `text` and `input_audio`
(`{"data": base64, "format": "wav" | "mp3" | "flac"}`), as OpenAI defines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffa2.diffusion.decoding import PRESETS

# Modes continuous batching covers (diffa2.diffusion.continuous): the presets without a KV cache.
SERVED_MODES = tuple(name for name, fields in PRESETS.items() if fields.get("cache", "none") == "none")
DECODING_FIELDS = ("decode_mode", "gen_length", "block_length", "steps", "threshold", "factor", "cfg_scale",
                   "eos_early_exit")


class _Strict(BaseModel):
    """Unknown fields, JSON values of the wrong type ("n": "2") and NaN/Infinity are refused, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3", "flac"]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | AudioPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(_Strict):
    """`POST /v1/chat/completions` body: OpenAI's fields this server honours, then the `extra_body` fields."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    # extra_body (DECODING_FIELDS)
    decode_mode: str | None = None
    gen_length: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0, le=1)
    factor: float | None = Field(default=None, gt=0)
    cfg_scale: float | None = Field(default=None, ge=0)
    eos_early_exit: bool | None = None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each limit breached is a 4xx that names it."""

    max_body_bytes: int = 20 * 2**20
    max_audio_seconds: float = 30.0
    max_question_chars: int = 2000  # the text of all turns together
    max_n: int = 8
    max_gen_length: int = 512
    max_clips: int = 4  # clips over all user turns (each spliced at its place, docs/conversations.md)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
