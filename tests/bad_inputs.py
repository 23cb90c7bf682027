"""The table of bad inputs shared by tests/test_bad_inputs.py (data) and tests/test_bad_inputs_setup.py (set-up).

A row (`Case`) builds a real file in a temporary folder and feeds it to the entry point a user would hit; `check`
runs it and asserts what it gets: a clear error naming the file/line/field or option, skipped and counted, or
accepted (converted / trimmed and counted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffa2.audio import AudioError
from diffa2.data.manifest import ManifestError
from diffa2.eval.loaders import DataError
from diffa2.modeling.safe_load import CheckpointError
from diffa2.run_lock import RunDirError

# SystemExit: a command's error exit, its message and no traceback (e.g. `python -m diffa2.stages.rl`)
PROJECT_ERRORS = (AudioError, ManifestError, CheckpointError, DataError, ValueError, RunDirError, SystemExit)


@dataclass
class Ctx:
    tmp: Path
    checkpoint: Path  # a saved tiny DIFFA-2 checkpoint (session fixture), copied before being damaged
    chat: object


@dataclass
class Case:
    name: str
    gets: str  # "error", "skipped" (counted), "accepted" or "trimmed" (counted)
    message: str  # fragment of the error / skip message, or of the accepted item's description
    run: Callable[[Ctx], object]  # raises (error) or returns the messages / description to search


def check(case: Case, ctx: Ctx) -> None:
    """Run one row: its error must carry `case.message`, or what it returns must (one skip, or a description)."""
    if case.gets == "error":
        with pytest.raises(PROJECT_ERRORS) as err:
            case.run(ctx)
        assert case.message in str(err.value)
        return
    got = case.run(ctx)
    if case.gets == "skipped":
        assert len(got) == 1 and case.message in got[0], got  # counted once, with a message naming file and line
        assert "train.jsonl:2" in got[0], got
    else:
        assert case.message in got, got
