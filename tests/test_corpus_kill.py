"""kill -9 of the synthetic corpus builder (`python -m diffa2.data.synth`) at several moments of a build, then reruns
with and without `--if_missing` and the stages' `ensure_synth_corpus`: a killed build is never taken for a complete
corpus, the lock it held blocks no rerun, and the corpus finally built is byte-identical to an uninterrupted build."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from diffa2.data.synth import cli, ensure_synth_corpus, is_complete
from diffa2.data.synth.constants import COMPLETE_MARKER, LOCK_FILE
from diffa2.io import staging_path

ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def staging(root: Path) -> Path:
    """Where a build of `root` writes before it moves the corpus into place."""
    return staging_path(root / "build", "staging")


# Moments of a build, each seen in the staging folder, in build order: a later one is never true of what an
# earlier kill left there.
MOMENTS: dict[str, Callable[[Path], bool]] = {
    "the first WAV": lambda root: any(staging(root).rglob("*.wav")),
    "the first manifest": lambda root: any(staging(root).glob("stage1_asr_*.json*")),
    "the test split's WAVs": lambda root: any(staging(root).glob("audio/test/*.wav")),  # ~0.3 s before the end
}


def hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, hidden ones included, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lock_is_free(root: Path) -> bool:
    """Whether the corpus folder's build lock could be taken now (without waiting)."""
    with open(root / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def kill_at(moment: str, root: Path, flags: list[str]) -> None:
    """Run the builder into `root` and SIGKILL it at `moment`, while it holds the build lock."""
    command = [sys.executable, "-m", "diffa2.data.synth", "--small", "--out", str(root), *flags]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not MOMENTS[moment](root):
        assert process.poll() is None, f"the build ended before {moment}: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {moment} within 120 s"
        time.sleep(0.002)
    assert not lock_is_free(root), moment  # the builder holds the build lock
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()


def reference_listing(small_corpus: Path) -> dict[str, str]:
    """The uninterrupted build's files (the session's small corpus: seed 0, size small, as `--small` builds)."""
    reference = hashes(small_corpus)
    audio = [name for name in reference if name.endswith(".wav")]
    top = sorted(name for name in reference if "/" not in name)
    tokenizer = [name for name in reference if name.startswith("tokenizer/")]
    assert (len(audio), len(top), len(tokenizer), len(reference)) == (68, 21, 3, 92), sorted(reference)
    assert {COMPLETE_MARKER, LOCK_FILE, "corpus_info.json", "test_mmau.json", "stage3_sft_train.jsonl"} < set(top)
    return reference


@pytest.mark.slow
def test_builds_killed_at_three_moments_leave_no_complete_corpus_and_the_rebuild_is_identical(tmp_path, small_corpus,
                                                                                               capsys):
    reference = reference_listing(small_corpus)
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)  # a complete corpus, which the first killed (plain) build replaces
    for moment, flags in zip(MOMENTS, ([], [], ["--if_missing"]), strict=True):  # plain reruns, then --if_missing
        kill_at(moment, root, flags)
        assert not (root / COMPLETE_MARKER).exists() and not is_complete(root, 0, "small"), moment
        assert staging(root).is_dir() and lock_is_free(root), moment  # the lock file stays; the kernel freed it
    extra = set(hashes(root)) - set(reference)  # the half-written files are all in the staging folder
    assert extra and all(name.startswith(f"{staging(root).name}/") for name in extra)

    ensure_synth_corpus(root, seed=0, size="small")  # what a stage does: rebuilds, the leftovers removed
    assert hashes(root) == reference
    capsys.readouterr()
    assert cli.main(["--small", "--out", str(root), "--if_missing"]) == 0
    assert "(already complete, not rebuilt)" in capsys.readouterr().out and hashes(root) == reference


@pytest.mark.slow
def test_a_build_that_dies_while_moving_the_corpus_into_place_is_rebuilt(tmp_path, small_corpus, monkeypatch,
                                                                          capsys):
    reference = reference_listing(small_corpus)
    root = tmp_path / "corpus"
    real_replace, moved = os.replace, []

    def die_on_the_fourth_move(src, dst):
        if Path(src).parent == staging(root) and Path(dst).parent == root:  # a move, not an atomic write
            moved.append(Path(dst).name)
            if len(moved) == 4:
                raise KeyboardInterrupt  # as if killed here: nothing is cleaned up
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_the_fourth_move)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--small", "--out", str(root)])
    monkeypatch.undo()
    assert moved == ["stage1_asr_train.json", "stage1_asr_train.jsonl", "stage1_asr_validation.json",
                     "stage1_asr_validation.jsonl"]
    assert (root / "stage1_asr_train.json").is_file() and not is_complete(root, 0, "small")
    capsys.readouterr()
    assert cli.main(["--small", "--out", str(root), "--if_missing"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert hashes(root) == reference
    assert cli.main(["--small", "--out", str(root), "--if_missing"]) == 0
    assert "(already complete, not rebuilt)" in capsys.readouterr().out
