"""Stage 5 (RL) on multi-turn items: HIAN and GTPO (diffa2/stages/turn_rollout.py, docs/rl-stage.md).

Sessions read from conversations, turn prompts holding the policy's own answers, the advantages of a fixed rollout
against a hand computation (and the loss of its first update), seeded sessions, and both objectives end to end on
the synthetic multi-turn split."""

from __future__ import annotations

import json
import math
from statistics import mean, stdev

import pytest
import torch
from helpers import clip, make_tiny_model, small_run_args
from rl_distributed_entry import LENGTH_REWARD

from diffa2.audio import LogMelFeaturizer
from diffa2.chat import AudioRef, Conversation, Turn
from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.data.recipe import DataRecipe, load_split
from diffa2.data.synth import format_mc_prompt
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.stages import rl
from diffa2.stages.reference_models import FrozenReference
from diffa2.stages.rewards import RLItem, get_reward, register_reward
from diffa2.stages.rollout import PromptBatch, RolloutSeeds, make_rollout, rollout_loss, rollout_metrics
from diffa2.stages.runner import REPO_ROOT
from diffa2.stages.turn_rollout import evaluate_turns, play_sessions, sessions_of, turn_prompts

DECODE = DecodeConfig(gen_length=8, block_length=8, steps=4, temperature=1.0)
PITCH = format_mc_prompt("Is the pitch low, medium, or high?", ["high", "low", "medium"])
COMPARE = format_mc_prompt("Which clip is louder, clip one or clip two?", ["one", "two"])
SINGLE = format_mc_prompt("How many beeps are there?", ["one", "two", "three"])


def comparison() -> Conversation:
    """Turn 1 about clip one; turn 2 brings clip two and compares; the reference answers: "high", then "two"."""
    return Conversation((Turn("user", (AudioRef("a.wav"), PITCH)), Turn("assistant", ("high",)),
                         Turn("user", (AudioRef("b.wav"), COMPARE))))


def prompt_batch(chat) -> PromptBatch:
    """Two prompts: the two-turn, two-clip comparison (target "two"), then a single question (target "two")."""
    examples = [SFTExample([clip(1.0, 300, seed=0), clip(1.2, 500, seed=1)], comparison(), "two"),
                SFTExample(clip(1.0, 400, seed=2), SINGLE, "two")]
    collator = SFTCollator(chat, LogMelFeaturizer(n_mels=80, window_seconds=4.0))
    return PromptBatch(**rl.RLCollator(collator)(examples))


def test_sessions_read_every_turn_with_its_target_choices_and_clips(chat):
    prompts = prompt_batch(chat)
    first, second = sessions_of(prompts)
    assert first.turns_count == 2 and second.turns_count == 1
    assert [(i.target, i.choices) for i in first.items] == [("high", ("high", "low", "medium")),
                                                            ("two", ("one", "two"))]
    assert (first.first_clip, first.clips, second.first_clip, second.clips) == (0, (1, 2), 2, (1,))
    assert second.items == (prompts.items[1],) and prompts.items[0].choices == ("one", "two")
    with pytest.raises(ValueError, match=r"prompt 0: a multi-turn RL item alternates user and assistant turns"):
        bad = Conversation((Turn("user", (AudioRef(), PITCH)), Turn("user", ("And now?",))))
        sessions_of(PromptBatch(prompts.input_features, prompts.feature_lengths, [], [], prompts.items[:1],
                                questions=[bad]))


def test_turn_prompts_hold_the_policys_own_answers_and_the_clips_so_far(chat):
    prompts = prompt_batch(chat)
    sessions = sessions_of(prompts)
    batch = turn_prompts(chat, prompts, sessions, [(0, []), (0, ["low"]), (1, [])])
    own = Conversation((Turn("user", (AudioRef(), PITCH)), Turn("assistant", ("low",)),
                        Turn("user", (AudioRef(), COMPARE))))
    assert batch.prompt_ids[1] == chat.encode_conversation(own)[0] and len(batch.audio_slots[1]) == 2
    assert (batch.prompt_ids[0], batch.audio_slots[0]) == (chat.encode_conversation(Conversation.single(PITCH))[0],
                                                           [chat.encode_prompt(PITCH)[1]])
    assert batch.prompt_ids[2] == prompts.prompt_ids[1]  # a single question: its classic prompt
    # clips: turn 1 has clip one; turn 2 clips one and two; the single question its own clip
    assert torch.equal(batch.input_features, prompts.input_features[[0, 0, 1, 2]])
    assert [i.target for i in batch.items] == ["high", "two", "two"]


def test_prompt_rows_carry_each_prompts_own_clips(chat):
    prompts = prompt_batch(chat)  # features: clip rows 0, 1 (the two-clip conversation), then 2 (the single question)
    rows = prompts.rows(torch.tensor([1, 0, 0, 1]))
    assert torch.equal(rows.input_features, prompts.input_features[[2, 0, 1, 0, 1, 2]])
    assert torch.equal(rows.feature_lengths, prompts.feature_lengths[[2, 0, 1, 0, 1, 2]])
    assert rows.audio_slots == [prompts.audio_slots[i] for i in (1, 0, 0, 1)] and len(rows.audio_slots[1]) == 2
    assert [i.target for i in rows.items] == ["two"] * 4 and rows.prompt_ids[3] == prompts.prompt_ids[1]


def answers(chat, texts: list[str]) -> torch.Tensor:
    rows = [chat.encode_answer(text) for text in texts]
    return torch.tensor([row + [chat.ids.eos] * (DECODE.gen_length - len(row)) for row in rows])


def z_scores(values: list[float]) -> list[float]:
    """(x - mean) / sample std: the hand computation of a group normalisation."""
    return [(x - mean(values)) / stdev(values) for x in values]


# Three sessions of the comparison (one prompt): right, right / right, wrong / turn 1 empty (which ends it)
ROWS = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
TEXTS = ["high", "high", "", "two", "one"]


def fixed_rollout(chat, model, advantage: str, reward: str = "mc_correct"):
    """The objective and the rollout of the sessions `ROWS` / `TEXTS` of the comparison (its two clips)."""
    prompts = prompt_batch(chat)
    prompts = PromptBatch(prompts.input_features[:2], prompts.feature_lengths[:2], prompts.prompt_ids[:1],
                          prompts.audio_slots[:1], prompts.items[:1], None, prompts.questions[:1])
    objective = rl.resolve_objective(rl.RLArguments(advantage=advantage), DECODE)
    rollout = evaluate_turns(model, FrozenReference(model), chat, prompts, sessions_of(prompts), 3, ROWS,
                             answers(chat, TEXTS), objective, reward=get_reward(reward),
                             generator=torch.Generator().manual_seed(0))
    return objective, rollout


@pytest.mark.parametrize("advantage", ["hian", "gtpo"])
def test_fixed_rollout_advantages_match_a_hand_computation(chat, advantage):
    model = make_tiny_model(chat).eval()
    objective, rollout = fixed_rollout(chat, model, advantage)
    assert rollout.rewards.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0] and rollout.texts == TEXTS
    # turn rewards (turn 1, turn 2): (1, 1), (1, 0), (0, not played); sessions: all right = 1, 0, 0
    if advantage == "hian":  # z of the session rewards over the group + z of the 5 turn rewards over the group
        session = z_scores([1, 0, 0])
        turn = dict(zip(ROWS, z_scores([1, 1, 0, 1, 0]), strict=True))
        hand = [session[b] + turn[b, k] for b, k in ROWS]
        assert hand[0] == pytest.approx(1.154701 + 0.730297, abs=1e-6)
    else:  # the differences of the cumulative scores, z-scored per turn index: turn 1 over 3, turn 2 over 2
        hand = [*z_scores([1, 1, 0]), *z_scores([1, 0])]
        assert hand == pytest.approx([0.577350, 0.577350, -1.154701, 0.707107, -0.707107], abs=1e-6)
    assert rollout.mask.all()  # d1: every answer token masked, every turn kept
    expected = torch.tensor(hand)[:, None].expand(5, DECODE.gen_length)
    torch.testing.assert_close(rollout.token_advantages, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout.advantages, torch.tensor(hand), rtol=0, atol=1e-5)
    assert rollout.index.tolist() == [0] * 5
    metrics = {k: v for k, v in rollout_metrics(rollout).items() if k.startswith(("reward/", "rollout/"))}
    assert metrics == pytest.approx({"reward/mean": 0.6, "reward/session": 1 / 3, "rollout/accuracy": 0.6,
                                     "rollout/session_accuracy": 1 / 3, "rollout/turns": 5 / 3, "rollout/dropped": 0})
    # the first update: ratio 1, no KL (policy = reference); GRPO's seq-mean-token-mean: minus the turns' mean
    loss, _ = rollout_loss(model, rollout, objective, chat.ids.mask)
    assert loss.item() == pytest.approx(-sum(hand) / 5, abs=1e-5)


@register_reward("test_nan_for_one")
def nan_for_one(item: RLItem, answer: str) -> float:
    """NaN for the answer "one", else whether it is "two"."""
    return math.nan if answer == "one" else float(answer == "two")


def test_a_nan_turn_reward_drops_its_whole_session(chat):
    _, rollout = fixed_rollout(chat, make_tiny_model(chat).eval(), "hian", reward="test_nan_for_one")
    dropped = torch.tensor([False, True, False, False, True])  # session 1: both its turns
    assert not rollout.mask[dropped].any() and rollout.mask[~dropped].all()
    assert torch.equal(rollout.token_advantages[dropped], torch.zeros(2, DECODE.gen_length))
    # the two sessions kept: turn rewards (0, 1) and (0, -); sessions 0 and 0 (all right fails)
    turn = z_scores([0, 0, 1])
    hand = [0 + turn[0], 0 + turn[1], 0 + turn[2]]  # equal session rewards: their z is 0
    torch.testing.assert_close(rollout.advantages[~dropped], torch.tensor(hand), rtol=0, atol=1e-5)


def test_sessions_are_seeded_and_play_every_turn(chat):
    model = make_tiny_model(chat).eval()
    prompts = prompt_batch(chat)
    sessions = sessions_of(prompts)
    rows, ids = play_sessions(model, chat, prompts, sessions, 2, DECODE, RolloutSeeds(0, 0, 0))
    again = play_sessions(model, chat, prompts, sessions, 2, DECODE, RolloutSeeds(0, 0, 0))
    assert rows == again[0] and torch.equal(ids, again[1])
    other = play_sessions(model, chat, prompts, sessions, 2, DECODE, RolloutSeeds(1, 0, 0))
    assert not torch.equal(ids[:4], other[1][:4])
    # turn 1 of all four sessions (row g·P + p), then turn 2 of the comparison's sessions (0 and 2) left going
    texts = [chat.decode_answer(row.tolist()) for row in ids]
    assert rows[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert rows[4:] == [(b, 1) for b in (0, 2) if texts[b]] and len(rows) > 4  # seed 0: a second turn is played
    objective = rl.resolve_objective(rl.RLArguments(advantage="gtpo", group_size=2), DECODE)
    rollout = make_rollout(model, FrozenReference(model), chat, prompts, objective, reward=get_reward("format"),
                           group_size=2, decode=DECODE, seeds=RolloutSeeds(0, 0, 0))
    assert torch.equal(rollout.answers, ids) and rollout.index.tolist() == [b % 2 for b, _ in rows]


@pytest.fixture(scope="module")
def multiturn_recipe(tmp_path_factory):
    """A small RL recipe of the synthetic multi-turn split: 4 conversations, each as its turn-1 and its whole form."""
    from diffa2.data.synth.multiturn import MultiturnSizes, build_multiturn_split

    root = tmp_path_factory.mktemp("mt")
    written = build_multiturn_split(root, seed=3, sizes=MultiturnSizes(train=4, validation=1, test_per_kind=1))
    recipe = root / "rl_multiturn.yaml"
    recipe.write_text(f"name: rl-multiturn\ntrain:\n  - path: \"{written['train']}\"\n"
                      f"validation:\n  - path: \"{written['validation']}\"\n")
    return recipe


def test_shipped_multiturn_rl_recipe_reads_the_multiturn_split(multiturn_recipe):
    recipe = DataRecipe.load(REPO_ROOT / "data_recipes" / "synth_rl_multiturn.yaml")
    root = multiturn_recipe.parent  # the split the fixture wrote: 4 training conversations, 1 validation one
    for sources, name, conversations in ((recipe.train, "train", 4), (recipe.validation, "validation", 1)):
        items, problems = load_split(sources, synth_dir=root, seed=0)
        records = json.loads((root / f"multiturn_{name}.json").read_text())
        prompts = [item.prompt() for item in items]
        assert problems == [] and len(items) == len(records) == 2 * conversations
        assert [(len(question.turns), len(clips)) for question, _, clips in prompts] == [(1, 1), (3, 1)] * conversations
        assert [answer for _, answer, _ in prompts] == [record["messages"][-1]["content"] for record in records]


@pytest.mark.parametrize("advantage", ["hian", "gtpo"])
def test_command_runs_hian_and_gtpo_end_to_end_on_multi_turn_items(tmp_path, small_corpus, multiturn_recipe,
                                                                   advantage):
    out = tmp_path / advantage
    summary = rl.main([*small_run_args(out, small_corpus, 2), "--model", "none", "--recipe", str(multiturn_recipe),
                       "--group_size", "2", "--per_device_train_batch_size", "4", "--advantage", advantage,
                       "--reward", LENGTH_REWARD])
    assert summary["steps"] == 2 and (out / "final" / "model.safetensors").is_file()
    assert summary["rl"]["advantage"] == advantage
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first = next(entry for entry in log if "loss" in entry)
    assert {"reward/session", "rollout/session_accuracy", "rollout/turns", "actor/kl"} <= set(first)
    # 4 prompts x 2 sessions; the whole conversations play a second turn; the lengths differ: the update is not 0
    assert 1.0 < first["rollout/turns"] <= 2.0 and first["actor/kl"] == 0 and first["grad_norm"] > 0
    assert first["reward/session"] <= first["reward/mean"]  # the least turn reward of each session
