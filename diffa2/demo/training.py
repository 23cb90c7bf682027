"""Train the tiny embedded default from the page: run the SFT stage in a subprocess and report its progress.

A subprocess, not a thread: training must not block or crash the server, and the stage's own command line (the
same one `make train` runs) stays the single way to train. Progress comes from the tqdm bars the stage prints
(training steps, then the test split) and its `[sft] ...` log lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# tqdm's bar: "test:  25%|██▌       | 3/12 [00:01<00:04, ...]" or " 12%|█▏        | 96/800 [00:31<03:50, ...]".
_TQDM = re.compile(r"^(?:(?P<desc>[\w ]+):)?\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


@dataclass
class TrainingProgress:
    """One progress report: fraction done of the current bar (None between bars) and what is happening."""

    fraction: float | None
    message: str


class TrainingFailed(RuntimeError):
    """The training command exited with an error; the message ends with the last lines it printed."""


def tiny_default_command(runs_dir: str | Path) -> list[str]:
    """The embedded default's stage-3 command (what `make train` runs), writing to `<runs_dir>/sft`."""
    return [sys.executable, "-m", "diffa2.stages.sft", "--output_dir", str(Path(runs_dir) / "sft")]


def run_training(command: Sequence[str], cwd: str | Path) -> Iterator[TrainingProgress]:
    """Run `command` in `cwd`, yielding progress as it prints; raise TrainingFailed if it exits non-zero."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            pending = b""
            while chunk := proc.stdout.read1(4096):
                *lines, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws its bar after a bare \r
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if line:
                        tail.append(line)
                        yield parse_progress(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # the caller stopped listening (page closed, server stopping): stop training too
                proc.kill()
    if code:
        raise TrainingFailed(f"training exited with code {code}; last output:\n" + "\n".join(tail))


def parse_progress(line: str) -> TrainingProgress:
    """A progress report from one line the stage printed."""
    bar = _TQDM.match(line)
    if bar is None:
        return TrainingProgress(None, line[:200])
    n, total = int(bar["n"]), int(bar["total"])
    what = f"evaluating ({bar['desc'].strip()})" if bar["desc"] else "training step"
    return TrainingProgress(n / max(total, 1), f"{what} {n}/{total}")
