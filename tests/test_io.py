"""Atomic writes: the whole file or the old one, with the permissions of a plain write."""

from __future__ import annotations

import os
import stat

from diffa2.io import atomic_write_json, atomic_write_text


def test_atomic_write_gives_a_plain_writes_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.json"
    atomic_write_json(atomic, {"a": 1})
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    old = os.umask(0o077)
    try:
        atomic_write_text(atomic, "private")
        assert stat.S_IMODE(atomic.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert atomic.read_text() == "private"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.json", "plain.txt"]  # no temporary file left
