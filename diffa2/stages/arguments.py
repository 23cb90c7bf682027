"""Typed options of the training stages; defaults are the embedded tiny default; `--preset real` or `--config
stages/<stage>.yaml` give DIFFA-2's real recipe (one source: `diffa2.stages.real_recipe`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from diffa2.audio import DEFAULT_MAX_AUDIO_SECONDS
from diffa2.data.synth import ANSWER_TOKENS
from diffa2.stages.distributed import cpu_multiprocess, gloo_deepspeed_state
from diffa2.stages.evaluate import TestPrompt


@dataclass
class ModelArguments:
    preset: str = field(
        default="tiny",
        metadata={"help": "tiny (embedded default, trained from scratch) or real (DIFFA-2's recipe for this stage as "
                          "defaults: diffa2/stages/real_recipe.py, the same values as stages/<stage>.yaml)"},
    )
    whisper_path: str | None = field(
        default=None, metadata={"help": "real preset: HF Whisper directory or OpenAI .pt (e.g. whisper-large-v3)"}
    )
    llada_path: str | None = field(default=None, metadata={"help": "real preset: LLaDA-8B-Instruct directory"})
    model: str | None = field(
        default="auto",
        metadata={"help": "the checkpoint to start from; 'auto' = the previous stage's, runs/<previous stage>/final, "
                          "if it exists; 'none' = build from --preset",
                  "aliases": ["--init_from", "--init-from"]},
    )
    speech_path: int = field(default=2, metadata={"help": "1: prompt embeddings + semantic; 2: acoustic + semantic"})
    lora: bool = field(default=False, metadata={"help": "add LoRA to the backbone (stages 3-4)"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_encoder: bool = field(default=True, metadata={"help": "train the Whisper encoder (tiny: it starts random)"})
    train_backbone: bool = field(default=True, metadata={"help": "train all backbone weights (LoRA trains anyway)"})
    train_adapters: bool = True
    allow_full_training: bool = field(
        default=False,
        metadata={"help": "allow training a pretrained Whisper encoder or LLaDA backbone in full (refused otherwise: "
                          "DIFFA-2 keeps both frozen)"},
    )
    tiny_encoder_dim: int = 64
    tiny_encoder_layers: int = 2
    tiny_llm_dim: int = 128
    tiny_llm_layers: int = 4
    tiny_num_queries: int = 8
    tiny_window_seconds: float = field(
        default=4.0, metadata={"help": "tiny preset: the encoder's window in seconds (a positive multiple of 10 ms)"})
    asr_warmup_steps: int = field(
        default=0,
        metadata={"help": "tiny preset from scratch: first train this many steps of transcription on the "
                          "prompt-embedding speech path (stage 1 in miniature, into OUTPUT_DIR/asr_warmup), then start "
                          "from it; 0 = off. The embedded SFT default uses it (docs/experiment-log.md)"},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt the model answers with, stored in its config (default: the "
                                        "checkpoint's, else 'You are a helpful voice assistant.')"},
    )
    training_system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt training items are built with, stored in the config (default: "
                                        "the checkpoint's, else the same as --system_prompt)"},
    )


AnswerCanvas = Literal["fixed", "batch"]
LongAudio = Literal["trim", "window"]


@dataclass
class DataArguments:
    recipe: str = field(default="data_recipes/synth_sft.yaml", metadata={"help": "data recipe YAML"})
    synth_dir: str = field(default="data/synth", metadata={"help": "synthetic corpus directory ({synth} in recipes)"})
    synth_seed: int = field(default=0, metadata={"help": "seed of the synthetic corpus (built when missing)"})
    synth_size: str = field(default="default", metadata={"help": "size of the synthetic corpus: default or small"})
    answer_canvas: AnswerCanvas = field(
        default="fixed",
        metadata={"help": "fixed (--answer_length tokens per item, the tiny default) or batch (the batch's longest "
                          "answer, the others EOS-padded, as DIFFA-2 pads)"},
    )
    answer_length: int = field(
        default=ANSWER_TOKENS, metadata={"help": "fixed canvas: answer tokens per item incl. <|eot_id|> + EOS padding"}
    )
    on_bad_audio: str = field(default="skip", metadata={"help": "skip (count and report) or error"})
    on_bad_record: str = field(default="skip", metadata={"help": "skip (count and report) or raise"})
    feature_cache_items: int = field(
        default=4096, metadata={"help": "clips whose log-mel features stay cached in memory (0 = off)"}
    )
    masking_form: str = field(
        default="count", metadata={"help": "ratio (LLaDA SFT: p ~ U, weight 1/p) or count (k ~ U{1..L}, weight L/k)"}
    )
    stop_token_loss_weight: float = field(
        default=0.1,
        metadata={"help": "loss weight of EOS-padding and end-of-turn targets (1.0 = LLaDA; the tiny default "
                          "learns its answers faster at 0.1, docs/experiment-log.md)"},
    )
    loss_reduction: str = field(default="per_sample", metadata={"help": "per_sample (LLaDA) or batch (DIFFA code)"})
    long_audio: LongAudio = field(
        default="trim",
        metadata={"help": "a training clip longer than the encoder window: trim (cut to it, DIFFA-2's way) or window "
                          "(encoded in consecutive windows whose speech spans are joined, as at inference; SFT stages "
                          "only; recorded in the checkpoint's config; docs/long-audio.md)"},
    )
    max_audio_seconds: float = field(
        default=DEFAULT_MAX_AUDIO_SECONDS,
        metadata={"help": "with --long_audio window: longer training clips are cut to this many seconds (counted as "
                          "trimmed)"},
    )

    def canvas_length(self) -> int | None:
        """The fixed answer canvas in tokens, or None for a canvas as wide as each batch's longest answer."""
        return self.answer_length if self.answer_canvas == "fixed" else None


@dataclass
class EvalArguments:
    test_file: str | None = field(
        default="{synth}/test_mmau.json", metadata={"help": "MMAU-format test split evaluated after training"}
    )
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N test items only"})
    test_prompt: TestPrompt = field(
        default="choices",
        metadata={"help": "choices (MMAU's prompt with the lettered choices) or question (the question alone, as "
                          "stages 1-2 train); both scored with MMAU's rule against the choices"},
    )
    eval_batch_size: int = 32
    gen_length: int = ANSWER_TOKENS
    block_length: int = ANSWER_TOKENS
    steps: int = field(
        default=ANSWER_TOKENS,
        metadata={"help": "decoding steps of the end-of-stage evaluation (training steps: --max_steps)",
                  "aliases": ["--decode_steps", "--decode-steps"]},
    )


@dataclass
class StageTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with the embedded default's values."""

    output_dir: str = field(default="runs/sft", metadata={"help": "where checkpoints, logs and plots go"})
    max_steps: int = 1600  # 800 steps: 62.2 %, 1600: 80.3 % on the synthetic test split (docs/experiment-log.md)
    per_device_train_batch_size: int = 32
    learning_rate: float = 3e-4  # higher rates leave every cue but background noise unlearned (docs/experiment-log.md)
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = 2
    report_to: str | list[str] = field(default_factory=lambda: ["tensorboard"])
    remove_unused_columns: bool = False
    dataloader_num_workers: int = 0
    seed: int = 42
    disable_tqdm: bool = False
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds another run's checkpoints, "
                                         "deleting them (without it such a run is refused)"}
    )
    train_sampling_strategy: str = field(
        default="random",
        metadata={"help": "training order: random, sequential, group_by_length (batches of nearly equal prompt "
                          "length) or length_buckets (each batch from one coarse prompt-length bucket, kinds mixed; "
                          "pads less than random)",
                  "choices": ["random", "sequential", "group_by_length", "length_buckets", "batch_rebalance"]},
    )
    max_bad_steps: int = field(
        default=10, metadata={"help": "stop after this many optimizer steps in a row with a NaN/inf loss or gradient "
                                      "(each such step is skipped: no update)"}
    )
    audio_lr_scale: float = field(
        default=1.0, metadata={"help": "learning-rate multiplier of the audio path (encoder, adapters, prompts)"}
    )

    def __post_init__(self) -> None:
        # Several CPU processes without DeepSpeed: accelerate sets up DDP over gloo only when told the device is the
        # CPU (`PartialState(cpu=True)`); otherwise every process would train alone on the same data.
        # With DeepSpeed, accelerate finds no backend on a CPU-only machine and counts one process: hand it a
        # process group on gloo instead (its documented `use_configured_state` route).
        if cpu_multiprocess():
            if self.deepspeed:
                gloo_deepspeed_state(self.ddp_timeout)
                self.accelerator_config = {**(self.accelerator_config or {}), "use_configured_state": True}
            else:
                self.use_cpu = True
        super().__post_init__()
