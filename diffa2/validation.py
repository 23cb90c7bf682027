"""The allowed range of every numeric option of the command lines, in one table, checked right after parsing.

Each entry point (the training stages, `python -m diffa2.eval`, the demo, bench/*.py, the synthetic corpus builder)
hands its parsed options to `check_options` / `check_args`; a value outside its range is an `OptionError` that
names the flag, the value and the range (`--max_steps -5 is out of range: must be >= 1, or -1 (train for
--num_train_epochs instead)`), before anything is built. Options are looked up by name, so one rule serves every command
that has an option of that name (`--seed`, `--batch_size`, `--gen_length`, ...). NaN and
infinite values are refused everywhere.

`--max_steps -1` stays allowed: it is transformers' way to train for `--num_train_epochs` instead of a step count,
and the stage says so when it starts. Every other value below 1 is an error (transformers would silently train by
epochs).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """A command-line option outside its allowed range; the message names the flag, the value and the range."""


@dataclass(frozen=True)
class Range:
    """Allowed values: [low, high] (bounds exclusive when `*_open`), plus the `also` values, meaning `note`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()
    note: str = ""

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', '1..65535', with the extra values: 'must be >= 1, or -1 (...)'."""
        low, high = number_text(self.low), number_text(self.high)
        if self.low is not None and self.high is not None:
            both_closed = not (self.low_open or self.high_open)
            if both_closed and float(self.low).is_integer() and float(self.high).is_integer():
                text = f"{low}..{high}"
            else:
                text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"{'<' if self.high_open else '<='} {high}"
        extra = ", or " + " or ".join(map(number_text, self.also)) + (f" ({self.note})" if self.note else "")
        return f"must be {text}{extra if self.also else ''}"


def number_text(value: float | None) -> str:
    """A number as a user would type it: 4294967295, 0.5, 1e-08, nan."""
    if value is None:
        return ""
    return str(int(value)) if isinstance(value, int) or (math.isfinite(value) and value.is_integer()) else f"{value:g}"


POSITIVE_INT = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, 2**32 - 1)  # numpy's seed range

# Every numeric option, by name (dest: underscores). The same name means the same thing in every command.
RULES: dict[str, Range] = {
    # training stages: transformers' TrainingArguments
    "max_steps": Range(1, also=(-1,), note="train for --num_train_epochs instead"),
    "num_train_epochs": POSITIVE,
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,  # below 1: a fraction of the run's steps
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "logging_steps": POSITIVE,  # below 1: a fraction of the run's steps
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_total_limit": POSITIVE_INT,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "ddp_timeout": POSITIVE_INT,
    # training stages: ours
    "max_bad_steps": POSITIVE_INT,
    "audio_lr_scale": NON_NEGATIVE,
    "lora_r": POSITIVE_INT,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "speech_path": Range(1, 2),
    "tiny_encoder_dim": POSITIVE_INT,
    "tiny_encoder_layers": POSITIVE_INT,
    "tiny_llm_dim": POSITIVE_INT,
    "tiny_llm_layers": POSITIVE_INT,
    "tiny_num_queries": POSITIVE_INT,
    "tiny_window_seconds": POSITIVE,
    "asr_warmup_steps": NON_NEGATIVE,
    "synth_seed": SEED,
    "answer_length": POSITIVE_INT,
    "feature_cache_items": NON_NEGATIVE,
    "stop_token_loss_weight": NON_NEGATIVE,
    "eval_limit": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    # stage 4 (VRPO) and bench/vrpo_variance.py
    "beta": POSITIVE,
    "n_t": POSITIVE_INT,
    "n_yt": POSITIVE_INT,
    "pref_eval_samples": POSITIVE_INT,
    "pref_eval_limit": POSITIVE_INT,
    "pref_eval_batch_size": POSITIVE_INT,
    "budget": POSITIVE_INT,
    "pairs": POSITIVE_INT,
    "replicates": Range(2),  # a variance needs two estimates
    "perturb": NON_NEGATIVE,
    # stage 5 (RL)
    "group_size": Range(2),  # a group needs two answers to compare
    "rollout_temperature": POSITIVE,  # > 0: the answers of a group must differ
    "likelihood_samples": POSITIVE_INT,
    "kl_coef": NON_NEGATIVE,
    "ppo_epochs": POSITIVE_INT,
    "rounds": POSITIVE_INT,  # bench/rl.py: timed rounds per decoder and timed steps
    # decoding (stages, eval, bench/decode.py)
    "gen_length": POSITIVE_INT,
    "gen_lengths": POSITIVE_INT,
    "throughput_batches": POSITIVE_INT,  # bench/decode.py: batch sizes of the throughput table
    "block_length": POSITIVE_INT,
    "steps": POSITIVE_INT,
    "temperature": NON_NEGATIVE,
    "cfg_scale": NON_NEGATIVE,
    "threshold": Range(0, 1, low_open=True),
    "factor": POSITIVE,
    "refresh_every": POSITIVE_INT,
    # eval, bench
    "batch_size": POSITIVE_INT,
    "limit": POSITIVE_INT,
    "seed": SEED,
    "n_draws": POSITIVE_INT,  # ELBO draws per answer (answer scoring, --mcq likelihood)
    # demo
    "port": Range(1, 65535),
    "max_upload_mb": POSITIVE,
    # server (python -m diffa2.serve)
    "max_batch": POSITIVE_INT,
    "max_wait_ms": NON_NEGATIVE,
    "max_body_mb": POSITIVE,
    "max_audio_seconds": POSITIVE,
    "max_question_chars": POSITIVE_INT,
    "max_n": POSITIVE_INT,
    "max_gen_length": POSITIVE_INT,
    "max_clips": POSITIVE_INT,
    "clients": POSITIVE_INT,  # bench/serve.py
    "requests": POSITIVE_INT,
    # synthetic corpus
    "long_per_kind": POSITIVE_INT,  # the long-clip split's items per question kind
    "long_train": NON_NEGATIVE,  # its training items (0 = none)
    "multiturn_train": POSITIVE_INT,  # the multi-turn split's training conversations
    "multiturn_per_kind": POSITIVE_INT,  # its test conversations per turn-2 kind
    "vocab_size": Range(263),  # 256 bytes + the 7 special tokens (diffa2.data.tokenizer.build_tokenizer)
    # every entry point
    "threads": POSITIVE_INT,
}


def check_value(name: str, value: Any, flag: str) -> None:
    """Raise `OptionError` when `value` (a number, or a list of numbers) is outside the range of option `name`."""
    rule = RULES.get(name)
    if rule is None or value is None or isinstance(value, bool):
        return
    for number in value if isinstance(value, list | tuple) else [value]:
        if isinstance(number, int | float) and not rule.allows(number):
            raise OptionError(f"{flag} {number_text(number)} is out of range: {rule.describe()}")


def check_options(values: Mapping[str, Any], flag: Callable[[str], str] = lambda name: f"--{name}") -> None:
    """Check every option in `values` (name -> parsed value) that has a rule; `flag` spells its name for messages."""
    for name, value in values.items():
        check_value(name, value, flag(name))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check an argparse namespace, naming each option by the spelling its `--help` shows (`--batch_size`)."""
    flags = option_flags(parser)
    check_options(vars(args), lambda name: flags.get(name, f"--{name}"))


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the option's longest spelling, over the parser and its sub-commands."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= option_flags(sub)
        elif action.option_strings:
            flags[action.dest] = max(action.option_strings, key=len)
    return flags


def parse_checked(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, then the range checks; a bad value exits like any argparse error (status 2)."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        check_args(parser, args)
    except OptionError as err:
        parser.error(str(err))
    return args
