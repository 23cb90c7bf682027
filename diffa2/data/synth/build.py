"""Building the synthetic corpus on disk (WAVs, manifests, tokenizer, info) and its completion marker, so that
callers reuse a finished build and concurrent builders serialise on a lock.

A build is written into a staging folder inside the corpus folder (`.build.partial-staging`), moved into place once
generated, and completed by the marker, written last. A build killed at any moment (kill -9 included) leaves no
marker, so neither `is_complete` nor `--if_missing` takes what it left for a corpus; its half-written files (and the
temporary files of interrupted atomic writes) are all in the staging folder, which the next build removes; and its
lock is an flock, which the kernel releases when the holder dies, so the lock file it leaves blocks nobody.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

try:
    import fcntl
except ImportError:  # not on Windows: builds are then not serialised between processes
    fcntl = None

from diffa2.data.synth.constants import (
    CLIP_SECONDS,
    COMPLETE_MARKER,
    COUNT_WORDS,
    DATASET_NAME,
    DEFAULT_CORPUS_DIR,
    DEFAULT_VOCAB_SIZE,
    FAMILIES,
    FORMAT_VERSION,
    LOCK_FILE,
    SAMPLE_RATE,
    SPLITS,
    STAGES,
    VOCABULARY,
    WORD_TONES,
)
from diffa2.data.synth.items import _record, _stage_items, _test_split, chance_accuracy
from diffa2.data.synth.questions import (
    CAPTION_KIND,
    CAPTION_PHRASINGS,
    QUESTION_KINDS,
    TRANSCRIPTION_KIND,
    format_mc_prompt,
)
from diffa2.data.synth.render import _SPLIT_CODE, Clip, _make_clip
from diffa2.data.tokenizer import ASR_INSTRUCTION, build_tokenizer
from diffa2.io import atomic_write_text, staging_path

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
                   root / "tokenizer")


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


_held = threading.local()  # the corpus folders whose build lock this thread holds (the lock is re-entrant)


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Hold the build lock of the corpus folder `root`, waiting for another builder; re-entrant in one thread."""
    held = _held.__dict__.setdefault("roots", set())
    key = root.resolve()
    if key in held:
        yield
        return
    with open(root / LOCK_FILE, "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or by the kernel if the holder dies
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def build_synth_corpus(
    out_dir: str | Path = DEFAULT_CORPUS_DIR,
    seed: int = 0,
    size: str = "default",
    sizes: SynthSizes | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> SynthCorpus:
    """Generate the corpus into ``out_dir`` (replacing a previous build there) and return its paths.

    ``size`` picks a preset of :data:`SIZES` ("default" for the embedded default's training, "small" for
    tests); ``sizes`` overrides it. It is generated in a staging folder under the build lock, moved into place,
    and completed by the marker, written last, atomically.
    """
    sizes = _resolve_sizes(size, sizes)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        marker = root / COMPLETE_MARKER
        marker.unlink(missing_ok=True)
        staging = staging_path(root / "build", "staging")
        shutil.rmtree(staging, ignore_errors=True)  # what a killed build left
        staging.mkdir()
        _generate(staging, seed, size, sizes, vocab_size)
        for target, built in zip(_owned_paths(root), _owned_paths(staging), strict=True):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if built.exists():
                os.replace(built, target)
        shutil.rmtree(staging)
        # The completion marker, last and atomically: the file list with sizes lets ensure_synth_corpus spot a
        # damaged corpus cheaply.
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        listing = {str(p.relative_to(root)): p.stat().st_size for p in files}
        _dump_json(marker, {"format_version": FORMAT_VERSION, "seed": seed, "size": size, "sizes": asdict(sizes),
                            "vocab_size": vocab_size, "files": listing})
    return SynthCorpus.at(root, seed, size)


def _generate(root: Path, seed: int, size: str, sizes: SynthSizes, vocab_size: int) -> None:
    """Write every file of the corpus into the empty folder ``root`` (all but the completion marker)."""
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
    with _build_lock(root):
        if is_complete(out_dir, seed, size, sizes, vocab_size):  # another process built it meanwhile
            return SynthCorpus.at(out_dir, seed, size)
        return build_synth_corpus(out_dir, seed=seed, size=size, sizes=sizes, vocab_size=vocab_size)

