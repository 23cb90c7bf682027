"""Stage 5 (RL): rewards, group sampling, one step against a hand computation of GRPO's loss, every registered name
run or refused, dropped NaN rewards, the command end to end on the small corpus, and 2 processes under DeepSpeed
equal to one (slow). The objectives with a teacher or an allocation (OPD, SCOPE, DynaMO): tests/test_rl_objectives.py.

Left for later (issue 16): the accuracy measurements."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import clip, make_tiny_model, small_run_args
from rl_distributed_entry import LENGTH_REWARD
from safetensors.torch import load_file
from test_distributed import DEEPSPEED, free_port, launch, run_args

from diffa2.audio import LogMelFeaturizer
from diffa2.config import parse_config, read_yaml_config
from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.data.synth import format_mc_prompt
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.rl import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    LIKELIHOOD_ESTIMATORS,
    POLICY_LOSSES,
    D1Estimator,
)
from diffa2.stages import rl
from diffa2.stages.reference_models import FrozenReference
from diffa2.stages.rewards import RLItem, choices_in_prompt, get_reward, register_reward
from diffa2.stages.rollout import (
    DISTILLATION,
    PromptBatch,
    RolloutSeeds,
    group_advantages,
    make_rollout,
    rollout_loss,
    rollout_metrics,
    sample_group,
)
from diffa2.stages.runner import REPO_ROOT

RL_ENTRY = Path(__file__).parent / "rl_distributed_entry.py"
QUESTIONS = [("Is the pitch low, medium, or high?", ["high", "low", "medium"], "high"),
             ("How many beeps are there?", ["one", "two", "three"], "two")]
GROUP = 4
DECODE = DecodeConfig(gen_length=8, block_length=8, steps=4, temperature=1.0)


def prompt_batch(chat) -> PromptBatch:
    examples = [SFTExample(clip(1.0 + 0.3 * i, 300 + 100 * i, seed=i), format_mc_prompt(q, choices), target)
                for i, (q, choices, target) in enumerate(QUESTIONS)]
    collator = SFTCollator(chat, LogMelFeaturizer(n_mels=80, window_seconds=4.0))
    return PromptBatch(**rl.RLCollator(collator)(examples))


def lora_policy(chat):
    """Frozen encoder and backbone, trainable adapters, prompts and LoRA; eval mode (no dropout): deterministic."""
    model = make_tiny_model(chat)
    model.add_lora()
    model.set_trainable(encoder=False, backbone=False)
    return model.eval()


def rollout_for(chat, model, args: rl.RLArguments, seed=0, teacher=None, counts=None):
    """One rollout of the two prompts with `args`' objective and reward (and a teacher, an allocation of answers)."""
    objective = rl.resolve_objective(args, DECODE)
    prompts = prompt_batch(chat)
    return objective, make_rollout(model, FrozenReference(model), chat, prompts, objective,
                                   reward=get_reward(args.reward), group_size=args.group_size, decode=DECODE,
                                   seeds=RolloutSeeds(seed, 0, 0), teacher=teacher, counts=counts)


# --------------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------------


def test_rewards_read_the_choices_from_the_prompt_and_score_with_mmau_rule():
    prompt = format_mc_prompt("Is the pitch low, medium, or high?", ["high", "low", "medium"])
    assert choices_in_prompt(prompt) == ("high", "low", "medium") and choices_in_prompt("How loud?") == ()
    item = RLItem(prompt, "high", ("high", "low", "medium"))
    correct, fmt = get_reward("mc_correct"), get_reward("format")
    assert [correct(item, a) for a in ("high", "A. high", "high or low", "low", "")] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [fmt(item, a) for a in ("low", "high low", "loud", "")] == [1.0, 0.0, 0.0, 0.0]
    free = RLItem("How loud is the sound?", "quiet")
    assert [correct(free, a) for a in ("quiet", "Quiet.", "quiet loud", "")] == [1.0, 1.0, 0.0, 0.0]
    assert [fmt(free, a) for a in ("anything", "")] == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward 'nope'; valid names: .*format, .*mc_correct"):
        get_reward("nope")


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------


def test_group_sampling_is_reproducible_per_seed(chat):
    model = lora_policy(chat)
    prompts = prompt_batch(chat)
    rows = GROUP * len(prompts.items)
    first = sample_group(model, chat, prompts, GROUP, DECODE, RolloutSeeds(0, 0, 0).group(2, GROUP))
    again = sample_group(model, chat, prompts, GROUP, DECODE, RolloutSeeds(0, 0, 0).group(2, GROUP))
    other = sample_group(model, chat, prompts, GROUP, DECODE, RolloutSeeds(1, 0, 0).group(2, GROUP))
    assert first.shape == (rows, 8) and torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(row) for row in first.tolist()}) > 1  # temperature > 0: the group's answers differ
    assert RolloutSeeds(0, 0, 0).group(2, GROUP) != RolloutSeeds(0, 1, 0).group(2, GROUP)  # a new step, new noise
    # an answer's seed depends on its prompt's number in the global batch, not on the layout: the second of two
    # processes (its first prompt is number 2) draws what one process draws for prompts 2 and 3
    one_process = RolloutSeeds(0, 0, 0).group(4, GROUP)
    second = RolloutSeeds(0, 0, 0, first_prompt=2).group(2, GROUP)
    assert second == [one_process[g * 4 + 2 + p] for g in range(GROUP) for p in range(2)]
    assert len(set(one_process)) == len(one_process)


# --------------------------------------------------------------------------------------------------
# one step by hand
# --------------------------------------------------------------------------------------------------


def hand_logp(model, prompts: PromptBatch, answers: torch.Tensor, mask_id: int) -> torch.Tensor:
    """d1's one-step estimate by hand: every answer token masked, log-softmax at the true token, (R, L)."""
    logits = model(prompts.input_features, prompts.feature_lengths, prompts.prompt_ids, prompts.audio_slots,
                   torch.full_like(answers, mask_id), answers_per_prompt=GROUP)
    return F.log_softmax(logits.float(), -1).gather(-1, answers[..., None]).squeeze(-1)


def hand_grpo_loss(logp, old, ref, advantages, kl_coef):
    """GRPO: clipped ratio (ε 0.2), k3 KL, each the mean over tokens then over answers."""
    ratio = (logp - old).exp()
    a = advantages[:, None]
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean(-1).mean()
    delta = ref - logp
    kl = (delta.exp() - delta - 1).mean(-1).mean()
    return surrogate + kl_coef * kl, (-a * ratio.clamp(0.8, 1.2) > -a * ratio).float().mean()


def test_one_step_matches_grpo_by_hand_and_changes_only_trainable_tensors(chat):
    model = lora_policy(chat)
    args = rl.RLArguments(group_size=GROUP)
    objective, rollout = rollout_for(chat, model, args)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # rows g·P + p: prompt 0 gets 1, 0, 1, 0
    by_prompt = rewards.view(GROUP, 2).T  # (P, G)
    expected = ((by_prompt - by_prompt.mean(1, keepdim=True)) / (by_prompt.std(1, keepdim=True) + 1e-6)).T.flatten()
    advantages = group_advantages(objective, rewards, torch.arange(2).repeat(GROUP))
    assert torch.allclose(advantages, expected) and advantages[0] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6))
    rollout = dataclasses.replace(rollout, rewards=rewards, advantages=advantages)  # a fixed rollout
    old = hand_logp(model, rollout.prompts, rollout.answers, chat.ids.mask).detach()
    assert torch.allclose(rollout.old_values, old, atol=1e-6) and torch.equal(rollout.old_values, rollout.ref_values)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    loss, metrics = rollout_loss(model, rollout, objective, chat.ids.mask)
    # first update: the policy is the rollout policy and the reference, ratio 1, KL 0: loss = -mean(A) = 0
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6) and metrics["actor/kl"] == 0
    assert metrics["actor/pg_clipfrac"] == 0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if "lora_B" in n)

    loss, metrics = rollout_loss(model, rollout, objective, chat.ids.mask)  # second update on the same rollout
    logp = hand_logp(model, rollout.prompts, rollout.answers, chat.ids.mask).detach()
    expected_loss, clipped = hand_grpo_loss(logp, old, old, advantages, args.kl_coef)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-6)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(clipped.item()) and clipped > 0
    assert metrics["actor/kl"] > 0


# --------------------------------------------------------------------------------------------------
# every registered name runs one step or is refused with its reason
# --------------------------------------------------------------------------------------------------


def one_step(chat, **options) -> float:
    model = lora_policy(chat)
    teacher = None
    if options.get("advantage") in DISTILLATION:  # the teacher: another tiny model (its checkpoint path unused here)
        options["teacher"], teacher = "teacher", make_tiny_model(chat, seed=1)
    objective, rollout = rollout_for(chat, model, rl.RLArguments(group_size=2, **options), teacher=teacher)
    loss, _ = rollout_loss(model, rollout, objective, chat.ids.mask)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    return loss.item()


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss_runs_one_step(chat, name):
    assert math.isfinite(one_step(chat, policy_loss=name, reward=LENGTH_REWARD))


@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_every_aggregation_runs_one_step(chat, name):
    assert math.isfinite(one_step(chat, loss_agg_mode=name, reward=LENGTH_REWARD))


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_every_kl_estimator_runs_one_step(chat, name):
    assert math.isfinite(one_step(chat, kl=name, reward=LENGTH_REWARD))


@pytest.mark.parametrize("name", LIKELIHOOD_ESTIMATORS.names())
def test_every_likelihood_estimator_runs_one_step(chat, name):
    samples = 1 if name == "spg" else 2  # spg: one draw per decoded block, and the rollout decodes one block
    assert math.isfinite(one_step(chat, likelihood=name, likelihood_samples=samples, reward=LENGTH_REWARD))


def test_spg_with_more_draws_than_blocks_is_refused():
    with pytest.raises(NotImplementedError, match=r"--likelihood_samples 2 needs that many blocks, the rollout "
                                                  r"has 1 \(--gen_length 8 / --block_length 8\)"):
        rl.resolve_objective(rl.RLArguments(likelihood="spg", likelihood_samples=2), DECODE)


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_every_advantage_estimator_runs_one_step_or_is_refused(chat, name):
    if name in rl.SUPPORTED_ADVANTAGES:
        assert math.isfinite(one_step(chat, advantage=name, reward=LENGTH_REWARD))
        return
    with pytest.raises(NotImplementedError, match=rf"--advantage {name} needs .+: not built yet in the RL stage; "
                                                  r"choose one of grpo, dr_grpo, rloo, opd, scope, dynamo"):
        rl.resolve_objective(rl.RLArguments(advantage=name), DECODE)
    assert set(rl.REFUSED_ADVANTAGES) == set(ADVANTAGE_ESTIMATORS.names()) - set(rl.SUPPORTED_ADVANTAGES)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; valid names: .*grpo"):
        rl.RLArguments(policy_loss="ppo")
    with pytest.raises(ValueError, match=r"--elbo_form: unknown masking form 'x'"):
        rl.RLArguments(elbo_form="x")


# --------------------------------------------------------------------------------------------------
# dropped rewards
# --------------------------------------------------------------------------------------------------

CALLS = []


def nan_every_other(item: RLItem, answer: str) -> float:
    """NaN for every other answer scored (by call order), else 1."""
    CALLS.append(answer)
    return math.nan if len(CALLS) % 2 else 1.0


register_reward("test_nan_every_other")(nan_every_other)


def test_a_nan_reward_is_dropped_and_counted(chat):
    CALLS.clear()
    model = lora_policy(chat)
    objective, rollout = rollout_for(chat, model, rl.RLArguments(group_size=GROUP, reward="test_nan_every_other"))
    dropped = torch.tensor([True, False] * GROUP)
    assert torch.equal(~rollout.valid, dropped)
    assert not rollout.mask[dropped].any() and rollout.mask[~dropped].all()
    assert torch.equal(rollout.advantages[dropped], torch.zeros(GROUP))
    metrics = rollout_metrics(rollout)
    assert metrics["rollout/dropped"] == GROUP and metrics["reward/mean"] == 1.0
    loss, _ = rollout_loss(model, rollout, objective, chat.ids.mask)
    assert math.isfinite(loss.item())


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def test_refused_objective_ends_the_command_before_building_anything(tmp_path):
    with pytest.raises(SystemExit, match=r"error: --advantage dual_track needs answers in two segments"):
        rl.main(["--output_dir", str(tmp_path / "rl"), "--advantage", "dual_track"])
    assert not (tmp_path / "rl").exists()


def test_command_runs_end_to_end_and_writes_checkpoint_summary_and_reward_plot(tmp_path, small_corpus):
    CALLS.clear()
    out = tmp_path / "rl"
    summary = rl.main([*small_run_args(out, small_corpus, 2), "--model", "none", "--group_size", "2",
                       "--per_device_train_batch_size", "2", "--reward", "test_nan_every_other"])
    assert summary["steps"] == 2 and (out / "final" / "model.safetensors").is_file()
    assert (out / "reward.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    written = json.loads((out / "summary.json").read_text())
    # ppo_epochs 2: one rollout of 2 prompts x 2 answers for the two steps; every other reward was NaN
    assert len(CALLS) == 4 and written["rl_log"]["dropped_rewards"] == 2
    assert written["before"]["test"]["total"] == written["test"]["total"] == 4
    assert written["rl"]["group_size"] == 2 and written["rl"]["rollout_decoding"]["temperature"] == 0.5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first = next(entry for entry in log if "loss" in entry)
    assert {"reward/mean", "rollout/accuracy", "actor/kl", "actor/pg_clipfrac", "rollout/dropped"} <= set(first)
    assert first["actor/kl"] == 0 and first["reward/mean"] == 1.0  # step 0: the policy is the reference


def test_real_recipe_builds_its_trainer(tmp_path, real_format_bases):
    whisper, llada, recipe = real_format_bases
    real = read_yaml_config(REPO_ROOT / "stages" / "rl.yaml", rl.ARG_TYPES)
    overrides = {k: v for k, v in real.items() if k not in ("deepspeed", "bf16")}  # GPU-only settings
    args = parse_config(rl.ARG_TYPES, ["--whisper_path", str(whisper), "--llada_path", str(llada), "--model", "none",
                                       "--recipe", str(recipe), "--output_dir", str(tmp_path / "run")],
                        "test", overrides=overrides)
    stage = rl.RLStage(rl.SPEC, *args).setup()
    trainer = stage.trainer
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size) == (3e-6, 1)
    assert (trainer.rl.group_size, trainer.rl.ppo_epochs, trainer.rl.kl_coef) == (8, 2, 0.04)
    assert trainer.objective.estimator == D1Estimator(p_mask_prompt=0.0)
    assert trainer.objective.loss_agg_mode == "seq-mean-token-mean"  # GRPO's own
    assert (trainer.decode.gen_length, trainer.decode.temperature) == (32, 0.9)
    trainable = {n.split(".")[0] for n, p in stage.lifecycle.model.named_parameters() if p.requires_grad}
    assert trainable == {"semantic_adapter", "acoustic_adapter", "prompt_embeddings", "backbone"}
    assert set(trainer.reference.tensors) == {n for n, p in stage.lifecycle.model.named_parameters()
                                              if p.requires_grad}


def logged(run_dir: Path, key: str) -> list[float]:
    """The values of `key` in a run's training log, in order, where it was logged."""
    entries = map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
    return [entry[key] for entry in entries if key in entry]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, small_corpus):
    # Global batch 4 prompts x 2 answers either way: 1 process x 4, or 2 processes x 2 under torchrun + DeepSpeed
    # ZeRO-2. Every answer's decoding seed is a function of its prompt's number in the global batch and its number in
    # the group (RolloutSeeds), so both layouts sample the same answers; d1's likelihood masks every answer token (no
    # draw noise). 4 steps with 2 updates per rollout: two rollout batches, the second sampled by updated weights.
    # What is left is float32 reduction order (the all-reduce of two half-batch gradient means vs one mean).
    flags = ["--model", "none", "--group_size", "2", "--reward", LENGTH_REWARD, "--learning_rate", "1e-3"]
    one = rl.main([*run_args(tmp_path / "one", small_corpus, 4, 4), *flags])
    launch(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(RL_ENTRY),
            *run_args(tmp_path / "two", small_corpus, 4, 2), *flags, "--deepspeed", str(DEEPSPEED / "zero2.json")],
           tmp_path)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["steps"] == two["steps"] == 4
    rewards = logged(tmp_path / "one", "reward/mean")  # logged at the steps that sample: 0 and 2
    assert len(rewards) == 2 and rewards == pytest.approx(logged(tmp_path / "two", "reward/mean"), abs=1e-6)
    assert rewards[0] != rewards[1]  # the second rollout batch: other prompts, other answers
    # the KL (~1e-2) squares small log-ratio differences: measured <= 2.6e-7 apart, so 1e-6 absolute
    for key, tolerance in (("loss", {"rel": 1e-5, "abs": 1e-7}), ("actor/pg_loss", {"rel": 1e-5, "abs": 1e-7}),
                           ("actor/kl", {"abs": 1e-6})):
        a, b = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        assert len(a) == 4 and a == pytest.approx(b, **tolerance), (key, a, b)
    assert logged(tmp_path / "one", "actor/kl")[-1] > 0  # the policy moved away from the reference
    # Final weights: Adam divides each gradient by its own running size, so where a gradient is near 0 the reduction
    # order's rounding becomes an update of up to lr (tests/distributed_entry.py). Measured: 11 of 285,424 numbers
    # outside rtol 1e-4 / atol 1e-5, the largest 1.1e-4 apart (lr 1e-3); other answers would move most numbers by
    # up to lr per step.
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    apart = sum(int((~torch.isclose(wa[k], wb[k], rtol=1e-4, atol=1e-5)).sum()) for k in wa)
    assert apart <= 1e-3 * sum(t.numel() for t in wa.values())
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 5e-4
