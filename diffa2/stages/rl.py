"""Stage 5: reinforcement learning of the diffusion model with the shared RL library `diffa2.rl`.

One optimizer step on P prompts (`rollout.py` has the details):

1. every `--ppo_epochs` steps, sample `--group_size` answers per prompt with the project's decoder (batched, one seed
   per answer, `--rollout_temperature` > 0 so the group differs; lengths from --gen_length/--block_length/
   --steps, speed settings from `--rollout_mode`), score each with the reward `--reward` (`rewards.py`; a
   NaN/inf reward drops that answer, counted in the summary), and compute the advantages `--advantage` per group;
2. the answers' log-likelihoods under the policy, the rollout (old) policy and the frozen reference by the
   registered estimator `--likelihood` (`d1_one_step`, `elbo` with `--likelihood_samples` draws, `spg`), the draws
   shared between the three;
3. the policy loss `--policy_loss` on those, aggregated by `--loss_agg_mode` (default: the loss's own), plus
   `--kl_coef` x the KL estimator `--kl` to the reference; the same rollout serves `--ppo_epochs` updates, so ratios
   and clipping come into play from the second.

OPD and SCOPE (`--advantage opd|scope --teacher CKPT`) take their per-token advantages from a frozen teacher's
likelihood of the student's own answers (same estimator, same draws); SCOPE routes by the answers' correctness.
DynaMO (`--advantage dynamo`) allocates the step's `group_size x P` answers across its prompts by the variance proxy
of their success rates so far and modulates GRPO's advantages per token at every update. HIAN and GTPO
(`--advantage hian|gtpo`) play each item as a conversation, turn by turn on the policy's own answers, with a reward
per turn and per session (`turn_rollout.py`; a single-question item is a one-turn session). Dual-track GRPO, which
needs two-segment answers, is refused with what it needs (`REFUSED_ADVANTAGES`).
The stage composes the shared lifecycle (`lifecycle.StageRun`: corpus, model, data, train, save, evaluate, report)
as VRPO does, and adds the synthetic test accuracy before training, the reward curve (reward.png) and the KL.

Embedded default (tiny model, the synthetic corpus's QA items, CPU; needs the default SFT's checkpoint):
    python -m diffa2.stages.sft && python -m diffa2.stages.rl
Real scale (LLaDA-8B + Whisper-large-v3 with LoRA, from the stage-3 checkpoint):
    torchrun --nproc_per_node 8 -m diffa2.stages.rl --config stages/rl.yaml
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffa2.chat import ChatFormat
from diffa2.data.collate import SFTCollator
from diffa2.data.dataset import AudioInstructionDataset
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.modeling.checkpoint import load_pretrained, read_checkpoint_config, resolve_source
from diffa2.modeling.configuration import DIFFA2Config
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.safe_load import CheckpointError
from diffa2.rl import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    get_advantage_estimator,
    get_aggregation,
    get_kl_estimator,
    get_likelihood_estimator,
    get_policy_loss,
    masking_form,
)
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import StageDefaults, refusals_end_the_command, stage_overrides, start_stage
from diffa2.stages.distributed import zero3_enabled
from diffa2.stages.lifecycle import StageRun, StageSpec, previous_checkpoint
from diffa2.stages.plots import plot_reward_curve
from diffa2.stages.reference_models import make_reference
from diffa2.stages.rewards import get_reward, rl_item
from diffa2.stages.rollout import (
    DISTILLATION,
    TURN_LEVEL,
    Objective,
    PromptBatch,
    Rollout,
    RolloutAllocator,
    RolloutSeeds,
    make_rollout,
    rollout_loss,
    rollout_metrics,
    with_agg_mode,
)
from diffa2.stages.runner import DIFFA2Trainer
from diffa2.validation import OptionError

SUPPORTED_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "opd", "scope", "dynamo", *TURN_LEVEL)
# per-token advantages: they need per-token likelihoods (not spg's one value per answer)
TOKEN_LEVEL = (*DISTILLATION, "dynamo", *TURN_LEVEL)
# What each refused advantage estimator needs that the stage does not build yet (issue 16, part 3).
REFUSED_ADVANTAGES = {
    "dual_track": "answers in two segments, each with its own reward and its own tokens (track_scores, track_masks)",
}


@dataclass
class RLArguments:
    """The RL objective, every piece by its registered name in `diffa2.rl` (or `rewards.REWARDS`)."""

    group_size: int = field(default=4, metadata={"help": "answers sampled per prompt (G)"})
    rollout_temperature: float = field(
        default=1.0, metadata={"help": "Gumbel noise of the rollout decoder; > 0 so a group's answers differ"}
    )
    rollout_mode: str = field(
        default="reference", metadata={"help": "speed settings of the rollout decoder: a decoding preset "
                                               "(reference, parallel, cache, fast, fpd)"}
    )
    reward: str = field(default="mc_correct", metadata={"help": "registered reward: mc_correct or format"})
    likelihood: str = field(
        default="d1_one_step", metadata={"help": "likelihood estimator: d1_one_step, elbo or spg"}
    )
    likelihood_samples: int = field(
        default=4, metadata={"help": "noise draws per answer of elbo and spg (spg: at most one per decoded block)"}
    )
    elbo_form: str = field(
        default="count", metadata={"help": "elbo: count (exactly k of L tokens masked, weight L/k) or ratio (each "
                                           "token masked w.p. t, weight 1/t); aliases l = count, t = ratio"}
    )
    advantage: str = field(default="grpo", metadata={
        "help": f"advantage estimator: {ADVANTAGE_ESTIMATORS.describe(SUPPORTED_ADVANTAGES)}; registered but "
                f"refused until the stage provides what they need: "
                f"{ADVANTAGE_ESTIMATORS.describe(REFUSED_ADVANTAGES)}"})
    policy_loss: str = field(default="grpo", metadata={"help": f"policy loss: {POLICY_LOSSES.describe()}"})
    loss_agg_mode: str | None = field(
        default=None, metadata={"help": "token-mean, seq-mean-token-sum, seq-mean-token-mean or "
                                        "seq-mean-token-sum-norm (default: the policy loss's own)"}
    )
    kl: str = field(default="k3", metadata={"help": "KL estimator: k1, k2, k3, abs, k1+, k3+ (kl, mse, low_var_kl)"})
    kl_coef: float = field(default=0.04, metadata={"help": "weight of the KL to the reference (GRPO: 0.04)"})
    ppo_epochs: int = field(default=2, metadata={"help": "optimizer steps per rollout batch"})
    teacher: str | None = field(default=None, metadata={
        "help": "checkpoint of the teacher of --advantage opd and scope (e.g. a stronger stage-3 model; the same "
                "tokenizer as the student)"})

    def __post_init__(self) -> None:
        """Every name is looked up: an unknown one is an `OptionError` naming the flag and listing the valid names."""
        lookups = [("reward", get_reward), ("likelihood", get_likelihood_estimator),
                   ("advantage", get_advantage_estimator), ("policy_loss", get_policy_loss), ("kl", get_kl_estimator),
                   ("loss_agg_mode", get_aggregation), ("rollout_mode", DecodeConfig.preset)]
        for option, lookup in lookups:
            try:
                if getattr(self, option) is not None:
                    lookup(getattr(self, option))
            except ValueError as err:
                raise OptionError(f"--{option}: {err}") from None
        try:
            self.elbo_form = masking_form(self.elbo_form)
        except ValueError as err:
            raise OptionError(f"--elbo_form: {err}") from None
        if (self.advantage in DISTILLATION) != bool(self.teacher):
            raise OptionError(f"--teacher CKPT is needed by --advantage {self.advantage}" if self.teacher is None else
                              f"--teacher is read by --advantage {' or '.join(DISTILLATION)} only, not "
                              f"{self.advantage}")


def rollout_decode(rl: RLArguments, eval_args: EvalArguments) -> DecodeConfig:
    """The rollout decoder: the evaluation's lengths, `--rollout_mode`'s speed settings, the rollout temperature."""
    return DecodeConfig(gen_length=eval_args.gen_length, block_length=eval_args.block_length,
                        steps=eval_args.steps, temperature=rl.rollout_temperature).with_mode(rl.rollout_mode)


def resolve_objective(rl: RLArguments, decode: DecodeConfig) -> Objective:
    """The registered pieces of the step, or `NotImplementedError` saying what a refused name needs."""
    if rl.advantage not in SUPPORTED_ADVANTAGES:
        need = REFUSED_ADVANTAGES.get(rl.advantage, "inputs the RL stage does not provide")
        note = ADVANTAGE_ESTIMATORS.note(rl.advantage)
        raise NotImplementedError(f"--advantage {rl.advantage} needs {need}: not built yet in the RL stage; "
                                  f"choose one of {', '.join(SUPPORTED_ADVANTAGES)}"
                                  + (f" ({rl.advantage} is {note})" if note else ""))
    if rl.advantage in TOKEN_LEVEL and rl.likelihood == "spg":
        raise NotImplementedError(f"--advantage {rl.advantage} gives each token its own advantage, and --likelihood "
                                  f"spg one value per answer (its bound chosen by the answer's advantage); choose "
                                  f"--likelihood d1_one_step or elbo")
    estimator_cls = get_likelihood_estimator(rl.likelihood)
    # the model's forward masks answer tokens only, never prompt tokens: d1's and SPG's prompt masking is off
    if rl.likelihood == "d1_one_step":
        estimator = estimator_cls(p_mask_prompt=0.0)
    elif rl.likelihood == "elbo":
        estimator = estimator_cls(n_t=rl.likelihood_samples, form=rl.elbo_form)
    elif rl.likelihood == "spg":
        blocks = decode.gen_length // decode.block_length
        if rl.likelihood_samples > blocks:
            raise NotImplementedError(
                f"--likelihood spg draws each sample in its own decoded block: --likelihood_samples "
                f"{rl.likelihood_samples} needs that many blocks, the rollout has {blocks} (--gen_length "
                f"{decode.gen_length} / --block_length {decode.block_length})")
        estimator = estimator_cls(n_t=rl.likelihood_samples, block_length=decode.block_length, p_mask_prompt=0.0)
    else:
        raise NotImplementedError(f"--likelihood {rl.likelihood} is registered but the RL stage does not know its "
                                  f"options yet; choose d1_one_step, elbo or spg")
    policy_loss = get_policy_loss(rl.policy_loss)
    dynamo = rl.advantage == "dynamo"  # GRPO's advantages, modulated per token
    return Objective(estimator=estimator, advantage=get_advantage_estimator("grpo" if dynamo else rl.advantage),
                     policy_loss=policy_loss,
                     policy_config=with_agg_mode(policy_loss.default_config(), rl.loss_agg_mode),
                     kl=get_kl_estimator(rl.kl), kl_coef=rl.kl_coef,
                     modulation=get_advantage_estimator("dynamo") if dynamo else None)


def load_teacher(path: str, chat: ChatFormat, student: DIFFA2Config) -> DIFFA2Model:
    """The frozen teacher of OPD and SCOPE, in eval mode; it scores the student's token ids from the student's
    log-mel features, so its tokenizer, window and mel bins must be the student's."""
    teacher = load_pretrained(path)
    ours, theirs = (student.window_seconds, student.n_mels), (teacher.config.window_seconds, teacher.config.n_mels)
    if ours != theirs:
        raise ValueError(f"--teacher {path}: its encoder takes {theirs[0]:g} s windows of {theirs[1]} mel bins, the "
                         f"student's {ours[0]:g} s of {ours[1]}; the teacher scores the student's features, so both "
                         f"need the same")
    own = ChatFormat.from_pretrained(resolve_source(teacher.config.tokenizer_source, Path(path)))
    if own.ids != chat.ids or own.tokenizer.get_vocab() != chat.tokenizer.get_vocab():
        raise ValueError(f"--teacher {path}: its tokenizer differs from the student's; the teacher scores the "
                         f"student's answers token by token, so both need the same tokenizer")
    return teacher.requires_grad_(False).eval()


class RLCollator:
    """`SFTExample`s -> the fields of a `PromptBatch`: features and prompts, and each item as the reward sees it."""

    def __init__(self, collator: SFTCollator) -> None:
        self.collator = collator

    def __call__(self, examples: list) -> dict:
        features, lengths, prompt_ids, audio_slots = self.collator.encode_inputs(examples)
        return vars(PromptBatch(features, lengths, prompt_ids, audio_slots,
                                [rl_item(ex.instruction, ex.answer) for ex in examples],
                                [f"{ex.audio_key}\n{ex.instruction}" for ex in examples],
                                [ex.instruction for ex in examples]))


class RLTrainer(DIFFA2Trainer):
    """Trainer whose step is an RL update on a rollout batch made every `ppo_epochs` steps (module docstring).

    Logged with each training loss (means since the last log, over processes): `reward/mean`, `rollout/accuracy`,
    `rollout/dropped`, `actor/kl` (the KL estimator to the reference), `actor/pg_loss`, `actor/pg_clipfrac`,
    `actor/ppo_kl` and the policy loss's other metrics.
    """

    def __init__(self, *args, chat, rl: RLArguments, objective: Objective, decode: DecodeConfig,
                 teacher: DIFFA2Model | None = None, **kwargs) -> None:
        super().__init__(*args, chat=chat, **kwargs)
        if zero3_enabled(self):
            raise NotImplementedError("the RL stage decodes its rollouts with the whole policy on each device: "
                                      "ZeRO-3 is not supported yet (use ZeRO-1/2, stages/deepspeed/zero1_offload.json)")
        self.reference = make_reference(self.model, self)  # the model as loaded
        self.rl, self.objective, self.decode = rl, objective, decode
        self.reward = get_reward(rl.reward)
        self.teacher = teacher
        self.allocator = RolloutAllocator(rl.group_size) if rl.advantage == "dynamo" else None
        self.rollouts: dict[int, Rollout] = {}  # by micro-batch of the optimizer step
        self.dropped_rewards = 0
        self._calls = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def new_rollout(self, model, prompts: PromptBatch, step: int, micro_batch: int) -> Rollout:
        """Sample, score and evaluate a rollout batch for `prompts`, seeded by the run's seed, step and micro-batch."""
        first_prompt = self.args.process_index * len(prompts.items)  # its number in the step's global batch
        seeds = RolloutSeeds(self.args.seed, step, micro_batch, first_prompt)
        counts = None if self.allocator is None else self.allocator.allocate(prompts.keys)
        policy = self.accelerator.unwrap_model(model)
        if self.teacher is not None:  # where and in what dtype the policy runs (bf16 under DeepSpeed, as its inputs)
            self.teacher.to(device=prompts.input_features.device, dtype=next(policy.parameters()).dtype)
        rollout = make_rollout(policy, self.reference, self.chat, prompts, self.objective, reward=self.reward,
                               group_size=self.rl.group_size, decode=self.decode, seeds=seeds, counts=counts,
                               teacher=self.teacher)
        if self.allocator is not None:
            self.allocator.update(prompts.keys, rollout.index, rollout.rewards)
        dropped = int((~rollout.valid).sum())
        if dropped:
            self.dropped_rewards += dropped
            print(f"[rl] step {step}: {dropped} answer(s) with a NaN/inf reward dropped from the update")
        self.record(rollout_metrics(rollout))
        return rollout

    def record(self, metrics: dict) -> None:
        names = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in names], device=self.args.device)
        for name, value in zip(names, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True):
            self._metrics[name].append(value)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        micro_batch = self._calls % self.args.gradient_accumulation_steps
        self._calls += 1
        step = self.state.global_step
        if step % self.rl.ppo_epochs == 0 or micro_batch not in self.rollouts:
            self.rollouts[micro_batch] = self.new_rollout(model, PromptBatch(**inputs), step, micro_batch)
        loss, metrics = rollout_loss(model, self.rollouts[micro_batch], self.objective, self.chat.ids.mask)
        self.record(metrics)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{name: sum(v) / len(v) for name, v in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)


SPEC = StageSpec(name="rl", previous="sft", requires_previous=True, objective="RL policy loss + KL")


# The embedded default: 8 multiple-choice prompts x 8 answers per step sampled at temperature 0.5 (at 1.0 half the
# tiny model's samples are malformed), each rollout batch used for 2 updates; from a 61.4 % stage-3 checkpoint
# 150 steps gave 66.4 % (docs/experiment-log.md, 2026-12-03 third session): issue 16's +10 points not reached yet.
@dataclass(frozen=True)
class RLDefaults(StageDefaults):
    """Stage 5's embedded defaults (`--config` and flags override them)."""

    recipe: str = "data_recipes/synth_rl.yaml"
    max_steps: int = 150
    per_device_train_batch_size: int = 8
    group_size: int = 8
    rollout_temperature: float = 0.5
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0
    logging_steps: int = 2
    save_steps: int = 50


DEFAULTS = RLDefaults()
ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, RLArguments, StageTrainingArguments)


class RLStage:
    """Stage 5's recipe: setup -> test accuracy before -> train -> save -> evaluate (after) -> report with KL."""

    def __init__(self, spec: StageSpec, model_args: ModelArguments, data_args: DataArguments,
                 eval_args: EvalArguments, rl_args: RLArguments, train_args: StageTrainingArguments) -> None:
        self.rl_args = rl_args
        self.decode = rollout_decode(rl_args, eval_args)
        self.objective = resolve_objective(rl_args, self.decode)  # refused names fail before anything is built
        # the answer canvas is the rollout's: items whose target cannot fit --gen_length tokens are left out
        data_args.answer_canvas, data_args.answer_length = "fixed", eval_args.gen_length
        self.lifecycle = StageRun(spec, model_args, data_args, eval_args, train_args)

    @property
    def trainer(self) -> RLTrainer:
        return self.lifecycle.trainer

    def setup(self) -> RLStage:
        run = self.lifecycle
        run.setup(self.make_dataset, self.make_trainer)
        run.summary["rl"] = {**vars(self.rl_args), "rollout_decoding": vars(self.decode)}
        return self

    def make_dataset(self, items: list) -> AudioInstructionDataset:
        run = self.lifecycle
        return AudioInstructionDataset(items, run.max_seconds, on_bad_audio=run.data_args.on_bad_audio)

    def make_trainer(self) -> RLTrainer:
        run = self.lifecycle
        collator = SFTCollator(run.chat, run.qa.featurizer, feature_cache_items=run.data_args.feature_cache_items)
        teacher = load_teacher(self.rl_args.teacher, run.chat, run.model.config) if self.rl_args.teacher else None
        return RLTrainer(model=run.model, args=run.train_args, train_dataset=run.dataset,
                         data_collator=RLCollator(collator), chat=run.chat, rl=self.rl_args,
                         objective=self.objective, decode=self.decode, audio_lr_scale=run.train_args.audio_lr_scale,
                         teacher=teacher)

    def run(self) -> dict:
        run = self.lifecycle
        self.setup()
        if run.eval_args.test_file:
            run.model.to(run.train_args.device)  # with DeepSpeed, Trainer moves the model only when training starts
            run.summary["before"] = {"test": run.test_accuracy()}
        run.train()
        run.save()
        run.evaluate()
        history = [entry for entry in run.trainer.state.log_history if "reward/mean" in entry]
        run.summary["rl_log"] = {
            "dropped_rewards": self.trainer.dropped_rewards,
            "first": {k: history[0][k] for k in ("reward/mean", "rollout/accuracy", "actor/kl")} if history else None,
            "last": {k: history[-1][k] for k in ("reward/mean", "rollout/accuracy", "actor/kl")} if history else None,
        }
        if run.trainer.is_world_process_zero():
            plot_reward_curve(history, run.output_dir / "reward.png", title=f"rl: {self.rl_args.reward} reward")
        return self.report()

    def report(self) -> dict:
        summary = self.lifecycle.report()
        log = summary["rl_log"]
        print(f"{log['dropped_rewards']} answer(s) dropped for a NaN/inf reward; reward curve: "
              f"{self.lifecycle.output_dir / 'reward.png'}")
        if log["last"] is not None:
            first, last = log["first"], log["last"]
            print(f"rollouts: reward {first['reward/mean']:.3f} -> {last['reward/mean']:.3f}, accuracy "
                  f"{100 * first['rollout/accuracy']:.1f}% -> {100 * last['rollout/accuracy']:.1f}%, "
                  f"KL to the reference ({self.rl_args.kl}) {last['actor/kl']:.4f}")
        if "before" in summary and "test" in summary:
            print(f"synthetic test accuracy: {summary['before']['test']['accuracy']:.1f}% -> "
                  f"{summary['test']['accuracy']:.1f}% (chance {summary['test']['chance']:.1f}%)")
        return summary


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, eval_args, rl_args, train_args = start_stage(
        ARG_TYPES, argv, __doc__, overrides=stage_overrides(SPEC.name, DEFAULTS, argv)
    )
    try:  # before anything is built: a refused objective or a missing stage-3 checkpoint says what to do
        stage = RLStage(SPEC, model_args, data_args, eval_args, rl_args, train_args)
        init = previous_checkpoint(model_args, SPEC, Path(train_args.output_dir))
        if init is not None:
            read_checkpoint_config(init)
        if rl_args.teacher:
            try:
                read_checkpoint_config(Path(rl_args.teacher))
            except CheckpointError as err:
                raise SystemExit(f"error: --teacher {err}; expected the folder of a saved DIFFA-2 checkpoint") from None
    except (FileNotFoundError, NotImplementedError) as err:
        raise SystemExit(f"error: {err}") from None
    except CheckpointError as err:
        raise SystemExit(f"error: --model {err}; expected the folder of a saved DIFFA-2 checkpoint (config.json + "
                         f"model.safetensors), or --model none to start from the preset") from None
    with refusals_end_the_command():
        return stage.run()


if __name__ == "__main__":
    main()
