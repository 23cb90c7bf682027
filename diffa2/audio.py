"""Audio decoding, trimming and Whisper log-mel features.

Everything the speech front end needs between a file (or in-memory bytes) and the encoder input:

* ``load_audio`` / ``decode_audio_bytes``: decode with soundfile (libsndfile), mix down to mono, resample to
  16 kHz with librosa's soxr backend and validate (missing, corrupt, empty, NaN/inf) with one error type.
  With ``max_seconds`` only the start of a long file is decoded (a 2-hour file costs a window of memory).
* ``trim_to_window``: cut a clip to the encoder window and report whether it was cut.
* ``split_windows``: cut a clip into consecutive encoder windows (``long_audio: window``, docs/long-audio.md).
* ``LogMelFeaturizer``: Whisper log-mel features from transformers' ``WhisperFeatureExtractor``, always padded
  to the full window, plus the number of real mel frames per clip.

torchaudio is deliberately not used: it has no CPU wheel matching the pinned torch (see
docs/environment.md).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

SAMPLE_RATE = 16000
# Whisper's fixed STFT front end (openai/whisper whisper/audio.py; HF preprocessor_config.json of
# openai/whisper-large-v3): 400-sample window, 160-sample hop, so 100 mel frames per second at 16 kHz.
N_FFT = 400
HOP_LENGTH = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
SUPPORTED_N_MELS = (80, 128)
# Decoded beyond ``max_seconds`` so that resampling near the cut sees the same neighbours as a full decode,
# and so that ``trim_to_window`` still reports the cut.
DECODE_MARGIN_SECONDS = 1.0


class AudioError(ValueError):
    """Audio that cannot be used; the message names the source, the problem and what was expected."""

    def __init__(self, source: str, problem: str, *, expected: str | None = None, where: str | None = None):
        self.source = source
        self.problem = problem
        self.expected = expected
        self.where = where
        message = f"{source}: {problem}"
        if expected:
            message += f"; expected {expected}"
        if where:
            message += f" (referenced from {where})"
        super().__init__(message)


def load_audio(
    path: str | Path, *, sample_rate: int = SAMPLE_RATE, where: str | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``sample_rate``, raising AudioError on bad files.

    With ``max_seconds``, at most that much (plus a margin) is decoded: cut the result with ``trim_to_window``.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(str(path), "file not found", expected="an existing audio file", where=where)
    if not path.is_file():
        raise AudioError(str(path), "is not a regular file", expected="an audio file", where=where)
    return _decode(path, str(path), sample_rate=sample_rate, where=where, max_seconds=max_seconds)


def decode_audio_bytes(
    data: bytes, *, sample_rate: int = SAMPLE_RATE, name: str = "<audio bytes>", where: str | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode in-memory audio (e.g. HF datasets ``Audio(decode=False)`` bytes) exactly like ``load_audio``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AudioError(name, f"got {type(data).__name__}", expected="bytes of an audio file", where=where)
    return _decode(io.BytesIO(bytes(data)), name, sample_rate=sample_rate, where=where, max_seconds=max_seconds)


def _decode(
    source: Path | io.BytesIO, label: str, *, sample_rate: int, where: str | None, max_seconds: float | None
) -> np.ndarray:
    """Shared decode + validate + mono + resample path of ``load_audio`` and ``decode_audio_bytes``."""
    if isinstance(source, io.BytesIO) and source.getbuffer().nbytes == 0:
        raise AudioError(label, "is empty (0 bytes)", expected="an encoded audio file", where=where)
    if isinstance(source, Path) and source.stat().st_size == 0:
        raise AudioError(label, "is empty (0 bytes)", expected="an encoded audio file", where=where)
    try:
        with sf.SoundFile(source) as handle:
            native_rate = handle.samplerate
            frames = -1 if max_seconds is None else math.ceil((max_seconds + DECODE_MARGIN_SECONDS) * native_rate)
            # always_2d gives (frames, channels); dtype float32 maps any PCM subtype (U8/16/24/32) into [-1, 1).
            data = handle.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(
            label,
            f"cannot be decoded by libsndfile ({exc})",
            expected="a wav/flac/ogg/mp3 file",
            where=where,
        ) from exc
    if data.shape[0] == 0:
        raise AudioError(
            label, "contains no samples (zero-length audio)", expected="at least one sample", where=where
        )
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(
            label, f"contains {bad} NaN/inf sample values", expected="finite samples", where=where
        )
    return _to_mono_resampled(data, int(native_rate), sample_rate)


def _to_mono_resampled(data: np.ndarray, native_rate: int, sample_rate: int) -> np.ndarray:
    """Average channels to mono, resample with soxr (librosa ``soxr_hq``) and clip to [-1, 1]."""
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if native_rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")
    # Float files may legitimately exceed full scale and resampling can overshoot slightly (Gibbs);
    # the contract of this module is samples in [-1, 1].
    return np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32)


def trim_to_window(
    wave: np.ndarray, max_seconds: float, *, sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, bool]:
    """Keep at most ``max_seconds`` of ``wave``; the flag says whether it was cut, so callers can count."""
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    max_samples = int(round(max_seconds * sample_rate))
    if wave.shape[-1] <= max_samples:
        return wave, False
    return wave[..., :max_samples], True


LONG_AUDIO_MODES = ("trim", "window")  # a clip over the encoder window: cut to it, or encoded window by window
DEFAULT_MAX_AUDIO_SECONDS = 120.0  # the longest clip `long_audio: window` encodes unless told otherwise


def check_long_audio(mode: str) -> str:
    """`mode` when it is one of LONG_AUDIO_MODES, else a ValueError naming the allowed ones."""
    if mode not in LONG_AUDIO_MODES:
        raise ValueError(f"long_audio must be one of {list(LONG_AUDIO_MODES)}, got {mode!r}")
    return mode


def split_windows(
    wave: np.ndarray, window_seconds: float, *, max_seconds: float | None = None, sample_rate: int = SAMPLE_RATE
) -> list[np.ndarray]:
    """``wave`` cut into consecutive ``window_seconds`` pieces (the last one shorter: the featurizer pads it, as it
    pads any clip); a clip over ``max_seconds`` is refused, naming its length and the limit."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    samples = wave.shape[-1]
    if max_seconds is not None and samples > int(round(max_seconds * sample_rate)):
        raise ValueError(f"a {samples / sample_rate:.2f} s clip exceeds max_audio_seconds={max_seconds:g} "
                         f"(long_audio 'window'); raise the limit or cut the clip")
    step = int(round(window_seconds * sample_rate))
    return [wave[..., lo : lo + step] for lo in range(0, max(samples, 1), step)]


class LogMelFeaturizer:
    """Whisper log-mel features padded to a fixed window, with the real frame count of every clip."""

    def __init__(self, n_mels: int = 80, window_seconds: float = 30):
        if n_mels not in SUPPORTED_N_MELS:
            raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS} (Whisper's mel banks), got {n_mels}")
        frames = window_seconds * FRAMES_PER_SECOND
        if window_seconds <= 0 or abs(frames - round(frames)) > 1e-9:
            raise ValueError(
                f"window_seconds must be a positive multiple of 10 ms (whole frames), got {window_seconds}"
            )
        self.n_mels = n_mels
        self.window_seconds = window_seconds
        self._frames = int(round(frames))
        self.n_samples = self._frames * HOP_LENGTH
        chunk_length = int(window_seconds) if float(window_seconds).is_integer() else float(window_seconds)
        self.extractor = WhisperFeatureExtractor(
            feature_size=n_mels,
            sampling_rate=SAMPLE_RATE,
            hop_length=HOP_LENGTH,
            chunk_length=chunk_length,
            n_fft=N_FFT,
            padding_value=0.0,
        )

    @classmethod
    def from_pretrained(cls, whisper_dir: str | Path) -> LogMelFeaturizer:
        """Build from a Whisper directory: preprocessor_config.json when present, else config.json."""
        whisper_dir = Path(whisper_dir)
        pre_path = whisper_dir / "preprocessor_config.json"
        cfg_path = whisper_dir / "config.json"
        window_from_config = None
        n_mels_from_config = None
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            if "max_source_positions" in cfg and "num_mel_bins" in cfg:
                # The encoder needs exactly 2 * max_source_positions mel frames (conv2 has stride 2).
                window_from_config = 2 * cfg["max_source_positions"] / FRAMES_PER_SECOND
                n_mels_from_config = cfg["num_mel_bins"]
        if pre_path.is_file():
            pre = json.loads(pre_path.read_text())
            for key, want in (("sampling_rate", SAMPLE_RATE), ("hop_length", HOP_LENGTH), ("n_fft", N_FFT)):
                if pre.get(key, want) != want:
                    raise ValueError(f"{pre_path}: {key}={pre[key]} is not supported (expected {want})")
            n_mels = pre.get("feature_size", 80)
            window = pre.get("chunk_length", 30)
            if n_mels_from_config is not None and n_mels_from_config != n_mels:
                raise ValueError(
                    f"{pre_path}: feature_size={n_mels} but {cfg_path} has num_mel_bins={n_mels_from_config}"
                )
            if window_from_config is not None and not math.isclose(window, window_from_config):
                raise ValueError(
                    f"{pre_path}: chunk_length={window}s gives {window * FRAMES_PER_SECOND:g} frames but the "
                    f"encoder in {cfg_path} needs {window_from_config * FRAMES_PER_SECOND:g}"
                )
            return cls(n_mels=n_mels, window_seconds=window)
        if n_mels_from_config is not None:
            return cls(n_mels=n_mels_from_config, window_seconds=window_from_config)
        raise FileNotFoundError(
            f"{whisper_dir}: neither preprocessor_config.json nor a Whisper config.json "
            "(with num_mel_bins and max_source_positions) was found"
        )

    @property
    def frames(self) -> int:
        """Mel frames of the full window (3000 for 30 s), the length every feature matrix is padded to."""
        return self._frames

    def __call__(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features float32 [B, n_mels, frames], real mel frames int64 [B]) for 16 kHz mono clips."""
        if len(waves) == 0:
            raise ValueError("LogMelFeaturizer got an empty batch")
        clean = []
        for i, wave in enumerate(waves):
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim != 1 or wave.shape[0] == 0:
                raise ValueError(f"clip {i}: expected a non-empty 1-D mono waveform, got shape {wave.shape}")
            if wave.shape[0] > self.n_samples:
                raise ValueError(
                    f"clip {i}: {wave.shape[0]} samples ({wave.shape[0] / SAMPLE_RATE:.2f} s) exceed the "
                    f"{self.window_seconds} s window; cut it first with trim_to_window (no silent truncation)"
                )
            clean.append(wave)
        out = self.extractor(
            clean,
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            max_length=self.n_samples,
            truncation=False,
            return_attention_mask=True,
            return_tensors="np",
        )
        features = torch.from_numpy(np.ascontiguousarray(out["input_features"], dtype=np.float32))
        # The extractor's mask is the sample mask taken every 160 samples, i.e. one frame per STFT frame whose
        # centre lies on a real sample: ceil(len / 160) frames (= len // 160 when len is a multiple of 160).
        lengths = torch.from_numpy(np.asarray(out["attention_mask"]).sum(axis=-1).astype(np.int64))
        expected_shape = (len(clean), self.n_mels, self._frames)
        if tuple(features.shape) != expected_shape:
            raise RuntimeError(
                f"feature extractor returned {tuple(features.shape)}, expected {expected_shape}"
            )
        return features, lengths
