"""Range checks of every numeric option: one table, every entry point, errors naming the flag and the range."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
from helpers import bench_parser, bench_parsers, small_run_args

from diffa2.data.synth import build_parser as synth_parser
from diffa2.data.tokenizer import SPECIAL_TOKENS
from diffa2.demo.cli import build_parser as demo_parser
from diffa2.demo.cli import parse_args as demo_args
from diffa2.eval.__main__ import build_parser as eval_parser
from diffa2.eval.__main__ import main as eval_main
from diffa2.serve.cli import build_parser as serve_parser
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import SFT_ARG_TYPES, parse_stage_options
from diffa2.stages.rl import RLArguments
from diffa2.stages.vrpo import VRPOArguments
from diffa2.threads import ThreadArguments
from diffa2.validation import RULES, OptionError, Range, check_args, option_flags

OUR_DATACLASSES = (ModelArguments, DataArguments, EvalArguments, VRPOArguments, RLArguments, ThreadArguments)


def argparse_entry_points() -> dict[str, argparse.ArgumentParser]:
    parsers = {"eval": eval_parser(), "demo": demo_parser(), "synth": synth_parser(), "serve": serve_parser()}
    return parsers | bench_parsers()


def numeric_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += numeric_actions(sub)
        elif action.type in (int, float):
            actions.append(action)
    return actions


def is_numeric(field: dataclasses.Field, owner: type) -> bool:
    hint = typing.get_type_hints(owner)[field.name]
    return any(t in (int, float) for t in (typing.get_args(hint) or (hint,)))


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Range(1), "must be >= 1"),
        (Range(0, low_open=True), "must be > 0"),
        (Range(0, 1, high_open=True), "must be in [0, 1)"),
        (Range(0, 1, low_open=True), "must be in (0, 1]"),
        (Range(1, 65535), "must be 1..65535"),
        (Range(1, also=(-1,), note="epochs"), "must be >= 1, or -1 (epochs)"),
    ],
)
def test_range_descriptions(rule, text):
    assert rule.describe() == text


def test_every_rule_names_a_real_option():
    names = {f.name for cls in (*OUR_DATACLASSES, StageTrainingArguments) for f in dataclasses.fields(cls)}
    for parser in argparse_entry_points().values():
        names |= set(option_flags(parser))
    assert sorted(set(RULES) - names) == []


def test_every_numeric_option_of_every_entry_point_has_a_rule():
    missing = [f"{where}: {a.dest}" for where, parser in argparse_entry_points().items()
               for a in numeric_actions(parser) if a.dest not in RULES]
    missing += [f"{cls.__name__}.{f.name}" for cls in OUR_DATACLASSES for f in dataclasses.fields(cls)
                if is_numeric(f, cls) and f.name not in RULES]
    assert missing == []


def test_vocab_size_floor_is_the_tokenizers():
    assert RULES["vocab_size"].low == 256 + len(SPECIAL_TOKENS)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_steps", "-5"], "--max_steps -5 is out of range: must be >= 1, or -1 (train for --num_train_epochs"),
        (["--max_steps", "0"], "--max_steps 0 is out of range"),
        (["--learning_rate", "nan"], "--learning_rate nan is out of range: must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 is out of range: must be >= 1"),
        (["--lora_dropout", "1.0"], "--lora_dropout 1 is out of range: must be in [0, 1)"),
        (["--warmup_steps", "-0.1"], "--warmup_steps -0.1 is out of range: must be >= 0"),
        (["--seed", "-1"], "--seed -1 is out of range: must be 0..4294967295"),
        (["--eval_limit", "0"], "--eval_limit 0 is out of range: must be >= 1"),
        (["--threads", "0"], "--threads 0 is out of range: must be >= 1"),
        (["--beta", "0"], "--beta 0 is out of range: must be > 0"),
    ],
)
def test_stage_options_out_of_range(tmp_path, flags, message):
    types = (*SFT_ARG_TYPES[:3], VRPOArguments, SFT_ARG_TYPES[3])
    with pytest.raises(OptionError) as err:
        parse_stage_options(types, small_run_args(tmp_path, tmp_path, 2, flags), "test", {})
    assert str(err.value).startswith(message)


def test_max_steps_minus_one_trains_by_epochs(tmp_path):
    *_, train_args, threads = parse_stage_options(SFT_ARG_TYPES, small_run_args(tmp_path, tmp_path, 2) +
                                                  ["--max_steps", "-1", "--num_train_epochs", "2"], "test", {})
    assert (train_args.max_steps, train_args.num_train_epochs, threads.threads) == (-1, 2.0, None)


def test_stage_command_exits_2_naming_the_option(tmp_path, capsys):
    from diffa2.stages import sft

    with pytest.raises(SystemExit) as exit_info:
        sft.main(small_run_args(tmp_path / "run", tmp_path, 2, ["--max_steps", "-5"]))
    assert exit_info.value.code == 2
    assert "error: --max_steps -5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--benchmark", "synth", "--batch-size", "0"], "--batch_size 0 is out of range: must be >= 1"),
        (["run", "--benchmark", "synth", "--limit", "-3"], "--limit -3 is out of range: must be >= 1"),
        (["run", "--benchmark", "synth", "--threshold", "1.5"], "--threshold 1.5 is out of range: must be in (0, 1]"),
        (["run", "--benchmark", "synth", "--temperature", "-1"], "--temperature -1 is out of range: must be >= 0"),
        (["run", "--benchmark", "synth", "--threads", "0"], "--threads 0 is out of range: must be >= 1"),
    ],
)
def test_eval_options_out_of_range(argv, message, capsys):
    parser = eval_parser()
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_args(parser, parser.parse_args(argv))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--port", "70000"], "--port 70000 is out of range: must be 1..65535"),
     (["--max-upload-mb", "0"], "--max_upload_mb 0 is out of range: must be > 0")],
)
def test_demo_options_out_of_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [("decode", ["--gen-lengths", "32", "0"], "--gen_lengths 0 is out of range: must be >= 1"),
     ("vrpo_variance", ["--replicates", "1"], "--replicates 1 is out of range: must be >= 2"),
     ("memory_estimate", ["--threads", "-1"], "--threads -1 is out of range: must be >= 1")],
)
def test_bench_options_out_of_range(name, argv, message):
    parser = bench_parser(name)
    with pytest.raises(OptionError, match=message):
        check_args(parser, parser.parse_args(argv))


def test_synth_vocab_size_out_of_range(capsys):
    from diffa2.data.synth import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--vocab-size", "100", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert "--vocab_size 100 is out of range: must be >= 263" in capsys.readouterr().err


def test_entry_points_take_threads():
    for where, parser in argparse_entry_points().items():
        if where != "bench/eval_parity":  # pure-Python scoring: no torch threads
            assert "threads" in option_flags(parser), where
