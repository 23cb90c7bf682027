"""One running process per output folder, and no fresh run over another run's checkpoints.

`RunLock` makes a folder the property of one process: a lock file (`.diffa2-run.lock`) created with O_EXCL holds
the owner's PID, host, start time and command. A second process refuses to start and names the owner. A lock whose
owner is gone (same host, PID no longer running or a zombie, or running but a different process that reuses the
PID) is reported and taken over; a lock from another host cannot be checked and is never taken over. The lock is
released when the owner releases it or exits normally; after a kill the next run finds it stale. Under torchrun only
rank 0 takes it (the other ranks write into the folder rank 0 owns).

`check_fresh_run` keeps a training run from mixing its checkpoints with another run's: a folder that holds
`checkpoint-N/` or `final/` is refused unless the run resumes (`--resume true`) or replaces them
(`--overwrite_output_dir true`, which deletes them first so that `--resume` never picks up the old run's steps).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from diffa2.io import is_partial

LOCK_NAME = ".diffa2-run.lock"
CHECKPOINT_PREFIX = "checkpoint-"


class RunDirError(RuntimeError):
    """The output folder belongs to another run; the message names it and how to proceed."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell whether it still runs, and to name it in messages."""

    pid: int
    host: str
    started: str
    command: str
    token: str
    pid_start: str | None = None  # the process's start time (Linux /proc): tells a reused PID from the owner

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300], uuid.uuid4().hex,
                   process_start(os.getpid()))

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host} (started {self.started}: {self.command})"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (Linux), None where there is no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (one of another user counts as alive; a zombie, killed
    but not yet reaped, does not: e.g. a torchrun worker orphaned by a kill of its launcher, which a container's
    init may reap late or never)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def is_stale(holder: Holder, host: str) -> bool:
    """A lock left by a process of this host that no longer runs (or whose PID now belongs to another process)."""
    if holder.host != host:
        return False
    if not pid_alive(holder.pid):
        return True
    return holder.pid_start is not None and process_start(holder.pid) not in (None, holder.pid_start)


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when it is gone, empty or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None


def create_lock_file(path: Path, holder: Holder) -> None:
    """Create `path` only if it does not exist (O_EXCL: atomic between processes) and write `holder` into it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(holder)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class RunLock:
    """The lock of one output folder; `acquire()` it before writing there (released at exit at the latest)."""

    def __init__(self, directory: Path, log: Callable[[str], None] = print) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.log = log
        self.me = Holder.this_process()

    def acquire(self) -> RunLock:
        """Own the folder, or raise `RunDirError` naming the process that does; a stale lock is taken over."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            create_lock_file(self.path, self.me)
        except FileExistsError:
            self._contend()
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file if it is still this lock's."""
        atexit.unregister(self.release)
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def _contend(self) -> None:
        holder = read_holder(self.path)
        if holder is None:
            raise RunDirError(f"{self.directory} is locked by {self.path}, which cannot be read; if no other run "
                              f"writes into this folder, delete that file")
        same_process = holder.host == self.me.host and holder.pid == self.me.pid
        if not (same_process or is_stale(holder, self.me.host)):
            checkable = "" if holder.host == self.me.host else f" (another host: cannot be checked from {self.me.host})"
            raise RunDirError(f"{self.directory} is in use by another run: {holder.describe()}{checkable} holds "
                              f"{self.path}. Wait for it to finish or choose another output folder; if that process "
                              f"is gone, delete {self.path}")
        if not same_process:
            self.log(f"{self.path}: stale lock of {holder.describe()}, which is no longer running; taking it over")
        self._take_over(holder)

    def _take_over(self, stale: Holder) -> None:
        """Replace the stale lock by this one; one process at a time (a second O_EXCL file guards the swap)."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RunDirError(f"another process is taking over the stale lock {self.path}; retry in a moment "
                              f"(if none is, delete {guard})") from None
        try:
            if read_holder(self.path) == stale:
                self.path.unlink(missing_ok=True)
            try:
                create_lock_file(self.path, self.me)
            except FileExistsError:
                now = read_holder(self.path)
                raise RunDirError(f"{self.directory} is in use by another run: "
                                  f"{now.describe() if now else 'unknown'} took {self.path} first") from None
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)


def existing_run_files(directory: Path) -> list[Path]:
    """Checkpoints of an earlier run in `directory`: `checkpoint-N/`, `final/` and unfinished staging folders."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and (
        (p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit())
        or p.name == "final" or is_partial(p))]
    return sorted(found, key=lambda p: (not p.name.startswith(CHECKPOINT_PREFIX), len(p.name), p.name))


def check_fresh_run(directory: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None] = print) -> None:
    """Refuse a fresh run into a folder holding another run's checkpoints, unless resuming or overwriting."""
    found = [p for p in existing_run_files(directory) if not is_partial(p)]
    if resume or not found:
        return
    names = ", ".join(p.name for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if not overwrite:
        raise RunDirError(f"{directory} holds another run's checkpoints ({names}): pass --resume true to continue "
                          f"that run, --overwrite_output_dir true to replace it, or choose another --output_dir")
    log(f"--overwrite_output_dir: deleting the earlier run's {names} in {directory}")
    for path in existing_run_files(directory):
        shutil.rmtree(path)
