"""Stage 4: VRPO (variance-reduced preference optimisation, LLaDA 1.5) from the stage-3 checkpoint.

DPO in which each answer's log-likelihood, intractable for a masked diffusion LM, is replaced by its ELBO estimate
B̂ (the shared library `diffa2.rl`: `ElboEstimator` for the noise and the estimate, `vrpo` for the loss):

    loss = −log σ(β [(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))])

DIFFA-2's settings (NKU-HLT/DIFFA, DIFFA-2/train_vrpo.py; docs/recipes.md) are the defaults of `VRPOArguments`: β 0.2;
4 Monte-Carlo samples per answer, each one "timestep" with one mask (n_t = 4, n_yt = 1: the optimal allocation);
the k-token ELBO form (k ~ U{1..L} of the L answer positions masked, weight L/k); antithetic sampling (policy and
reference score the same masked sequences); chosen and rejected answers get independent draws. Policy and reference
both start from the stage-3 checkpoint.

The reference shares everything it can with the policy: `FrozenReference` keeps a frozen copy of the *trainable*
tensors only (adapters, prompt embeddings, LoRA; the whole model when everything trains, as in the tiny default) and
runs the policy's own module with those tensors swapped in (`torch.func.functional_call`, under `no_grad`, in eval
mode), so the frozen Whisper and LLaDA weights exist once. The reference is the stage-3 model *with* its LoRA and
adapters, so "the policy with LoRA disabled" would be the wrong reference.

Under DeepSpeed ZeRO-3 the policy's parameters are partitioned across ranks, so there is no whole module to swap
tensors into: `ZeRO3Reference` is a copy of the model as loaded, made its own DeepSpeed inference engine with the same
ZeRO-3 partitioning (as TRL's DPOTrainer builds its reference). Its forwards are collective, so every rank runs the
same policy and reference forwards in lockstep. The evaluation after training runs on the main process alone: on
the whole policy reloaded from `final/`, its reference a `FrozenReference` over that reload holding the trainable
tensors as loaded (`ZeRO3Reference.over`). `make_reference` picks the kind.

Embedded default (tiny model, synthetic preference pairs, CPU; needs the default SFT's checkpoint runs/sft/final):
    python -m diffa2.stages.sft && python -m diffa2.stages.vrpo
It prints the preference accuracy on the validation pairs and the synthetic test accuracy, before -> after.
Real DIFFA-2 recipe (the stage-3 checkpoint records its Whisper and LLaDA sources):
    torchrun --nnodes 2 --nproc_per_node 8 ... -m diffa2.stages.vrpo --config stages/vrpo.yaml
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import Trainer

from diffa2.data.collate import PairBatch, PairCollator, PairExample
from diffa2.data.dataset import PreferenceDataset
from diffa2.data.recipe import load_split
from diffa2.modeling.model import DIFFA2Model
from diffa2.rl import ElboEstimator, VRPOConfig, elbo_terms, get_likelihood_estimator, get_preference_loss
from diffa2.run_lock import RunDirError
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import stage_overrides, start_stage
from diffa2.stages.distributed import inference_engine, zero3_enabled
from diffa2.stages.real_recipe import FullTrainingRefused
from diffa2.stages.runner import DIFFA2Trainer, SFTStage, StageSpec, previous_checkpoint

VRPO_LOSS = get_preference_loss("vrpo")


@dataclass
class VRPOArguments:
    """VRPO's objective; the defaults are DIFFA-2's (`train_vrpo.py`: β 0.2, mc_steps 4, k-token ELBO)."""

    beta: float = field(default=VRPOConfig.beta, metadata={"help": "β of the DPO loss on ELBO estimates"})
    n_t: int = field(default=4, metadata={"help": "Monte-Carlo timesteps per answer (budget n = n_t x n_yt)"})
    n_yt: int = field(default=1, metadata={"help": "masks per timestep; 1 is VRPO's optimal allocation"})
    elbo_form: str = field(default="l", metadata={"help": "l: exactly k of L tokens masked, weight L/k (DIFFA-2); "
                                                          "t: each token masked w.p. t, weight 1/t"})
    antithetic: bool = field(default=True, metadata={"help": "policy and reference score the same masked answers"})
    pref_eval_samples: int = field(
        default=16, metadata={"help": "ELBO samples per answer for the before/after preference accuracy"}
    )
    pref_eval_limit: int | None = field(default=None, metadata={"help": "validation pairs evaluated (None: all)"})
    pref_eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.elbo_form not in ("l", "t"):
            raise ValueError(f"elbo_form must be 'l' or 't', got {self.elbo_form!r}")

    def estimator(self) -> ElboEstimator:
        """The training estimator: n_t timesteps x n_yt masks per answer."""
        return get_likelihood_estimator("elbo")(n_t=self.n_t, n_yt=self.n_yt, form=self.elbo_form)

    def eval_estimator(self) -> ElboEstimator:
        """The evaluation estimator: more samples, stratified over timesteps (unbiased, lower variance)."""
        return get_likelihood_estimator("elbo")(n_t=self.pref_eval_samples, form=self.elbo_form, stratified=True)


# --------------------------------------------------------------------------------------------------
# reference and ELBO scoring
# --------------------------------------------------------------------------------------------------


class FrozenReference:
    """π_ref: `model` as it is now, kept as a frozen copy of its trainable tensors only (see the module docstring).

    Calling it runs `model`'s forward with those tensors in place of the current ones, without gradients and in eval
    mode (no dropout, as DIFFA-2's reference). The copy follows the model's device and dtype on first use (so it is
    bf16 where DeepSpeed casts the model to bf16). Parameters must be whole where it runs: one process, DDP,
    ZeRO-1/2, or the main process's reload of a ZeRO-3 run's `final/` (`over`); during ZeRO-3 training the
    reference is a `ZeRO3Reference`.
    """

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        if tensors is None:
            tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.tensors = tensors

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        for name, tensor in self.tensors.items():
            self.tensors[name] = tensor.to(device=params[name].device, dtype=params[name].dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return functional_call(self.model, self.tensors, args, kwargs, strict=False)
        finally:
            self.model.train(was_training)

    def over(self, model: nn.Module) -> FrozenReference:
        """The same frozen tensors swapped into `model`: the reference for a reload of the policy (same modules)."""
        return FrozenReference(model, dict(self.tensors))


class ZeRO3Reference:
    """π_ref under ZeRO-3: a copy of the model as loaded, its own DeepSpeed inference engine (see the module docstring).

    ZeRO-3 partitions the policy's parameters, so `FrozenReference` has nothing whole to swap its tensors into. Here
    the copy is partitioned the same way and runs in eval mode under `no_grad`; every call is collective (all ranks
    make it together). The main process also keeps a `FrozenReference` snapshot of the trainable tensors, for its
    evaluation after training on the whole policy reloaded from `final/` (`over`).
    """

    def __init__(self, model: nn.Module, trainer: Trainer) -> None:
        self.snapshot = FrozenReference(model) if trainer.is_world_process_zero() else None
        self.engine = inference_engine(copy.deepcopy(model).requires_grad_(False), trainer)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.engine(*args, **kwargs)

    def over(self, model: nn.Module) -> FrozenReference:
        """The reference as a `FrozenReference` of `model`, the whole policy on the main process after training."""
        if self.snapshot is None:
            raise RuntimeError("only the main process keeps the reference's snapshot for evaluation")
        return self.snapshot.over(model)


Reference = FrozenReference | ZeRO3Reference


def make_reference(model: nn.Module, trainer: Trainer) -> Reference:
    """π_ref for `trainer`'s policy `model` as it is now (before any step): its own engine under ZeRO-3, else shared.

    Call it after `Trainer.__init__` and before `train()`, which partitions `model` under ZeRO-3.
    """
    return ZeRO3Reference(model, trainer) if zero3_enabled(trainer) else FrozenReference(model)


def answer_logprobs(model, batch: PairBatch, masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Log-probabilities `(n, 2P, La)` of the true answer tokens under `masks (n, 2P, La)` (True = [MASK]).

    Rows are the P chosen answers, then the P rejected ones. All n·2P masked answers go through one call of `model`
    (a DIFFA-2 model, a distributed wrapper of one, or a `Reference`), which computes each pair's speech and
    prompt prefix once and shares it among its 2n answers.
    """
    answers = batch.answers
    n = masks.shape[0]
    targets = answers.expand(n, -1, -1)
    noisy = torch.where(masks, torch.full_like(targets, mask_id), targets)
    logits = model(batch.input_features, batch.feature_lengths, batch.prompt_ids, batch.audio_slots,
                   noisy.flatten(0, 1), batch.answer_mask.repeat(2 * n, 1), answers_per_prompt=2 * n)
    logp = -F.cross_entropy(logits.float().transpose(1, 2), targets.flatten(0, 1), reduction="none")
    return logp.view(masks.shape)


@dataclass
class PairElbos:
    """Per-draw ELBO terms of P pairs' answers (chosen rows, then rejected) under the policy and the reference."""

    policy_terms: torch.Tensor  # (n, 2P)
    reference_terms: torch.Tensor  # (n, 2P)
    n_t: int  # timesteps; draws j·n_yt .. (j+1)·n_yt − 1 share timestep j

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """B̂_θ(y_w), B̂_θ(y_l), B̂_ref(y_w), B̂_ref(y_l), each `(P,)`: the preference loss's inputs."""
        policy_chosen, policy_rejected = self.policy_terms.mean(0).chunk(2)
        reference_chosen, reference_rejected = self.reference_terms.mean(0).chunk(2)
        return policy_chosen, policy_rejected, reference_chosen, reference_rejected

    def score_variance(self, beta: float) -> torch.Tensor | None:
        """Per pair `(P,)`, the variance of the estimated preference score ŝ = β[(B̂_θ − B̂_ref)(y_w) − (same)(y_l)].

        The n_t per-timestep terms s_j are i.i.d. and ŝ is their mean, so Var(ŝ) ≈ var_j(s_j) / n_t (unbiased
        sample variance). None when n_t = 1.
        """
        if self.n_t < 2:
            return None
        diff = (self.policy_terms - self.reference_terms).unflatten(0, (self.n_t, -1)).mean(1)  # (n_t, 2P)
        chosen, rejected = diff.chunk(2, dim=1)
        return (beta * (chosen - rejected)).var(0) / self.n_t


def pair_elbos(
    policy,
    reference: Reference,
    batch: PairBatch,
    estimator: ElboEstimator,
    mask_id: int,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
) -> PairElbos:
    """ELBO terms of every answer of `batch` under `policy` (with gradients when enabled) and `reference`.

    Chosen and rejected answers are separate rows, so they get independent draws; with `antithetic` the reference
    scores exactly the policy's draws (the library's `paired_elbo` convention), else draws of its own.
    """
    answer_mask = batch.answer_mask.repeat(2, 1)
    draws = estimator.sample(answer_mask, generator=generator)
    reference_draws = draws if antithetic else estimator.sample(answer_mask, generator=generator)
    reference_terms = elbo_terms(answer_logprobs(reference, batch, reference_draws.masks, mask_id), reference_draws)
    policy_terms = elbo_terms(answer_logprobs(policy, batch, draws.masks, mask_id), draws)
    return PairElbos(policy_terms, reference_terms, draws.n_t)


def vrpo_metrics(elbos: PairElbos, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    `vrpo/score_variance` (mean over pairs of Var(ŝ), see `PairElbos.score_variance`).
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
DEFAULTS = {
    "recipe": "data_recipes/synth_vrpo.yaml",
    "max_steps": 100,
    "per_device_train_batch_size": 4,
    "learning_rate": 2e-5,
    "warmup_steps": 0.1,
    "logging_steps": 5,
    "save_steps": 50,
}
ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, VRPOArguments, StageTrainingArguments)


class VRPOStage(SFTStage):
    """Stage 4's lifecycle: setup -> measure (before) -> train -> save -> evaluate (after) -> report."""

    def __init__(self, spec: StageSpec, model_args: ModelArguments, data_args: DataArguments,
                 eval_args: EvalArguments, vrpo_args: VRPOArguments, train_args: StageTrainingArguments) -> None:
        super().__init__(spec, model_args, data_args, eval_args, train_args)
        self.vrpo_args = vrpo_args

    def setup(self) -> VRPOStage:
        super().setup()
        self.summary["vrpo"] = vars(self.vrpo_args)
        if self.recipe.validation:
            items, _ = load_split(self.recipe.validation, synth_dir=self.synth_dir, seed=0, on_error="skip")
            items = items[: self.vrpo_args.pref_eval_limit]
            dataset = PreferenceDataset(items, self.max_seconds)
            self.validation_pairs = [dataset[i] for i in range(len(dataset))]
        else:
            self.validation_pairs = []
            self.log("the recipe has no validation pairs: no preference accuracy before/after")
        return self

    def make_dataset(self, items: list) -> PreferenceDataset:
        return PreferenceDataset(items, self.max_seconds, on_bad_audio=self.data_args.on_bad_audio)

    def make_trainer(self) -> VRPOTrainer:
        collator = PairCollator(self.chat, self.qa.featurizer, answer_length=self.data_args.canvas_length(),
                                feature_cache_items=self.data_args.feature_cache_items)
        trainer = VRPOTrainer(
            model=self.model,
            args=self.train_args,
            train_dataset=self.dataset,
            data_collator=lambda examples: vars(collator(examples)),
            chat=self.chat,
            vrpo=self.vrpo_args,
        )
        self.reference = trainer.reference
        return trainer

    def use_model(self, model: DIFFA2Model) -> None:
        """Evaluate `model` from now on, against the same reference (under ZeRO-3: the reloaded `final/`)."""
        super().use_model(model)
        self.reference = self.reference.over(model)

    def preference_accuracy(self) -> dict | None:
        if not self.validation_pairs:
            return None
        args = self.vrpo_args
        collator = PairCollator(self.chat, self.qa.featurizer, answer_length=self.data_args.canvas_length())
        return evaluate_preferences(self.model, self.reference, self.validation_pairs, collator,
                                    args.eval_estimator(), self.chat.ids.mask, beta=args.beta,
                                    batch_size=args.pref_eval_batch_size, seed=self.train_args.seed)

    def measure(self) -> dict:
        """Preference accuracy on the validation pairs and synthetic test accuracy of the model as it is now.

        Every process runs it before training, in lockstep: a `ZeRO3Reference`'s forwards are collective. It needs
        the whole policy on each device; with neither validation pairs nor a test file it measures nothing and
        leaves the model where it is (for ZeRO-3 runs whose model fits no single device).
        """
        if not self.validation_pairs and not self.eval_args.test_file:
            return {"preference": None}
        self.model.to(self.train_args.device)  # with DeepSpeed, Trainer moves the model only when training starts
        measured = {"preference": self.preference_accuracy()}
        if self.eval_args.test_file:
            measured["test"] = self.test_accuracy()
        return measured

    def run(self) -> dict:
        self.setup()
        self.summary["before"] = before = self.measure()
        if before["preference"] is not None and before["preference"]["max_log_ratio"] > 1e-3:
            raise RuntimeError(f"the reference differs from the policy before training (max |log ratio| "
                               f"{before['preference']['max_log_ratio']:.3g}): the reference snapshot is broken")
        self.train()
        self.save()
        self.evaluate()
        # the main process alone: under ZeRO-3, save() left it the whole reloaded policy and a FrozenReference of it
        self.summary["preference"] = self.preference_accuracy() if self.trainer.is_world_process_zero() else None
        return self.report()

    def report(self) -> dict:
        summary = super().report()
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
    try:
        return VRPOStage(SPEC, model_args, data_args, eval_args, vrpo_args, train_args).run()
    except (FullTrainingRefused, RunDirError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
