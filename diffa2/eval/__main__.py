"""Command line of the benchmark runners: ``python -m diffa2.eval {run,score,score_answers,prompts} --help``.

Laptop (the embedded default's synthetic test split, on the checkpoint `make train` wrote to runs/sft/final):
    python -m diffa2.eval run --benchmark synth
    python -m diffa2.eval run --benchmark synth --decode_mode reference   # LLaDA's decoder instead of the fast default
Real scale:
    python -m diffa2.eval run --benchmark mmau --model CKPT --data mmau-test-mini.json --audio_root DIR --batch_size 16
    python -m diffa2.eval run --benchmark mmsu --model CKPT --data ddwang2000/MMSU
    torchrun --nproc_per_node=8 -m diffa2.eval run --benchmark mmau ...   # one shard per GPU, merged by rank 0
    python -m diffa2.eval score --benchmark mmau --predictions predictions.json --mode normalized
Long clips, encoded window by window (docs/long-audio.md):
    python -m diffa2.eval run --benchmark synth --data data/synth/test_long_mmau.json --long_audio window
Answer scoring (docs/answer-scoring.md):
    python -m diffa2.eval run --benchmark synth --mcq likelihood     # each item's best-scoring choice
    python -m diffa2.eval score_answers --model CKPT --audio A.wav --question Q --candidate "..." --candidate "..."
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diffa2.audio import DEFAULT_MAX_AUDIO_SECONDS, LONG_AUDIO_MODES, load_audio, trim_to_window
from diffa2.chat import COMPAT_MODES
from diffa2.cli_flags import add_flag
from diffa2.diffusion.decoding import DEFAULT_MODE, PRESETS, SPEED_FIELDS, DecodeConfig
from diffa2.eval.core import MCQ_MODES
from diffa2.eval.loaders import DataError, read_predictions, validate
from diffa2.eval.prompts import PROMPTS
from diffa2.eval.report import build_report, format_table, write_report
from diffa2.eval.scoring import score_records
from diffa2.eval.specs import MODES, SpecError, benchmark_names, load_spec
from diffa2.likelihood import DEFAULT_DRAWS, DEFAULT_FORM
from diffa2.rl import MASKING_FORMS, masking_form
from diffa2.run_lock import RunDirError
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

BENCHMARKS = list(benchmark_names())


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (default: the benchmark spec's; DIFFA-2 used 16/16/16, greedy)")
    add_flag(group, "--gen_length", type=int, help="answer tokens to generate")
    add_flag(group, "--block_length", type=int, help="semi-autoregressive block size")
    group.add_argument("--steps", type=int, help="total denoising steps")
    group.add_argument("--temperature", type=float, help="Gumbel noise temperature (0 = greedy)")
    add_flag(group, "--cfg_scale", type=float, help="classifier-free guidance scale")
    group.add_argument("--remasking", choices=["low_confidence", "random"], help="remasking strategy")
    add_flag(group, "--logits_eos_inf", action=argparse.BooleanOptionalAction, default=None,
             help="never predict EOS")
    add_flag(group, "--confidence_eos_eot_inf", action=argparse.BooleanOptionalAction, default=None,
             help="commit EOS / end-of-turn predictions last")
    group.add_argument("--profile", help="decoding profile of the spec: 'parallel' (the toolkit's default) or, for "
                       "MMSU/MMAU/MMAR, 'paper' (DIFFA-2's published decoding; the default for a released DIFFA-2 "
                       "checkpoint); the flags below change it")
    add_flag(group, "--decode_mode", choices=sorted(PRESETS),
             help=f"speed mode: the preset's threshold/factor/cache/early-exit settings replace the spec's "
             f"(default: the spec's = {DEFAULT_MODE!r}; 'reference' = LLaDA/DIFFA-2 decoding, one token per "
             f"step, no cache); the flags below override it")
    group.add_argument("--threshold", type=float, help="commit every masked token with confidence >= this")
    group.add_argument("--factor", type=float, help="Fast-dLLM's factor rule (DIFFA-2's FPD)")
    add_flag(group, "--factor_quirk", action=argparse.BooleanOptionalAction, default=None,
             help="the factor rule's edge case as coded in DIFFA-2: when only the last candidate fails its "
             "bar, commit it too")
    group.add_argument("--cache", choices=["none", "prefix", "dual"], help="block-wise approximate KV cache")
    add_flag(group, "--refresh_every", type=int, help="with a cache: also refresh it every N steps of a block")
    add_flag(group, "--eos_early_exit", action=argparse.BooleanOptionalAction, default=None,
             help="stop an answer once its text is decided (EOS, nothing masked before it)")
    add_flag(group, "--exit_on_eot", action=argparse.BooleanOptionalAction, default=None,
             help="the early exit also stops at an end-of-turn token (DIFFA-2's published decoding: no)")


def _add_draws(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--n_draws", type=int, default=DEFAULT_DRAWS,
             help=f"Monte-Carlo draws per answer of the ELBO (default: {DEFAULT_DRAWS})")


DECODING_FLAGS = ("gen_length", "block_length", "steps", "temperature", "cfg_scale", "remasking", "logits_eos_inf",
                  "confidence_eos_eot_inf", *SPEED_FIELDS)


def decoding_overrides(args: argparse.Namespace) -> dict:
    """Decoding fields to set over the spec's: the --decode_mode preset's speed settings, then explicit flags."""
    mode = DecodeConfig.preset(args.decode_mode) if args.decode_mode else None
    preset = {k: getattr(mode, k) for k in SPEED_FIELDS} if mode else {}
    return preset | {k: getattr(args, k) for k in DECODING_FLAGS if getattr(args, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffa2.eval",
        description="Benchmark runners (MMSU, MMAU, MMAR, synth) with the official scoring rules.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="decode a benchmark with a checkpoint, write predictions and reports",
                         description="Decode a benchmark with a checkpoint (resumable), write predictions in the "
                         "official submission format, samples.jsonl, report.json/.md/.png.")
    run.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    run.add_argument("--model", help="DIFFA-2 checkpoint folder (save_pretrained layout); default: the spec's "
                     "(synth: runs/sft/final, written by `make train`)")
    run.add_argument("--data", help="metadata file (MMAU JSON, MMAR JSONL, MMSU JSONL/parquet) or HF dataset id; "
                     "default: the spec's (mmsu: ddwang2000/MMSU; synth: the corpus at data/synth)")
    add_flag(run, "--audio_root", help="folder the records' audio paths are relative to (default: the data "
             "file's folder)")
    run.add_argument("--out", help="output folder (default: runs/eval/<benchmark>)")
    add_flag(run, "--batch_size", type=int, default=8, help="items per decoding batch (default: 8)")
    run.add_argument("--limit", type=int, help="only the first N items")
    run.add_argument("--seed", type=int, default=0, help="base seed; each item's seed derives from it and its id")
    run.add_argument("--prompt", choices=sorted(PROMPTS), help="prompt template (default: the spec's)")
    run.add_argument("--mode", choices=MODES, help="scoring mode (default: the spec's, official)")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--compat", choices=COMPAT_MODES, help="'toolkit' (batch-safe, with the toolkit's fixes) or "
                     "'reference' (DIFFA-2's released inference code, docs/reference-compat.md); default: the "
                     "checkpoint's")
    run.add_argument("--spec", help="benchmark spec YAML (default: diffa2/eval/benchmarks/<benchmark>.yaml)")
    add_flag(run, "--hf_revision", help="Hugging Face dataset revision to pin")
    add_flag(run, "--no_progress", action="store_true", help="no progress bar")
    run.add_argument("--mcq", choices=MCQ_MODES, default="generate", help="answer multiple-choice items by "
                     "decoding (generate, the default) or by the choice with the highest ELBO (likelihood; "
                     "docs/answer-scoring.md)")
    _add_draws(run)
    add_flag(run, "--long_audio", choices=LONG_AUDIO_MODES, help="clips longer than the encoder window: 'trim' "
             "(cut to the window, DIFFA-2's behaviour) or 'window' (encoded window by window, the spans joined; "
             "docs/long-audio.md); default: the checkpoint's (trim)")
    add_flag(run, "--max_audio_seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS,
             help=f"with --long_audio window: the longest clip encoded, longer ones are cut to it and counted "
             f"(default: {DEFAULT_MAX_AUDIO_SECONDS:g})")
    add_threads_option(run)
    _add_decoding(run)

    score = sub.add_parser("score", help="rescore a predictions file in the official submission format",
                           description="Rescore a predictions file (ours or another toolkit's) in the benchmark's "
                           "official submission format and print the table.")
    score.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    score.add_argument("--predictions", required=True, help="predictions file (.json list or .jsonl)")
    score.add_argument("--mode", choices=MODES, help="scoring mode (default: official)")
    add_flag(score, "--prediction_key", help="key holding the model's text (default: the official one, e.g. "
             "model_output; model_prediction is used when no record has model_output)")
    score.add_argument("--out", help="write the report here (.json; .md and .png beside it)")
    score.add_argument("--spec", help="benchmark spec YAML (default: diffa2/eval/benchmarks/<benchmark>.yaml)")

    answers = sub.add_parser("score_answers", help="print the ELBO of given answers to a question about a clip",
                             description="Score candidate answers to a question about a clip: each one's ELBO "
                             "(a lower bound of its log-likelihood, in nats) under the model and its per-token mean.")
    answers.add_argument("--model", required=True, help="DIFFA-2 checkpoint folder (save_pretrained layout)")
    answers.add_argument("--audio", required=True, help="audio file")
    answers.add_argument("--question", required=True, help="the question (the prompt's instruction)")
    answers.add_argument("--candidate", action="append", required=True, help="a candidate answer (repeat the flag)")
    answers.add_argument("--seed", type=int, default=0, help="seed of the ELBO draws")
    add_flag(answers, "--elbo_form", type=masking_form, choices=MASKING_FORMS, default=DEFAULT_FORM,
             help=f"the ELBO's masking form (default: {DEFAULT_FORM}; aliases l = count, t = ratio; diffa2.rl.elbo)")
    answers.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    answers.add_argument("--compat", choices=COMPAT_MODES, help="'toolkit' or 'reference' (default: the checkpoint's)")
    _add_draws(answers)
    add_threads_option(answers)

    prompts = sub.add_parser("prompts", help="list the prompt templates, or show one rendered",
                             description="List the prompt templates, or render one on an example item.")
    prompts.add_argument("--show", choices=sorted(PROMPTS), help="render this template on an example")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from diffa2.eval.runner import RunOptions, run_benchmark

    apply_threads(args.threads, log=lambda message: print(f"[diffa2.eval] {message}", file=sys.stderr))
    decoding = decoding_overrides(args)
    model = args.model or load_spec(args.benchmark, args.spec).default_model
    if model is None:
        raise ValueError(f"--model is required for {args.benchmark}")
    if not Path(model).is_dir():
        raise ValueError(f"checkpoint folder {model!r} does not exist" +
                         (" (train the embedded default first: make train)" if not args.model else ""))
    options = RunOptions(
        benchmark=args.benchmark, model=model, data=args.data, audio_root=args.audio_root, out=args.out,
        batch_size=args.batch_size, limit=args.limit, seed=args.seed, prompt=args.prompt, mode=args.mode,
        profile=args.profile, decoding=decoding, device=args.device, spec_file=args.spec, hf_revision=args.hf_revision,
        progress=not args.no_progress, compat=args.compat, mcq=args.mcq, n_draws=args.n_draws,
        long_audio=args.long_audio, max_audio_seconds=args.max_audio_seconds,
    )
    run_benchmark(options)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    spec = load_spec(args.benchmark, args.spec)
    records = read_predictions(args.predictions)
    validate(records, spec, for_run=False, source=args.predictions)
    result = score_records(records, spec, args.mode, args.prediction_key)
    report = build_report(result, {"predictions": str(Path(args.predictions).resolve())})
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        paths = write_report(report, out.parent, stem=out.stem)
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def _cmd_score_answers(args: argparse.Namespace) -> int:
    import torch

    from diffa2.inference import AudioQA

    apply_threads(args.threads, log=lambda message: print(f"[diffa2.eval] {message}", file=sys.stderr))
    if not Path(args.model).is_dir():
        raise ValueError(f"checkpoint folder {args.model!r} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    qa = AudioQA.from_checkpoint(args.model, device=device, compat=args.compat)
    wave, _ = trim_to_window(load_audio(args.audio, max_seconds=qa.model.config.window_seconds),
                             qa.model.config.window_seconds)
    scores = qa.score([wave], [args.question], [args.candidate], n_draws=args.n_draws, seed=args.seed,
                      form=args.elbo_form)
    print(f"{'ELBO':>10} {'per token':>10} {'tokens':>6}  candidate  ({args.n_draws} draws, seed {args.seed})")
    for text, elbo, mean, tokens in zip(args.candidate, scores.elbos[0], scores.per_token[0], scores.tokens[0],
                                        strict=True):
        print(f"{elbo:10.3f} {mean:10.3f} {tokens:6d}  {text}")
    return 0


def _cmd_prompts(args: argparse.Namespace) -> int:
    if args.show:
        template = PROMPTS[args.show]
        print(template("Which instrument is playing?", ["piano", "violin", "drums", "flute"]))
        return 0
    for name in sorted(PROMPTS):
        t = PROMPTS[name]
        print(f"{name:<18} answers with {t.answer_style:<6}  {t.source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    try:
        commands = {"run": _cmd_run, "score": _cmd_score, "score_answers": _cmd_score_answers, "prompts": _cmd_prompts}
        return commands[args.command](args)
    except (DataError, SpecError, ValueError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
