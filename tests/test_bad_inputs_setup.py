"""Bad set-up of issues #8 and #15 and what it gets, as one table (the rows and their check: tests/bad_inputs.py).

Configs go through `parse_config`, checkpoints through the loaders, numeric options through each command line's
range checks, output folders through a stage's setup, the RL stage's objective through its command and its reward
scoring. Audio, manifests and benchmark files are in tests/test_bad_inputs.py; bad server requests in
tests/test_serve.py (BAD_REQUESTS); the release importer's bad inputs in tests/test_release.py. Multi-turn items do
not exist yet (issue 18).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bad_inputs import Case, Ctx, check
from safetensors.torch import load_file, save_file
from tiny_checkpoints import write_tiny_hf_whisper
from tiny_llada import write_tiny_llada

from diffa2.config import parse_config
from diffa2.data.synth import build_parser as synth_parser
from diffa2.demo.cli import build_parser as demo_parser
from diffa2.eval.__main__ import build_parser as eval_parser
from diffa2.modeling.backbone import LLaDABackbone
from diffa2.modeling.checkpoint import load_pretrained
from diffa2.modeling.encoder import WhisperSpeechEncoder
from diffa2.run_lock import LOCK_NAME, Holder, process_start
from diffa2.stages import rl, sft
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import SFT_ARG_TYPES, parse_stage_options
from diffa2.stages.rewards import RLItem
from diffa2.stages.rollout import group_advantages, score
from diffa2.stages.runner import SFTStage
from diffa2.threads import choose_threads
from diffa2.validation import check_args

BENCH = Path(__file__).resolve().parents[1] / "bench"


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def config_row(yaml_text: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        path = ctx.tmp / "stage.yaml"
        path.write_text(yaml_text)
        return parse_config((ModelArguments, DataArguments, EvalArguments, StageTrainingArguments),
                            ["--config", str(path)], "test")

    return run


def damaged_checkpoint(damage: Callable[[Path], None]) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        directory = ctx.tmp / "ckpt"
        directory.mkdir()
        for file in ctx.checkpoint.iterdir():
            if file.is_file():
                (directory / file.name).write_bytes(file.read_bytes())
        damage(directory)
        return load_pretrained(directory)

    return run


def flatten_first_tensor(directory: Path) -> None:
    tensors = load_file(directory / "model.safetensors")
    first = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
    tensors[first] = tensors[first].flatten()
    save_file(tensors, directory / "model.safetensors")


class CreatesAFile:
    """A pickle payload: unpickling it with weights_only=False would run os.mkdir (here: create MARKER)."""

    marker = ""

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_pickle(path: Path, ctx: Ctx) -> None:
    CreatesAFile.marker = str(ctx.tmp / "PWNED")
    torch.save({"model.encoder.conv1.weight": CreatesAFile()}, path)


def pickle_row(load: Callable[[Ctx], object]) -> Callable[[Ctx], object]:
    """Load a malicious pickle; whatever the error, the payload must not have run."""

    def run(ctx: Ctx) -> object:
        try:
            return load(ctx)
        finally:
            assert not (ctx.tmp / "PWNED").exists(), "the pickle's code was executed"

    return run


def whisper_with_pickle(ctx: Ctx) -> object:
    directory = write_tiny_hf_whisper(ctx.tmp / "whisper", d_model=32, layers=2, with_safetensors=False)
    malicious_pickle(directory / "pytorch_model.bin", ctx)
    return WhisperSpeechEncoder.from_pretrained(directory)


def openai_pt_pickle(ctx: Ctx) -> object:
    malicious_pickle(ctx.tmp / "large-v3.pt", ctx)
    return WhisperSpeechEncoder.from_pretrained(ctx.tmp / "large-v3.pt")


def llada_with_pickle(ctx: Ctx) -> object:
    directory = ctx.tmp / "llada"
    write_tiny_llada(directory, vocab=len(ctx.chat.tokenizer), mask_id=ctx.chat.ids.mask, eos_id=ctx.chat.ids.eos)
    (directory / "model.safetensors").unlink()
    malicious_pickle(directory / "pytorch_model.bin", ctx)
    return LLaDABackbone.from_llada_pretrained(directory)


def diffa2_with_pickle(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    malicious_pickle(directory / "pytorch_model.bin", Ctx(directory.parent, directory, None))


def stage_option_row(*flags: str) -> Callable[[Ctx], object]:
    """Stage flags through the stages' parser and range checks."""

    def run(ctx: Ctx) -> object:
        return parse_stage_options(SFT_ARG_TYPES, ["--output_dir", str(ctx.tmp / "run"), *flags], "test", {})

    return run


def stage_yaml_row(yaml_text: str) -> Callable[[Ctx], object]:
    """A stage config YAML through the stages' parser and range checks."""

    def run(ctx: Ctx) -> object:
        (ctx.tmp / "stage.yaml").write_text(yaml_text)
        return stage_option_row("--config", str(ctx.tmp / "stage.yaml"))(ctx)

    return run


def cli_option_row(build_parser: Callable[[], object], *argv: str) -> Callable[[Ctx], object]:
    """Flags of an argparse command line through its range checks."""

    def run(ctx: Ctx) -> object:
        parser = build_parser()
        return check_args(parser, parser.parse_args(list(argv)))

    return run


def bench_parser(name: str) -> Callable[[], object]:
    def build() -> object:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module.build_parser()

    return build


def rl_option_row(*flags: str) -> Callable[[Ctx], object]:
    """RL stage flags through the stage's parser, range checks and name look-ups."""

    def run(ctx: Ctx) -> object:
        return parse_stage_options(rl.ARG_TYPES, ["--output_dir", str(ctx.tmp / "rl"), *flags], "test", {})

    return run


def rl_command_row(*flags: str) -> Callable[[Ctx], object]:
    """`python -m diffa2.stages.rl` with `flags`: it must end with its message before building anything."""

    def run(ctx: Ctx) -> object:
        try:
            return rl.main(["--output_dir", str(ctx.tmp / "rl"), *flags])
        finally:
            assert not (ctx.tmp / "rl").exists(), "the refused run created its output folder"

    return run


REWARD_BY_ANSWER = {"high": math.nan, "low": math.inf, "high!": 1.0, "medium": 0.0}


def non_finite_rewards(ctx: Ctx) -> object:
    """A reward returning NaN and inf for two of a group's four answers: those are dropped (advantage 0), counted."""
    item = RLItem("Is the pitch low, medium, or high?", "high", ("high", "low", "medium"))
    rewards, _ = score(lambda _, answer: REWARD_BY_ANSWER[answer], [item], list(REWARD_BY_ANSWER))
    objective = rl.resolve_objective(rl.RLArguments(), rl.rollout_decode(rl.RLArguments(), EvalArguments()))
    one_group = torch.zeros(len(rewards), dtype=torch.long)
    advantages = group_advantages(objective, rewards, one_group)
    dropped = int((~torch.isfinite(rewards)).sum())
    return f"dropped {dropped} of {len(rewards)} answers; advantages {[round(a, 4) for a in advantages.tolist()]}"


def text_reward(ctx: Ctx) -> object:
    """A custom reward that returns the answer's text instead of a number."""
    item = RLItem("Is the pitch low, medium, or high?", "high", ("high", "low", "medium"))

    def says_high(_, answer):
        return answer

    return score(says_high, [item], ["high"])


def stage_into(prepare: Callable[[Path], None]) -> Callable[[Ctx], object]:
    """A stage set up in an output folder that `prepare` filled first."""

    def run(ctx: Ctx) -> object:
        prepare(ctx.tmp / "run")
        args = parse_config(SFT_ARG_TYPES, ["--output_dir", str(ctx.tmp / "run")], "test")
        return SFTStage(sft.SPEC, *args).setup()

    return run


def earlier_checkpoints(run: Path) -> None:
    (run / "checkpoint-1600").mkdir(parents=True)
    (run / "final").mkdir()


def locked_by_parent(run: Path) -> None:
    """The lock of a live process of this host (pytest's parent)."""
    run.mkdir(parents=True)
    pid = os.getppid()
    holder = Holder(pid, socket.gethostname(), "2026-12-03 10:00:00", "train", "t", process_start(pid))
    (run / LOCK_NAME).write_text(json.dumps(dataclasses.asdict(holder)))


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

PICKLE_REFUSED = "not a PyTorch checkpoint loadable with weights_only=True"
CASES = [
    # configs
    Case("config: unknown key", "error", "stage.yaml: unknown keys ['max_stepz']", config_row("max_stepz: 3\n")),
    Case("config: wrong type (int)", "error", "stage.yaml: key 'max_steps': 'ten' is invalid",
         config_row("max_steps: ten\n")),
    Case("config: fractional int", "error", "stage.yaml: key 'max_steps': 1.5 is not a valid int",
         config_row("max_steps: 1.5\n")),
    Case("config: wrong type (bool)", "error", "stage.yaml: key 'lora': 'maybe' is invalid",
         config_row("lora: maybe\n")),
    Case("config: list for a single value", "error", "stage.yaml: key 'learning_rate': expected a single",
         config_row("learning_rate: [0.1, 0.2]\n")),
    Case("config: not YAML", "error", "stage.yaml: not valid YAML", config_row("max_steps: [1\n")),
    # checkpoints
    Case("checkpoint: missing config.json", "error", "not a complete DIFFA-2 checkpoint: missing config.json",
         damaged_checkpoint(lambda d: (d / "config.json").unlink())),
    Case("checkpoint: missing model.safetensors", "error", "ckpt: missing model.safetensors",
         damaged_checkpoint(lambda d: (d / "model.safetensors").unlink())),
    Case("checkpoint: truncated model.safetensors", "error", "model.safetensors: not a readable safetensors file",
         damaged_checkpoint(lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"))),
    Case("checkpoint: mismatched shapes", "error", "does not match its config.json",
         damaged_checkpoint(flatten_first_tensor)),
    Case("checkpoint: pickle instead of safetensors", "error",
         "found pickled weights ['pytorch_model.bin'], which are not read (safetensors only)",
         pickle_row(damaged_checkpoint(diffa2_with_pickle))),
    Case("checkpoint: malicious Whisper pytorch_model.bin", "error",
         f"pytorch_model.bin: {PICKLE_REFUSED}", pickle_row(whisper_with_pickle)),
    Case("checkpoint: malicious OpenAI .pt", "error",
         f"large-v3.pt: {PICKLE_REFUSED}", pickle_row(openai_pt_pickle)),
    Case("checkpoint: malicious LLaDA pytorch_model.bin", "error",
         f"pytorch_model.bin: {PICKLE_REFUSED}", pickle_row(llada_with_pickle)),
    # numeric options, every entry point (one table of ranges: diffa2.validation)
    Case("option: --max_steps -5", "error",
         "--max_steps -5 is out of range: must be >= 1, or -1 (train for --num_train_epochs instead)",
         stage_option_row("--max_steps", "-5")),
    Case("option: --learning_rate nan", "error", "--learning_rate nan is out of range: must be > 0",
         stage_option_row("--learning_rate", "nan")),
    Case("option: per_device_train_batch_size 0 in a config YAML", "error",
         "--per_device_train_batch_size 0 is out of range: must be >= 1",
         stage_yaml_row("per_device_train_batch_size: 0\n")),
    Case("option: eval --batch_size 0", "error", "--batch_size 0 is out of range: must be >= 1",
         cli_option_row(eval_parser, "run", "--benchmark", "synth", "--batch_size", "0")),
    Case("option: demo --port 70000", "error", "--port 70000 is out of range: must be 1..65535",
         cli_option_row(demo_parser, "--port", "70000")),
    Case("option: synth --vocab_size 100", "error", "--vocab_size 100 is out of range: must be >= 263",
         cli_option_row(synth_parser, "--vocab_size", "100")),
    Case("option: bench/decode.py --gen_lengths 0", "error", "--gen_lengths 0 is out of range: must be >= 1",
         cli_option_row(bench_parser("decode"), "--gen_lengths", "0")),
    Case("option: --threads 0", "error", "--threads 0 is out of range: must be >= 1",
         stage_option_row("--threads", "0")),
    Case("environment: OMP_NUM_THREADS=abc", "error", "OMP_NUM_THREADS='abc' is not a positive number of threads",
         lambda ctx: choose_threads(2, 0.0, env="abc")),
    # output folders
    Case("output dir: another run's checkpoints", "error",
         "holds another run's checkpoints (checkpoint-1600, final): pass --resume true",
         stage_into(earlier_checkpoints)),
    Case("output dir: locked by a running process", "error", "is in use by another run: PID ",
         stage_into(locked_by_parent)),
    # the RL stage (python -m diffa2.stages.rl)
    Case("rl: --reward not registered", "error", "--reward: unknown reward 'my_judge'; valid names: format, mc_correct",
         rl_option_row("--reward", "my_judge")),
    Case("rl: --policy_loss not registered", "error", "--policy_loss: unknown policy loss 'ppo'; valid names: ce_gppo",
         rl_option_row("--policy_loss", "ppo")),
    Case("rl: --group_size 1", "error", "--group_size 1 is out of range: must be >= 2",
         rl_option_row("--group_size", "1")),
    Case("rl: refused --advantage dual_track", "error",
         "error: --advantage dual_track needs answers in two segments, each with its own reward and its own tokens "
         "(track_scores, track_masks): not built yet in the RL stage; choose one of grpo, dr_grpo, rloo, opd, "
         "scope, dynamo, hian, gtpo",
         rl_command_row("--advantage", "dual_track")),
    Case("rl: --model that does not exist", "error",
         "nowhere: no such checkpoint directory; expected the folder of a saved DIFFA-2 checkpoint",
         rl_command_row("--model", "nowhere")),
    Case("rl: a reward returning NaN and inf", "accepted",
         "dropped 2 of 4 answers; advantages [0.0, 0.0, 0.7071, -0.7071]", non_finite_rewards),
    Case("rl: a reward returning text", "error",
         "reward 'says_high' returned 'high' (str) for the answer 'high'; a reward must return a real number",
         text_reward),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, checkpoint, chat):
    check(case, Ctx(tmp_path, checkpoint, chat))


def test_the_test_pickle_really_runs_code_when_unpickled_without_weights_only(tmp_path):
    """The control for the pickle rows: the same file, loaded unsafely, creates the marker."""
    ctx = Ctx(tmp_path, tmp_path, None)
    malicious_pickle(tmp_path / "evil.bin", ctx)
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "PWNED").exists()
