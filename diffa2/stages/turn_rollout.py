"""Multi-turn rollouts of the RL stage: HIAN and GTPO (`--advantage hian|gtpo`, docs/rl-stage.md).

A *session* is one RL item played as a conversation: its user turns asked in order, each answered by the policy.
Turn k's prompt holds the policy's **own** earlier answers (not the reference answers): the conversation trained on
is the one the policy produced, so each answer is credited in the context it was sampled in, and the session reward
measures what the policy does over a whole conversation. The reference answers are only each turn's target.
An empty answer ends its session (an assistant turn needs text); the turns after it are not played.

Rewards: each played turn gets the registered reward of its answer against its own question (the turn-level
reward); the session reward is the least turn reward over the item's turns, a turn not played counting 0 (with a
0/1 reward: 1 when every answer is right). A non-finite turn reward drops its whole session from the step.
HIAN reads the session reward (`scores`) and the turn rewards; GTPO reads the cumulative score after each turn (the
sum of the turn rewards so far), whose differences are the turn rewards. Tokens are tied to turns by `turn_ids`
on a session-major canvas (`turns x gen_length` positions); both estimators give one advantage per turn.

Layout: `G` sessions per prompt, session `b = g·P + p` plays prompt p. The rollout's rows are *turn rows*, one per
played turn (turn-major: every session's turn 1, then turn 2, ...), each with its own prompt (conversation so far,
its clips) and answer canvas, so the likelihoods, the policy loss and the KL run unchanged: the loss sums over every
turn's answer tokens with that turn's advantage (`Rollout.token_advantages`). Turn k's answer g of prompt p is
decoded with seed number `k·G + g` of that prompt (`RolloutSeeds.answers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffa2.chat import AudioRef, ChatFormat, Conversation, Turn
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.likelihood import answer_token_logprobs
from diffa2.rl import AdvantageInputs
from diffa2.stages.rewards import RewardFn, RLItem, mc_correct, rl_item
from diffa2.stages.rollout import (
    Objective,
    PromptBatch,
    Rollout,
    RolloutSeeds,
    likelihood_view,
    reward_value,
    rollout_and_reference_values,
    sample_group,
)


@dataclass(frozen=True)
class Session:
    """One multi-turn RL item: its user turns, the reward's view of each, and where its clips are."""

    user_turns: tuple[Turn, ...]
    items: tuple[RLItem, ...]  # turn k's question, reference answer and choices
    first_clip: int  # the row of its first clip in the batch's features
    clips: tuple[int, ...]  # clips in its user turns up to and including turn k
    system: str | None = None

    @property
    def turns_count(self) -> int:
        """How many user turns it asks."""
        return len(self.user_turns)

    def prompt(self, answers: Sequence[str]) -> Conversation:
        """The conversation asking user turn `len(answers)`, after the earlier turns answered by `answers`."""
        turns: list[Turn] = []
        for user, answer in zip(self.user_turns, answers, strict=False):
            turns += [user, Turn("assistant", (answer,))]
        return Conversation((*turns, self.user_turns[len(answers)]), self.system)


def sessions_of(prompts: PromptBatch) -> list[Session]:
    """The sessions of a batch: a conversation's user turns with the reference answers (its assistant turns, then
    the item's target), or one turn for a single question; needs `prompts.questions`."""
    if prompts.questions is None:
        raise ValueError("multi-turn rollouts need PromptBatch.questions (the RL collator fills it)")
    sessions, first_clip = [], 0
    for p, (question, item) in enumerate(zip(prompts.questions, prompts.items, strict=True)):
        if not isinstance(question, Conversation):
            sessions.append(Session((Turn("user", (AudioRef(), question)),), (item,), first_clip, (1,)))
            first_clip += 1
            continue
        roles = [t.role for t in question.turns]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise ValueError(f"prompt {p}: a multi-turn RL item alternates user and assistant turns, starting and "
                             f"ending with a user turn; got roles {roles}")
        users = question.turns[::2]
        targets = [t.text for t in question.turns[1::2]] + [item.target]
        counts = torch.tensor([len(t.clips) for t in users]).cumsum(0).tolist()
        sessions.append(Session(users, tuple(rl_item(u.text, a) for u, a in zip(users, targets, strict=True)),
                                first_clip, tuple(counts), question.system))
        first_clip += counts[-1]
    return sessions


def turn_prompts(chat: ChatFormat, prompts: PromptBatch, sessions: Sequence[Session],
                 asks: Sequence[tuple[int, Sequence[str]]]) -> PromptBatch:
    """One prompt per `(p, earlier answers)`: session p's next turn after those answers, with its clips so far."""
    ids, slots, clip_rows, items = [], [], [], []
    for p, answers in asks:
        session = sessions[p]
        prompt_ids, prompt_slots = chat.encode_conversation(session.prompt(answers))
        ids.append(prompt_ids)
        slots.append(prompt_slots)
        clip_rows += range(session.first_clip, session.first_clip + session.clips[len(answers)])
        items.append(session.items[len(answers)])
    rows = torch.tensor(clip_rows, dtype=torch.long)
    return PromptBatch(prompts.input_features[rows.to(prompts.input_features.device)],
                       prompts.feature_lengths[rows.to(prompts.feature_lengths.device)], ids, slots, items)


def history(texts: dict[tuple[int, int], str], session: int, turn: int) -> list[str]:
    """The answers of `session`'s turns before `turn`."""
    return [texts[session, k] for k in range(turn)]


@torch.no_grad()
def play_sessions(policy, chat: ChatFormat, prompts: PromptBatch, sessions: Sequence[Session], group_size: int,
                  decode: DecodeConfig, seeds: RolloutSeeds) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Play `group_size` sessions per prompt turn by turn; the turn rows `(session, turn)` and their answers."""
    n_prompts = len(sessions)
    texts: dict[tuple[int, int], str] = {}
    rows: list[tuple[int, int]] = []
    answers: list[torch.Tensor] = []
    live = list(range(group_size * n_prompts))
    for turn in range(max(s.turns_count for s in sessions)):
        live = [b for b in live if turn < sessions[b % n_prompts].turns_count and (turn == 0 or texts[b, turn - 1])]
        if not live:
            break
        batch = turn_prompts(chat, prompts, sessions, [(b % n_prompts, history(texts, b, turn)) for b in live])
        numbers = [turn * group_size + b // n_prompts for b in live]
        ids = sample_group(policy, chat, batch, 1, decode, seeds.answers([b % n_prompts for b in live], numbers))
        for b, row in zip(live, ids, strict=True):
            texts[b, turn] = chat.decode_answer(row.tolist())
            rows.append((b, turn))
            answers.append(row)
    return rows, torch.stack(answers)


def turn_advantages(objective: Objective, rewards: torch.Tensor, played: torch.Tensor, index: torch.Tensor,
                    length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HIAN's or GTPO's advantages `(B, K, length)` of B sessions from their turn rewards `(B, K)` (`played`: the
    turns played), with the session rewards `(B,)` and which sessions are kept `(B,)` (every turn reward finite)."""
    sessions, turns = rewards.shape
    valid = (torch.isfinite(rewards) | ~played).all(-1)
    turn_mask = played & valid[:, None]
    clean = torch.where(turn_mask, rewards, torch.zeros_like(rewards))
    session = torch.where(valid, clean.amin(-1), torch.zeros_like(valid, dtype=rewards.dtype))
    on_tokens = turn_mask[:, :, None].expand(sessions, turns, length)
    turn_ids = torch.where(on_tokens, torch.arange(turns, device=rewards.device)[None, :, None], -1)
    output = objective.advantage(AdvantageInputs(
        response_mask=on_tokens.reshape(sessions, -1), index=index, scores=session, valid=valid,
        turn_ids=turn_ids.reshape(sessions, -1), turn_mask=turn_mask,
        turn_rewards=clean.cumsum(-1) if objective.advantage.name == "gtpo" else clean))
    return output.advantages.view(sessions, turns, length), session, valid


@torch.no_grad()
def evaluate_turns(policy, reference, chat: ChatFormat, prompts: PromptBatch, sessions: Sequence[Session],
                   group_size: int, rows: Sequence[tuple[int, int]], answers: torch.Tensor, objective: Objective, *,
                   reward: RewardFn, generator: torch.Generator) -> Rollout:
    """Score the played turns `rows` (`(session, turn)`, answers `(N, L)`), compute HIAN's or GTPO's advantages and
    the answers' likelihoods under the rollout policy and the reference, with the same draws."""
    n_prompts, device = len(sessions), answers.device
    n_sessions, turns = group_size * n_prompts, max(s.turns_count for s in sessions)
    texts = {row: chat.decode_answer(ids.tolist()) for row, ids in zip(rows, answers, strict=True)}
    items = [sessions[b % n_prompts].items[k] for b, k in rows]
    rewards = torch.tensor([reward_value(reward, item, texts[row]) for item, row in zip(items, rows, strict=True)])
    correct = torch.tensor([mc_correct(item, texts[row]) for item, row in zip(items, rows, strict=True)])
    session_of, turn_of = (torch.tensor(column) for column in zip(*rows, strict=True))
    grid = torch.zeros(n_sessions, turns)
    played = torch.zeros(n_sessions, turns, dtype=torch.bool)
    grid[session_of, turn_of], played[session_of, turn_of] = rewards, True
    index = torch.arange(n_prompts).repeat(group_size)
    per_token, session, valid = turn_advantages(objective, grid, played, index, answers.shape[1])
    token_advantages = per_token[session_of, turn_of].to(device)
    batch = turn_prompts(chat, prompts, sessions, [(b % n_prompts, history(texts, b, k)) for b, k in rows])
    draws = objective.estimator.sample(torch.ones_like(answers, dtype=torch.bool), generator=generator)
    advantages = token_advantages[:, 0]  # one advantage per turn

    def values(model) -> tuple[torch.Tensor, torch.Tensor]:
        token_logp = answer_token_logprobs(model, batch, answers, draws.masks, chat.ids.mask)
        return likelihood_view(objective.estimator, token_logp, draws, advantages)

    old, mask, ref = rollout_and_reference_values(policy, reference, values)
    mask = mask & valid[session_of].to(device)[:, None]
    token_advantages = torch.where(mask, token_advantages, torch.zeros_like(token_advantages))
    right = torch.zeros(n_sessions, turns)
    right[session_of, turn_of] = correct
    full = torch.tensor([sessions[b % n_prompts].turns_count for b in range(n_sessions)])
    session_correct = (right.sum(-1) == full).float()
    metrics = {"reward/session": session[valid].mean().item() if valid.any() else float("nan"),
               "rollout/session_accuracy": session_correct[valid].mean().item() if valid.any() else float("nan"),
               "rollout/turns": played.sum().item() / n_sessions}
    return Rollout(batch, index[session_of].to(device), answers, [texts[row] for row in rows], rewards, correct,
                   advantages, draws, old, ref, mask, token_advantages, metrics)


@torch.no_grad()
def make_turn_rollout(policy, reference, chat: ChatFormat, prompts: PromptBatch, objective: Objective, *,
                      reward: RewardFn, group_size: int, decode: DecodeConfig, seeds: RolloutSeeds) -> Rollout:
    """Play `group_size` sessions per prompt, score their turns and evaluate them; `policy` is the unwrapped model."""
    sessions = sessions_of(prompts)
    rows, answers = play_sessions(policy, chat, prompts, sessions, group_size, decode, seeds)
    generator = torch.Generator(device=answers.device).manual_seed(seeds.draws)
    return evaluate_turns(policy, reference, chat, prompts, sessions, group_size, rows, answers, objective,
                          reward=reward, generator=generator)
