"""The resumable part of a benchmark run: content fingerprints of a checkpoint, per-item keys, and the append-only
partial predictions logs (one per process) that a rerun of the same command resumes from."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffa2.eval.loaders import Item
from diffa2.eval.sharding import log_paths

SAMPLE_CHUNK = 1 << 16  # bytes per sampled chunk of a large weight file
SAMPLE_CHUNKS = 32
SMALL_FILE = 8 << 20  # files up to this size are hashed whole

def _file_digest(path: Path) -> str:
    """SHA-256 of a small file, or of its size plus evenly spaced chunks for a large one (weights)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= SMALL_FILE:
            h.update(handle.read())
        else:
            for k in range(SAMPLE_CHUNKS):
                handle.seek((size - SAMPLE_CHUNK) * k // (SAMPLE_CHUNKS - 1))
                h.update(handle.read(SAMPLE_CHUNK))
    return h.hexdigest()


def checkpoint_fingerprint(directory: str | Path) -> str:
    """A content fingerprint of a checkpoint folder (configs whole, weights sampled: fast on 16 GB)."""
    root = Path(directory)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and
                                                  not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{_file_digest(p)}\n".encode())
    return h.hexdigest()[:16]

def item_key(item: Item, prompt: str) -> str:
    return hashlib.sha256(f"{item.id}\0{prompt}\0{item.audio.label}".encode()).hexdigest()[:16]

def read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """Finished items by key; a line cut short by a crash is ignored (its item is decoded again)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "key" in entry:
                done[entry["key"]] = entry
    return done


def read_logs(directory: Path, stem: str) -> dict[str, dict[str, Any]]:
    """Finished items of every log of one run identity (one process's, or each rank's of a sharded run); a
    decoded entry wins over an audio failure of the same item (retried later, perhaps by another rank)."""
    done: dict[str, dict[str, Any]] = {}
    for path in log_paths(directory, stem):
        for key, entry in read_partial(path).items():
            if has_output(entry) or not has_output(done.get(key)):
                done[key] = entry
    return done


def has_output(entry: dict[str, Any] | None) -> bool:
    """Whether a log entry holds an answer (an entry for missing or unreadable audio does not: it is retried)."""
    return entry is not None and "output" in entry

def append_partial(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    """Append entries durably; first terminate a line a crash may have left unfinished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
