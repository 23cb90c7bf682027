"""Stage 5 (RL), the objectives that need more than one reward: OPD and SCOPE (a teacher's likelihood of the student's
answers), DynaMO (rollouts allocated across prompts, advantages modulated per token). One step on tiny models against
a hand computation of the loss for a fixed rollout, the allocation's budget, the refusals, and each command end to end.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_model, small_run_args
from rl_distributed_entry import LENGTH_REWARD
from test_rl_stage import DECODE, GROUP, hand_logp, logged, lora_policy, rollout_for

from diffa2.rl import AdvantageInputs, get_advantage_estimator
from diffa2.stages import rl, sft
from diffa2.stages.rollout import RolloutAllocator, distillation_advantages, rollout_loss
from diffa2.validation import OptionError

PROMPTS = 2


def snapshot(model) -> tuple[dict, dict]:
    """Copies of the frozen and of the trainable tensors."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def sgd_step(model, loss) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def mean_loss_at_ratio_one(advantages: torch.Tensor) -> float:
    """GRPO's loss (seq-mean-token-mean) at ratio 1 (policy = rollout policy): mean of -A over tokens, answers."""
    return (-advantages).mean(-1).mean().item()


# --------------------------------------------------------------------------------------------------
# OPD and SCOPE
# --------------------------------------------------------------------------------------------------


def distill_rollout(chat, advantage: str):
    student, teacher = lora_policy(chat), make_tiny_model(chat, seed=1)
    args = rl.RLArguments(group_size=GROUP, advantage=advantage, teacher="teacher")
    objective, rollout = rollout_for(chat, student, args, teacher=teacher)
    s = hand_logp(student, rollout.prompts, rollout.answers, chat.ids.mask).detach()
    t = hand_logp(teacher, rollout.prompts, rollout.answers, chat.ids.mask).detach()
    return student, teacher, objective, rollout, s, t


def test_opd_step_matches_the_hand_computation_and_changes_only_the_students_trainable_tensors(chat):
    student, teacher, objective, rollout, s, t = distill_rollout(chat, "opd")
    assert rollout.mask.all() and rollout.old_values.shape == s.shape == (GROUP * PROMPTS, 8)
    assert torch.allclose(rollout.old_values, s, atol=1e-6)
    # OPD (λ 1, γ 0): A_t = -(log π_S(y_t) - log π_T(y_t)) on the student's own tokens, the teacher scored by hand
    assert torch.allclose(rollout.token_advantages, t - s, atol=1e-5)
    assert rollout.metrics["distill/reverse_kl"] == pytest.approx((s - t).mean().item(), abs=1e-5)
    assert (rollout.token_advantages != 0).all()
    frozen, trainable = snapshot(student)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    loss, metrics = rollout_loss(student, rollout, objective, chat.ids.mask)
    # first update: ratio 1 and KL 0, so the loss is the mean of -A = mean(log π_S - log π_T), the reverse KL
    assert loss.item() == pytest.approx(mean_loss_at_ratio_one(t - s), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx((s - t).mean().item(), rel=1e-5, abs=1e-6) and metrics["actor/kl"] == 0
    sgd_step(student, loss)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable[n]) for n, p in student.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    # second update on the same rollout: GRPO's clipped surrogate with the per-token advantages, + 0.04 x k3 KL
    loss, _ = rollout_loss(student, rollout, objective, chat.ids.mask)
    logp = hand_logp(student, rollout.prompts, rollout.answers, chat.ids.mask).detach()
    ratio, a = (logp - s).exp(), t - s
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).mean(-1).mean()
    kl = ((s - logp).exp() - (s - logp) - 1).mean(-1).mean()
    assert loss.item() == pytest.approx((surrogate + 0.04 * kl).item(), rel=1e-5, abs=1e-6) and kl > 0


def scope_by_hand(s: torch.Tensor, t: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """SCOPE's advantages written out: per (prompt, correctness) pool, weights |pool| · softmax of the perplexities
    (the student's for correct answers, the teacher's for wrong ones); correct answers get their weight on every token,
    wrong ones -weight · (log π_S - log π_T)."""
    rows = len(s)
    student_ppl, teacher_ppl = (-s.mean(-1)).exp(), (-t.mean(-1)).exp()
    weights = torch.empty(rows)
    for prompt in range(PROMPTS):
        for right in (True, False):
            pool = [r for r in range(rows) if r % PROMPTS == prompt and bool(correct[r]) == right]
            scores = (student_ppl if right else teacher_ppl)[pool]
            weights[pool] = len(pool) * torch.softmax(scores, 0)
    return torch.where(correct[:, None].bool(), weights[:, None].expand_as(s), -weights[:, None] * (s - t))


def test_scope_routes_by_correctness_and_its_step_matches_the_hand_computation(chat):
    student, _, objective, rollout, s, t = distill_rollout(chat, "scope")
    # the random student answers nothing right: every answer is distilled, weighted by the teacher's perplexity
    assert not rollout.correct.any()
    assert torch.allclose(rollout.token_advantages, scope_by_hand(s, t, rollout.correct), atol=1e-5)
    # a fixed rollout with right and wrong answers in each group (rows g·P + p): prompt 0 gets 1, 1, 0, 0 and
    # prompt 1 gets 0, 1, 0, 1, so every (prompt, correctness) pool holds two answers
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    advantages, metrics = distillation_advantages(objective, rollout.old_values, t, rollout.mask, rollout.index,
                                                  correct)
    expected = scope_by_hand(s, t, correct)
    assert torch.allclose(advantages, expected, atol=1e-5) and metrics["distill/correct_fraction"] == 0.5
    assert torch.allclose(advantages[correct].mean(-1).sum(), torch.tensor(4.0))  # weights: mean 1 in each pool
    rollout = dataclasses.replace(rollout, correct=correct.float(), token_advantages=advantages)
    frozen, _ = snapshot(student)
    loss, _ = rollout_loss(student, rollout, objective, chat.ids.mask)
    assert loss.item() == pytest.approx(mean_loss_at_ratio_one(expected), rel=1e-5, abs=1e-6)
    sgd_step(student, loss)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)


# --------------------------------------------------------------------------------------------------
# DynaMO
# --------------------------------------------------------------------------------------------------


def test_dynamo_allocation_spends_the_budget_exactly_by_the_variance_proxy():
    allocator = RolloutAllocator(group_size=4)
    keys = ["a", "b", "c", "d"]
    assert allocator.bounds == (2, 6)
    assert allocator.allocate(keys).tolist() == [4, 4, 4, 4]  # unseen prompts: group_size each (exploration)
    # one rollout, 4 answers each (rows g·P + p): the batch mean is 7/16, so the answers rewarded 1 beat it
    rewards = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]).T.flatten()
    allocator.update(keys, torch.arange(4).repeat(4), rewards)
    assert allocator.rates == {"a": 0.5, "b": 1.0, "c": 0.0, "d": 0.25} and set(allocator.samples.values()) == {4}
    # priorities 4·acc·(1 - acc) floored at 0.01, mastered (>= 0.85) at the floor: 1, 0.01, 0.01, 0.75. Each gets
    # n_min = 2; the 8 left go by priority (largest remainder: 5, 0, 0, 3), capped at n_max = 6, then the last one
    allocation = allocator.allocate(keys)
    assert allocation.tolist() == [6, 2, 2, 6] and int(allocation.sum()) == 16
    # a new prompt beside a seen one: 4 for the new (exploration), 2 for the seen, the 2 left split evenly
    assert allocator.allocate(["a", "new"]).tolist() == [3, 5]


def test_allocated_rollout_spends_the_counts_and_samples_the_answers_the_group_layout_samples(chat):
    model = lora_policy(chat)
    args = rl.RLArguments(group_size=2, advantage="dynamo")
    _, grouped = rollout_for(chat, model, args)  # rows g·P + p: (0, 0), (1, 0), (0, 1), (1, 1)
    _, allocated = rollout_for(chat, model, args, counts=torch.tensor([3, 1]))  # (0, 0), (0, 1), (0, 2), (1, 0)
    assert allocated.index.tolist() == [0, 0, 0, 1] and len(allocated.prompts.items) == 4
    assert [item.target for item in allocated.prompts.items] == ["high", "high", "high", "two"]
    # an answer's seed is its prompt's and its number's: the same answers whatever the layout
    assert torch.equal(allocated.answers[[0, 1, 3]], grouped.answers[[0, 2, 1]])
    assert allocated.answers.shape == (4, 8) and allocated.old_values.shape == (4, 8)


def test_dynamo_step_modulates_grpo_advantages_by_the_policys_entropy(chat):
    model = lora_policy(chat)
    args = rl.RLArguments(group_size=GROUP, advantage="dynamo", reward=LENGTH_REWARD)
    objective, rollout = rollout_for(chat, model, args)
    assert objective.advantage.name == "grpo" and objective.modulation.name == "dynamo"
    assert rollout.advantages.abs().sum() > 0
    loss, metrics = rollout_loss(model, rollout, objective, chat.ids.mask)
    # by hand: every answer token masked (d1), the policy's log-probs and entropies, then DynaMO's modulation
    logits = model(rollout.prompts.input_features, rollout.prompts.feature_lengths, rollout.prompts.prompt_ids,
                   rollout.prompts.audio_slots, torch.full_like(rollout.answers, chat.ids.mask),
                   answers_per_prompt=GROUP)
    log_probs = F.log_softmax(logits.float(), -1).detach()
    logp = log_probs.gather(-1, rollout.answers[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    base = rollout.advantages[:, None].expand_as(logp)
    modulated = get_advantage_estimator("dynamo")(AdvantageInputs(
        response_mask=rollout.mask, advantages=base, log_prob=logp, old_log_prob=rollout.old_values,
        entropy=entropy)).advantages
    assert loss.item() == pytest.approx(mean_loss_at_ratio_one(modulated), rel=1e-5, abs=1e-6)
    assert not torch.allclose(modulated, base)  # β_comp > 1 on the confident tokens of answers with A > 0
    assert 0.6 <= metrics["dynamo/beta_stab"] <= 1 and 1 <= metrics["dynamo/beta_comp"] <= 1.2


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("advantage", ["opd", "scope", "dynamo"])
def test_token_level_objectives_refuse_spg(advantage):
    teacher = "teacher" if advantage != "dynamo" else None
    with pytest.raises(NotImplementedError, match=rf"--advantage {advantage} gives each token its own advantage, "
                                                  r"and --likelihood spg one value per answer"):
        rl.resolve_objective(rl.RLArguments(advantage=advantage, likelihood="spg", likelihood_samples=1,
                                            teacher=teacher), DECODE)


def test_teacher_goes_with_opd_and_scope_only():
    with pytest.raises(OptionError, match=r"--teacher CKPT is needed by --advantage opd"):
        rl.RLArguments(advantage="opd")
    with pytest.raises(OptionError, match=r"--teacher is read by --advantage opd or scope only, not grpo"):
        rl.RLArguments(teacher="ckpt")


# --------------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------------


def test_scope_and_dynamo_commands_run_end_to_end(tmp_path, small_corpus):
    # the student (--model none) is the tiny preset with its 4 s window; the SFT default's is 2 s
    sft.main(small_run_args(tmp_path / "sft", small_corpus, 2, ["--test_file", "", "--tiny_window_seconds", "4"]))
    teacher = str(tmp_path / "sft" / "final")
    with pytest.raises(SystemExit, match=r"error: --teacher .*nowhere: no such checkpoint directory"):
        rl.main([*small_run_args(tmp_path / "bad", small_corpus, 2), "--model", "none", "--advantage", "opd",
                 "--teacher", str(tmp_path / "nowhere")])
    common = ["--model", "none", "--group_size", "2", "--per_device_train_batch_size", "2", "--test_file", ""]
    with pytest.raises(ValueError, match=r"its encoder takes 4 s windows of 80 mel bins, the student's 2 s of 80"):
        rl.main([*small_run_args(tmp_path / "window", small_corpus, 2), *common, "--tiny_window_seconds", "2",
                 "--advantage", "opd", "--teacher", teacher])
    rl.main([*small_run_args(tmp_path / "scope", small_corpus, 2), *common, "--advantage", "scope",
             "--teacher", teacher])
    assert logged(tmp_path / "scope", "distill/reverse_kl")[0] != 0
    assert logged(tmp_path / "scope", "distill/correct_fraction")[0] == 0
    rl.main([*small_run_args(tmp_path / "dynamo", small_corpus, 2), *common, "--advantage", "dynamo"])
    assert len(logged(tmp_path / "dynamo", "dynamo/beta_stab")) == 2  # every update is modulated
    assert (tmp_path / "dynamo" / "final" / "model.safetensors").is_file()
