"""Question kinds and prompt texts of the synthetic corpus (MMAU sub-categories, phrasings, the MC prompt),
shared by the item generator, the corpus builder and the evaluation code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffa2.data.synth.constants import COUNT_WORDS, FAMILIES
from diffa2.data.tokenizer import MMAU_INSTRUCTION

# ----------------------------------------------------------------------------------------------------------
# Question kinds
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: its MMAU sub-category name, closed answer set and phrasings."""

    name: str
    attribute: str
    task: str
    category: str
    families: tuple[str, ...]
    values: tuple[str, ...] | None  # the closed answer set; None: the transcription (Spoken Content)
    phrasings: tuple[str, ...]  # the first is the canonical one (stage 2 and the test split)


_IE = "Information Extraction"
QUESTION_KINDS: dict[str, QuestionKind] = {
    k.name: k
    for k in (
        QuestionKind(
            "Spoken Content", "words", "speech", _IE, ("speech",), None,
            ("What does the speaker say?", "What words are spoken in the audio?", "Which words do you hear?",
             "Write down what is said."),
        ),
        QuestionKind(
            "Event Counting", "count", "sound", "Reasoning", ("sound",), COUNT_WORDS,
            ("How many beeps are there?", "Count the beeps in the audio.",
             "How many sound events do you hear?", "How many times does the tone sound?"),
        ),
        QuestionKind(
            "Pitch", "pitch", "music", _IE, ("sound", "music"), ("low", "medium", "high"),
            ("What is the pitch of the sound?", "Is the pitch low, medium, or high?",
             "How high are the tones?", "Describe the pitch of the audio."),
        ),
        QuestionKind(
            "Tempo", "tempo", "music", _IE, ("music",), ("slow", "fast"),
            ("Is the tempo slow or fast?", "How fast is the melody?", "What is the tempo of the music?"),
        ),
        QuestionKind(
            "Loudness", "loudness", "sound", _IE, FAMILIES, ("quiet", "loud"),
            ("Is the audio quiet or loud?", "How loud is the sound?", "What is the loudness of the audio?"),
        ),
        QuestionKind(
            "Background Noise", "noise", "sound", _IE, FAMILIES, ("yes", "no"),
            ("Is there background noise?", "Can you hear background noise in the recording?",
             "Is the recording noisy?"),
        ),
    )
}
CAPTION_KIND = "Caption"  # training only (stage 2): a short description of all attributes of the clip
TRANSCRIPTION_KIND = "Transcription"  # stage 1
CAPTION_PHRASINGS = ("Describe the audio in a few words.", "Give a short caption of the audio.")
MC_FRACTION = 0.3  # share of stage-3/4 items asked in the MMAU multiple-choice format


def format_mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The DIFFA MMAU evaluation prompt (reference §7): instruction, question, lettered choices, then
    "Answer:"."""
    lines = [MMAU_INSTRUCTION, f"Question: {question}", "Choices:"]
    lines += [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)

