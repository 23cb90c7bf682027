"""Stage 3: instruction SFT (masked diffusion) on both adapters, plus LoRA on the backbone at real scale.

Embedded default (builds the synthetic corpus if missing, trains the tiny DIFFA-2 on CPU: 800 steps of transcription,
then 1200 of SFT, about 13 min on 2 cores; evaluates, saves):
    python -m diffa2.stages.sft
Real DIFFA-2 recipe (frozen Whisper-large-v3 and LLaDA-8B-Instruct, LoRA r=8, from the stage-2 checkpoint):
    torchrun --nproc_per_node=8 -m diffa2.stages.sft --config stages/sft.yaml \
        --whisper_path /models/whisper-large-v3 --llada_path /models/LLaDA-8B-Instruct
"""

from __future__ import annotations

from dataclasses import dataclass

from diffa2.stages.cli import StageDefaults, stage_main
from diffa2.stages.runner import StageSpec

SPEC = StageSpec(name="sft", previous="acoustic")


# The embedded default first learns to transcribe (800 steps of stage 1, 0 % WER), then trains 1200 SFT steps:
# 95.6 % on the synthetic test split against 79-80 % for 1600 SFT steps from scratch (docs/experiment-log.md).
# After stages 1-2 (the curriculum) the warm-up is skipped: the stage starts from their checkpoint.
@dataclass(frozen=True)
class SFTDefaults(StageDefaults):
    """Stage 3's embedded defaults (`--config` and flags override them)."""

    recipe: str = "data_recipes/synth_sft.yaml"
    asr_warmup_steps: int = 800
    max_steps: int = 1200


DEFAULTS = SFTDefaults()


def main(argv: list[str] | None = None) -> dict:
    return stage_main(SPEC, __doc__, DEFAULTS, argv)


if __name__ == "__main__":
    main()
