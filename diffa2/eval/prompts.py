"""Prompt templates for multiple-choice audio benchmarks, chosen by name.

A template turns (question, choices) into the *instruction* text; ``diffa2.chat`` wraps it in the chat template
with the audio slot. ``choices`` is a list whose entries may be ``None`` (MMSU's unused ``choice_c``/``choice_d``
on 2-choice items): option letters follow the position in the list, so a letter always maps back to the same
field, and ``None`` options are left out, except by the official MMSU templates, which reproduce the official
inference script printing "C. None" (docs/benchmarks.md §3.1, "Prompt trap").

Sources (all described in docs/benchmarks.md and docs/model.md; wording reproduced, code
written here):

===================  ==========================================================================================
name                 source
===================  ==========================================================================================
diffa                DIFFA / DIFFA-2 MMAU prompt, reused for MMAR (docs/model.md §7; docs/benchmarks.md §1.3)
diffa_mmsu           DIFFA / DIFFA-2 MMSU prompt = old official MMSU template (docs/benchmarks.md §3.3)
mmsu_official        new official MMSU template, nulls printed as "None" (dingdongwang/MMSU:mmsu_inference.py)
mmsu_official_v1     old official MMSU template, nulls printed as "None" (dingdongwang/MMSU_Bench)
mmau_authors         MMAU authors' recommendation (Sakshi113/MMAU issue #3)
mmar_authors         MMAR authors' recommendation (ddlBoJack/MMAR issue #3)
audio_flamingo       Audio Flamingo 2/3 (NVIDIA/audio-flamingo issue #29, static/mmar.json)
r1_aqa               R1-AQA / NeMo-RL, final answer in <answer> tags (xiaomi-research/r1-aqa:src/test.py)
lmms_eval_mmau       lmms-eval MMAU (letter answer)
lmms_eval_mmar       lmms-eval MMAR (letter answer; the Qwen2-Audio-only suffix is left out)
lmms_eval_mmsu       lmms-eval MMSU (letter answer)
kimi_evalkit         Kimi-Audio-Evalkit MQA (choices on one line)
audiobench           AudioBench mmau_mini
question             the question alone (what stages 1-2 train on; their end-of-stage test, --test_prompt question)
===================  ==========================================================================================

Templates that ask for a *letter* (``answer_style == "letter"``) score near 0 under MMAU's official word-set
rule (a letter is not the choice text); use them with ``--mode normalized``, which maps letters back to text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from diffa2.data.tokenizer import MMAU_INSTRUCTION, MMSU_INSTRUCTION

Render = Callable[[str, Sequence[str | None]], str]

# The new official MMSU instruction (dingdongwang/MMSU:mmsu_inference.py, docs/benchmarks.md §3.3).
MMSU_INSTRUCTION_V2 = (
    "Choose the most suitable answer from options A, B, C, and D. You must respond with only A, B, C, or D."
)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    render: Render
    answer_style: str  # "text" (the model should answer with a choice's text) or "letter"
    source: str

    def __call__(self, question: str, choices: Sequence[str | None]) -> str:
        return self.render(question.strip(), list(choices))

    def fingerprint(self) -> str:
        """A hash of what the template produces on a probe, so a changed template invalidates resumed work."""
        probe = self(" Q? ", ["x", "y", None, "z"])
        return hashlib.sha256(f"{self.name}\x00{probe}".encode()).hexdigest()[:16]


PROMPTS: dict[str, PromptTemplate] = {}


def register_prompt(name: str, *, answer_style: str, source: str) -> Callable[[Render], Render]:
    """Register a template function under `name` (a second registration of the same name is an error)."""
    if answer_style not in ("text", "letter"):
        raise ValueError(f"answer_style must be 'text' or 'letter', got {answer_style!r}")

    def decorator(fn: Render) -> Render:
        if name in PROMPTS:
            raise ValueError(f"prompt template {name!r} is already registered")
        PROMPTS[name] = PromptTemplate(name, fn, answer_style, source)
        return fn

    return decorator


def get_prompt(name: str) -> PromptTemplate:
    if name not in PROMPTS:
        raise KeyError(f"unknown prompt template {name!r}; available: {', '.join(sorted(PROMPTS))}")
    return PROMPTS[name]


def letter(index: int) -> str:
    if not 0 <= index < 26:
        raise ValueError(f"option index {index} has no letter (A-Z)")
    return chr(ord("A") + index)


def _options(choices: Sequence[str | None], fmt: str, *, nulls_as_text: bool = False) -> list[str]:
    """One string per option, `fmt` with {L} (letter) and {c} (text); None options dropped (or printed "None")."""
    lines = []
    for i, c in enumerate(choices):
        if c is None and not nulls_as_text:
            continue
        lines.append(fmt.format(L=letter(i), c=c))
    return lines


def _present(choices: Sequence[str | None]) -> list[str]:
    return [c for c in choices if c is not None]


# --- DIFFA-2's own prompts (the defaults) ---------------------------------------------------------------------


@register_prompt("diffa", answer_style="text", source="DIFFA-2 inference_mmau.py (docs/model.md §7)")
def _diffa(question: str, choices: Sequence[str | None]) -> str:
    # Same layout as the MC items the synthetic corpus trains with (diffa2.data.synth.format_mc_prompt).
    return "\n".join([MMAU_INSTRUCTION, f"Question: {question}", "Choices:", *_options(choices, "{L}. {c}"), "Answer:"])


@register_prompt("diffa_mmsu", answer_style="letter", source="DIFFA-2 inference_mmsu.py (docs/model.md §7)")
def _diffa_mmsu(question: str, choices: Sequence[str | None]) -> str:
    return f"{MMSU_INSTRUCTION}\n\nQuestion: {question}\n\n" + "\n".join(_options(choices, "{L}. {c}"))


# --- official and peer-toolkit alternatives -------------------------------------------------------------------


@register_prompt("mmsu_official", answer_style="letter", source="dingdongwang/MMSU:mmsu_inference.py")
def _mmsu_official(question: str, choices: Sequence[str | None]) -> str:
    return f"{MMSU_INSTRUCTION_V2}\n\nQuestion: {question}\n\n" + "\n".join(
        _options(choices, "{L}. {c}", nulls_as_text=True)
    )


@register_prompt("mmsu_official_v1", answer_style="letter", source="dingdongwang/MMSU_Bench:mmsu_inference.py")
def _mmsu_official_v1(question: str, choices: Sequence[str | None]) -> str:
    return f"{MMSU_INSTRUCTION}\n\nQuestion: {question}\n\n" + "\n".join(
        _options(choices, "{L}. {c}", nulls_as_text=True)
    )


@register_prompt("mmau_authors", answer_style="text", source="Sakshi113/MMAU issue #3")
def _mmau_authors(question: str, choices: Sequence[str | None]) -> str:
    # Question, two spaces, the instruction, a newline, the choices, a period. How the choices are laid out is
    # not stated in the issue [unverified]; they are rendered as a Python list here.
    return f"{question}  Select one option from the provided choices.\n{_present(choices)}."


@register_prompt("mmar_authors", answer_style="text", source="ddlBoJack/MMAR issue #3")
def _mmar_authors(question: str, choices: Sequence[str | None]) -> str:
    return f"{question}\nSelect one option from the provided choices:\n" + "\n".join(_present(choices))


@register_prompt("audio_flamingo", answer_style="text", source="NVIDIA/audio-flamingo issue #29; static/mmar.json")
def _audio_flamingo(question: str, choices: Sequence[str | None]) -> str:
    return f"{question} Choose the correct option from the following options:\n" + "\n".join(
        _options(choices, "({L}) {c}")
    )


@register_prompt("r1_aqa", answer_style="text", source="xiaomi-research/r1-aqa:src/test.py")
def _r1_aqa(question: str, choices: Sequence[str | None]) -> str:
    return (
        f"{question} Please choose the answer from the following options: {_present(choices)}. "
        "Output the final answer in <answer> </answer>."
    )


@register_prompt("lmms_eval_mmau", answer_style="letter", source="lmms-eval lmms_eval/tasks/mmau")
def _lmms_eval_mmau(question: str, choices: Sequence[str | None]) -> str:
    return "\n".join([question, *_options(choices, "{L}. {c}")]) + (
        "\nAnswer with the option's letter from the given choices directly."
    )


@register_prompt("lmms_eval_mmar", answer_style="letter", source="lmms-eval lmms_eval/tasks/mmar/mmar.yaml")
def _lmms_eval_mmar(question: str, choices: Sequence[str | None]) -> str:
    head = (
        "Listen to the audio and answer the following multiple-choice question. "
        "Respond with only the letter (A, B, C, or D) of the correct option."
    )
    return "\n".join([head, question, *_options(choices, "{L}. {c}"), "The best answer is:"])


@register_prompt("lmms_eval_mmsu", answer_style="letter", source="lmms-eval lmms_eval/tasks/mmsu")
def _lmms_eval_mmsu(question: str, choices: Sequence[str | None]) -> str:
    return "\n".join(
        ["Listen to the audio and answer the following question.", question, *_options(choices, "{L}. {c}"),
         "Answer with the letter (A, B, C, or D) only."]
    )


@register_prompt("kimi_evalkit", answer_style="text", source="MoonshotAI/Kimi-Audio-Evalkit almeval/datasets/ds_mqa.py")
def _kimi_evalkit(question: str, choices: Sequence[str | None]) -> str:
    return f"{question}\n" + " ".join(_options(choices, "({L}) {c}"))


@register_prompt("audiobench", answer_style="text", source="AudioLLMs/AudioBench src/dataset_src/mmau_mini.py")
def _audiobench(question: str, choices: Sequence[str | None]) -> str:
    return f"Question:\n{question}\nChoices:\n" + "\n".join(_options(choices, "({L}) {c}"))


@register_prompt("question", answer_style="text", source="the toolkit's stages 1-2 (the question alone, no choices)")
def _question(question: str, choices: Sequence[str | None]) -> str:
    return question
