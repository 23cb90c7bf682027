"""The command line of the synthetic corpus builder (``python -m diffa2.data.synth``): flags and the summary."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from diffa2.cli_flags import add_flag
from diffa2.data.synth.build import SIZES, SynthCorpus, build_synth_corpus, is_complete
from diffa2.data.synth.constants import DEFAULT_CORPUS_DIR, DEFAULT_VOCAB_SIZE, SPLITS, STAGES
from diffa2.data.synth.long import build_long_split, build_long_training_split
from diffa2.data.synth.multiturn import MultiturnSizes, build_multiturn_split
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _summary(corpus: SynthCorpus, seconds: float, skipped: bool) -> str:
    info = corpus.info
    lines = [
        f"synthetic corpus {'(already complete, not rebuilt) ' if skipped else ''}at {corpus.root.resolve()}"
    ]
    lines.append(f"  seed {info['seed']}, size {info['size']!r}, format v{info['format_version']}, "
                 f"{info['clip_seconds']} s clips at {info['sample_rate']} Hz")
    lines.append(f"  clips: {json.dumps(info['clips'])}")
    for stage in STAGES:
        for split in SPLITS:
            c = info["counts"][stage][split]
            kinds = ", ".join(f"{k} {v}" for k, v in c["by_kind"].items())
            lines.append(f"  {stage}_{split}.json: {c['items']} items ({kinds})")
    c = info["counts"]["test_mmau"]
    lines.append(
        f"  test_mmau.json: {c['items']} items ({', '.join(f'{k} {v}' for k, v in c['by_kind'].items())})"
    )
    ch = info["chance"]
    per = ", ".join(f"{k} {v:.3f}" for k, v in ch["by_sub_category"].items())
    lines.append(f"  chance accuracy: overall {ch['overall']:.3f} ({per})")
    lines.append(f"  tokenizer: {corpus.tokenizer_dir} (vocabulary {info['tokenizer']['vocab_size']} tokens)")
    lines.append(f"  info: {corpus.info_path}")
    lines.append(f"  time: {seconds:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The corpus builder's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m diffa2.data.synth",
        description="Generate the synthetic audio corpus of the embedded default (WAV files, DIFFA/DeSTA2 "
        "manifests for the four stages, an MMAU-format test split, and its tokenizer).",
    )
    parser.add_argument(
        "--out", default=DEFAULT_CORPUS_DIR, help=f"output directory (default: {DEFAULT_CORPUS_DIR})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="default", help="size preset (default: default)"
    )
    parser.add_argument(
        "--small", action="store_true", help="same as --size small (tens of items, for tests)"
    )
    add_flag(parser, "--if_missing", action="store_true", help="only build when no complete corpus is there")
    add_flag(
        parser,
        "--vocab_size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"tokenizer vocabulary bound (default: {DEFAULT_VOCAB_SIZE})",
    )
    parser.add_argument("--long", action="store_true", help="only write the long-clip splits under --out, next to a "
                        "built corpus (test_long_mmau.json: each test cue in window 2 or 3 of a 12 s clip; "
                        "long_train.json: stage-3 training items moved the same way into window 1-3; clips in "
                        "audio_long/; docs/long-audio.md)")
    add_flag(parser, "--long_per_kind", type=int, default=20,
             help="with --long: test items per question kind (default: 20)")
    add_flag(parser, "--long_train", type=int, default=600,
             help="with --long: training items (default: 600; 0 = the test split only)")
    parser.add_argument("--multiturn", action="store_true", help="only write the multi-turn split under --out "
                        "(multiturn_{train,validation}.json, test_multiturn_mmau.json, audio_multiturn/: follow-up "
                        "questions and two-clip comparisons; docs/conversations.md)")
    add_flag(parser, "--multiturn_train", type=int, default=MultiturnSizes.train,
             help=f"with --multiturn: training conversations (default: {MultiturnSizes.train})")
    add_flag(parser, "--multiturn_per_kind", type=int, default=MultiturnSizes.test_per_kind,
             help=f"with --multiturn: test conversations per turn-2 kind (default: {MultiturnSizes.test_per_kind})")
    add_threads_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    if args.long:
        manifest = build_long_split(args.out, seed=args.seed, per_kind=args.long_per_kind)
        print(f"long-clip test split: {manifest.resolve()}")
        if args.long_train:
            train = build_long_training_split(args.out, seed=args.seed, items=args.long_train)
            print(f"long-clip training split: {train.resolve()}")
        return 0
    if args.multiturn:
        sizes = MultiturnSizes(train=args.multiturn_train, test_per_kind=args.multiturn_per_kind)
        for split, path in build_multiturn_split(args.out, seed=args.seed, sizes=sizes).items():
            print(f"multi-turn {split}: {path.resolve()}")
        return 0
    size = "small" if args.small else args.size
    t0 = time.perf_counter()
    skipped = args.if_missing and is_complete(args.out, args.seed, size, vocab_size=args.vocab_size)
    if skipped:
        corpus = SynthCorpus.at(args.out, args.seed, size)
    else:
        corpus = build_synth_corpus(args.out, seed=args.seed, size=size, vocab_size=args.vocab_size)
    print(_summary(corpus, time.perf_counter() - t0, skipped))
    return 0

