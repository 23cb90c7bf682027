"""The long-clip splits: each cue moved into one stretch of a three-stretch clip.

``python -m diffa2.data.synth --long --out data/synth`` writes ``test_long_mmau.json`` (MMAU format, the test
split's questions, choices and answers) and its clips under ``audio_long/``. A clip is ``LONG_WINDOWS`` stretches
of ``LONG_WINDOW_SECONDS`` (4 s, whatever the model's encoder window) of digital silence, with one ordinary
2-second test clip (``_test_split``'s cue, pilot tone and noise included) placed at a random offset inside window
2 or 3 (alternating, so every kind has both). Cut to its first window (``long_audio: trim``) a clip is silence, and
the answer a guess; encoded window by window (``long_audio: window``, docs/long-audio.md) the cue is heard. Every
file depends only on the seed and the number of items per kind.

The same command also writes ``long_train.json``: stage-3 training items of the built corpus with their clip moved
into stretch 1, 2 or 3 of a 12 s clip the same way, for training a model with ``--long_audio window``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from diffa2.data.synth.constants import SAMPLE_RATE
from diffa2.data.synth.items import _test_split
from diffa2.io import atomic_write_text

LONG_WINDOW_SECONDS = 4.0
LONG_WINDOWS = 3
LONG_MANIFEST = "test_long_mmau.json"
LONG_TRAIN_MANIFEST = "long_train.json"
LONG_TRAIN_SOURCE = "stage3_sft_train.json"  # the built corpus's stage-3 items the training clips are made from
LONG_AUDIO_DIR = "audio_long"
_LONG_CODE = 4  # the random stream of the cue placement (the corpus's splits use 1-3)
_LONG_TRAIN_CODE = 5  # the training clips' stream


def place_cue(cue: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """A silent ``LONG_WINDOWS``-window int16 clip with ``cue`` at a random offset inside window ``window``
    (0-based), never crossing a window boundary."""
    step = int(round(LONG_WINDOW_SECONDS * SAMPLE_RATE))
    if not 0 <= window < LONG_WINDOWS or len(cue) > step:
        raise ValueError(f"a {len(cue)}-sample cue does not fit window {window} of {LONG_WINDOWS} x {step} samples")
    out = np.zeros(LONG_WINDOWS * step, dtype=np.int16)
    start = window * step + int(rng.integers(0, step - len(cue) + 1))
    out[start : start + len(cue)] = cue
    return out


def build_long_split(out: str | Path, *, seed: int = 0, per_kind: int = 20) -> Path:
    """Write ``test_long_mmau.json`` and its clips under ``out``; returns the manifest's path."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    root = Path(out)
    (root / LONG_AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    clips, records = _test_split(seed, per_kind)
    items = []
    for i, (clip, record) in enumerate(zip(clips, records, strict=True)):
        window = 1 + i % 2  # the second or the third window
        rng = np.random.default_rng([seed, _LONG_CODE, i])
        relpath = f"{LONG_AUDIO_DIR}/long-{i:05d}.wav"
        audio = place_cue(clip.audio, window, rng)
        sf.write(str(root / relpath), audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        items.append(record | {"id": f"long-{i:05d}", "audio_id": relpath, "cue_window": window + 1,
                               "duration": LONG_WINDOWS * LONG_WINDOW_SECONDS})
    manifest = root / LONG_MANIFEST
    atomic_write_text(manifest, json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    return manifest


def build_long_training_split(out: str | Path, *, seed: int = 0, items: int = 600) -> Path:
    """Write ``long_train.json`` and its clips under ``out``: the first ``items`` stage-3 training items of the
    corpus built there, each clip moved into a random window (1, 2 or 3) of a silent 12 s clip; returns its path."""
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")
    root = Path(out)
    source = root / LONG_TRAIN_SOURCE
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: build the corpus there first (python -m diffa2.data.synth "
                                f"--out {root})")
    records = json.loads(source.read_text())[:items]
    (root / LONG_AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    out_records = []
    for i, record in enumerate(records):
        rng = np.random.default_rng([seed, _LONG_TRAIN_CODE, i])
        window = int(rng.integers(0, LONG_WINDOWS))
        cue, rate = sf.read(str(root / record["audio_filepath"]), dtype="int16")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{source}: item {i} ({record['audio_filepath']}) is {rate} Hz, expected {SAMPLE_RATE}")
        relpath = f"{LONG_AUDIO_DIR}/train-{i:05d}.wav"
        sf.write(str(root / relpath), place_cue(cue, window, rng), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        moved = {k: v for k, v in record.items() if k != "seed_transcript"}  # its time stamps no longer hold
        out_records.append(moved | {"audio_id": f"long-{moved['audio_id']}", "audio_filepath": relpath,
                                    "duration": LONG_WINDOWS * LONG_WINDOW_SECONDS, "cue_window": window + 1})
    manifest = root / LONG_TRAIN_MANIFEST
    atomic_write_text(manifest, json.dumps(out_records, indent=1, ensure_ascii=False) + "\n")
    return manifest
