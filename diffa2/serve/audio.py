"""`input_audio` content parts -> 16 kHz mono waveforms, with the request's audio limits."""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
import soundfile as sf

from diffa2.audio import SAMPLE_RATE, AudioError, decode_audio_bytes
from diffa2.serve.schema import InputAudio


class RequestError(ValueError):
    """A request the server refuses; `status` is its HTTP status and `param` the field at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


# libsndfile's container names -> the `input_audio.format` a client declares for them
CONTAINERS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac", "MP3": "mp3"}
STREAMED_SIZES = (0, 0xFFFFFFFF)  # a WAV written to a pipe leaves its data size unknown


def wav_missing_bytes(raw: bytes) -> int:
    """How many bytes of its `data` chunk a RIFF/WAVE file lacks (0: complete, or a streamed size left unknown)."""
    offset = 12
    while offset + 8 <= len(raw):
        chunk, size = struct.unpack_from("<4sI", raw, offset)
        if chunk == b"data":
            return 0 if size in STREAMED_SIZES else max(0, size - (len(raw) - offset - 8))
        offset += 8 + size + size % 2
    return 0


def check_container(raw: bytes, declared: str, param: str) -> None:
    """Refuse data whose container is not the declared `format`, and a WAV cut short of its declared length."""
    try:
        container = sf.info(io.BytesIO(raw)).format
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return  # not decodable at all: decode_audio_bytes says so
    actual = CONTAINERS.get(container)
    if actual is not None and actual != declared:
        raise RequestError(f"{param}.format is {declared!r} but the data is a {container} file: send format "
                           f"{actual!r}", param=f"{param}.format", code="format_mismatch")
    missing = wav_missing_bytes(raw) if actual == "wav" else 0
    if missing:
        raise RequestError(f"{param}.data is a truncated WAV file: its data chunk lacks {missing} of the bytes its "
                           "header declares (expected the whole file, base64-encoded)", param=param,
                           code="invalid_audio")


def decode_input_audio(part: InputAudio, *, max_seconds: float, param: str) -> np.ndarray:
    """Base64 `data` of an `input_audio` part as a float32 16 kHz mono waveform of at most `max_seconds`."""
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{param}.data is not valid base64 ({exc})", param=param, code="invalid_base64") from exc
    check_container(raw, part.format, param)
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
