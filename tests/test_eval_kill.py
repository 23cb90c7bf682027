"""`python -m diffa2.eval run` killed with SIGKILL mid-way, three times, then resumed: every prediction once, and
final files byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diffa2.eval.runner import RunOptions, run_benchmark
from diffa2.run_lock import LOCK_NAME

FIXTURES = Path(__file__).parent / "fixtures"
FINAL_FILES = ("predictions.json", "samples.jsonl", "report.json", "report.md", "report.png")
KILLS = 3


def lines_in(directory: Path) -> int:
    """Entries appended so far to the run's partial log(s)."""
    return sum(len(p.read_bytes().splitlines()) for p in directory.glob("partial/*.jsonl"))


def parse_line(line: str) -> dict | None:
    """A log entry, or None for a line a kill cut short (the runner ignores it and decodes that item again)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def kill_after_progress(command: list[str], out: Path, cwd: Path) -> int:
    """Start the run, SIGKILL it once it has appended a few more entries, and return how many it had appended."""
    before = lines_in(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while lines_in(out) < before + 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no progress within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return lines_in(out)


@pytest.mark.slow
def test_sigkill_three_times_then_resume_equals_an_uninterrupted_run(checkpoint, tmp_path):
    records = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:24]
    data = tmp_path / "data" / "mmau.json"
    data.parent.mkdir()
    data.write_text(json.dumps(records), encoding="utf-8")
    t = np.arange(8000) / 16000
    for i, r in enumerate(records):
        (data.parent / r["audio_id"]).parent.mkdir(parents=True, exist_ok=True)
        sf.write(data.parent / r["audio_id"], (0.3 * np.sin(2 * np.pi * (200 + 31 * i) * t)).astype(np.float32), 16000)

    def options(out: Path) -> RunOptions:
        return RunOptions(benchmark="mmau", model=str(checkpoint), data=str(data), out=str(out), batch_size=1,
                          progress=False)

    run_benchmark(options(tmp_path / "full"), log=lambda _: None)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "diffa2.eval", "run", "--benchmark", "mmau", "--model", str(checkpoint),
               "--data", str(data), "--out", str(killed), "--batch-size", "1", "--threads", "1", "--no-progress"]
    appended = [kill_after_progress(command, killed, tmp_path) for _ in range(KILLS)]
    assert appended[0] < appended[1] < appended[2] < len(records)  # each run went further, none finished
    assert not (killed / "report.json").exists() and (killed / LOCK_NAME).exists()  # the kill left its lock

    resumed = run_benchmark(options(killed), log=lambda _: None)  # takes the stale lock over
    assert resumed.decoded == len(records) - appended[-1]
    predictions = json.loads((killed / "predictions.json").read_text(encoding="utf-8"))
    assert [p["id"] for p in predictions] == [r["id"] for r in records]  # complete, in order, no duplicates
    (log,) = (killed / "partial").glob("*.jsonl")
    keys = [entry["key"] for entry in map(parse_line, log.read_text(encoding="utf-8").splitlines()) if entry]
    assert len(keys) == len(set(keys)) == len(records)  # no item decoded twice
    for name in FINAL_FILES:
        assert (killed / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert not (killed / LOCK_NAME).exists()
