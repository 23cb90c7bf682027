"""The command line shared by the SFT stages: parse, run, summarise."""

from __future__ import annotations

from typing import Any

from diffa2.config import parse_config
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.runner import StageSpec, run_stage


def stage_main(spec: StageSpec, description: str, defaults: dict[str, Any], argv: list[str] | None = None) -> dict:
    """Parse `--config`/flags over the stage's defaults and run the stage."""
    model_args, data_args, eval_args, train_args = parse_config(
        (ModelArguments, DataArguments, EvalArguments, StageTrainingArguments),
        argv,
        description,
        overrides={"output_dir": f"runs/{spec.name}", **defaults},
    )
    return run_stage(spec, model_args, data_args, eval_args, train_args)
