"""The command line shared by the stages: parse and range-check the options, set the threads, run, summarise."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffa2.config import parse_config
from diffa2.run_lock import RunDirError
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.real_recipe import FullTrainingRefused, preset_options
from diffa2.stages.runner import StageSpec, run_stage
from diffa2.threads import ThreadArguments, apply_threads
from diffa2.validation import OptionError, check_options

SFT_ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, StageTrainingArguments)


@dataclasses.dataclass(frozen=True)
class StageDefaults:
    """A stage's embedded defaults: subclassed per stage, each field an option of its parser with the stage's value."""


def parse_stage_options(arg_types: tuple[type, ...], argv: list[str] | None, description: str,
                        overrides: dict[str, Any]) -> tuple:
    """The stage's option dataclasses plus `ThreadArguments` from `--config` and flags; OptionError if out of range."""
    return parse_config((*arg_types, ThreadArguments), argv, description, overrides=overrides,
                        check=lambda options: check_options(vars(options)))


def start_stage(arg_types: tuple[type, ...], argv: list[str] | None, description: str,
                overrides: dict[str, Any]) -> tuple:
    """Parse and check the options (a bad value exits with status 2), set the threads, say how long it trains."""
    try:
        *parsed, threads = parse_stage_options(arg_types, argv, description, overrides)
    except OptionError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    apply_threads(threads.threads)
    train_args = parsed[-1]
    if train_args.max_steps == -1:
        print(f"max_steps -1: training for {train_args.num_train_epochs:g} epoch(s) (--num_train_epochs)")
    return tuple(parsed)


def stage_overrides(stage: str, defaults: StageDefaults, argv: list[str] | None) -> dict[str, Any]:
    """What `--config` and flags override: the stage's embedded defaults, then with `--preset real` its real recipe."""
    return {"output_dir": f"runs/{stage}", **dataclasses.asdict(defaults), **preset_options(stage, argv)}


def stage_main(spec: StageSpec, description: str, defaults: StageDefaults, argv: list[str] | None = None) -> dict:
    """Parse `--config`/flags over the stage's defaults and run the stage."""
    args = start_stage(SFT_ARG_TYPES, argv, description, stage_overrides(spec.name, defaults, argv))
    with refusals_end_the_command():
        return run_stage(spec, *args)


@contextmanager
def refusals_end_the_command() -> Iterator[None]:
    """A refused run (a pretrained base trained in full, a folder in use or holding another run) ends with its
    message, which says what to do, and exit status 1 instead of a traceback."""
    try:
        yield
    except (FullTrainingRefused, RunDirError) as err:
        raise SystemExit(f"error: {err}") from None
