"""Every stage's embedded defaults: a frozen dataclass whose fields are options of the stage's parser, typed alike."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing

import pytest

import diffa2.stages
from diffa2.stages import acoustic, rl, semantic, sft, vrpo
from diffa2.stages.cli import SFT_ARG_TYPES, StageDefaults, parse_stage_options, stage_overrides
from diffa2.threads import ThreadArguments

STAGES = {sft: SFT_ARG_TYPES, semantic: SFT_ARG_TYPES, acoustic: SFT_ARG_TYPES, vrpo: vrpo.ARG_TYPES, rl: rl.ARG_TYPES}
FIELDS = {
    sft: ["recipe", "tiny_window_seconds", "asr_warmup_steps", "max_steps", "train_sampling_strategy"],
    semantic: ["recipe", "speech_path", "max_steps", "test_file"],
    acoustic: ["recipe", "answer_length", "gen_length", "block_length", "steps", "test_prompt"],
    vrpo: ["recipe", "max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "logging_steps",
           "save_steps"],
    rl: ["recipe", "max_steps", "per_device_train_batch_size", "group_size", "rollout_temperature", "learning_rate",
         "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps"],
}
ids = [stage.SPEC.name for stage in STAGES]


def conforms(value: object, hint: object) -> bool:
    """True when `value` is a valid value of the type `hint` (a class, a union of them, a Literal; int for float)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def option_types(stage: types.ModuleType) -> dict[str, object]:
    """Option name -> type, over every dataclass the stage's parser is built from."""
    arg_types = (*STAGES[stage], ThreadArguments)
    return {name: hint for cls in arg_types for name, hint in typing.get_type_hints(cls).items()}


def test_every_stage_module_with_defaults_is_checked_here():
    modules = [importlib.import_module(f"diffa2.stages.{m.name}") for m in pkgutil.iter_modules(diffa2.stages.__path__)]
    with_defaults = {module.__name__ for module in modules if hasattr(module, "DEFAULTS")}
    assert with_defaults == {stage.__name__ for stage in STAGES} == {
        "diffa2.stages.sft", "diffa2.stages.semantic", "diffa2.stages.acoustic", "diffa2.stages.vrpo",
        "diffa2.stages.rl",
    }


@pytest.mark.parametrize("stage", STAGES, ids=ids)
def test_defaults_are_a_frozen_stage_defaults_dataclass(stage):
    defaults = stage.DEFAULTS
    assert isinstance(defaults, StageDefaults) and type(defaults) is not StageDefaults
    assert [f.name for f in dataclasses.fields(defaults)] == FIELDS[stage]
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.max_steps = 1  # type: ignore[misc]


@pytest.mark.parametrize("stage", STAGES, ids=ids)
def test_each_field_is_an_option_of_the_stage_with_the_options_type(stage):
    options = option_types(stage)
    declared = typing.get_type_hints(type(stage.DEFAULTS))
    assert list(declared) == FIELDS[stage]
    for name, hint in declared.items():
        assert name in options, f"{stage.__name__}: {name!r} is not an option of the stage"
        assert hint == options[name], f"{stage.__name__}: {name} is declared {hint}, the option is {options[name]}"
        value = getattr(stage.DEFAULTS, name)
        assert conforms(value, hint), f"{stage.__name__}: {name} = {value!r} is not a {hint}"


@pytest.mark.parametrize("stage", STAGES, ids=ids)
def test_the_stage_parser_starts_from_its_defaults(stage, tmp_path):
    argv = ["--output_dir", str(tmp_path / "run")]
    parsed = parse_stage_options(STAGES[stage], argv, "test", stage_overrides(stage.SPEC.name, stage.DEFAULTS, argv))
    values = {name: value for options in parsed for name, value in vars(options).items()}
    assert {name: values[name] for name in FIELDS[stage]} == dataclasses.asdict(stage.DEFAULTS)
    assert values["output_dir"] == str(tmp_path / "run")


def test_conforms_tells_a_wrong_value_from_a_right_one():
    assert conforms(0, float) and conforms("", str | None) and conforms("question", typing.Literal["question"])
    assert not conforms("800", int) and not conforms(True, float) and not conforms("both", typing.Literal["choices"])
