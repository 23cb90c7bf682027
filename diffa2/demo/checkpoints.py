"""Say what a checkpoint the demo loaded is: its size, what it was trained on and what it can answer (which
checkpoints exist: `diffa2.runs`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffa2.runs import is_embedded_default

NO_CHECKPOINT_HELP = (
    "**No checkpoint found in `{runs}`.** Train the tiny embedded default (about 13 minutes on a 2-core CPU) with "
    "`make train` or `python -m diffa2.stages.sft` (or with the button below, when the demo was started with "
    "`--allow_training`); or start the demo with `--model DIR`, or type a checkpoint directory into the box above."
)


def count_label(n: int) -> str:
    """1234 -> '1.23 k', 1_340_000 -> '1.34 M', 8e9 -> '8 B' (three significant digits)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def describe_model(checkpoint: str | Path, config: Any, parameters: int) -> str:
    """Markdown: the checkpoint's size, what it was trained on (its config and its run's summary.json) and what it
    can answer."""
    from diffa2.data.synth import ANSWER_TOKENS, QUESTION_KINDS  # the embedded default's corpus

    checkpoint = Path(checkpoint)
    summary_file = checkpoint.parent / "summary.json"
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    lines = [f"**{checkpoint}**: {count_label(parameters)} parameters."]
    release = getattr(config, "release", None)
    if release:
        lines.append(f"A released DIFFA-2 checkpoint ({release}): a Whisper encoder and a LLaDA backbone trained on "
                     "speech recognition, audio captions, audio instruction QA and preference pairs. It answers open "
                     "questions about speech, sounds and music.")
    elif is_embedded_default(checkpoint):
        kinds = ", ".join(kind.name for kind in QUESTION_KINDS.values())
        lines.append(f"The tiny embedded default, trained from scratch on the built-in synthetic audio corpus "
                     f"(`diffa2.data.synth`). It answers only that corpus's multiple-choice "
                     f"question kinds ({kinds}) in {ANSWER_TOKENS} answer tokens; other questions get guesses.")
    else:
        lines.append(f"Built on the encoder `{config.encoder_source}` and the backbone `{config.backbone_source}`; "
                     "it answers what its stages' data taught it.")
    if summary:
        trained = f"Trained by the `{summary.get('stage', '?')}` stage for {summary.get('steps', '?')} steps"
        test = summary.get("test")
        if isinstance(test, dict) and test.get("accuracy") is not None:
            trained += f"; {test['accuracy']:.1f} % on its test split"
        lines.append(trained + f" ({summary_file.name} of the run).")
    else:
        lines.append(f"No {summary_file.name} beside it: how it was trained is not recorded.")
    return "\n\n".join(lines)
