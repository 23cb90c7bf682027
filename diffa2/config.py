"""One configuration system: dataclass defaults (the embedded default) < `--config FILE.yaml` < command-line flags.

Built on transformers' `HfArgumentParser`, so every dataclass field is a `--flag` with its `help` metadata. A YAML
key that no dataclass knows, or a value of the wrong type, is an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_config(dataclass_types: tuple[type, ...], argv: list[str] | None, description: str,
                 overrides: dict[str, Any] | None = None) -> tuple:
    """Parse `--config` YAML and flags into instances of `dataclass_types` (stage defaults in `overrides`)."""
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
    for key, value in defaults.items():
        action = dests.get(key)
        if action is None:
            raise ValueError(f"{known.config or 'stage defaults'}: unknown key {key!r}")
        if value is not None and action.type is not None and not isinstance(value, list | dict):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{known.config}: key {key!r}: {value!r} is invalid ({err})") from None
        defaults[key] = value
    parser.set_defaults(**defaults)
    *parsed, leftover = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    return tuple(obj for obj in parsed if dataclasses.is_dataclass(obj))  # drop the Namespace holding --config


def read_yaml_config(path: Path, dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """A flat YAML mapping whose keys must all be fields of the given dataclasses."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (see --help for the valid options)")
    return data
