"""The synthetic audio corpus of the embedded default: WAV files, DIFFA/DeSTA2 manifests, an MMAU-format test.

Run ``python -m diffa2.data.synth --help``. Everything is pure numpy and deterministic from the seed: the same
seed gives byte-identical files (WAVs, manifests, tokenizer).

Three families of 2-second clips, 16 kHz mono 16-bit PCM:

* ``speech`` -- an utterance of 1-3 words from a 12-word vocabulary. A word is a DTMF-like *dual tone*: one
  tone from a low group (3 frequencies) and one from a high group (4 frequencies) sounding together for
  0.22-0.30 s. Each word is identifiable from any single frame of the log-mel (two peaks >= 5 mel bins apart
  from those of every other word), which is what a tiny model trained for minutes can learn; a word built as a
  *sequence* of tones would need temporal composition on top.
* ``sound`` -- 1-4 pure-tone beeps of one pitch class, each 0.16 s long (so the total sounding time, a global
  cue, is proportional to the count), separated by >= 0.2 s of silence.
* ``music`` -- a melody (fundamental + octave, decaying notes) in one pitch register, slow and legato (a
  note every 0.45-0.55 s, ringing 85% of that) or fast and staccato (every 0.12-0.15 s, ringing 45%).

Attributes and where each can be asked (question kinds, which are MMAU sub-categories of the test split):

=================  =========================  =====================  ========
kind               answers                    clip families          task
=================  =========================  =====================  ========
Spoken Content     the words (1-3)            speech                 speech
Event Counting     one / two / three / four   sound                  sound
Pitch              low / medium / high        sound, music           music
Tempo              slow / fast                music                  music
Loudness           quiet / loud               speech, sound, music   sound
Background Noise   yes / no                   speech, sound, music   sound
=================  =========================  =====================  ========

Pitch classes are far apart on the mel axis (low 210-280 Hz = mel bins 5-7, medium 700-935 Hz = bins 18-24,
high 2.2-2.9 kHz = bins 46-55), so they survive the 80-bin log-mel whatever the clip's level.

Loudness. Whisper's log-mel is ``log10(power)`` clamped from below at ``max - 8`` and scaled ``(x + 4) / 4``:
the scale is absolute but the floor follows the clip's maximum, a loader may peak-normalise or gain-adjust the
waveform, and a per-frame normalisation in the model (LayerNorm over mel bins) removes any uniform shift. So
loudness is not left to the absolute level alone: *every* clip carries a constant reference tone (the "pilot",
6.8 kHz, -40 dBFS, mel bin 76, away from all content), and the events are rendered at a fixed level *relative
to the pilot*: quiet = +4..+10 dB, loud = +26..+32 dB. The event-to-pilot contrast is visible in the same
frames, survives any global gain, and does not depend on the clamp floor; the absolute level carries the same
information as a bonus when the waveform is left as generated.

Background noise is white noise 3-8 dB below the pilot's amplitude (noise "no" = digital silence besides the
pilot and the events). It lifts every mel bin by tens of dB above the silent floor: the most global cue.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

try:
    import fcntl
except ImportError:  # not on Windows: builds are then not serialised between processes
    fcntl = None

from diffa2.data.tokenizer import ASR_INSTRUCTION, MMAU_INSTRUCTION, build_tokenizer
from diffa2.io import atomic_write_text
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

FORMAT_VERSION = 2  # 2: stage-3 SFT items without captions (they stay in stage 2)
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
DATASET_NAME = "diffa2-synth"
DEFAULT_CORPUS_DIR = "data/synth"
COMPLETE_MARKER = ".complete.json"
LOCK_FILE = ".build.lock"
DEFAULT_VOCAB_SIZE = 1024  # an upper bound for the tokenizer; the corpus yields fewer tokens

STAGES: tuple[str, ...] = ("stage1_asr", "stage2_acoustic", "stage3_sft", "stage4_pref")
SPLITS: tuple[str, ...] = ("train", "validation")
FAMILIES: tuple[str, ...] = ("speech", "sound", "music")

# ----------------------------------------------------------------------------------------------------------
# Acoustic design (see the module docstring)
# ----------------------------------------------------------------------------------------------------------
PILOT_HZ = 6800.0
PILOT_AMP = 0.01  # -40 dBFS
LOUDNESS_DB = {"quiet": (4.0, 10.0), "loud": (26.0, 32.0)}  # event amplitude over the pilot's
NOISE_REL = (0.4, 0.7)  # white-noise standard deviation, relative to PILOT_AMP
EDGE_S = 0.1  # events lie within [EDGE_S, CLIP_SECONDS - EDGE_S]

WORD_LOW_HZ = (420.0, 600.0, 860.0)
WORD_HIGH_HZ = (1300.0, 1850.0, 2600.0, 3700.0)
VOCABULARY: tuple[str, ...] = (
    "red", "blue", "green", "gold",
    "cat", "dog", "fish", "bird",
    "sun", "moon", "star", "rain",
)  # fmt: skip
# word i = low tone i // 4 and high tone i % 4
WORD_TONES: dict[str, tuple[float, float]] = {
    w: (WORD_LOW_HZ[i // len(WORD_HIGH_HZ)], WORD_HIGH_HZ[i % len(WORD_HIGH_HZ)])
    for i, w in enumerate(VOCABULARY)
}
PITCH_BASE_HZ = {"low": 210.0, "medium": 700.0, "high": 2200.0}  # register spans base .. base * 2**(5/12)
PITCH_SPAN_SEMITONES = 5
TEMPO_IOI_S = {"slow": (0.45, 0.55), "fast": (0.12, 0.15)}  # inter-onset interval of the melody
BEEP_S = 0.16  # every beep lasts the same: the total sounding time is then proportional to the count
BEEP_GAP_S = 0.2  # minimum silence between beeps (2.5 frames of the 12.5 Hz semantic adapter)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
# Answer regions of the embedded default, in tokens (answer + <|eot_id|> + EOS padding). Short on purpose: the tiny
# diffusion LM learns answers several-fold faster on short canvases (docs/experiment-log.md). Stage 1 transcripts, stage
# 3/4 answers and the test split fit in ANSWER_TOKENS; stage 2's captions (up to 8 tokens) need CAPTION_TOKENS.
ANSWER_TOKENS = 4
CAPTION_TOKENS = 10

# ----------------------------------------------------------------------------------------------------------
# Question kinds
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: its MMAU sub-category name, closed answer set and phrasings."""

    name: str
    attribute: str
    task: str
    category: str
    families: tuple[str, ...]
    values: tuple[str, ...] | None  # the closed answer set; None: the transcription (Spoken Content)
    phrasings: tuple[str, ...]  # the first is the canonical one (stage 2 and the test split)


_IE = "Information Extraction"
QUESTION_KINDS: dict[str, QuestionKind] = {
    k.name: k
    for k in (
        QuestionKind(
            "Spoken Content", "words", "speech", _IE, ("speech",), None,
            ("What does the speaker say?", "What words are spoken in the audio?", "Which words do you hear?",
             "Write down what is said."),
        ),
        QuestionKind(
            "Event Counting", "count", "sound", "Reasoning", ("sound",), COUNT_WORDS,
            ("How many beeps are there?", "Count the beeps in the audio.",
             "How many sound events do you hear?", "How many times does the tone sound?"),
        ),
        QuestionKind(
            "Pitch", "pitch", "music", _IE, ("sound", "music"), ("low", "medium", "high"),
            ("What is the pitch of the sound?", "Is the pitch low, medium, or high?",
             "How high are the tones?", "Describe the pitch of the audio."),
        ),
        QuestionKind(
            "Tempo", "tempo", "music", _IE, ("music",), ("slow", "fast"),
            ("Is the tempo slow or fast?", "How fast is the melody?", "What is the tempo of the music?"),
        ),
        QuestionKind(
            "Loudness", "loudness", "sound", _IE, FAMILIES, ("quiet", "loud"),
            ("Is the audio quiet or loud?", "How loud is the sound?", "What is the loudness of the audio?"),
        ),
        QuestionKind(
            "Background Noise", "noise", "sound", _IE, FAMILIES, ("yes", "no"),
            ("Is there background noise?", "Can you hear background noise in the recording?",
             "Is the recording noisy?"),
        ),
    )
}  # fmt: skip
CAPTION_KIND = "Caption"  # training only (stage 2): a short description of all attributes of the clip
TRANSCRIPTION_KIND = "Transcription"  # stage 1
CAPTION_PHRASINGS = ("Describe the audio in a few words.", "Give a short caption of the audio.")
MC_FRACTION = 0.3  # share of stage-3/4 items asked in the MMAU multiple-choice format


def format_mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The DIFFA MMAU evaluation prompt (reference §7): instruction, question, lettered choices, then
    "Answer:"."""
    lines = [MMAU_INSTRUCTION, f"Question: {question}", "Choices:"]
    lines += [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Sizes and the corpus handle
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSizes:
    """How many clips and items to generate."""

    train_clips: dict[str, int] = field(default_factory=lambda: {"speech": 900, "sound": 900, "music": 600})
    validation_clips: int = 40  # per family
    stage_items: dict[str, int] = field(
        default_factory=lambda: {"stage2_acoustic": 3000, "stage3_sft": 3000, "stage4_pref": 1000}
    )  # stage 1 has one item per speech clip
    validation_items: dict[str, int] = field(
        default_factory=lambda: {"stage2_acoustic": 120, "stage3_sft": 120, "stage4_pref": 60}
    )
    test_per_kind: int = 60


SIZES: dict[str, SynthSizes] = {
    "default": SynthSizes(),
    "small": SynthSizes(
        train_clips={"speech": 12, "sound": 12, "music": 8},
        validation_clips=4,
        stage_items={"stage2_acoustic": 24, "stage3_sft": 28, "stage4_pref": 12},
        validation_items={"stage2_acoustic": 6, "stage3_sft": 7, "stage4_pref": 6},
        test_per_kind=4,
    ),
}


@dataclass(frozen=True)
class SynthCorpus:
    """Paths of a built corpus. Manifest keys are ``"<stage>/<split>"``, e.g. ``"stage3_sft/train"``."""

    root: Path
    seed: int
    size: str
    manifests: dict[str, Path]
    test_mmau: Path
    info_path: Path
    tokenizer_dir: Path

    def manifest(self, stage: str, split: str = "train", jsonl: bool = False) -> Path:
        path = self.manifests[f"{stage}/{split}"]
        return path.with_suffix(".jsonl") if jsonl else path

    @property
    def info(self) -> dict:
        return json.loads(self.info_path.read_text(encoding="utf-8"))

    @classmethod
    def at(cls, root: str | Path, seed: int, size: str) -> SynthCorpus:
        root = Path(root)
        manifests = {f"{s}/{sp}": root / f"{s}_{sp}.json" for s in STAGES for sp in SPLITS}
        return cls(root, seed, size, manifests, root / "test_mmau.json", root / "corpus_info.json",
                   root / "tokenizer")  # fmt: skip


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


# ----------------------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------------------


def _content_distractors(rng: np.random.Generator, words: tuple[str, ...], k: int) -> list[str]:
    """``k`` utterances that differ from ``words`` in exactly one position, by a word not in the utterance."""
    out: list[str] = []
    while len(out) < k:
        pos = int(rng.integers(0, len(words)))
        new = str(rng.choice([w for w in VOCABULARY if w not in words]))
        cand = " ".join(words[:pos] + (new,) + words[pos + 1 :])
        if cand not in out:
            out.append(cand)
    return out


def _choices(rng: np.random.Generator, clip: Clip, kind: QuestionKind) -> list[str]:
    answer = clip.answer(kind)
    if kind.values is None:
        options = [answer, *_content_distractors(rng, clip.attrs["words"], 3)]
    else:
        options = list(kind.values)
    return [options[i] for i in rng.permutation(len(options))]


def _rejected(rng: np.random.Generator, clip: Clip, kind: QuestionKind, choices: list[str] | None) -> str:
    """A minimally wrong answer: another value of the closed set, or the utterance with one word swapped."""
    answer = clip.answer(kind)
    if choices is not None:
        wrong = [c for c in choices if c != answer]
    elif kind.values is None:
        wrong = _content_distractors(rng, clip.attrs["words"], 1)
    else:
        wrong = [v for v in kind.values if v != answer]
    return str(wrong[int(rng.integers(0, len(wrong)))])


def _record(clip: Clip, instruction: str, target: str, kind: str) -> dict:
    return {
        "audio_id": clip.clip_id,
        "audio_filepath": clip.relpath,
        "transcription": clip.transcription,
        "input": instruction,
        "target": target,
        "dataset": DATASET_NAME,
        "duration": clip.duration,
        "seed_transcript": clip.seed_transcript(),
        "kind": kind,
    }


def _balanced(rng: np.random.Generator, options: Sequence, n: int) -> list:
    """``n`` draws with every option equally often (up to one), in random order."""
    seq = [options[i % len(options)] for i in range(n)]
    return [seq[i] for i in rng.permutation(n)]


def _stage_items(rng: np.random.Generator, stage: str, clips: dict[str, list[Clip]], n: int) -> list[dict]:
    kinds = list(QUESTION_KINDS)
    if stage == "stage2_acoustic":
        kinds = [k for k in kinds if k != "Spoken Content"] + [CAPTION_KIND]
    items = []
    for kind_name in _balanced(rng, kinds, n):
        if kind_name == CAPTION_KIND:
            family = FAMILIES[int(rng.integers(0, len(FAMILIES)))]
            pool = clips[family]
            clip = pool[int(rng.integers(0, len(pool)))]
            phrasing = (
                CAPTION_PHRASINGS[0] if stage == "stage2_acoustic" else str(rng.choice(CAPTION_PHRASINGS))
            )
            items.append(_record(clip, phrasing, clip.caption(), CAPTION_KIND))
            continue
        kind = QUESTION_KINDS[kind_name]
        family = kind.families[int(rng.integers(0, len(kind.families)))]
        pool = clips[family]
        clip = pool[int(rng.integers(0, len(pool)))]
        if stage == "stage2_acoustic":
            question = kind.phrasings[0]
        else:
            question = kind.phrasings[int(rng.integers(0, len(kind.phrasings)))]
        choices = None
        if stage != "stage2_acoustic" and rng.random() < MC_FRACTION:
            choices = _choices(rng, clip, kind)
            instruction = format_mc_prompt(question, choices)
        else:
            instruction = question
        rec = _record(clip, instruction, clip.answer(kind), kind_name)
        if stage == "stage4_pref":
            rec["chosen"] = rec["target"]
            rec["rejected"] = _rejected(rng, clip, kind, choices)
        items.append(rec)
    return items


def _difficulty(clip: Clip, kind: QuestionKind) -> str:
    """easy/medium/hard: a base per kind (longer utterances and more beeps are harder), one level up with
    background noise."""
    levels = ("easy", "medium", "hard")
    if kind.name == "Spoken Content":
        base = len(clip.attrs["words"]) - 1
    elif kind.name == "Event Counting":
        base = 1 if clip.attrs["count"] <= 2 else 2
    elif kind.name == "Tempo":
        base = 1
    else:
        base = 0
    if clip.attrs["noise"] and kind.name != "Background Noise":
        base += 1
    return levels[min(base, 2)]


def _test_split(seed: int, per_kind: int) -> tuple[list[Clip], list[dict]]:
    """Fresh clips (their own random streams), one question each; answers balanced within every kind."""
    clips, records = [], []
    index = 0
    for kind in QUESTION_KINDS.values():
        krng = np.random.default_rng([seed, _SPLIT_CODE["test"], 99, index])
        values = kind.values or (None,)
        for j in range(per_kind):
            family = kind.families[j % len(kind.families)]
            value = values[(j // len(kind.families)) % len(values)]
            fixed = {}
            if kind.attribute == "count":
                fixed["count"] = COUNT_WORDS.index(value) + 1
            elif kind.attribute == "noise":
                fixed["noise"] = value == "yes"
            elif value is not None:
                fixed[kind.attribute] = value
            clip = _make_clip(seed, "test", family, index, fixed)
            index += 1
            choices = _choices(krng, clip, kind)
            records.append(
                {
                    "id": str(uuid.UUID(bytes=krng.bytes(16), version=4)),
                    "audio_id": clip.relpath,
                    "question": kind.phrasings[0],
                    "choices": choices,
                    "answer": clip.answer(kind),
                    "dataset": DATASET_NAME,
                    "task": kind.task,
                    "split": "test-mini",
                    "category": kind.category,
                    "sub-category": kind.name,
                    "difficulty": _difficulty(clip, kind),
                }
            )
            clips.append(clip)
    return clips, records


def chance_accuracy(records: Iterable[dict]) -> dict:
    """Expected accuracy of a uniform guess among each item's choices: overall, per sub-category, per task."""
    by_sub: dict[str, list[float]] = {}
    by_task: dict[str, list[float]] = {}
    allp: list[float] = []
    for r in records:
        p = 1.0 / len(r["choices"])
        allp.append(p)
        by_sub.setdefault(r["sub-category"], []).append(p)
        by_task.setdefault(r["task"], []).append(p)

    def mean(v: list[float]) -> float:
        return round(float(sum(v) / len(v)), 6) if v else 0.0

    return {
        "overall": mean(allp),
        "by_sub_category": {k: mean(v) for k, v in sorted(by_sub.items())},
        "by_task": {k: mean(v) for k, v in sorted(by_task.items())},
    }


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


def _dump_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _dump_manifest(path: Path, records: list[dict]) -> None:
    _dump_json(path, records)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.with_suffix(".jsonl").write_text(lines, encoding="utf-8")


def _write_wav(root: Path, clip: Clip) -> None:
    path = root / clip.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), clip.audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    clip.audio = None  # free the samples once written


def _owned_paths(root: Path) -> list[Path]:
    names = [f"{s}_{sp}.{ext}" for s in STAGES for sp in SPLITS for ext in ("json", "jsonl")]
    names += ["test_mmau.json", "test_mmau.jsonl", "corpus_info.json", "audio", "tokenizer"]
    return [root / n for n in names]


def _resolve_sizes(size: str, sizes: SynthSizes | None) -> SynthSizes:
    if sizes is not None:
        return sizes
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


def build_synth_corpus(
    out_dir: str | Path = DEFAULT_CORPUS_DIR,
    seed: int = 0,
    size: str = "default",
    sizes: SynthSizes | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> SynthCorpus:
    """Generate the corpus into ``out_dir`` (replacing a previous build there) and return its paths.

    ``size`` picks a preset of :data:`SIZES` ("default" for the embedded default's training, "small" for
    tests); ``sizes`` overrides it. The completion marker is written last, atomically.
    """
    sizes = _resolve_sizes(size, sizes)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / COMPLETE_MARKER
    marker.unlink(missing_ok=True)
    for p in _owned_paths(root):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    corpus = SynthCorpus.at(root, seed, size)

    # Clips of the training and validation splits.
    clips: dict[str, dict[str, list[Clip]]] = {}
    for split in SPLITS:
        clips[split] = {}
        for family in FAMILIES:
            n = sizes.train_clips[family] if split == "train" else sizes.validation_clips
            made = [_make_clip(seed, split, family, i) for i in range(n)]
            for c in made:
                _write_wav(root, c)
            clips[split][family] = made

    # Manifests.
    texts: list[str] = []
    counts: dict[str, dict] = {}
    for stage_idx, stage in enumerate(STAGES):
        counts[stage] = {}
        for split in SPLITS:
            rng = np.random.default_rng([seed, 100 + stage_idx, _SPLIT_CODE[split]])
            if stage == "stage1_asr":
                items = [
                    _record(c, ASR_INSTRUCTION, c.transcription, TRANSCRIPTION_KIND)
                    for c in clips[split]["speech"]
                ]
            else:
                table = sizes.stage_items if split == "train" else sizes.validation_items
                items = _stage_items(rng, stage, clips[split], table[stage])
            _dump_manifest(corpus.manifests[f"{stage}/{split}"], items)
            by_kind = dict(sorted(Counter(r["kind"] for r in items).items()))
            counts[stage][split] = {"items": len(items), "by_kind": by_kind}
            for r in items:
                texts += [r["input"], r["target"], r["transcription"], r.get("rejected", "")]

    # The held-out multiple-choice test split.
    test_clips, test_records = _test_split(seed, sizes.test_per_kind)
    for c in test_clips:
        _write_wav(root, c)
    _dump_manifest(corpus.test_mmau, test_records)
    for r in test_records:
        texts += [r["question"], *r["choices"], format_mc_prompt(r["question"], r["choices"])]
    counts["test_mmau"] = {
        "items": len(test_records),
        "by_kind": dict(sorted(Counter(r["sub-category"] for r in test_records).items())),
    }

    # The tokenizer: corpus texts + template strings + every closed-set answer on its own, at the start of a text
    # and after a space, twice (BPE's min_frequency), so each is one token whatever the corpus size.
    words = list(VOCABULARY) + list(COUNT_WORDS)
    for kind in QUESTION_KINDS.values():
        texts += list(kind.phrasings)
        words += list(kind.values or ())
    texts += [form for w in words for form in (w, f" {w}")] * 2
    tokenizer = build_tokenizer(texts, corpus.tokenizer_dir, vocab_size=vocab_size)

    n_clips = {split: {f: len(v) for f, v in clips[split].items()} for split in SPLITS}
    n_clips["test"] = dict(sorted(Counter(c.family for c in test_clips).items()))
    info = {
        "format_version": FORMAT_VERSION,
        "dataset": DATASET_NAME,
        "seed": seed,
        "size": size,
        "sizes": asdict(sizes),
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": CLIP_SECONDS,
        "clips": n_clips,
        "counts": counts,
        "vocabulary": list(VOCABULARY),
        "word_tones_hz": {w: list(t) for w, t in WORD_TONES.items()},
        "question_kinds": {
            k.name: {
                "task": k.task,
                "category": k.category,
                "attribute": k.attribute,
                "families": list(k.families),
                "answers": list(k.values) if k.values else "the transcription (1-3 vocabulary words)",
                "phrasings": list(k.phrasings),
            }
            for k in QUESTION_KINDS.values()
        },
        "training_only_kinds": {CAPTION_KIND: list(CAPTION_PHRASINGS), TRANSCRIPTION_KIND: [ASR_INSTRUCTION]},
        "chance": chance_accuracy(test_records),
        "mc_prompt_example": format_mc_prompt("<question>", ["<choice 1>", "<choice 2>"]),
        "files": {
            **{key: path.name for key, path in corpus.manifests.items()},
            "test_mmau": corpus.test_mmau.name,
            "tokenizer": corpus.tokenizer_dir.name,
        },
        "tokenizer": {"vocab_size": len(tokenizer), "special_tokens": tokenizer.all_special_tokens},
    }
    _dump_json(corpus.info_path, info)

    # The completion marker, last and atomically: the file list with sizes lets ensure_synth_corpus spot a
    # damaged corpus cheaply.
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    listing = {str(p.relative_to(root)): p.stat().st_size for p in files}
    marker_info = {"format_version": FORMAT_VERSION, "seed": seed, "size": size, "sizes": asdict(sizes),
                   "vocab_size": vocab_size, "files": listing}  # fmt: skip
    _dump_json(marker, marker_info)
    return corpus


def is_complete(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "default",
    sizes: SynthSizes | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> bool:
    """True when ``out_dir`` holds a finished build of this format, seed, sizes and tokenizer bound, with
    every file intact (present, with its recorded size)."""
    root = Path(out_dir)
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = asdict(_resolve_sizes(size, sizes))
    found = (marker.get("format_version"), marker.get("seed"), marker.get("sizes"), marker.get("vocab_size"))
    if found != (FORMAT_VERSION, seed, want, vocab_size):
        return False
    for rel, nbytes in marker.get("files", {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != nbytes:
            return False
    return bool(marker.get("files"))


def ensure_synth_corpus(
    out_dir: str | Path = DEFAULT_CORPUS_DIR,
    seed: int = 0,
    size: str = "default",
    sizes: SynthSizes | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> SynthCorpus:
    """Return the corpus at ``out_dir``, building it first when it is missing, incomplete or different.

    Concurrent callers (parallel stages, test workers) serialise on a lock file in the corpus directory, so
    only one of them builds.
    """
    if is_complete(out_dir, seed, size, sizes, vocab_size):
        return SynthCorpus.at(out_dir, seed, size)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if is_complete(out_dir, seed, size, sizes, vocab_size):  # another process built it meanwhile
            return SynthCorpus.at(out_dir, seed, size)
        return build_synth_corpus(out_dir, seed=seed, size=size, sizes=sizes, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _summary(corpus: SynthCorpus, seconds: float, skipped: bool) -> str:
    info = corpus.info
    lines = [
        f"synthetic corpus {'(already complete, not rebuilt) ' if skipped else ''}at {corpus.root.resolve()}"
    ]
    lines.append(f"  seed {info['seed']}, size {info['size']!r}, format v{info['format_version']}, "
                 f"{info['clip_seconds']} s clips at {info['sample_rate']} Hz")  # fmt: skip
    lines.append(f"  clips: {json.dumps(info['clips'])}")
    for stage in STAGES:
        for split in SPLITS:
            c = info["counts"][stage][split]
            kinds = ", ".join(f"{k} {v}" for k, v in c["by_kind"].items())
            lines.append(f"  {stage}_{split}.json: {c['items']} items ({kinds})")
    c = info["counts"]["test_mmau"]
    lines.append(
        f"  test_mmau.json: {c['items']} items ({', '.join(f'{k} {v}' for k, v in c['by_kind'].items())})"
    )
    ch = info["chance"]
    per = ", ".join(f"{k} {v:.3f}" for k, v in ch["by_sub_category"].items())
    lines.append(f"  chance accuracy: overall {ch['overall']:.3f} ({per})")
    lines.append(f"  tokenizer: {corpus.tokenizer_dir} (vocabulary {info['tokenizer']['vocab_size']} tokens)")
    lines.append(f"  info: {corpus.info_path}")
    lines.append(f"  time: {seconds:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The corpus builder's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m diffa2.data.synth",
        description="Generate the synthetic audio corpus of the embedded default (WAV files, DIFFA/DeSTA2 "
        "manifests for the four stages, an MMAU-format test split, and its tokenizer).",
    )
    parser.add_argument(
        "--out", default=DEFAULT_CORPUS_DIR, help=f"output directory (default: {DEFAULT_CORPUS_DIR})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="default", help="size preset (default: default)"
    )
    parser.add_argument(
        "--small", action="store_true", help="same as --size small (tens of items, for tests)"
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="only build when no complete corpus is there"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"tokenizer vocabulary bound (default: {DEFAULT_VOCAB_SIZE})",
    )
    add_threads_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    size = "small" if args.small else args.size
    t0 = time.perf_counter()
    skipped = args.if_missing and is_complete(args.out, args.seed, size, vocab_size=args.vocab_size)
    if skipped:
        corpus = SynthCorpus.at(args.out, args.seed, size)
    else:
        corpus = build_synth_corpus(args.out, seed=args.seed, size=size, vocab_size=args.vocab_size)
    print(_summary(corpus, time.perf_counter() - t0, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
