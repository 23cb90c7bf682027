"""Tests of diffa2.audio: decoding edge cases on real files, trimming, log-mel parity with openai-whisper."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper
from tiny_checkpoints import write_tiny_hf_whisper

from diffa2.audio import (
    SAMPLE_RATE,
    AudioError,
    LogMelFeaturizer,
    decode_audio_bytes,
    load_audio,
    trim_to_window,
)

# Observed max |ours - whisper.log_mel_spectrogram| over 20 random clips: 2.4e-7 (80 mels) and 1.2e-7
# (128 mels), i.e. 1-2 float32 ulps at the feature magnitude (~1); 5e-7 leaves about 2 ulps of headroom.
LOG_MEL_ATOL = 5e-7


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine of ``seconds`` at ``rate``."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics + noise with a silent gap: a signal whose log-mel has real dynamic range."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1330 * t) + 0.03 * rng.standard_normal(n)
    x[n // 3 : n // 2] = 0.0
    return x.astype(np.float32)


def peak_frequency(wave: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the largest FFT magnitude bin."""
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("rate", [8000, 44100, 48000, 192000])
def test_resampled_length_and_pitch(tmp_path, rate):
    seconds = 1.0
    path = tmp_path / f"sine_{rate}.wav"
    sf.write(path, sine(440.0, seconds, rate), rate, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(seconds * SAMPLE_RATE)) <= 1
    # 1 s at 16 kHz gives 1 Hz FFT bins: the tone must stay at 440 Hz and keep its amplitude.
    assert peak_frequency(wave, SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert np.abs(wave[1000:-1000]).max() == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize(("fmt", "subtype"), [("OGG", "VORBIS"), ("MP3", None)])
def test_compressed_formats_decode(tmp_path, fmt, subtype):
    path = tmp_path / f"sine.{fmt.lower()}"
    sf.write(path, sine(440.0, 1.0, 44100), 44100, format=fmt, subtype=subtype)
    wave = load_audio(path)
    # Observed with the bundled libsndfile 1.2.2: exactly 16000 samples for both (MP3 delay is removed).
    assert abs(len(wave) - SAMPLE_RATE) <= 1
    assert peak_frequency(wave, SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert np.abs(wave[1000:-1000]).max() == pytest.approx(0.5, rel=0.05)  # lossy codecs: 5%


def test_16k_float_file_is_returned_unchanged(tmp_path):
    data = sine(300.0, 0.5, SAMPLE_RATE)
    path = tmp_path / "f32.wav"
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), data)


@pytest.mark.parametrize(
    ("subtype", "atol"),
    [("PCM_16", 1 / 2**15), ("PCM_32", 1 / 2**31), ("PCM_U8", 1 / 2**7), ("FLOAT", 0.0)],
)
def test_sample_formats_scale_to_unit_range(tmp_path, subtype, atol):
    data = sine(300.0, 0.25, SAMPLE_RATE, amplitude=0.9)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, data, SAMPLE_RATE, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32
    assert np.abs(wave - data).max() <= atol + 1e-7
    assert np.abs(wave).max() == pytest.approx(0.9, abs=max(atol, 1e-3))


def test_stereo_is_mixed_to_channel_mean(tmp_path):
    left = sine(300.0, 0.5, SAMPLE_RATE, amplitude=0.6)
    right = sine(700.0, 0.5, SAMPLE_RATE, amplitude=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def test_six_channels_are_mixed_to_channel_mean(tmp_path):
    rng = np.random.default_rng(0)
    data = (0.2 * rng.standard_normal((8000, 6))).astype(np.float32)
    data[:, 2] += 0.3  # one channel with an offset so the mean differs from any single channel
    path = tmp_path / "six.wav"
    sf.write(path, data, SAMPLE_RATE, subtype="PCM_16")
    stored, _ = sf.read(path, dtype="float32")
    assert stored.shape == (8000, 6)
    np.testing.assert_allclose(load_audio(path), stored.mean(axis=1), atol=1e-7)


def test_flac_and_bytes_decode_identically(tmp_path):
    data = speech_like(0.7)
    path = tmp_path / "clip.flac"
    sf.write(path, data, 22050)
    from_file = load_audio(path)
    from_bytes = decode_audio_bytes(path.read_bytes())
    np.testing.assert_array_equal(from_file, from_bytes)
    assert abs(len(from_file) - round(len(data) * SAMPLE_RATE / 22050)) <= 1


def test_float_samples_beyond_full_scale_are_clipped(tmp_path):
    path = tmp_path / "hot.wav"
    sf.write(path, sine(300.0, 0.25, SAMPLE_RATE, amplitude=1.5), SAMPLE_RATE, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.max() == 1.0 and wave.min() == -1.0


def test_missing_file_names_path_and_manifest_line(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as info:
        load_audio(path, where="train.jsonl:17")
    assert str(path) in str(info.value) and "train.jsonl:17" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0,), dtype=np.float32), SAMPLE_RATE)
    assert path.stat().st_size > 0  # a valid header with no frames
    with pytest.raises(AudioError, match="no samples") as info:
        load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples(tmp_path, bad):
    data = sine(300.0, 0.25, SAMPLE_RATE)
    data[100] = bad
    path = tmp_path / "nan.wav"
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="1 NaN/inf") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    with pytest.raises(AudioError, match="cannot be decoded") as info:
        load_audio(path, where="dev.jsonl:2")
    assert str(path) in str(info.value) and "dev.jsonl:2" in str(info.value)


def test_bad_bytes_name_their_source():
    with pytest.raises(AudioError, match="empty") as info:
        decode_audio_bytes(b"", name="row 5 of set X")
    assert "row 5 of set X" in str(info.value)
    with pytest.raises(AudioError, match="cannot be decoded"):
        decode_audio_bytes(b"definitely not audio" * 10)


def test_trim_to_window():
    wave = np.arange(3 * SAMPLE_RATE, dtype=np.float32)
    cut, trimmed = trim_to_window(wave, 2.0)
    assert trimmed and len(cut) == 2 * SAMPLE_RATE
    np.testing.assert_array_equal(cut, wave[: 2 * SAMPLE_RATE])
    same, trimmed = trim_to_window(wave, 3.0)
    assert not trimmed and same is wave


# ------------------------------------------------------------------------------------------------ log-mel


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_openai_whisper(n_mels):
    featurizer = LogMelFeaturizer(n_mels=n_mels, window_seconds=30)
    clips = [speech_like(7.3, seed=1), speech_like(1.01, seed=2)]
    features, lengths = featurizer(clips)
    assert features.dtype == torch.float32 and features.shape == (2, n_mels, 3000)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [730, 101]
    for clip, feat in zip(clips, features, strict=True):
        reference = whisper.log_mel_spectrogram(whisper.pad_or_trim(clip), n_mels=n_mels)
        assert reference.shape == feat.shape
        assert (feat - reference).abs().max().item() <= LOG_MEL_ATOL


def test_log_mel_small_window_matches_openai_whisper_padded_to_that_window():
    featurizer = LogMelFeaturizer(n_mels=80, window_seconds=4)
    clip = speech_like(2.5, seed=3)
    features, lengths = featurizer([clip])
    assert featurizer.frames == 400 and features.shape == (1, 80, 400) and lengths.tolist() == [250]
    reference = whisper.log_mel_spectrogram(whisper.pad_or_trim(clip, 4 * SAMPLE_RATE), n_mels=80)
    assert (features[0] - reference).abs().max().item() <= LOG_MEL_ATOL


def test_feature_lengths_follow_the_extractor_mask():
    featurizer = LogMelFeaturizer(n_mels=80, window_seconds=2)
    sizes = [1, 159, 160, 161, 16000, 16001, 32000]
    _, lengths = featurizer([np.full(n, 0.1, dtype=np.float32) for n in sizes])
    # One frame per STFT frame whose centre (every 160 samples) lies on a real sample: ceil(n / 160).
    assert lengths.tolist() == [math.ceil(n / 160) for n in sizes] == [1, 1, 1, 2, 100, 101, 200]
    mask = featurizer.extractor(
        [np.full(n, 0.1, dtype=np.float32) for n in sizes],
        sampling_rate=SAMPLE_RATE,
        max_length=32000,
        return_attention_mask=True,
        return_tensors="np",
    )["attention_mask"]
    assert mask.sum(-1).tolist() == lengths.tolist()


def test_too_long_clip_raises_instead_of_truncating():
    featurizer = LogMelFeaturizer(n_mels=80, window_seconds=2)
    with pytest.raises(ValueError, match="trim_to_window"):
        featurizer([np.zeros(100, np.float32), np.zeros(2 * SAMPLE_RATE + 1, np.float32)])
    cut, trimmed = trim_to_window(np.zeros(2 * SAMPLE_RATE + 1, np.float32), 2)
    assert trimmed
    assert featurizer([cut])[1].tolist() == [200]


def test_featurizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_mels"):
        LogMelFeaturizer(n_mels=64)
    with pytest.raises(ValueError, match="window_seconds"):
        LogMelFeaturizer(window_seconds=0.0005)
    with pytest.raises(ValueError, match="non-empty"):
        LogMelFeaturizer(window_seconds=2)([np.zeros(0, np.float32)])


def test_featurizer_from_pretrained_directory(tmp_path):
    whisper_dir = write_tiny_hf_whisper(tmp_path / "w", n_mels=128, max_source_positions=150)
    assert json.loads((whisper_dir / "preprocessor_config.json").read_text())["feature_size"] == 128
    featurizer = LogMelFeaturizer.from_pretrained(whisper_dir)
    assert (featurizer.n_mels, featurizer.frames) == (128, 300)
    # Without preprocessor_config.json the window comes from the encoder's max_source_positions.
    (whisper_dir / "preprocessor_config.json").unlink()
    featurizer = LogMelFeaturizer.from_pretrained(whisper_dir)
    assert (featurizer.n_mels, featurizer.frames) == (128, 300)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        LogMelFeaturizer.from_pretrained(tmp_path / "none")


def test_featurizer_from_pretrained_rejects_inconsistent_window(tmp_path):
    whisper_dir = write_tiny_hf_whisper(tmp_path / "w", max_source_positions=100)
    pre = json.loads((whisper_dir / "preprocessor_config.json").read_text())
    pre["chunk_length"] = 30
    (whisper_dir / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match="chunk_length=30"):
        LogMelFeaturizer.from_pretrained(whisper_dir)
