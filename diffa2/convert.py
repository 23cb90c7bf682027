"""Convert between the released DIFFA-2 layout and this toolkit's checkpoints: ``python -m diffa2.convert --help``.

Import the release (HF repo zhoujiaming777/DIFFA-2) into a toolkit checkpoint, bases read from the Whisper and
LLaDA folders as the reference code reads them, tokenizer copied from the LLaDA folder:
    python -m diffa2.convert official --src DIFFA-2 --whisper whisper-large-v3 --llada LLaDA-8B-Instruct --out ckpt
Export a toolkit checkpoint in the release layout (pytorch_model.bin + config.json the reference code loads):
    python -m diffa2.convert export-official --model ckpt --out DIFFA-2-export
Layout, name mapping and dtype notes: docs/release-format.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from diffa2.cli_flags import add_flag
from diffa2.modeling.checkpoint import load_pretrained, resolve_source, save_pretrained
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.release import REFERENCE_LORA, ReleaseExport, ReleaseImport, import_release, save_release

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _official(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("official", help="release folder -> toolkit checkpoint",
                            description="Import a DIFFA-2 release folder into a toolkit checkpoint.")
    parser.add_argument("--src", type=Path, required=True, help="the release folder (config.json + weights)")
    parser.add_argument("--whisper", type=Path, required=True, help="the Whisper folder the release was trained on "
                        "(large-v3); its encoder is the base, as in the reference code")
    parser.add_argument("--llada", type=Path, required=True,
                        help="the LLaDA-8B-Instruct folder: base backbone and tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write (replaced atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype the model is loaded in and saved with (default fp32: exact for a bf16 release)")
    add_flag(parser, "--merge_lora", action="store_true",
             help="fold LoRA into the backbone (the checkpoint then stores the whole backbone)")
    add_flag(parser, "--lora_alpha", type=float, default=REFERENCE_LORA.alpha,
             help="LoRA alpha when the release has no adapter_config.json (default 16: the value of "
             "the reference's training script and loader; the release stores only the matrices)")
    add_flag(parser, "--speech_path", choices=["acoustic+semantic", "prompt+semantic"], default="acoustic+semantic",
             help="the release does not record it: stage-1 releases need prompt+semantic")


def _export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export-official", help="toolkit checkpoint -> release folder",
                            description="Write a toolkit checkpoint in the DIFFA-2 release layout.")
    parser.add_argument("--model", type=Path, required=True, help="a toolkit checkpoint (or a release folder)")
    parser.add_argument("--out", type=Path, required=True, help="the release folder to write (replaced atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of the written tensors (default bf16, as the release was trained and saved)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffa2.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _official(sub)
    _export(sub)
    return parser


def _parameters(model: DIFFA2Model) -> int:
    return sum(p.numel() for p in model.state_dict().values())


def import_summary(result: ReleaseImport, out: Path) -> str:
    """What `official` did, for the terminal."""
    model = result.model
    dtype = next(model.parameters()).dtype
    lines = [f"read {result.weights_file}", *result.base_checks,
             f"model: {len(model.state_dict())} tensors, {_parameters(model):,} parameters, {dtype}, "
             f"LoRA {result.lora}, speech path {model.config.speech_path}",
             f"wrote {out}"]
    return "\n".join(lines)


def export_summary(result: ReleaseExport) -> str:
    """What `export-official` did, for the terminal."""
    lines = [f"wrote {result.directory}: {result.tensors} tensors, {result.parameters:,} parameters, {result.dtype}"]
    lines += [f"note: the reference code would not run this as written: {note}" for note in result.notes]
    return "\n".join(lines)


def run_official(args: argparse.Namespace) -> str:
    """Import the release with the given bases and save it as a toolkit checkpoint with the LLaDA tokenizer."""
    result = import_release(args.src, dtype=DTYPES[args.dtype], tokenizer=args.llada, merge_lora=args.merge_lora,
                            lora_alpha=args.lora_alpha, speech_path=args.speech_path, whisper=args.whisper,
                            llada=args.llada, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.llada), trust_remote_code=False)
    save_pretrained(result.model, args.out, tokenizer=tokenizer)
    return import_summary(result, args.out)


def run_export(args: argparse.Namespace) -> str:
    """Load a checkpoint and write it in the release layout, with its tokenizer beside it."""
    model = load_pretrained(args.model)
    tokenizer_dir = resolve_source(model.config.tokenizer_source, args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False) if tokenizer_dir else None
    return export_summary(save_release(model, args.out, dtype=DTYPES[args.dtype], tokenizer=tokenizer, progress=True))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(run_official(args) if args.command == "official" else run_export(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
