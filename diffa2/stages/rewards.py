"""Verifiable rewards of the RL stage, registered by name: `reward_fn(item, answer) -> float`.

`register_reward(name)(fn)` adds a custom one; `get_reward(name)` looks one up (an unknown name is a `ValueError`
listing the valid ones). Registered here:

- `mc_correct` (the default): 1.0 when the answer is right by MMAU's official word-set rule against the item's
  choices (`diffa2.eval.scoring.wordset_match`, the rule the evaluation scores with), else 0.0. An item without
  choices (a free-form question) is right when the answer's word set equals the target's.
- `format`: 1.0 when the answer is well formed: it names exactly one of the choices (MMAU's rule,
  `named_options`), or for a free-form item it is not empty; else 0.0.

A reward may return NaN or inf (a failed judge, say): the stage drops that answer from the step and counts it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from diffa2.chat import Conversation, Question
from diffa2.eval.scoring import named_options, word_set, wordset_match
from diffa2.rl import Registry


@dataclass(frozen=True)
class RLItem:
    """What a reward sees of one prompt: its question, the target answer and the choices (empty: free-form)."""

    question: str
    target: str
    choices: tuple[str, ...] = ()


RewardFn = Callable[[RLItem, str], float]
REWARDS: Registry[RewardFn] = Registry("reward")
get_reward = REWARDS.get

# A lettered choice line of the MMAU prompt (`diffa2.data.synth.format_mc_prompt`): "A. high".
_CHOICE_LINE = re.compile(r"^([A-Z])\. (.*)$")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn(item, answer) -> float` under `name`; returns `fn` unchanged."""

    def decorate(fn: RewardFn) -> RewardFn:
        REWARDS.add(name, fn)
        return fn

    return decorate


def choices_in_prompt(prompt: str) -> tuple[str, ...]:
    """The choices of an MMAU-style prompt (the lines "A. ..." , "B. ..." after "Choices:"); () when it has none."""
    lines = prompt.splitlines()
    if "Choices:" not in lines:
        return ()
    choices = []
    for line in lines[lines.index("Choices:") + 1 :]:
        match = _CHOICE_LINE.match(line)
        if match is None or match.group(1) != chr(ord("A") + len(choices)):
            break
        choices.append(match.group(2))
    return tuple(choices)


def rl_item(question: Question, target: str) -> RLItem:
    """The reward's view of a training item: the choices are read from its MMAU-style prompt (a conversation: its
    last user turn, the one `target` answers)."""
    prompt = question.turns[-1].text if isinstance(question, Conversation) else question
    return RLItem(prompt, target, choices_in_prompt(prompt))


@register_reward("mc_correct")
def mc_correct(item: RLItem, answer: str) -> float:
    """1.0 if `answer` is right by MMAU's rule against the item's choices (free-form: same word set), else 0.0."""
    if item.choices:
        return float(wordset_match(answer, item.target, item.choices))
    return float(bool(word_set(answer)) and word_set(answer) == word_set(item.target))


@register_reward("format")
def answer_format(item: RLItem, answer: str) -> float:
    """1.0 if `answer` names exactly one choice (free-form: is not empty), else 0.0."""
    if item.choices:
        return float(len(named_options(answer, item.choices)) == 1)
    return float(bool(word_set(answer)))
