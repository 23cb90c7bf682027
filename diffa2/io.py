"""Atomic file and directory writes: a crash mid-write never leaves something that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask alone must set one to read it,
    which another thread could see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`; the file gets the
    permissions a plain `open(path, "w")` would give (mkstemp's own are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """`atomic_write_text` of pretty-printed JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


PARTIAL_MARK = ".partial-"  # staging directories are named `.<name>.partial-<tag>`, beside their target


def staging_path(path: Path, tag: str) -> Path:
    """The hidden staging name of `path` (`.<name>.partial-<tag>`), recognisable as incomplete by `is_partial`."""
    return path.parent / f".{path.name}{PARTIAL_MARK}{tag}"


def is_partial(path: Path) -> bool:
    """True for a staging directory left behind by a write that never finished (see `staging_path`)."""
    return path.name.startswith(".") and PARTIAL_MARK in path.name


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=staging_path(path, "").name))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, path)


def publish_directory(staging: Path, path: Path) -> None:
    """Rename the complete directory `staging` to `path`, replacing an existing `path`.

    An existing `path` is moved aside first and deleted only after the new one is in place, so at every
    instant either the old or the new complete directory exists under a recognisable name.
    """
    old = None
    if path.exists():
        old = staging_path(path, f"old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
