"""Audio rendering of the synthetic cues: one deterministic int16 clip per (seed, split, family, index), so a clip
does not depend on how many others are generated."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from diffa2.data.synth.constants import (
    BEEP_GAP_S,
    BEEP_S,
    CLIP_SECONDS,
    COUNT_WORDS,
    EDGE_S,
    FAMILIES,
    LOUDNESS_DB,
    NOISE_REL,
    PILOT_AMP,
    PILOT_HZ,
    PITCH_BASE_HZ,
    PITCH_SPAN_SEMITONES,
    SAMPLE_RATE,
    TEMPO_IOI_S,
    VOCABULARY,
    WORD_TONES,
)
from diffa2.data.synth.questions import QuestionKind

# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    clip_id: str
    split: str
    family: str
    attrs: dict  # loudness, noise, and per family: words | count, pitch | tempo, pitch
    relpath: str
    audio: np.ndarray | None = None  # int16 samples

    @property
    def duration(self) -> float:
        return CLIP_SECONDS

    @property
    def transcription(self) -> str:
        return " ".join(self.attrs["words"]) if self.family == "speech" else ""

    def answer(self, kind: QuestionKind) -> str:
        value = self.attrs[kind.attribute]
        if kind.attribute == "words":
            return " ".join(value)
        if kind.attribute == "count":
            return COUNT_WORDS[value - 1]
        if kind.attribute == "noise":
            return "yes" if value else "no"
        return value

    def seed_transcript(self) -> str:
        a = self.attrs
        stamp = f"[00:00-00:{int(round(CLIP_SECONDS)):02d}]"
        tail = f"loudness: {a['loudness']}, noise: {'yes' if a['noise'] else 'no'}"
        if self.family == "speech":
            return f"{stamp} {self.transcription} ({tail})"
        if self.family == "sound":
            return f"{stamp} (beeps: {a['count']}, pitch: {a['pitch']}, {tail})"
        return f"{stamp} (melody, tempo: {a['tempo']}, pitch: {a['pitch']}, {tail})"

    def caption(self) -> str:
        a = self.attrs
        noise = " with noise" if a["noise"] else ""
        if self.family == "speech":
            return f"{a['loudness']} speech saying {self.transcription}{noise}"
        if self.family == "sound":
            n = a["count"]
            return f"{COUNT_WORDS[n - 1]} {a['loudness']} {a['pitch']} {'beep' if n == 1 else 'beeps'}{noise}"
        return f"{a['tempo']} {a['loudness']} {a['pitch']} melody{noise}"


def _ramp(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release:
        env[n - release :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 1) / release)
    return env


def _partials(rng: np.random.Generator, n: int, freqs_amps: Iterable[tuple[float, float]]) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    for f, a in freqs_amps:
        out += a * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out


def _layout(rng: np.random.Generator, durations: Sequence[float], min_gap: float) -> list[float]:
    """Random onsets for events of the given durations, in order, separated by at least ``min_gap``."""
    span = CLIP_SECONDS - 2 * EDGE_S
    free = span - sum(durations) - min_gap * (len(durations) - 1)
    if free < 0:
        raise ValueError("events do not fit in the clip")
    cuts = np.sort(rng.uniform(0.0, free, size=len(durations)))
    return [EDGE_S + float(cuts[i]) + sum(durations[:i]) + i * min_gap for i in range(len(durations))]


def _add(x: np.ndarray, onset_s: float, seg: np.ndarray) -> None:
    start = int(round(onset_s * SAMPLE_RATE))
    end = min(len(x), start + len(seg))
    x[start:end] += seg[: end - start]


def _event_amp(rng: np.random.Generator, loudness: str) -> float:
    lo, hi = LOUDNESS_DB[loudness]
    return PILOT_AMP * 10 ** (rng.uniform(lo, hi) / 20)


def render_clip(rng: np.random.Generator, family: str, attrs: dict) -> np.ndarray:
    """Render one clip as int16 samples (``CLIP_SECONDS`` long)."""
    n = int(round(CLIP_SECONDS * SAMPLE_RATE))
    ms = SAMPLE_RATE // 1000
    x = np.zeros(n)
    if family == "speech":
        durs = [float(rng.uniform(0.22, 0.30)) for _ in attrs["words"]]
        onsets = _layout(rng, durs, min_gap=0.15)
        shift = rng.uniform(0.98, 1.02)  # a "speaker": all tones a little higher or lower
        for word, d, t0 in zip(attrs["words"], durs, onsets, strict=True):
            m = int(round(d * SAMPLE_RATE))
            amp = _event_amp(rng, attrs["loudness"])
            lo, hi = WORD_TONES[word]
            seg = _partials(rng, m, [(lo * shift, amp), (hi * shift, amp)]) * _ramp(m, 15 * ms, 30 * ms)
            _add(x, t0, seg)
    elif family == "sound":
        base = PITCH_BASE_HZ[attrs["pitch"]]
        f = base * 2 ** (rng.uniform(0, PITCH_SPAN_SEMITONES) / 12)
        durs = [BEEP_S] * attrs["count"]
        onsets = _layout(rng, durs, min_gap=BEEP_GAP_S)
        for d, t0 in zip(durs, onsets, strict=True):
            m = int(round(d * SAMPLE_RATE))
            seg = _partials(rng, m, [(f, _event_amp(rng, attrs["loudness"]))]) * _ramp(m, 8 * ms, 8 * ms)
            _add(x, t0, seg)
    elif family == "music":
        base = PITCH_BASE_HZ[attrs["pitch"]]
        ioi = rng.uniform(*TEMPO_IOI_S[attrs["tempo"]])
        # Fast melodies are also staccato (short notes that die away quickly), slow ones legato (notes that
        # ring almost to the next onset): note rate and articulation both tell the tempo, and the share of
        # sounding frames differs, which a time-pooled feature can see.
        slow = attrs["tempo"] == "slow"
        note_s = (0.85 if slow else 0.45) * ioi
        t0 = rng.uniform(0.02, 0.12)
        step = int(rng.integers(0, PITCH_SPAN_SEMITONES + 1))
        amp = _event_amp(rng, attrs["loudness"])
        while t0 + note_s <= CLIP_SECONDS - 0.02:
            step = int(np.clip(step + rng.integers(-2, 3), 0, PITCH_SPAN_SEMITONES))
            f = base * 2 ** (step / 12)
            m = int(round(note_s * SAMPLE_RATE))
            decay = np.exp(-np.arange(m) / ((1.0 if slow else 0.35) * m))
            seg = _partials(rng, m, [(f, amp), (2 * f, 0.4 * amp)]) * decay * _ramp(m, 5 * ms, 10 * ms)
            _add(x, t0, seg)
            t0 += ioi
    else:
        raise ValueError(f"unknown family {family!r}")
    # The pilot (loudness reference), constant over the whole clip, and the background noise.
    x += _partials(rng, n, [(PILOT_HZ, PILOT_AMP)]) * _ramp(n, 10 * ms, 10 * ms)
    if attrs["noise"]:
        x += rng.standard_normal(n) * PILOT_AMP * rng.uniform(*NOISE_REL)
    return np.round(np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)


def _random_attrs(rng: np.random.Generator, family: str, fixed: dict | None = None) -> dict:
    attrs = {
        "loudness": str(rng.choice(("quiet", "loud"))),
        "noise": bool(rng.integers(0, 2)),
    }
    if family == "speech":
        k = int(rng.integers(1, 4))
        attrs["words"] = tuple(str(w) for w in rng.choice(VOCABULARY, size=k, replace=False))
    elif family == "sound":
        attrs["count"] = int(rng.integers(1, 5))
        attrs["pitch"] = str(rng.choice(tuple(PITCH_BASE_HZ)))
    else:
        attrs["tempo"] = str(rng.choice(tuple(TEMPO_IOI_S)))
        attrs["pitch"] = str(rng.choice(tuple(PITCH_BASE_HZ)))
    attrs.update(fixed or {})
    return attrs


_SPLIT_CODE = {"train": 1, "validation": 2, "test": 3}
_FAMILY_CODE = {f: i for i, f in enumerate(FAMILIES)}


def _make_clip(seed: int, split: str, family: str, index: int, fixed: dict | None = None) -> Clip:
    # One generator per clip: a clip does not depend on how many others there are.
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], _FAMILY_CODE[family], index])
    attrs = _random_attrs(rng, family, fixed)
    clip_id = f"{split}-{family}-{index:05d}"
    clip = Clip(clip_id, split, family, attrs, f"audio/{split}/{clip_id}.wav")
    clip.audio = render_clip(rng, family, attrs)
    return clip

