"""One configuration system: dataclass defaults (the embedded default) < `--config FILE.yaml` < command-line flags.

Built on transformers' `HfArgumentParser`, so every dataclass field is a `--flag` with its `help` metadata. A YAML
key that no dataclass knows, or a value of the wrong type, is an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_config(dataclass_types: tuple[type, ...], argv: list[str] | None, description: str,
                 overrides: dict[str, Any] | None = None,
                 check: Callable[[argparse.Namespace], None] | None = None) -> tuple:
    """Parse `--config` YAML and flags into instances of `dataclass_types` (stage defaults in `overrides`).

    `check` sees every option's final value (flag > YAML > default) before any dataclass is built, so its errors
    come before those of the dataclasses' own `__post_init__` checks (e.g. transformers' TrainingArguments).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML recipe (e.g. stages/sft.yaml); flags given on the command line override it")
    defaults = dict(overrides or {})
    if known.config is not None:
        defaults.update(read_yaml_config(known.config, dataclass_types))
    dests = {action.dest: action for action in parser._actions}
    field_types = {f.name: str(f.type) for cls in dataclass_types for f in dataclasses.fields(cls)}
    source = str(known.config or "stage defaults")
    for key, value in defaults.items():
        action = dests.get(key)
        if action is None:
            raise ValueError(f"{source}: unknown key {key!r}")
        defaults[key] = _coerce(action, value, f"{source}: key {key!r}", field_types.get(key, ""))
    parser.set_defaults(**defaults)
    if check is not None:
        check(parser.parse_known_args(rest)[0])
    *parsed, leftover = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    return tuple(obj for obj in parsed if dataclasses.is_dataclass(obj))  # drop the Namespace holding --config


def _coerce(action: argparse.Action, value: Any, where: str, field_type: str) -> Any:
    """A YAML value converted like the flag would be; a lossy or impossible conversion is an error naming the key."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "dict" in field_type:
            return value
        raise ValueError(f"{where}: expected a single {field_type or 'value'}, got a mapping {value!r:.80}")
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise ValueError(f"{where}: expected a single {field_type or 'value'}, got a list {value!r:.80}")
        return [_coerce_scalar(action, v, where) for v in value]
    return _coerce_scalar(action, value, where)


def _coerce_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if action.type is None:
        return value
    lossy = (action.type in (int, float) and isinstance(value, bool)) or (
        action.type is int and isinstance(value, float) and not value.is_integer())
    if lossy:
        raise ValueError(f"{where}: {value!r} is not a valid {action.type.__name__}")
    try:
        return action.type(value)
    except (TypeError, ValueError, AttributeError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{where}: {value!r} is invalid ({err})") from None


def field_aliases(dataclass_types: tuple[type, ...]) -> dict[str, str]:
    """Old option names -> field names, from the fields' `aliases` metadata (e.g. `--init_from` -> `model`)."""
    return {alias.lstrip("-").replace("-", "_"): f.name for cls in dataclass_types for f in dataclasses.fields(cls)
            for alias in f.metadata.get("aliases", ())}


def read_yaml_config(path: Path, dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """A flat YAML mapping whose keys must all be fields of the given dataclasses (or a field's old name, an alias)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    for old, new in field_aliases(dataclass_types).items():
        if old in data:
            if new in data:
                raise ValueError(f"{path}: {old!r} is the old name of {new!r}; set only {new!r}")
            data[new] = data.pop(old)
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (see --help for the valid options)")
    return data
