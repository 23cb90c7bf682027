"""Decoding speed vs. accuracy: reference LLaDA decoding against the fast modes, on the synthetic test split.

    python bench/decode.py --model runs/sft/final                  # after `make train`
    python bench/decode.py --model CKPT --limit 24                 # a quick run (24 items, all kinds)
    python bench/decode.py --model CKPT --modes reference fast fast:cache=prefix --gen_lengths 256

For each answer length (default 32, 128, 256; block length 32, steps = gen length, i.e. the reference commits one
token per step, greedy) it decodes the same test items with every mode (`DecodeConfig.preset` names: reference,
parallel, cache, fast, fpd; `NAME:key=value,...` overrides a field) and prints per mode: NFE per answer (each
answer's own passes, = its NFE decoded alone), wall time per answer (the whole `AudioQA.answer` call: features,
encoder, decoding) and decoding time per answer, the wall-clock speedup over reference decoding, the synthetic
benchmark accuracy (MMAU's official rule) and how many answers are identical to the reference's. Batches are
interleaved across modes (every mode decodes batch k before any decodes batch k+1), so load from other processes
on a shared machine hits all modes alike; one untimed warm-up batch per mode comes first.

Then batch throughput under the `synth` benchmark's decoding (what `python -m diffa2.eval run --benchmark synth`
decodes with): items/s of static batches (`AudioQA.answer`, a batch decodes until its slowest answer is done) and
of the continuous batcher (`diffa2.diffusion.continuous`, a finished answer's slot goes to the next item) at each
`--throughput_batches` size (default 1 and 8), with how many answers equal the first row's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml

from diffa2.audio import load_audio, trim_to_window
from diffa2.chat import COMPAT_MODES
from diffa2.cli_flags import add_flag
from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus
from diffa2.diffusion.continuous import DecodeJob, decode_all
from diffa2.diffusion.decoding import PRESETS, DecodeConfig
from diffa2.eval import core
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

NO_CHECKPOINT = """no checkpoint at {path}. Train the embedded default first, e.g.
    make train                                                    # writes runs/sft/final (about 5 min on 2 CPU cores)
    python -m diffa2.stages.sft --max_steps 200 --output_dir /tmp/ckpt   # a quicker, weaker one: /tmp/ckpt/final
then pass --model DIR."""


@dataclass
class Tally:
    """What one mode accumulated over the items of one answer length."""

    nfe: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    decode_seconds: float = 0.0


def parse_mode(spec: str, base: DecodeConfig) -> DecodeConfig:
    """`NAME` or `NAME:key=value,...`: preset NAME's speed settings on `base`, then the overrides."""
    name, _, overrides = spec.partition(":")
    if name not in PRESETS:
        raise SystemExit(f"unknown mode {name!r}; choose from {sorted(PRESETS)} (optionally NAME:key=value,...)")
    values = dict(item.split("=", 1) for item in overrides.split(",") if item)
    return replace(base.with_mode(name), **{k: yaml.safe_load(v) for k, v in values.items()})


def load_items(test_file: Path, window: float, limit: int | None) -> list[dict]:
    """Test items (the eval core's, `synth` spec) with their trimmed waveforms and prompts, loaded once for every
    mode; with a `limit`, that many evenly spaced over the split (it is sorted by question kind)."""
    spec = load_spec("synth")
    items, _ = core.load_items(spec, test_file, test_file.parent)
    if limit is not None and limit < len(items):
        items = [items[i * len(items) // limit] for i in range(limit)]
    return [{"item": item, "prompt": prompt, "wave": trim_to_window(load_audio(item.audio.path), window)[0]}
            for item, prompt in zip(items, core.render_prompts(spec, items), strict=True)]


def accuracy(items: list[dict], texts: list[str]) -> float:
    """The `synth` benchmark's accuracy of these answers, scored by the eval runner's core."""
    requests = [r["item"] for r in items]
    _, result = core.score_entries(load_spec("synth"), requests, [{"output": text} for text in texts])
    return core.summarize(result, requests)["accuracy"]


def run_length(qa: AudioQA, items: list[dict], configs: dict[str, DecodeConfig], batch_size: int) -> dict[str, Tally]:
    """Decode every item with every mode, batches interleaved across modes."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for config in configs.values():  # warm-up, untimed
        qa.answer([r["wave"] for r in batches[0]], [r["prompt"] for r in batches[0]], config)
    tallies = {name: Tally() for name in configs}
    for batch in batches:
        waves, prompts = [r["wave"] for r in batch], [r["prompt"] for r in batch]
        for name, config in configs.items():
            answers = qa.answer(waves, prompts, config)
            tally = tallies[name]
            tally.nfe += answers.row_nfe
            tally.texts += answers.texts
            tally.seconds += answers.seconds
            tally.decode_seconds += answers.decode_seconds
    return tallies


def summarize(tallies: dict[str, Tally], reference: str, items: list[dict]) -> list[dict]:
    """One row per mode: per-answer means, speedups against `reference`, accuracy, agreement."""
    ref = tallies[reference]
    rows = []
    for name, t in tallies.items():
        n = len(t.texts)
        rows.append({
            "mode": name, "nfe": sum(t.nfe) / n, "nfe_ratio": sum(ref.nfe) / max(sum(t.nfe), 1),
            "wall_ms": 1000 * t.seconds / n, "decode_ms": 1000 * t.decode_seconds / n,
            "speedup": ref.seconds / t.seconds, "decode_speedup": ref.decode_seconds / t.decode_seconds,
            "accuracy": accuracy(items, t.texts),
            "same_as_reference": 100 * sum(a == b for a, b in zip(t.texts, ref.texts, strict=True)) / n,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'mode':<22} {'NFE/ans':>8} {'fewer NFE':>9} {'wall ms/ans':>11} {'decode ms/ans':>13} "
            f"{'speedup':>8} {'dec. speedup':>12} {'accuracy':>8} {'same ans':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<22} {r['nfe']:>8.1f} {r['nfe_ratio']:>8.1f}x {r['wall_ms']:>11.1f} "
                     f"{r['decode_ms']:>13.1f} {r['speedup']:>7.2f}x {r['decode_speedup']:>11.2f}x "
                     f"{r['accuracy']:>7.1f}% {r['same_as_reference']:>7.1f}%")
    return "\n".join(lines)


def throughput(qa: AudioQA, items: list[dict], config: DecodeConfig, sizes: list[int]) -> list[dict]:
    """Items/s of static and continuous batches of each size over `items`, and answers equal to the first row's."""
    waves, prompts = [r["wave"] for r in items], [r["prompt"] for r in items]

    def static(size: int) -> list[str]:
        return [text for lo in range(0, len(items), size)
                for text in qa.answer(waves[lo : lo + size], prompts[lo : lo + size], config).texts]

    def continuous(size: int) -> list[str]:
        jobs = ((i, DecodeJob((w, p), config)) for i, (w, p) in enumerate(zip(waves, prompts, strict=True)))
        texts = dict(pair for done in decode_all(qa.batcher(max_batch=size), jobs) for pair in done)
        return [qa.chat.decode_answer(texts[i].token_ids.tolist()) for i in range(len(items))]

    static(max(sizes))  # warm-up, untimed
    rows, first = [], None
    for size in sizes:
        for kind, run in (("static", static), ("continuous", continuous)):
            start = time.perf_counter()
            texts = run(size)
            seconds = time.perf_counter() - start
            first = first or texts
            rows.append({"batching": kind, "batch": size, "items_per_second": len(items) / seconds,
                         "same_answers": sum(a == b for a, b in zip(texts, first, strict=True))})
    return rows


def format_throughput(rows: list[dict], items: int) -> str:
    """The throughput table, each row's items/s also as a ratio to the first row's."""
    head = f"{'batching':<11} {'batch':>5} {'items/s':>8} {'vs first':>8} {'same answers':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batching']:<11} {r['batch']:>5} {r['items_per_second']:>8.2f} "
                     f"{r['items_per_second'] / rows[0]['items_per_second']:>7.2f}x {r['same_answers']:>6}/{items}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", "--checkpoint", default="runs/sft/final",
             help="DIFFA-2 checkpoint (default: runs/sft/final)")
    parser.add_argument("--data", help=f"MMAU-format test file (default: the synthetic corpus at {DEFAULT_CORPUS_DIR})")
    parser.add_argument("--limit", type=int, help="only N test items, evenly spaced over the split")
    add_flag(parser, "--gen_lengths", type=int, nargs="+", default=[32, 128, 256])
    add_flag(parser, "--block_length", type=int, default=32, help="block size (capped at the gen length)")
    parser.add_argument("--modes", nargs="+", default=["reference", "parallel", "cache", "fast"],
                        help="presets to compare; the first is the baseline (default: reference parallel cache fast)")
    add_flag(parser, "--batch_size", type=int, default=8)
    add_flag(parser, "--throughput_batches", type=int, nargs="*", default=[1, 8],
             help="batch sizes of the static vs. continuous throughput table (default: 1 8; none: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compat", choices=COMPAT_MODES,
                        help="toolkit or reference (DIFFA-2's released inference code); default: the checkpoint's")
    parser.add_argument("--json", help="also write the results here")
    add_threads_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(NO_CHECKPOINT.format(path=args.model), file=sys.stderr)
        return 2
    qa = AudioQA.from_checkpoint(args.model, device=args.device, compat=args.compat)
    test_file = Path(args.data) if args.data else ensure_synth_corpus(DEFAULT_CORPUS_DIR).test_mmau
    items = load_items(test_file, qa.model.config.window_seconds, args.limit)
    print(f"checkpoint {args.model} | data {test_file} ({len(items)} items) | batch {args.batch_size} | "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()} | greedy, steps = gen length | "
          f"compat {qa.model.config.compat}")
    results = []
    for gen_length in args.gen_lengths:
        base = DecodeConfig(gen_length=gen_length, block_length=min(args.block_length, gen_length), steps=gen_length)
        configs = {spec: parse_mode(spec, base) for spec in args.modes}
        print(f"\ngen length {gen_length}, block {base.block_length}, steps {base.steps}")
        for spec, config in configs.items():
            speed = {k: v for k, v in asdict(config).items() if asdict(base)[k] != v}
            print(f"  {spec}: {speed or 'reference decoding'}")
        rows = summarize(run_length(qa, items, configs, args.batch_size), args.modes[0], items)
        print(format_rows(rows), flush=True)
        results.append({"gen_length": gen_length, "config": {s: asdict(c) for s, c in configs.items()}, "rows": rows})
    batching = []
    if args.throughput_batches:
        config = load_spec("synth").decoding
        print(f"\nthroughput: synth decoding {config.gen_length}/{config.block_length}/{config.steps}, "
              f"{len(items)} items")
        batching = throughput(qa, items, config, args.throughput_batches)
        print(format_throughput(batching, len(items)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.model, "items": len(items),
                                               "compat": qa.model.config.compat, "results": results,
                                               "throughput": batching}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
