"""The lifecycle every training stage shares, on top of transformers' Trainer (`StageRun`), and its setup helpers.

setup (corpus -> tokenizer -> model -> trainable policy -> data -> the recipe's dataset and trainer) -> train
(Trainer: accumulation, schedule, clipping, bf16 where available, DeepSpeed, checkpoints, resume) -> save (trained
parts + tokenizer, atomically) -> evaluate (synthetic test split vs chance) -> report (loss curve JSONL + PNG,
summary). The SFT stages specialise it with their data and loss (`runner.SFTStage`); VRPO composes it
(`vrpo.VRPOStage`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, set_seed

from diffa2.chat import ChatFormat
from diffa2.data.dataset import AudioInstructionDataset, TokenBudget, items_within
from diffa2.data.recipe import DataRecipe, load_split
from diffa2.data.synth import ensure_synth_corpus
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.inference import AudioQA
from diffa2.io import atomic_write_json, atomic_write_text
from diffa2.modeling.adapters import SemanticAdapter
from diffa2.modeling.checkpoint import build_with_bases, load_pretrained, resolve_source, save_pretrained, stored_keys
from diffa2.modeling.configuration import LoraSettings, speech_path_of
from diffa2.modeling.encoder import encoder_lengths
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.presets import real_config, tiny_config
from diffa2.run_lock import RunLock, check_fresh_run
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.checkpoints import last_complete_checkpoint
from diffa2.stages.distributed import full_state_dict
from diffa2.stages.evaluate import evaluate_test_split, evaluate_transcription
from diffa2.stages.guards import check_output_dir, estimate_run_bytes, skipped_steps
from diffa2.stages.plots import plot_loss_curve
from diffa2.stages.real_recipe import check_full_training

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class StageSpec:
    """What distinguishes one stage from another."""

    name: str  # also the default run directory: runs/<name>
    previous: str | None  # stage whose final checkpoint initialises this one ('auto')
    asr_eval: bool = False  # stage 1 reports word error rate of transcriptions
    requires_previous: bool = False  # 'auto' without the previous stage's checkpoint is an error, not a fresh start
    objective: str = "masked-diffusion loss"  # what the loss curve shows


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the repository (so recipes are found from any working directory)."""
    candidate = Path(path)
    return candidate if candidate.exists() or candidate.is_absolute() else REPO_ROOT / candidate


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------


def previous_checkpoint(model_args: ModelArguments, spec: StageSpec, output_dir: Path) -> Path | None:
    if model_args.model is None or model_args.model == "none":
        return None
    if model_args.model != "auto":
        return Path(model_args.model)
    if spec.previous is None:
        return None
    candidate = output_dir.parent / spec.previous / "final"
    if (candidate / "config.json").is_file():
        return candidate
    if spec.requires_previous:
        raise FileNotFoundError(
            f"{spec.name} starts from the {spec.previous} stage's checkpoint, but {candidate} holds none: run "
            f"`python -m diffa2.stages.{spec.previous} --output_dir {output_dir.parent / spec.previous}` first, "
            f"or pass --model PATH"
        )
    return None


def build_model(
    model_args: ModelArguments, spec: StageSpec, output_dir: Path, synth_tokenizer: Path | None
) -> tuple[DIFFA2Model, ChatFormat, str]:
    """The model this stage trains: from the previous stage's checkpoint, else from the preset."""
    init = previous_checkpoint(model_args, spec, output_dir)
    if init is not None:
        model = load_pretrained(init)
        tokenizer_dir = resolve_source(model.config.tokenizer_source, init)
        origin = f"initialised from {init}"
    elif model_args.preset == "tiny":
        if synth_tokenizer is None:
            raise ValueError("the tiny preset needs the synthetic corpus's tokenizer")
        chat = ChatFormat.from_pretrained(synth_tokenizer)
        config = tiny_config(
            chat.ids,
            len(chat.tokenizer),
            encoder_dim=model_args.tiny_encoder_dim,
            encoder_layers=model_args.tiny_encoder_layers,
            llm_dim=model_args.tiny_llm_dim,
            llm_layers=model_args.tiny_llm_layers,
            num_queries=model_args.tiny_num_queries,
            window_seconds=model_args.tiny_window_seconds,
            speech_path=model_args.speech_path,
        )
        config.tokenizer_source = str(synth_tokenizer.resolve())
        model = build_with_bases(config)
        tokenizer_dir = synth_tokenizer
        origin = "tiny preset, random initialisation"
    elif model_args.preset == "real":
        if not (model_args.whisper_path and model_args.llada_path):
            raise ValueError("the real preset needs --whisper_path and --llada_path")
        model = build_with_bases(real_config(model_args.whisper_path, model_args.llada_path))
        tokenizer_dir = Path(model_args.llada_path)
        origin = f"real preset: {model_args.whisper_path} + {model_args.llada_path}"
    else:
        raise ValueError(f"unknown preset {model_args.preset!r}; choose tiny or real")
    configure_training(model, model_args)
    set_system_prompts(model, model_args)
    chat = ChatFormat.from_pretrained(tokenizer_dir, model.config.prompt_for_training, model.config.compat)
    chat.ids.check_backbone(model.config.backbone)
    return model, chat, origin


def set_system_prompts(model: DIFFA2Model, model_args: ModelArguments) -> None:
    """The inference and training system prompts given as flags or YAML, into the config saved with the model."""
    if model_args.system_prompt is not None:
        model.config.system_prompt = model_args.system_prompt
    if model_args.training_system_prompt is not None:
        model.config.training_system_prompt = model_args.training_system_prompt


def configure_training(model: DIFFA2Model, model_args: ModelArguments) -> None:
    """The stage's speech path, LoRA and trainable parts; a pretrained base trained in full is refused unless
    allowed (`check_full_training`)."""
    model.config.speech_path = speech_path_of(model_args.speech_path)
    if model_args.lora and model.config.lora is None:
        model.add_lora(LoraSettings(r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout))
    model.set_trainable(
        encoder=model_args.train_encoder, backbone=model_args.train_backbone, adapters=model_args.train_adapters
    )
    if not model.config.uses_acoustic_path:  # the acoustic adapter is unused on the stage-1 speech path
        model.acoustic_adapter.requires_grad_(False)
    check_full_training(model, model_args.allow_full_training)


def inference_qa(model: DIFFA2Model, training_chat: ChatFormat) -> AudioQA:
    """The model answering as it will after training: with its inference system prompt, not the training one."""
    return AudioQA(model, ChatFormat(training_chat.tokenizer, model.config.system_prompt, model.config.compat))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


class StageRun:
    """One stage run's shared lifecycle: `setup()`, `train()`, `save()`, `evaluate()`, `report()`.

    What differs between recipes goes to `setup`: the training dataset and the trainer (the SFT stages,
    `runner.SFTStage`; stage 4, `vrpo.VRPOStage`, which holds a `StageRun` and adds its own steps around it).
    """

    trains_windowed_clips = False  # whether the stage's collator encodes long clips window by window

    def __init__(self, spec: StageSpec, model_args: ModelArguments, data_args: DataArguments,
                 eval_args: EvalArguments, train_args: StageTrainingArguments) -> None:
        self.spec, self.model_args, self.data_args = spec, model_args, data_args
        self.eval_args, self.train_args = eval_args, train_args
        self.output_dir = Path(train_args.output_dir)
        self.start = time.time()
        self.summary: dict = {"stage": spec.name}

    def log(self, message: str) -> None:
        print(f"[{self.spec.name}] {message}")

    # -- setup: corpus -> model -> data -> trainer, in dependency order --------------------------------

    def setup(self, make_dataset: Callable[[list], Dataset], make_trainer: Callable[[], Trainer]) -> StageRun:
        """Corpus -> model -> data -> trainer: `make_dataset(items)` gets the training items that fit,
        `make_trainer()` runs last (the model, chat, dataset and `qa` are set)."""
        check_output_dir(self.output_dir)  # fail in seconds, not after building the corpus and the model
        if self.data_args.long_audio == "window" and not self.trains_windowed_clips:
            raise ValueError(f"--long_audio window trains the SFT stages (1-3) only; the {self.spec.name} stage "
                             "cuts clips to the encoder window (--long_audio trim)")
        self.claim_output_dir()
        recipe_path = resolve_path(self.data_args.recipe)
        self.recipe = DataRecipe.load(recipe_path)
        test_file = self.eval_args.test_file or ""
        uses_synth = "{synth}" in recipe_path.read_text() or "{synth}" in test_file
        corpus = None
        if uses_synth:
            args = self.data_args
            corpus = ensure_synth_corpus(args.synth_dir, seed=args.synth_seed, size=args.synth_size)
        self.synth_dir = corpus.root if corpus else None

        self.warm_up_on_transcription()
        set_seed(self.train_args.seed)  # the tiny preset's random initialisation is part of the run's identity
        self.model, self.chat, origin = build_model(
            self.model_args, self.spec, self.output_dir, corpus.tokenizer_dir if corpus else None
        )
        trainable, total = count_parameters(self.model)
        self.log(f"model: {origin}; {trainable:,} of {total:,} parameters trainable")
        check_output_dir(self.output_dir, estimate_run_bytes(self.model, stored_keys(self.model), self.train_args))
        self.summary.update(model=origin, trainable_parameters=trainable)

        window = self.model.config.window_seconds
        self.max_seconds = min(self.recipe.max_audio_seconds or window, window)
        if self.data_args.long_audio == "window":
            # clips keep up to the limit and are encoded window by window; the checkpoint answers the same way
            self.max_seconds = self.recipe.max_audio_seconds or self.data_args.max_audio_seconds
            self.model.config.long_audio = "window"
        items, self.record_problems = load_split(
            self.recipe.train,
            synth_dir=self.synth_dir,
            seed=self.train_args.seed,
            on_error=self.data_args.on_bad_record,
        )
        for problem in self.record_problems:
            self.log(f"skipping record {problem}")
        items = self.drop_too_long(items)
        self.dataset = make_dataset(items)
        self.qa = inference_qa(self.model, self.chat)
        self.log(f"data: recipe {self.recipe.name} ({recipe_path}), {len(self.dataset):,} training items")
        self.trainer = make_trainer()
        return self

    def warm_up_on_transcription(self) -> None:
        """`--asr_warmup_steps N`: a tiny model about to start from scratch first learns to transcribe (stage 1 for
        N steps, into OUTPUT_DIR/asr_warmup), then this stage starts from that checkpoint. Without it a from-scratch
        SFT never learns the spoken words (docs/experiment-log.md)."""
        steps = self.model_args.asr_warmup_steps
        if steps == 0 or self.model_args.preset != "tiny":
            return
        if previous_checkpoint(self.model_args, self.spec, self.output_dir) is not None:
            return  # it starts from a trained checkpoint (e.g. the curriculum's stage 2)
        warm_dir = self.output_dir / "asr_warmup"
        if not (self.train_args.resume and (warm_dir / "final" / "config.json").is_file()):
            from diffa2.stages import semantic  # stage modules import this one: import the stage where it runs

            self.log(f"ASR warm-up: {steps} steps of transcription into {warm_dir}")
            summary = semantic.main(self.warmup_argv(warm_dir, steps))
            self.summary["asr_warmup"] = {k: summary.get(k) for k in ("steps", "validation_wer", "total_seconds")}
        self.model_args.model = str(warm_dir / "final")

    def warmup_argv(self, warm_dir: Path, steps: int) -> list[str]:
        """The stage-1 command line of the warm-up: this run's corpus, model sizes, seed and threads."""
        m, d, t, e = self.model_args, self.data_args, self.train_args, self.eval_args
        options = {"output_dir": warm_dir, "max_steps": steps, "synth_dir": d.synth_dir, "synth_seed": d.synth_seed,
                   "synth_size": d.synth_size, "tiny_encoder_dim": m.tiny_encoder_dim,
                   "tiny_encoder_layers": m.tiny_encoder_layers, "tiny_llm_dim": m.tiny_llm_dim,
                   "tiny_llm_layers": m.tiny_llm_layers, "tiny_num_queries": m.tiny_num_queries,
                   "tiny_window_seconds": m.tiny_window_seconds, "seed": t.seed,
                   "per_device_train_batch_size": t.per_device_train_batch_size, "eval_limit": e.eval_limit,
                   "report_to": "none", "disable_tqdm": t.disable_tqdm, "threads": torch.get_num_threads(),
                   # this run owns the folder: a fresh run replaces an earlier warm-up, a resumed one continues it
                   "resume": t.resume, "overwrite_output_dir": not t.resume}
        return [arg for key, value in options.items() if value is not None for arg in (f"--{key}", str(value))]

    def claim_output_dir(self) -> None:
        """Rank 0 locks the output folder for this process and refuses to mix with another run's checkpoints."""
        if self.train_args.process_index != 0:
            return
        self.lock = RunLock(self.output_dir, self.log).acquire()
        check_fresh_run(self.output_dir, resume=self.train_args.resume,
                        overwrite=self.train_args.overwrite_output_dir, log=self.log)

    def token_budget(self) -> TokenBudget:
        """What one training row may hold: the backbone's window, the speech tokens of a full clip, the canvas."""
        config = self.model.config
        frames = min(math.ceil(self.max_seconds * 100), 2 * int(config.encoder["max_source_positions"]))
        semantic = int(SemanticAdapter.output_lengths(encoder_lengths(torch.tensor(frames))))
        lead = config.num_queries if config.uses_acoustic_path else config.num_prompt_embeddings
        window = int(config.backbone.get("max_sequence_length", 4096))
        return TokenBudget(window, lead + semantic, self.data_args.canvas_length())

    def drop_too_long(self, items: list) -> list:
        """The items that fit the model's window and the answer canvas; the others are counted and reported, so
        no batch fails mid-run."""
        items, self.too_long = items_within(items, self.chat, self.token_budget())
        for where, reason in list(self.too_long.items())[:10]:
            self.log(f"skipping {where}: {reason}")
        if len(self.too_long) > 10:
            self.log(f"... {len(self.too_long) - 10} more items skipped as too long")
        return items

    # -- train, save, evaluate, report ------------------------------------------------------------------

    def train(self) -> None:
        resume = None
        if self.train_args.resume:
            resume = last_complete_checkpoint(self.output_dir, self.log)
            self.log(f"resuming from {resume}" if resume else f"no checkpoint in {self.output_dir}; starting fresh")
        result = self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        history = [entry for entry in self.trainer.state.log_history if "loss" in entry]
        self.summary.update(
            steps=self.trainer.state.global_step,
            train_seconds=round(result.metrics.get("train_runtime", 0.0), 1),
            final_loss=history[-1]["loss"] if history else None,
            skipped_items=len(self.dataset.stats.skipped) + len(self.record_problems) + len(self.too_long),
            too_long_items=len(self.too_long),
            skipped_steps=skipped_steps(self.trainer.state.log_history),
            trimmed_items=len(self.dataset.stats.trimmed),
            optimizer=optimizer_name(self.trainer.optimizer),
        )

    def save(self) -> Path:
        """The final checkpoint, written by the main process (under ZeRO-3 from weights every rank helps gather)."""
        final_dir = self.output_dir / "final"
        state = full_state_dict(self.trainer)  # ZeRO-3: gathered on the main process (collective); else None
        if self.trainer.is_world_process_zero():
            save_pretrained(self.model, final_dir, tokenizer=self.chat.tokenizer, state_dict=state)
            if state is not None:  # a partitioned module runs only with every rank: evaluate what was saved
                dtype = torch.bfloat16 if self.train_args.bf16 else None
                self.use_model(load_pretrained(final_dir, dtype=dtype, device=self.train_args.device))
        self.trainer.accelerator.wait_for_everyone()
        self.summary["checkpoint"] = str(final_dir)
        return final_dir

    def use_model(self, model: DIFFA2Model) -> None:
        """Evaluate `model` from now on (`save` under ZeRO-3: the whole model reloaded from `final/`)."""
        self.model = model
        self.qa = inference_qa(model, self.chat)

    def evaluate(self) -> None:
        if not self.trainer.is_world_process_zero():  # one process evaluates and reports
            return
        self.model.eval()
        args = self.eval_args
        decode = self.decode_config()
        self.summary["decoding"] = vars(decode)
        if self.spec.asr_eval and self.recipe.validation:
            items, _ = load_split(self.recipe.validation, synth_dir=self.synth_dir, seed=0, on_error="skip")
            val_set = AudioInstructionDataset(items[: args.eval_limit or 200], self.max_seconds)
            examples = [val_set[i] for i in range(len(val_set))]
            self.summary["validation_wer"] = round(evaluate_transcription(self.qa, examples, decode), 2)
        if args.test_file:
            self.summary["test"] = self.test_accuracy()

    def decode_config(self) -> DecodeConfig:
        args = self.eval_args
        return DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)

    def test_accuracy(self) -> dict:
        """Multiple-choice accuracy of the current model on `--test_file`, next to chance."""
        self.model.eval()
        args = self.eval_args
        test_file = Path(args.test_file.replace("{synth}", str(self.synth_dir)))
        return evaluate_test_split(
            self.qa, test_file, self.decode_config(), limit=args.eval_limit, batch_size=args.eval_batch_size,
            prompt=args.test_prompt,
        )

    def report(self) -> dict:
        if not self.trainer.is_world_process_zero():
            return self.summary
        log_history = self.trainer.state.log_history
        atomic_write_text(self.output_dir / "train_log.jsonl", "".join(json.dumps(e) + "\n" for e in log_history))
        plot_loss_curve([e for e in log_history if "loss" in e], self.output_dir / "loss.png",
                        title=f"{self.spec.name}: {self.spec.objective}")
        self.summary["total_seconds"] = round(time.time() - self.start, 1)
        atomic_write_json(self.output_dir / "summary.json", self.summary)
        print_summary(self.summary, self.output_dir)
        self.lock.release()  # the run is over: the folder is free (the lock goes at exit anyway)
        return self.summary


def optimizer_name(optimizer) -> str:
    """The class of the optimizer that updates the weights, under the wrappers of accelerate and DeepSpeed ZeRO
    (each keeps the one it wraps as `.optimizer`): e.g. AdamW, or DeepSpeedCPUAdam with an offloaded optimizer."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return type(optimizer).__name__


def print_summary(summary: dict, output_dir: Path) -> None:
    print(f"\n=== {summary['stage']} finished in {summary['total_seconds']:.0f} s ===")
    loss = summary["final_loss"]
    print(f"steps {summary['steps']}, final loss {loss if loss is None else round(loss, 4)}, "
          f"{summary['skipped_items']} skipped ({summary['too_long_items']} too long for the window or the answer "
          f"canvas) and {summary['trimmed_items']} trimmed items")
    if summary.get("skipped_steps"):
        print(f"{len(summary['skipped_steps'])} optimizer step(s) skipped for a NaN/inf loss or gradient: "
              f"{summary['skipped_steps']}")
    if "asr_warmup" in summary:
        warm = summary["asr_warmup"]
        print(f"ASR warm-up: {warm['steps']} steps, transcription WER {warm['validation_wer']:.1f}%, "
              f"{warm['total_seconds']:.0f} s")
    if "validation_wer" in summary:
        print(f"transcription WER on validation: {summary['validation_wer']:.1f}%")
    if "test" in summary:
        test = summary["test"]
        asked = "the question alone" if test.get("prompt") == "question" else "MMAU's prompt with the choices"
        print(f"synthetic test accuracy: {test['accuracy']:.1f}% (chance {test['chance']:.1f}%), "
              f"{test['total']} items, asked with {asked}")
        for kind, row in test["per_kind"].items():
            print(f"  {kind:<18} {row['accuracy']:5.1f}%  (chance {row['chance']:.1f}%, n={row['total']})")
    print(f"checkpoint: {summary['checkpoint']}\nloss curve: {output_dir / 'loss.png'}; "
          f"summary: {output_dir / 'summary.json'}")
