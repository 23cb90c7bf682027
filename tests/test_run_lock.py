"""One run per output folder: the lock file, stale locks, and fresh runs over another run's checkpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from helpers import small_run_args

from diffa2.config import parse_config
from diffa2.eval.__main__ import main as eval_main
from diffa2.run_lock import (
    LOCK_NAME,
    Holder,
    RunDirError,
    RunLock,
    check_fresh_run,
    process_start,
    read_holder,
)
from diffa2.stages import curriculum, sft
from diffa2.stages.cli import SFT_ARG_TYPES
from diffa2.stages.runner import SFTStage

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def sleeper():
    """Another live process on this host."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant(directory: Path, holder: Holder) -> Path:
    """A lock file of `holder` in `directory`, as that process would have written it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)) + "\n")
    return path


def holder(pid: int, host: str | None = None, **changes) -> Holder:
    """The lock `pid` would have written (its own start time unless `changes` says otherwise)."""
    changes = {"pid_start": process_start(pid), **changes}
    return replace(Holder.this_process(), pid=pid, host=host or socket.gethostname(), command="train.py", **changes)


def test_lock_records_this_process_and_is_released(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    recorded = read_holder(tmp_path / "run" / LOCK_NAME)
    assert (recorded.pid, recorded.host, recorded.token) == (os.getpid(), socket.gethostname(), lock.me.token)
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_process_keeps_the_folder(tmp_path, sleeper):
    other = holder(sleeper.pid, started="2026-12-03 10:00:00")
    path = plant(tmp_path, other)
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path).acquire()
    assert str(err.value) == (
        f"{tmp_path} is in use by another run: PID {sleeper.pid} on {socket.gethostname()} (started 2026-12-03 "
        f"10:00:00: train.py) holds {path}. Wait for it to finish or choose another output folder; if that process "
        f"is gone, delete {path}")
    assert read_holder(path) == other  # untouched


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
    pid = dead_pid()
    path = plant(tmp_path, holder(pid, started="2026-12-03 10:00:00"))
    messages: list[str] = []
    lock = RunLock(tmp_path, messages.append).acquire()
    assert messages == [f"{path}: stale lock of PID {pid} on {socket.gethostname()} (started 2026-12-03 10:00:00: "
                        f"train.py), which is no longer running; taking it over"]
    assert read_holder(path).token == lock.me.token and not path.with_name(LOCK_NAME + ".takeover").exists()


def test_a_reused_pid_is_a_stale_lock(tmp_path, sleeper):
    plant(tmp_path, holder(sleeper.pid, pid_start="1"))  # the PID runs, but it is not the process that locked
    messages: list[str] = []
    RunLock(tmp_path, messages.append).acquire()
    assert len(messages) == 1 and "which is no longer running; taking it over" in messages[0]


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    plant(tmp_path, holder(dead_pid(), host="node-7"))
    with pytest.raises(RunDirError, match=r"PID \d+ on node-7 .* \(another host: cannot be checked from "):
        RunLock(tmp_path).acquire()


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunDirError, match=r"which cannot be read; if no other run writes into this folder, delete"):
        RunLock(tmp_path).acquire()


def test_the_same_process_may_lock_again_and_only_the_owner_releases(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()  # e.g. a stage rerun in the same Python process after an error
    first.release()  # no longer the owner: leaves the second's lock
    assert read_holder(tmp_path / LOCK_NAME).token == second.me.token
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


LOCK_THEN = "import os, sys; from diffa2.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "


def test_a_second_process_is_refused_while_the_first_runs(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", LOCK_THEN + "print('locked', flush=True); import time; "
                              "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError, match=rf"in use by another run: PID {first.pid} on {socket.gethostname()} "):
            RunLock(tmp_path).acquire()
    finally:
        first.kill()
        first.wait()
    messages: list[str] = []
    RunLock(tmp_path, messages.append).acquire()  # killed: its lock is stale now
    assert f"stale lock of PID {first.pid} on " in messages[0]


def test_the_lock_goes_at_exit_and_survives_a_kill_as_a_stale_lock(tmp_path):
    subprocess.run([sys.executable, "-c", LOCK_THEN + "print('ran')", str(tmp_path / "a")], check=True)
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    killed = subprocess.run([sys.executable, "-c", LOCK_THEN + "os.kill(os.getpid(), 9)", str(tmp_path / "b")])
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "b" / LOCK_NAME).exists()
    messages: list[str] = []
    RunLock(tmp_path / "b", messages.append).acquire()
    assert "which is no longer running; taking it over" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Fresh runs over another run's checkpoints
# ---------------------------------------------------------------------------------------------------------------


def earlier_run(directory: Path) -> None:
    for name in ("checkpoint-200", "checkpoint-1600", "final", ".checkpoint-1800.partial-staging"):
        (directory / name).mkdir(parents=True)
    (directory / "train_log.jsonl").write_text("{}\n")


def test_fresh_run_over_checkpoints_is_refused_naming_them(tmp_path):
    earlier_run(tmp_path)
    with pytest.raises(RunDirError) as err:
        check_fresh_run(tmp_path, resume=False, overwrite=False)
    assert str(err.value) == (
        f"{tmp_path} holds another run's checkpoints (checkpoint-200, checkpoint-1600, final): pass --resume true "
        f"to continue that run, --overwrite_output_dir true to replace it, or choose another --output_dir")
    check_fresh_run(tmp_path, resume=True, overwrite=False)  # resuming it is fine
    assert sorted(p.name for p in tmp_path.iterdir())[0] == ".checkpoint-1800.partial-staging"


def test_overwrite_deletes_the_earlier_checkpoints_only(tmp_path):
    earlier_run(tmp_path)
    messages: list[str] = []
    check_fresh_run(tmp_path, resume=False, overwrite=True, log=messages.append)
    assert messages == [f"--overwrite_output_dir: deleting the earlier run's checkpoint-200, checkpoint-1600, "
                        f"final in {tmp_path}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]


def test_a_folder_without_checkpoints_takes_a_fresh_run(tmp_path):
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    (tmp_path / "checkpoint-notes").mkdir()
    check_fresh_run(tmp_path, resume=False, overwrite=False)
    check_fresh_run(tmp_path / "absent", resume=False, overwrite=False)


# ---------------------------------------------------------------------------------------------------------------
# Wiring: the stages and the benchmark runner
# ---------------------------------------------------------------------------------------------------------------


def stage(run: Path, extra: list[str] = ()) -> SFTStage:
    args = parse_config(SFT_ARG_TYPES, small_run_args(run, run.parent / "no-corpus", 2, list(extra)), "test")
    return SFTStage(sft.SPEC, *args)


def test_stage_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"holds another run's checkpoints \(final\): pass --resume true"):
        stage(tmp_path / "run").setup()  # before the corpus (absent here) or the model is built


def test_stage_refuses_a_folder_locked_by_a_live_run(tmp_path, sleeper):
    plant(tmp_path / "run", holder(sleeper.pid))
    with pytest.raises(RunDirError, match=rf"is in use by another run: PID {sleeper.pid} on "):
        stage(tmp_path / "run").setup()


def test_stage_overwrite_output_dir_starts_afresh(tmp_path):
    earlier_run(tmp_path / "run")
    recipe = tmp_path / "none.yaml"
    with pytest.raises(FileNotFoundError, match="no such data recipe"):  # past the checks, at the next step
        stage(tmp_path / "run", ["--overwrite_output_dir", "true", "--recipe", str(recipe)]).setup()
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / LOCK_NAME).exists()


def test_eval_run_refuses_a_folder_locked_by_a_live_run(checkpoint, tmp_path, sleeper, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:2]
    (data / "mmau.json").write_text(json.dumps(rows), encoding="utf-8")
    for r in rows:
        (data / r["audio_id"]).parent.mkdir(parents=True, exist_ok=True)
        (data / r["audio_id"]).write_bytes(b"not decoded: the run stops first")
    plant(tmp_path / "out", holder(sleeper.pid))
    argv = ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(data / "mmau.json"),
            "--out", str(tmp_path / "out"), "--threads", "1"]
    assert eval_main(argv) == 2
    assert f"is in use by another run: PID {sleeper.pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]


def test_curriculum_checks_every_stage_folder_before_the_first_stage(tmp_path, capsys):
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)  # e.g. left by `make train`
    with pytest.raises(SystemExit) as exit_info:
        curriculum.main(["--runs_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'sft'} holds another run's checkpoints (final)" in err
    assert not (tmp_path / "runs" / "semantic").exists()  # refused before stage 1 started
