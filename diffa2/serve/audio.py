"""`input_audio` content parts -> 16 kHz mono waveforms, with the request's audio limits."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from diffa2.audio import SAMPLE_RATE, AudioError, decode_audio_bytes
from diffa2.serve.schema import InputAudio


class RequestError(ValueError):
    """A request the server refuses; `status` is its HTTP status and `param` the field at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def decode_input_audio(part: InputAudio, *, max_seconds: float, param: str) -> np.ndarray:
    """Base64 `data` of an `input_audio` part as a float32 16 kHz mono waveform of at most `max_seconds`."""
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{param}.data is not valid base64 ({exc})", param=param, code="invalid_base64") from exc
    try:
        wave = decode_audio_bytes(raw, name=f"{param} ({part.format})", max_seconds=max_seconds)
    except AudioError as exc:
        raise RequestError(str(exc), param=param, code="invalid_audio") from exc
    seconds = wave.shape[-1] / SAMPLE_RATE
    if seconds > max_seconds:
        raise RequestError(f"{param} is longer than the limit of {max_seconds:g} s of audio per clip",
                           param=param, code="audio_too_long")
    if not np.abs(wave).max() > 0:
        raise RequestError(f"{param} is silent (every sample is 0)", param=param, code="invalid_audio")
    return wave
