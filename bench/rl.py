"""RL stage speed: rollout throughput of a fast decoder against the reference decoder, and one step's time split.

    python bench/rl.py                                        # a random tiny DIFFA-2, the synthetic corpus's prompts
    python bench/rl.py --model runs/sft/final                 # a trained checkpoint (after `make train`)
    python bench/rl.py --model CKPT --rollout_mode fast --group_size 8 --gen_length 64 --block_length 32

Rollouts are sampled by the RL stage's own sampler (`diffa2.stages.rollout.sample_group`): `--batch_size` prompts
with choices from the synthetic corpus's stage-3 validation split, `--group_size` answers each, decoded in one batch
at `--rollout_temperature`, one seed per answer (new seeds every round). The reference decoder (LLaDA's low-confidence
remasking, `DecodeConfig` preset "reference") and `--rollout_mode` (a preset: parallel, cache, fast, fpd) decode the
same prompts with the same seeds, interleaved over `--rounds` timed rounds after one untimed warm-up round each, so
load from other processes hits both alike. Per decoder: answers/s, the speedup over the reference, and the accuracy
of the sampled answers (MMAU's rule), so a faster decoder that answers worse shows.

Then the time split of RL steps as the stage runs them (rollouts with `--rollout_mode`, `--likelihood`, the GRPO loss
with the k3 KL, AdamW on the trainable tensors): rollout (decoding), likelihoods (the rewards, then the rollout
policy's and the reference's likelihoods under shared draws: `evaluate_answers`) and update (the policy's forward,
backward and optimizer step), each the mean over `--rounds` steps after one untimed warm-up step.
The defaults decode like `stages/rl.yaml` (one 32-token block in 32 steps); the embedded default's stage decodes
4 tokens (`--gen_length 4 --block_length 4 --steps 4`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from diffa2.chat import ChatFormat
from diffa2.cli_flags import add_flag
from diffa2.data.collate import SFTCollator
from diffa2.data.dataset import AudioInstructionDataset
from diffa2.data.recipe import DataSource, load_split
from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus
from diffa2.diffusion.decoding import PRESETS, DecodeConfig
from diffa2.inference import AudioQA, checkpoint_or_random_tiny
from diffa2.modeling.model import DIFFA2Model
from diffa2.rl import LIKELIHOOD_ESTIMATORS
from diffa2.stages.reference_models import FrozenReference
from diffa2.stages.rewards import choices_in_prompt, mc_correct
from diffa2.stages.rl import RLArguments, RLCollator, resolve_objective
from diffa2.stages.rollout import PromptBatch, RolloutSeeds, evaluate_answers, rollout_loss, sample_group
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

PHASES = ("rollout", "likelihoods", "update")


def load_model(path: str | None, corpus_tokenizer: Path, seed: int) -> tuple[DIFFA2Model, ChatFormat]:
    """`--model`'s checkpoint, or a random tiny DIFFA-2; a folder without a checkpoint ends the command."""
    if path is not None and not (Path(path) / "config.json").is_file():
        raise SystemExit(f"error: --model {path}: no DIFFA-2 checkpoint there (config.json + model.safetensors); "
                         f"leave --model out to bench a random tiny model")
    return checkpoint_or_random_tiny(path, corpus_tokenizer, seed)


def load_prompts(manifest: Path, qa: AudioQA, count: int) -> PromptBatch:
    """The first `count` items with choices of a stage-3 manifest, as the RL stage's collator batches them."""
    items, _ = load_split([DataSource(str(manifest))], synth_dir=None, seed=0)
    dataset = AudioInstructionDataset(items, qa.model.config.window_seconds)
    examples = []
    for i in range(len(dataset)):
        example = dataset[i]
        if choices_in_prompt(example.instruction):
            examples.append(example)
            if len(examples) == count:
                return PromptBatch(**RLCollator(SFTCollator(qa.chat, qa.featurizer))(examples))
    raise SystemExit(f"error: --batch_size {count}: {manifest} has only {len(examples)} items with choices")


def answer_texts(chat: ChatFormat, answers: torch.Tensor) -> list[str]:
    return [chat.decode_answer(row.tolist()) for row in answers]


def throughput(model, chat: ChatFormat, prompts: PromptBatch, configs: dict[str, DecodeConfig], group: int,
               rounds: int, seed: int) -> list[dict]:
    """Answers/s and accuracy of each decoder over `rounds` interleaved rounds (after an untimed warm-up)."""
    prompt_count = len(prompts.items)
    rows = group * prompt_count
    for config in configs.values():
        sample_group(model, chat, prompts, group, config, RolloutSeeds(seed, rounds, 0).group(prompt_count, group))
    seconds, correct = defaultdict(float), defaultdict(float)
    for round_ in range(rounds):
        seeds = RolloutSeeds(seed, round_, 0).group(prompt_count, group)
        for name, config in configs.items():
            start = time.perf_counter()
            answers = sample_group(model, chat, prompts, group, config, seeds)
            seconds[name] += time.perf_counter() - start
            texts = answer_texts(chat, answers)
            correct[name] += sum(mc_correct(prompts.items[r % len(prompts.items)], t) for r, t in enumerate(texts))
    reference = next(iter(configs))
    return [{"decoder": name, "answers_per_second": rows * rounds / seconds[name],
             "speedup": seconds[reference] / seconds[name], "accuracy": 100 * correct[name] / (rows * rounds)}
            for name in configs]


def step_split(model, chat: ChatFormat, prompts: PromptBatch, rl: RLArguments, decode: DecodeConfig, rounds: int,
               seed: int) -> dict[str, float]:
    """Mean seconds of each phase of an RL step over `rounds` steps (after an untimed warm-up step)."""
    objective = resolve_objective(rl, decode)
    reference = FrozenReference(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    index = torch.arange(len(prompts.items)).repeat(rl.group_size)
    totals = defaultdict(float)
    model.train()
    for round_ in range(rounds + 1):
        seeds = RolloutSeeds(seed, round_, 1)
        marks = [time.perf_counter()]
        answers = sample_group(model, chat, prompts, rl.group_size, decode,
                               seeds.group(len(prompts.items), rl.group_size))
        marks.append(time.perf_counter())
        rollout = evaluate_answers(model, reference, chat, prompts, index, answers, objective, reward=mc_correct,
                                   generator=torch.Generator().manual_seed(seeds.draws))
        marks.append(time.perf_counter())
        loss, _ = rollout_loss(model, rollout, objective, chat.ids.mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
        if round_:  # round 0 warms up
            for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                totals[phase] += end - start
    return {phase: totals[phase] / rounds for phase in PHASES}


def format_throughput(rows: list[dict]) -> str:
    head = f"{'decoder':<12} {'answers/s':>10} {'speedup':>8} {'accuracy':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['decoder']:<12} {r['answers_per_second']:>10.2f} {r['speedup']:>7.2f}x "
                     f"{r['accuracy']:>8.1f}%")
    return "\n".join(lines)


def format_split(split: dict[str, float]) -> str:
    total = sum(split.values())
    head = f"{'phase':<12} {'s/step':>8} {'share':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{phase:<12} {seconds:>8.3f} {100 * seconds / total:>6.1f}%" for phase, seconds in split.items()]
    return "\n".join([*lines, f"{'total':<12} {total:>8.3f}"])


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", "--checkpoint", help="DIFFA-2 checkpoint (default: a random tiny DIFFA-2)")
    add_flag(parser, "--synth_dir", default=str(DEFAULT_CORPUS_DIR),
             help="synthetic corpus: its prompts, and the random model's tokenizer (built when missing)")
    add_flag(parser, "--batch_size", type=int, default=8, help="prompts per rollout batch (default: 8)")
    add_flag(parser, "--group_size", type=int, default=4, help="answers per prompt (default: 4)")
    add_flag(parser, "--rollout_mode", default="parallel", choices=sorted(set(PRESETS) - {"reference"}),
             help="the decoder measured against the reference (a DecodeConfig preset; default: parallel)")
    add_flag(parser, "--rollout_temperature", type=float, default=1.0, help="sampling noise (default: 1.0)")
    add_flag(parser, "--gen_length", type=int, default=32)
    add_flag(parser, "--block_length", type=int, default=32)
    add_flag(parser, "--steps", type=int, default=32, help="decoding steps (default: 32)")
    add_flag(parser, "--likelihood", default="d1_one_step", choices=LIKELIHOOD_ESTIMATORS.names(),
             help="likelihood estimator of the step split (default: d1_one_step)")
    add_flag(parser, "--likelihood_samples", type=int, default=4, help="draws per answer of elbo and spg")
    add_flag(parser, "--rounds", type=int, default=3, help="timed rounds per decoder and timed steps (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    add_threads_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    corpus = ensure_synth_corpus(args.synth_dir)
    model, chat = load_model(args.model, corpus.tokenizer_dir, args.seed)
    model.to(args.device)
    qa = AudioQA(model, chat)
    prompts = load_prompts(corpus.manifest("stage3_sft", "validation"), qa, args.batch_size)
    prompts = PromptBatch(prompts.input_features.to(args.device), prompts.feature_lengths.to(args.device),
                          prompts.prompt_ids, prompts.audio_slots, prompts.items, prompts.keys)
    rl = RLArguments(group_size=args.group_size, rollout_temperature=args.rollout_temperature,
                     rollout_mode=args.rollout_mode, likelihood=args.likelihood,
                     likelihood_samples=args.likelihood_samples)
    base = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                        temperature=args.rollout_temperature)
    configs = {"reference": base, args.rollout_mode: base.with_mode(args.rollout_mode)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.model or 'random tiny DIFFA-2 (seed ' + str(args.seed) + ')'} ({trainable:,} trainable "
          f"parameters) | {args.batch_size} prompts x {args.group_size} answers | device {args.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print(f"rollout decoding: gen length {base.gen_length}, block {base.block_length}, steps {base.steps}, "
          f"temperature {base.temperature}; {args.rollout_mode}: "
          f"{ {k: v for k, v in asdict(configs[args.rollout_mode]).items() if asdict(base)[k] != v} }")
    rows = throughput(model, chat, prompts, configs, args.group_size, args.rounds, args.seed)
    print(f"\nrollout throughput ({args.rounds} round(s), {args.batch_size * args.group_size} answers each)")
    print(format_throughput(rows), flush=True)
    print(f"\none RL step ({args.rollout_mode} rollouts, likelihood {rl.likelihood}"
          f"{f' x {rl.likelihood_samples} draws' if rl.likelihood != 'd1_one_step' else ''}, {rl.policy_loss} loss + "
          f"{rl.kl} KL, AdamW; mean of {args.rounds} step(s))")
    split = step_split(model, chat, prompts, rl, configs[args.rollout_mode], args.rounds, args.seed)
    print(format_split(split), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "settings": vars(args), "throughput": rows,
                                               "step_seconds": split}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
