"""One flag style for the argparse command lines: snake_case names, with the kebab-case spelling as a hidden alias.

The training stages take transformers' `HfArgumentParser` flags, which are snake_case (`--max_steps`) and also
accept the kebab-case spelling (`--max-steps`). `add_flag` gives the argparse command lines (`python -m
diffa2.eval`, the demo, the corpus builder, `python -m diffa2.convert`, bench/*.py) the same two spellings, and
`--help` shows the canonical snake_case one only:

    add_flag(parser, "--audio_root", help="...")              # also accepts --audio-root
    add_flag(parser, "--model", "--checkpoint", help="...")   # a renamed flag keeps its old name as an alias
"""

from __future__ import annotations

import argparse
from typing import Any


def kebab(flag: str) -> str:
    """`--audio_root` -> `--audio-root`."""
    return "--" + flag[2:].replace("_", "-")


class _BooleanFlag(argparse.BooleanOptionalAction):
    """`BooleanOptionalAction` that also understands the spellings `add_flag` hides from its option_strings."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def add_flag(container: argparse._ActionsContainer, flag: str, *aliases: str, **kwargs: Any) -> argparse.Action:
    """Add option `flag` (`--snake_case`, the name `--help` shows) to a parser or argument group; its kebab-case
    spelling and `aliases` (old names, each also in kebab case) parse to the same option but stay out of `--help`."""
    if not flag.startswith("--") or "-" in flag[2:]:
        raise ValueError(f"add_flag: {flag!r} is not a snake_case long option (e.g. '--audio_root')")
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        kwargs["action"] = _BooleanFlag
    spellings = [flag, *aliases]
    hidden = list(dict.fromkeys(s for name in spellings for s in (name, kebab(name)) if s != flag))
    action = container.add_argument(flag, *hidden, **kwargs)
    shown = {flag, f"--no-{flag[2:]}"}  # BooleanOptionalAction also registers --no-<name> for every spelling
    action.option_strings = [s for s in action.option_strings if s in shown]
    return action
