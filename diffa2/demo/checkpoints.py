"""Find the checkpoints the demo can offer: the final checkpoint of every stage run under a runs directory."""

from __future__ import annotations

import json
from pathlib import Path

NO_CHECKPOINT_HELP = (
    "**No checkpoint found in `{runs}`.** Train the tiny embedded default (about 13 minutes on a 2-core CPU) with "
    "`make train` or `python -m diffa2.stages.sft`, or with the button below; or start the demo with "
    "`--model DIR`, or type a checkpoint directory into the box above."
)


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
