"""Trained checkpoints under a runs directory (`<runs>/<stage>/final`): which exist, which is the embedded default,
which to preselect. Used by the demo and the server."""

from __future__ import annotations

import json
from pathlib import Path


def find_checkpoints(runs_dir: str | Path) -> list[Path]:
    """`<runs_dir>/<stage>/final` directories holding a config.json, newest first."""
    found = [config.parent for config in Path(runs_dir).glob("*/final/config.json")]
    return sorted(found, key=lambda d: (d / "config.json").stat().st_mtime, reverse=True)


def is_embedded_default(checkpoint: str | Path) -> bool:
    """True for a checkpoint of the tiny embedded default: trained from scratch, with no base-model sources."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("encoder_source") is None and config.get("backbone_source") is None


def default_checkpoint(runs_dir: str | Path, explicit: str | None = None) -> str | None:
    """The checkpoint to preselect: the one given on the command line, else the latest embedded-default one."""
    if explicit:
        return explicit
    return next((str(c) for c in find_checkpoints(runs_dir) if is_embedded_default(c)), None)


def checkpoint_choices(runs_dir: str | Path, explicit: str | None = None) -> list[str]:
    """Everything the checkpoint box lists: the explicit checkpoint first, then the runs newest first."""
    choices = [explicit] if explicit else []
    return choices + [str(c) for c in find_checkpoints(runs_dir) if str(c) != explicit]
