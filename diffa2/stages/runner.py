"""The masked-diffusion SFT stages (1-3): the shared lifecycle (`lifecycle.StageRun`) with the SFT data and loss.

Also the Trainer every stage's trainer builds on (`DIFFA2Trainer`: DIFFA-2 checkpoints, the audio path's learning
rate, the non-finite guard). The lifecycle's setup helpers are re-exported here for the stages that import them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file
from transformers import Trainer

from diffa2.chat import ChatFormat
from diffa2.data.collate import SFTBatch, SFTCollator
from diffa2.data.dataset import AudioInstructionDataset
from diffa2.data.sampling import EpochSeededLengthBucketSampler, EpochSeededLengthGroupedSampler, prompt_lengths
from diffa2.diffusion.objective import sft_loss
from diffa2.modeling.checkpoint import WEIGHTS_NAME, load_stored_tensors
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.checkpoints import publish_checkpoint, staging_run_dir
from diffa2.stages.guards import NonFiniteGuard
from diffa2.stages.lifecycle import (
    REPO_ROOT,
    StageRun,
    StageSpec,
    build_model,
    configure_training,
    count_parameters,
    inference_qa,
    optimizer_name,
    previous_checkpoint,
    print_summary,
    resolve_path,
    set_system_prompts,
)

__all__ = [
    "REPO_ROOT",
    "DIFFA2Trainer",
    "DiffusionSFTTrainer",
    "SFTStage",
    "StageRun",
    "StageSpec",
    "build_model",
    "configure_training",
    "count_parameters",
    "inference_qa",
    "optimizer_name",
    "previous_checkpoint",
    "print_summary",
    "resolve_path",
    "run_stage",
    "set_system_prompts",
]


class DIFFA2Trainer(Trainer):
    """Trainer whose checkpoints are DIFFA-2 checkpoints (trained tensors + tokenizer); subclasses give the loss."""

    loss_is_scaled_for_ga = False  # our losses are per-batch means; let Trainer divide by accumulation steps

    AUDIO_PARTS = ("encoder", "semantic_adapter", "acoustic_adapter", "prompt_embeddings")
    _staging_dir: Path | None = None  # set while a checkpoint is being written (see _save_checkpoint)
    _epoch_sampler = None  # the length-grouping sampler, whose order is drawn per epoch (see _get_train_sampler)

    def __init__(self, *args, chat: ChatFormat, audio_lr_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chat = chat
        self.audio_lr_scale = audio_lr_scale
        self.nonfinite = NonFiniteGuard(self.args.max_bad_steps)
        self.add_callback(self.nonfinite)

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the audio path (encoder, adapters, prompts) at `audio_lr_scale` x the rate."""
        optimizer = super().create_optimizer(model)
        if self.audio_lr_scale == 1.0:
            return optimizer
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            for audio in (False, True):
                params = [p for p in group["params"] if (names[id(p)].split(".")[0] in self.AUDIO_PARTS) == audio]
                if params:
                    scale = self.audio_lr_scale if audio else 1.0
                    groups.append({**group, "params": params, "lr": group["lr"] * scale})
        optimizer.param_groups.clear()  # nothing has stepped yet, so there is no state to keep
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.note_loss(loss)  # the guard drops this step's update if any loss or gradient is not finite
        return loss

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler, except for the orders that group items by prompt length (Trainer cannot read lengths
        from an audio dataset), each with a shuffle seeded per epoch, so resuming is exact:
        `group_by_length` (batches of nearly equal length) and `length_buckets` (each batch from one coarse length
        bucket, kinds mixed)."""
        strategy = self.args.train_sampling_strategy
        if strategy == "batch_rebalance":
            raise ValueError("--train_sampling_strategy batch_rebalance is not supported by the audio datasets; "
                             "use length_buckets, group_by_length or random")
        if strategy not in ("group_by_length", "length_buckets"):
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        lengths = prompt_lengths(dataset.items, self.chat)
        if strategy == "group_by_length":
            self._epoch_sampler = EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths, seed)
        else:  # one optimizer step's items, on every process, come from one bucket
            step_items = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            self._epoch_sampler = EpochSeededLengthBucketSampler(step_items, lengths, seed)
        return self._epoch_sampler

    def _run_epoch(self, *args, **kwargs):
        """Trainer's epoch, with the epoch-seeded sampler told its epoch first: in the epoch a resumed run continues,
        Trainer tells it through accelerate's batch-skipping wrapper, which does not reach the sampler of a
        multi-process loader (it would draw epoch 0's order)."""
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_dir) if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed into place once complete."""
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        self._staging_dir = staging_run_dir(run_dir, step)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(self._staging_dir, ignore_errors=True)
            raise
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, DeepSpeed shards)
        if self.args.should_save:
            publish_checkpoint(run_dir, step, self.args.save_total_limit)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        weights = Path(resume_from_checkpoint) / WEIGHTS_NAME
        load_stored_tensors(model, load_file(weights), source=str(weights))


class DiffusionSFTTrainer(DIFFA2Trainer):
    """The masked-diffusion SFT loss of stages 1-3."""

    def __init__(self, *args, mask_id: int, chat: ChatFormat, loss_reduction: str, masking_form: str,
                 stop_weight: float = 1.0, **kwargs) -> None:
        super().__init__(*args, chat=chat, **kwargs)
        self.mask_id = mask_id
        self.loss_reduction = loss_reduction
        self.masking_form = masking_form
        self.stop_weight = stop_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = sft_loss(model, SFTBatch(**inputs), self.mask_id, form=self.masking_form,
                        reduction=self.loss_reduction, stop_ids=(self.chat.ids.eos, self.chat.ids.eot),
                        stop_weight=self.stop_weight)
        return (loss, None) if return_outputs else loss


class SFTStage(StageRun):
    """Stages 1-3: the shared lifecycle with the SFT dataset and the masked-diffusion trainer."""

    trains_windowed_clips = True

    def setup(self) -> SFTStage:
        super().setup(self.make_dataset, self.make_trainer)
        return self

    def make_dataset(self, items: list) -> AudioInstructionDataset:
        return AudioInstructionDataset(items, self.max_seconds, on_bad_audio=self.data_args.on_bad_audio)

    def make_trainer(self) -> DIFFA2Trainer:
        budget = self.token_budget()
        collator = SFTCollator(self.chat, self.qa.featurizer, answer_length=budget.canvas,
                               feature_cache_items=self.data_args.feature_cache_items,
                               text_window=budget.max_sequence_length - budget.speech_tokens,
                               speech_tokens=budget.speech_tokens,
                               window_seconds=self.model.config.window_seconds
                               if self.data_args.long_audio == "window" else None)
        return DiffusionSFTTrainer(
            model=self.model,
            args=self.train_args,
            train_dataset=self.dataset,
            data_collator=lambda examples: vars(collator(examples)),
            mask_id=self.chat.ids.mask,
            chat=self.chat,
            loss_reduction=self.data_args.loss_reduction,
            masking_form=self.data_args.masking_form,
            stop_weight=self.data_args.stop_token_loss_weight,
            audio_lr_scale=self.train_args.audio_lr_scale,
        )


def run_stage(spec: StageSpec, model_args: ModelArguments, data_args: DataArguments, eval_args: EvalArguments,
              train_args: StageTrainingArguments) -> dict:
    """Run one SFT stage end to end and return its summary (also written to summary.json)."""
    stage = SFTStage(spec, model_args, data_args, eval_args, train_args).setup()
    stage.train()
    stage.save()
    stage.evaluate()
    return stage.report()

