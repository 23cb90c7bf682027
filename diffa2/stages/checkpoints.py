"""Trainer checkpoints that are complete or absent: built in a staging folder, renamed into place, found on resume.

Trainer writes a checkpoint file by file into `checkpoint-N`; a kill in the middle would leave a folder that
`--resume` takes for the latest checkpoint. Here every checkpoint is written into `.checkpoint-N.partial-staging`
(the same name on every process) and renamed to `checkpoint-N` only once all of it is on disk. On resume, staging
folders are removed with a message and `checkpoint-N` folders that lack a required file are passed over.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from diffa2.io import is_partial, publish_directory, staging_path
from diffa2.modeling.checkpoint import CONFIG_NAME, WEIGHTS_NAME

TRAINER_STATE = "trainer_state.json"  # written last by Trainer: its presence completes a checkpoint
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def staging_run_dir(run_dir: Path, step: int) -> Path:
    """Where Trainer is pointed while it writes the checkpoint of `step` (it adds `checkpoint-<step>` itself)."""
    return staging_path(run_dir / checkpoint_name(step), "staging")


def publish_checkpoint(run_dir: Path, step: int, save_total_limit: int | None) -> Path:
    """Move the finished staging checkpoint of `step` into place, then drop checkpoints beyond the limit."""
    staging = staging_run_dir(run_dir, step)
    final = run_dir / checkpoint_name(step)
    publish_directory(staging / final.name, final)
    shutil.rmtree(staging, ignore_errors=True)
    rotate_checkpoints(str(run_dir), save_total_limit=save_total_limit)
    return final


def missing_files(checkpoint: Path) -> list[str]:
    """Required files a checkpoint folder lacks (a trainer state that is not valid JSON counts as missing)."""
    missing = [name for name in REQUIRED_FILES if not (checkpoint / name).is_file()]
    if TRAINER_STATE not in missing:
        try:
            json.loads((checkpoint / TRAINER_STATE).read_text())
        except (ValueError, UnicodeDecodeError):
            missing.append(f"{TRAINER_STATE} (not valid JSON)")
    return missing


def last_complete_checkpoint(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The newest complete `checkpoint-N` of `run_dir`; leftovers of interrupted saves are removed, with a message."""
    if not run_dir.is_dir():
        return None
    for leftover in sorted(p for p in run_dir.iterdir() if p.is_dir() and is_partial(p)):
        log(f"removing {leftover}: an incomplete checkpoint left by an interrupted save")
        shutil.rmtree(leftover, ignore_errors=True)
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = sorted((int(p.name[len(prefix):]) for p in run_dir.glob(f"{prefix}*")
                    if p.is_dir() and p.name[len(prefix):].isdigit()), reverse=True)
    for step in steps:
        candidate = run_dir / checkpoint_name(step)
        missing = missing_files(candidate)
        if not missing:
            return candidate
        log(f"ignoring {candidate}: incomplete (missing {', '.join(missing)})")
    return None
