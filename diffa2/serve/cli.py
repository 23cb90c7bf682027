"""Command line of the server: `python -m diffa2.serve --model DIR`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from diffa2.cli_flags import add_flag
from diffa2.serve.planning import Defaults
from diffa2.serve.schema import SERVED_MODES, Limits
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

LIMITS, DEFAULTS = Limits(), Defaults()


def build_parser() -> argparse.ArgumentParser:
    """The server's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m diffa2.serve",
        description="OpenAI-compatible audio chat server for a DIFFA-2 checkpoint, with continuous batching "
                    "(docs/serving.md).",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_flag(parser, "--model", "--checkpoint", default=None,
             help="checkpoint directory, any the toolkit loads (default: the latest embedded-default checkpoint "
                  "under --runs_dir)")
    add_flag(parser, "--runs_dir", type=Path, default=Path("runs"),
             help="where to look for a checkpoint when --model is not given (default: runs)")
    add_flag(parser, "--served_model_name", default=None,
             help="the model id clients send and /v1/models lists (default: the checkpoint directory's name, or "
                  "its parent's when that name is 'final')")
    add_flag(parser, "--api_key", default=None,
             help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    parser.add_argument("--device", default="cpu", help="torch device to load the model on (default cpu)")
    parser.add_argument("--compat", choices=("toolkit", "reference"),
                        help="toolkit or reference (docs/reference-compat.md); default: the checkpoint's own")
    add_flag(parser, "--decode_mode", choices=SERVED_MODES, default=DEFAULTS.decode_mode,
             help=f"decoding preset of requests that name none (default {DEFAULTS.decode_mode})")
    add_flag(parser, "--gen_length", type=int, default=DEFAULTS.gen_length,
             help=f"answer length of requests that give no max_tokens (default {DEFAULTS.gen_length})")
    add_flag(parser, "--max_batch", type=int, default=8, help="most requests decoded together (default 8)")
    add_flag(parser, "--max_wait_ms", type=float, default=5.0,
             help="after an idle spell, how long to wait for more requests to start together (default 5)")
    add_flag(parser, "--max_body_mb", type=float, default=LIMITS.max_body_bytes / 2**20,
             help=f"largest request body in MB (default {LIMITS.max_body_bytes / 2**20:g})")
    add_flag(parser, "--max_audio_seconds", type=float, default=None,
             help="longest clip accepted (default and upper bound: the model's audio window)")
    add_flag(parser, "--max_question_chars", type=int, default=LIMITS.max_question_chars,
             help=f"longest question text (default {LIMITS.max_question_chars})")
    add_flag(parser, "--max_n", type=int, default=LIMITS.max_n,
             help=f"most answers per request, OpenAI's n (default {LIMITS.max_n})")
    add_flag(parser, "--max_gen_length", type=int, default=LIMITS.max_gen_length,
             help=f"longest answer a request may ask for (default {LIMITS.max_gen_length})")
    add_flag(parser, "--max_clips", type=int, default=LIMITS.max_clips,
             help=f"most input_audio parts over all messages of a request (default {LIMITS.max_clips})")
    add_threads_option(parser)
    return parser


def served_name(checkpoint: Path) -> str:
    """`runs/sft/final` -> `sft`; any other directory -> its own name."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


def request_limits(args: argparse.Namespace, window: float) -> Limits:
    """The request limits the flags set; `window` (the model's audio window, s) when no --max_audio_seconds."""
    return Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_audio_seconds=args.max_audio_seconds or window,
                  max_question_chars=args.max_question_chars, max_n=args.max_n,
                  max_gen_length=args.max_gen_length, max_clips=args.max_clips)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, load the checkpoint, serve until interrupted."""
    parser = build_parser()
    args = parse_checked(parser, argv)
    apply_threads(args.threads)
    import uvicorn  # the server stack is imported only once --help has been handled

    from diffa2.inference import AudioQA
    from diffa2.runs import default_checkpoint
    from diffa2.serve.app import ServeOptions, create_app

    checkpoint = default_checkpoint(args.runs_dir, args.model)
    if checkpoint is None:
        parser.error(f"no --model given and no embedded-default checkpoint under {args.runs_dir} "
                     "(train one with `make train`)")
    qa = AudioQA.from_checkpoint(checkpoint, device=args.device, compat=args.compat)
    window = qa.featurizer.window_seconds
    if args.max_audio_seconds is not None and args.max_audio_seconds > window:
        parser.error(f"--max_audio_seconds {args.max_audio_seconds:g} is over the model's audio window "
                     f"of {window:g} s")
    options = ServeOptions(model_name=args.served_model_name or served_name(Path(checkpoint)),
                           limits=request_limits(args, window),
                           defaults=Defaults(args.decode_mode, args.gen_length), api_key=args.api_key,
                           max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    print(f"serving {checkpoint} as {options.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(qa, options), host=args.host, port=args.port, log_level="info")
