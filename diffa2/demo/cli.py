"""Command line of the demo: `python -m diffa2.demo` / `python demo/app.py`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from diffa2.cli_flags import add_flag
from diffa2.demo import DEFAULT_MAX_UPLOAD_MB
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m diffa2.demo",
        description="Gradio audio Q&A demo of DIFFA-2: upload or record a clip, ask, watch the answer unmask.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes the demo to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    add_flag(parser, "--model", "--checkpoint", default=None,
             help="checkpoint directory to preselect (default: the latest embedded-default checkpoint under "
                  "--runs_dir)")
    add_flag(parser, "--runs_dir", type=Path, default=Path("runs"),
             help="where stage runs write <stage>/final checkpoints and the train button trains (default: runs)")
    add_flag(parser, "--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
             help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    add_flag(parser, "--allow_training", action="store_true",
             help="show the button that trains the tiny default into --runs_dir (off by default: a visitor could "
                  "otherwise start a 13-minute training run)")
    parser.add_argument("--compat", choices=("toolkit", "reference"),  # DIFFA2Config.compat (not imported: --help
                        help="toolkit or reference (DIFFA-2's released inference code, docs/reference-compat.md); "
                             "default: each checkpoint's own setting")  # stays instant without transformers)
    add_threads_option(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's flags, range-checked (a bad value exits with status 2)."""
    return parse_checked(build_parser(), argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, then build and serve the page until interrupted."""
    args = parse_args(argv)
    apply_threads(args.threads)
    from diffa2.demo.ui import DemoOptions, launch  # gradio is imported only once --help has been handled

    launch(DemoOptions(runs_dir=args.runs_dir, checkpoint=args.model, max_upload_mb=args.max_upload_mb,
                       compat=args.compat, allow_training=args.allow_training),
           host=args.host, port=args.port, share=args.share)
