"""kill -9 of a 2-process training run: torchrun's agent and both workers (gloo, CPU) SIGKILLed at seeded random
moments, three times, each time resumed with `--resume true`; the run ends as an uninterrupted 2-process run of the
same length does (the same weights, tensor for tensor, and the same loss log), each killed run's lock is reported as
stale and taken over, and no staging folder is left behind.

Exact equality is expected, not a tolerance: both runs have the same layout (2 ranks, the same per-rank batches and
seeds), gloo's reduction order is fixed for a layout, and a resume restores the weights, optimizer, scheduler,
sampler position and every rank's RNG state (rng_state_<rank>.pth) that draws the masks.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import sigkill_process_tree, small_run_args
from safetensors.torch import load_file

from diffa2.io import is_partial
from diffa2.run_lock import LOCK_NAME, Holder, RunLock, pid_alive, read_holder
from diffa2.stages.checkpoints import checkpoint_name

STEPS = 20
KILLS = 3
SEED = 15  # of the kill schedule: which checkpoint to wait for, then how long after it to kill
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"}  # a killed run's messages are in its log up to the kill


def torchrun(run_dir: Path, corpus: Path, resume: bool) -> list[str]:
    """The SFT stage CLI on 2 processes: batch 2 per rank, a checkpoint every 2 steps, no test-split evaluation."""
    flags = ["--per_device_train_batch_size", "2", "--test_file", "", "--resume", str(resume).lower()]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "diffa2.stages.sft", *small_run_args(run_dir, corpus, STEPS, flags)]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The launcher in a session of its own (its process group: the agent), output into `log`."""
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=log.parent, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def newest_checkpoint(run_dir: Path) -> int:
    """The step of the newest published `checkpoint-N` (0 when none)."""
    steps = [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def assert_took_over(text: str, run_dir: Path, stale: Holder, resumed_from: Path, leftovers: list[Path]) -> None:
    """A launch's output says it took the killed run's lock over, removed its staging folders, and resumed from the
    newest checkpoint it had published."""
    assert f"{run_dir / LOCK_NAME}: stale lock of {stale.describe()}, which is no longer running" in text
    assert all(f"removing {p}: an incomplete checkpoint left by an interrupted save" in text for p in leftovers)
    assert f"resuming from {resumed_from}\n" in text


def test_a_zombie_holds_no_lock(tmp_path):
    # A worker orphaned by a kill of torchrun's agent is re-parented to init; until init reaps it (a container's PID 1
    # may do so seconds later, or never), the killed worker is a zombie with its PID and start time, and a run resumed
    # meanwhile must find its lock stale.
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not pid_alive(child) and pid_alive(os.getpid())
        holder = Holder(child, Holder.this_process().host, "2026-12-03 10:00:00", "train", "t", None)
        (tmp_path / LOCK_NAME).write_text(json.dumps(asdict(holder)) + "\n")
        messages = []
        lock = RunLock(tmp_path, messages.append).acquire()
        assert messages == [f"{tmp_path / LOCK_NAME}: stale lock of {holder.describe()}, which is no longer running; "
                            f"taking it over"]
        assert read_holder(tmp_path / LOCK_NAME) == lock.me
        lock.release()
    finally:
        os.waitpid(child, 0)


@pytest.mark.slow
def test_two_process_run_killed_three_times_then_resumed_ends_with_the_uninterrupted_weights(tmp_path, small_corpus):
    full = tmp_path / "full"
    done = subprocess.run(torchrun(full, small_corpus, resume=False), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rng = random.Random(SEED)
    targets = sorted(rng.sample(range(2, STEPS - 6, 2), KILLS))  # >= 8 steps of margin: no run finishes first
    killed = tmp_path / "killed"
    stale, resumed_from, leftovers = None, None, []
    for launch, target in enumerate(targets):
        log = tmp_path / f"launch-{launch}.log"
        process = start(torchrun(killed, small_corpus, resume=launch > 0), log)
        target = max(target, newest_checkpoint(killed) + 2)  # each launch gets further than the one before
        deadline = time.monotonic() + 120
        while newest_checkpoint(killed) < target:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {checkpoint_name(target)} within 120 s"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere in the next step or two, a checkpoint save included
        assert process.poll() is None, "the run ended before it could be killed"
        pids = sigkill_process_tree(process)
        assert len(pids) == 3, pids  # the agent and its 2 workers
        if stale is not None:
            assert_took_over(log.read_text(), killed, stale, resumed_from, leftovers)
        stale = read_holder(killed / LOCK_NAME)
        assert stale is not None and stale.pid in pids[1:]  # the kill left rank 0's lock behind
        assert not (killed / "final").exists()
        resumed_from = killed / checkpoint_name(newest_checkpoint(killed))
        leftovers = [p for p in killed.iterdir() if is_partial(p)]  # a kill in mid-save leaves its staging folder

    log = tmp_path / "resumed.log"
    process = start(torchrun(killed, small_corpus, resume=True), log)
    assert process.wait(300) == 0, log.read_text()[-3000:]
    assert_took_over(log.read_text(), killed, stale, resumed_from, leftovers)
    assert json.loads((killed / "summary.json").read_text())["steps"] == STEPS
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[float]:
        return [e["loss"] for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in e]

    assert len(losses(killed)) == STEPS and losses(killed) == losses(full)
    # The same files as the uninterrupted run: the last two checkpoints, final/, the reports; no staging folder
    # and no lock.
    names = sorted(p.name for p in killed.iterdir())
    assert names == sorted(p.name for p in full.iterdir()) == [
        checkpoint_name(STEPS - 2), checkpoint_name(STEPS), "final", "loss.png", "summary.json", "train_log.jsonl"]
