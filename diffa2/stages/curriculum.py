"""The DIFFA-2 curriculum: stage 1 (semantic) -> 2 (acoustic) -> 3 (SFT) -> 4 (VRPO), each from the previous one.

Embedded default (tiny model with a 2 s encoder window, synthetic corpus, CPU; about 16 min on 2 idle cores, 98.9 %
on the synthetic test split after stage 3 against 97.5 % for `python -m diffa2.stages.sft` alone: docs/training.md
§2):
    python -m diffa2.stages.curriculum
Options after `--` go to every stage, e.g. `python -m diffa2.stages.curriculum -- --synth_dir /tmp/synth`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from diffa2.cli_flags import add_flag
from diffa2.run_lock import RunDirError, check_fresh_run
from diffa2.stages import acoustic, semantic, sft, vrpo

STAGES = {"semantic": semantic, "acoustic": acoustic, "sft": sft, "vrpo": vrpo}
# Stage 1 starts the tiny model with a 2 s encoder window (the corpus's clip length, as the SFT default), which the
# later stages keep from its checkpoint; stage 3 keeps its 1600 steps, in the SFT default's prompt-length buckets
# (docs/experiment-log.md); the standalone SFT default is shorter because it starts with its own ASR warm-up.
STAGE_OPTIONS = {"semantic": ["--tiny_window_seconds", "2"], "sft": ["--max_steps", "1600"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--runs_dir", default="runs", help="each stage writes to RUNS_DIR/<stage>")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="options passed to every stage (after --)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    passthrough = [a for a in args.stage_args if a != "--"]
    refuse_clobbering(parser, passthrough, [Path(args.runs_dir) / name for name in names])
    start = time.time()
    summaries = []
    for name in names:
        print(f"\n##### curriculum: stage {name} #####")
        options = [*STAGE_OPTIONS.get(name, []), *passthrough, "--output_dir", f"{args.runs_dir}/{name}"]
        summaries.append(STAGES[name].main(options))
    print(f"\n===== curriculum finished in {time.time() - start:.0f} s =====")
    for summary in summaries:
        test = summary.get("test")
        extra = f"test {test['accuracy']:.1f}% (chance {test['chance']:.1f}%)" if test else ""
        if "validation_wer" in summary:
            extra += f" WER {summary['validation_wer']:.1f}%"
        if summary.get("preference"):
            before = summary["before"]["preference"]["accuracy"]
            extra += f" preference {before:.1f}% -> {summary['preference']['accuracy']:.1f}%"
        print(f"{summary['stage']:<10} steps {summary['steps']:>5}  loss {summary['final_loss']:.4f}  {extra}")
    return summaries


def refuse_clobbering(parser: argparse.ArgumentParser, passthrough: list[str], run_dirs: list[Path]) -> None:
    """Check every stage's folder before the first stage starts, not only when a later stage reaches it."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--resume", type=string_to_bool, default=False)
    add_flag(flags, "--overwrite_output_dir", type=string_to_bool, default=False)
    known, _ = flags.parse_known_args(passthrough)
    if known.overwrite_output_dir:
        return  # each stage deletes its own folder's earlier run when it starts
    try:
        for run_dir in run_dirs:
            check_fresh_run(run_dir, resume=known.resume, overwrite=False)
    except RunDirError as err:
        parser.error(f"{err} (options after -- go to every stage)")


if __name__ == "__main__":
    main()
