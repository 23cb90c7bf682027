"""Stage 4: VRPO (variance-reduced preference optimisation, LLaDA 1.5) from the stage-3 checkpoint.

DPO in which each answer's log-likelihood, intractable for a masked diffusion LM, is replaced by its ELBO estimate
B̂ (the shared library `diffa2.rl`: `ElboEstimator` for the noise and the estimate, `vrpo` for the loss):

    loss = −log σ(β [(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))])

DIFFA-2's settings (NKU-HLT/DIFFA, DIFFA-2/train_vrpo.py; docs/recipes.md) are the defaults of `VRPOArguments`: β 0.2;
4 Monte-Carlo samples per answer, each one "timestep" with one mask (n_t = 4, n_yt = 1: the optimal allocation);
the k-token ELBO form (k ~ U{1..L} of the L answer positions masked, weight L/k); antithetic sampling (policy and
reference score the same masked sequences); chosen and rejected answers get independent draws. Policy and reference
both start from the stage-3 checkpoint.

The reference is the stage-3 model as loaded, frozen (`reference_models`: a snapshot of the trainable tensors swapped
into the policy's own module, or under ZeRO-3 an inference engine of its own). The stage composes the shared
lifecycle (`lifecycle.StageRun`: corpus, model, data, train, save, evaluate, report) with its preference data, its
trainer and the preference accuracy before and after training.

Embedded default (tiny model, synthetic preference pairs, CPU; needs the default SFT's checkpoint runs/sft/final):
    python -m diffa2.stages.sft && python -m diffa2.stages.vrpo
It prints the preference accuracy on the validation pairs and the synthetic test accuracy, before -> after.
Real DIFFA-2 recipe (the stage-3 checkpoint records its Whisper and LLaDA sources):
    torchrun --nnodes 2 --nproc_per_node 8 ... -m diffa2.stages.vrpo --config stages/vrpo.yaml
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffa2.data.collate import PairBatch, PairCollator, PairExample
from diffa2.data.dataset import PreferenceDataset
from diffa2.data.recipe import load_split
from diffa2.likelihood import answer_token_logprobs
from diffa2.modeling.model import DIFFA2Model
from diffa2.rl import (
    ElboEstimator,
    ElboPair,
    VRPOConfig,
    get_likelihood_estimator,
    get_preference_loss,
    masking_form,
    paired_elbo,
)
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import StageDefaults, refusals_end_the_command, stage_overrides, start_stage
from diffa2.stages.lifecycle import StageRun, StageSpec, previous_checkpoint
from diffa2.stages.reference_models import Reference, make_reference
from diffa2.stages.runner import DIFFA2Trainer

VRPO_LOSS = get_preference_loss("vrpo")


@dataclass
class VRPOArguments:
    """VRPO's objective; the defaults are DIFFA-2's (`train_vrpo.py`: β 0.2, mc_steps 4, k-token ELBO)."""

    beta: float = field(default=VRPOConfig.beta, metadata={"help": "β of the DPO loss on ELBO estimates"})
    n_t: int = field(default=4, metadata={"help": "Monte-Carlo timesteps per answer (budget n = n_t x n_yt)"})
    n_yt: int = field(default=1, metadata={"help": "masks per timestep; 1 is VRPO's optimal allocation"})
    elbo_form: str = field(default="count", metadata={"help": "count: exactly k of L tokens masked, weight L/k "
                                                              "(DIFFA-2); ratio: each token masked w.p. t, weight 1/t "
                                                              "(as --masking_form; aliases l = count, t = ratio)"})
    antithetic: bool = field(default=True, metadata={"help": "policy and reference score the same masked answers"})
    pref_eval_samples: int = field(
        default=16, metadata={"help": "ELBO samples per answer for the before/after preference accuracy"}
    )
    pref_eval_limit: int | None = field(default=None, metadata={"help": "validation pairs evaluated (None: all)"})
    pref_eval_batch_size: int = 8

    def __post_init__(self) -> None:
        try:
            self.elbo_form = masking_form(self.elbo_form)
        except ValueError as err:
            raise ValueError(f"--elbo_form: {err}") from None

    def estimator(self) -> ElboEstimator:
        """The training estimator: n_t timesteps x n_yt masks per answer."""
        return get_likelihood_estimator("elbo")(n_t=self.n_t, n_yt=self.n_yt, form=self.elbo_form)

    def eval_estimator(self) -> ElboEstimator:
        """The evaluation estimator: more samples, stratified over timesteps (unbiased, lower variance)."""
        return get_likelihood_estimator("elbo")(n_t=self.pref_eval_samples, form=self.elbo_form, stratified=True)


# --------------------------------------------------------------------------------------------------
# reference and ELBO scoring
# --------------------------------------------------------------------------------------------------


def answer_logprobs(model, batch: PairBatch, masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Log-probabilities `(n, 2P, La)` of the true answer tokens under `masks (n, 2P, La)` (True = [MASK]).

    Rows are the P chosen answers, then the P rejected ones: `answer_token_logprobs` over the pairs, so each pair's
    speech and prompt prefix is computed once and shared among its 2n answers.
    """
    return answer_token_logprobs(model, batch, batch.answers, masks, mask_id, batch.answer_mask.repeat(2, 1))


def pair_elbos(
    policy,
    reference: Reference,
    batch: PairBatch,
    estimator: ElboEstimator,
    mask_id: int,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
) -> ElboPair:
    """ELBO terms of every answer of `batch` under `policy` (with gradients when enabled) and `reference`.

    The library's `paired_elbo` with batched forwards (`answer_logprobs`: all draws of a batch in one call). Rows are
    the chosen answers, then the rejected ones, so they get independent draws; with `antithetic` the reference
    scores exactly the policy's draws, else draws of its own.
    """
    return paired_elbo(
        lambda masks, _: answer_logprobs(policy, batch, masks, mask_id),
        lambda masks, _: answer_logprobs(reference, batch, masks, mask_id),
        batch.answer_mask.repeat(2, 1),
        estimator,
        antithetic=antithetic,
        generator=generator,
        batched=True,
    )


def vrpo_metrics(elbos: ElboPair, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair VRPO losses `(P,)` and the batch's metrics (implicit rewards, ELBOs, score variance)."""
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = elbos.scores()
    losses, metrics = VRPO_LOSS(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                config=VRPOConfig(beta=beta))
    metrics["elbo/chosen"] = policy_chosen.detach().mean()
    metrics["elbo/rejected"] = policy_rejected.detach().mean()
    variance = elbos.score_variance(beta)
    if variance is not None:
        metrics["vrpo/score_variance"] = variance.detach().mean()
    return losses, metrics


# --------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------


class VRPOTrainer(DIFFA2Trainer):
    """Trainer whose loss is VRPO; logs the implicit rewards, preference accuracy and the estimator's variance.

    Metrics of every batch since the last log (averaged over processes) are averaged into the next training log
    entry: `rewards/{chosen,rejected,margins,accuracies}`, `elbo/{chosen,rejected}` (the policy's B̂) and
    `vrpo/score_variance` (mean over pairs of Var(ŝ), see `ElboPair.score_variance`).
    """

    def __init__(self, *args, chat, vrpo: VRPOArguments, **kwargs) -> None:
        super().__init__(*args, chat=chat, **kwargs)
        self.reference = make_reference(self.model, self)  # the model as loaded: the stage-3 checkpoint
        self.vrpo = vrpo
        self.estimator = vrpo.estimator()
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        elbos = pair_elbos(model, self.reference, PairBatch(**inputs), self.estimator, self.chat.ids.mask,
                           antithetic=self.vrpo.antithetic)
        losses, metrics = vrpo_metrics(elbos, self.vrpo.beta)
        names = sorted(metrics)
        values = self.accelerator.reduce(torch.stack([metrics[k].float() for k in names]), reduction="mean")
        for name, value in zip(names, values.tolist(), strict=True):
            self._metrics[name].append(value)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{name: sum(v) / len(v) for name, v in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module,
    reference: Reference,
    examples: list[PairExample],
    collator: PairCollator,
    estimator: ElboEstimator,
    mask_id: int,
    *,
    beta: float,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Preference accuracy of `model` on pairs, with seeded draws (the same before and after training).

    - `accuracy`: % of pairs whose chosen answer has the higher ELBO under the model, B̂_θ(y_w) > B̂_θ(y_l);
    - `reward_accuracy`, `reward_margin`: DPO's implicit-reward accuracy and mean margin against the reference
      (antithetic draws); both are 0 while the model is the reference;
    - `max_log_ratio`: max |B̂_θ − B̂_ref| over answers: 0 before training (the "ratio is 1" sanity check).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size]).to(device)
        parts.append(pair_elbos(model, reference, batch, estimator, mask_id, generator=generator).scores())
    model.train(was_training)
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (
        torch.cat(scores) for scores in zip(*parts, strict=True)
    )
    _, metrics = VRPO_LOSS(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                           config=VRPOConfig(beta=beta))
    log_ratio = torch.cat([policy_chosen - reference_chosen, policy_rejected - reference_rejected])
    return {
        "pairs": len(examples),
        "mc_samples": estimator.budget,
        "accuracy": 100 * (policy_chosen > policy_rejected).float().mean().item(),
        "elbo_margin": (policy_chosen - policy_rejected).mean().item(),
        "reward_accuracy": 100 * metrics["rewards/accuracies"].item(),
        "reward_margin": metrics["rewards/margins"].item(),
        "max_log_ratio": log_ratio.abs().max().item(),
    }


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


SPEC = StageSpec(name="vrpo", previous="sft", requires_previous=True, objective="VRPO loss")


# The embedded default: 100 steps of 4 pairs (400 of the 1000 synthetic pairs); lr 2e-5 keeps the policy near the
# reference. On the SFT default (62.2 %) lr 1e-4 made the ELBOs of both answers fall and broke decoding (test
# accuracy 9.7 %); 2e-5 kept it (61.1 %) while the ELBO margin grew 2.37 -> 3.08 (docs/experiment-log.md).
@dataclass(frozen=True)
class VRPODefaults(StageDefaults):
    """Stage 4's embedded defaults (`--config` and flags override them)."""

    recipe: str = "data_recipes/synth_vrpo.yaml"
    max_steps: int = 100
    per_device_train_batch_size: int = 4
    learning_rate: float = 2e-5
    warmup_steps: float = 0.1
    logging_steps: int = 5
    save_steps: int = 50


DEFAULTS = VRPODefaults()
ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, VRPOArguments, StageTrainingArguments)


class VRPOStage:
    """Stage 4's recipe: setup -> measure (before) -> train -> save -> evaluate (after) -> report.

    It composes the shared lifecycle (`self.lifecycle`, a `StageRun`) with its preference data and trainer, and adds the
    preference accuracy on the validation pairs before and after training.
    """

    def __init__(self, spec: StageSpec, model_args: ModelArguments, data_args: DataArguments,
                 eval_args: EvalArguments, vrpo_args: VRPOArguments, train_args: StageTrainingArguments) -> None:
        self.lifecycle = StageRun(spec, model_args, data_args, eval_args, train_args)
        self.vrpo_args = vrpo_args

    @property
    def model(self) -> DIFFA2Model:
        return self.lifecycle.model

    @property
    def trainer(self) -> VRPOTrainer:
        return self.lifecycle.trainer

    def setup(self) -> VRPOStage:
        run = self.lifecycle
        run.setup(self.make_dataset, self.make_trainer)
        run.summary["vrpo"] = vars(self.vrpo_args)
        if run.recipe.validation:
            items, _ = load_split(run.recipe.validation, synth_dir=run.synth_dir, seed=0, on_error="skip")
            items = items[: self.vrpo_args.pref_eval_limit]
            dataset = PreferenceDataset(items, run.max_seconds)
            self.validation_pairs = [dataset[i] for i in range(len(dataset))]
        else:
            self.validation_pairs = []
            run.log("the recipe has no validation pairs: no preference accuracy before/after")
        return self

    def make_dataset(self, items: list) -> PreferenceDataset:
        run = self.lifecycle
        return PreferenceDataset(items, run.max_seconds, on_bad_audio=run.data_args.on_bad_audio)

    def make_trainer(self) -> VRPOTrainer:
        run = self.lifecycle
        collator = PairCollator(run.chat, run.qa.featurizer, answer_length=run.data_args.canvas_length(),
                                feature_cache_items=run.data_args.feature_cache_items)
        trainer = VRPOTrainer(
            model=run.model,
            args=run.train_args,
            train_dataset=run.dataset,
            data_collator=lambda examples: vars(collator(examples)),
            chat=run.chat,
            vrpo=self.vrpo_args,
        )
        self.reference = trainer.reference
        return trainer

    def preference_accuracy(self) -> dict | None:
        if not self.validation_pairs:
            return None
        args, run = self.vrpo_args, self.lifecycle
        collator = PairCollator(run.chat, run.qa.featurizer, answer_length=run.data_args.canvas_length())
        return evaluate_preferences(run.model, self.reference, self.validation_pairs, collator,
                                    args.eval_estimator(), run.chat.ids.mask, beta=args.beta,
                                    batch_size=args.pref_eval_batch_size, seed=run.train_args.seed)

    def measure(self) -> dict:
        """Preference accuracy on the validation pairs and synthetic test accuracy of the model as it is now.

        Every process runs it before training, in lockstep: a `ZeRO3Reference`'s forwards are collective. It needs
        the whole policy on each device; with neither validation pairs nor a test file it measures nothing and
        leaves the model where it is (for ZeRO-3 runs whose model fits no single device).
        """
        run = self.lifecycle
        if not self.validation_pairs and not run.eval_args.test_file:
            return {"preference": None}
        run.model.to(run.train_args.device)  # with DeepSpeed, Trainer moves the model only when training starts
        measured = {"preference": self.preference_accuracy()}
        if run.eval_args.test_file:
            measured["test"] = run.test_accuracy()
        return measured

    def save(self) -> Path:
        """The final checkpoint; under ZeRO-3 the main process goes on with the whole policy reloaded from it, and
        the reference follows it (the same frozen tensors swapped into the reload)."""
        run = self.lifecycle
        trained = run.model
        final_dir = run.save()
        if run.model is not trained:
            self.reference = self.reference.over(run.model)
        return final_dir

    def run(self) -> dict:
        run = self.lifecycle
        self.setup()
        run.summary["before"] = before = self.measure()
        if before["preference"] is not None and before["preference"]["max_log_ratio"] > 1e-3:
            raise RuntimeError(f"the reference differs from the policy before training (max |log ratio| "
                               f"{before['preference']['max_log_ratio']:.3g}): the reference snapshot is broken")
        run.train()
        self.save()
        run.evaluate()
        # the main process alone: under ZeRO-3, save() left it the whole reloaded policy and a FrozenReference of it
        run.summary["preference"] = self.preference_accuracy() if run.trainer.is_world_process_zero() else None
        return self.report()

    def report(self) -> dict:
        summary = self.lifecycle.report()
        before, after = summary["before"], summary["preference"]
        if after is not None:
            pref = before["preference"]
            print(f"preference accuracy on {after['pairs']} validation pairs (ELBO of chosen > rejected, "
                  f"{after['mc_samples']} samples): {pref['accuracy']:.1f}% -> {after['accuracy']:.1f}%; "
                  f"ELBO margin {pref['elbo_margin']:.2f} -> {after['elbo_margin']:.2f}")
            print(f"implicit-reward accuracy vs the reference after training: {after['reward_accuracy']:.1f}% "
                  f"(margin {after['reward_margin']:.3f})")
        if "test" in before and "test" in summary:
            print(f"synthetic test accuracy: {before['test']['accuracy']:.1f}% -> {summary['test']['accuracy']:.1f}% "
                  f"(chance {summary['test']['chance']:.1f}%)")
        return summary


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, eval_args, vrpo_args, train_args = start_stage(
        ARG_TYPES, argv, __doc__, overrides=stage_overrides(SPEC.name, DEFAULTS, argv)
    )
    try:  # before anything is built: without the stage-3 checkpoint, say what to run (no traceback)
        previous_checkpoint(model_args, SPEC, Path(train_args.output_dir))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    with refusals_end_the_command():
        return VRPOStage(SPEC, model_args, data_args, eval_args, vrpo_args, train_args).run()


if __name__ == "__main__":
    main()
