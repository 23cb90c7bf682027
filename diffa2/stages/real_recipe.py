"""DIFFA-2's training recipe at real scale, one typed source per stage: the `--preset real` defaults and stages/*.yaml.

Values from NKU-HLT/DIFFA, DIFFA-2/train_stage{1,2,3,4}_multinode.sh and DIFFA-2/train.py, train_vrpo.py (restated
in docs/recipes.md): Whisper-large-v3 and LLaDA-8B-Instruct frozen in every stage; stage 1 trains the semantic
adapter and the 20 prompt embeddings, stage 2 both adapters, stages 3-4 both adapters and LoRA (r 8, alpha 16,
dropout 0.05 on q/k/v/ff/up); LLaDA's SFT loss (t ~ U(0, 1), p = 0.999 t + 0.001, weight 1/p, EOS padding counted
like any answer token) normalised by the batch's summed answer length; answers padded to the batch's longest.

`stages/<stage>.yaml` lists exactly `RealRecipe.options()` plus the launch keys (`LAUNCH_KEYS`, e.g. DeepSpeed), so
`python -m diffa2.stages.sft --preset real ...` and `--config stages/sft.yaml` train the same recipe (tested).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffa2.chat import DEFAULT_SYSTEM_PROMPT, DIFFA2_TRAINING_SYSTEM_PROMPT
from diffa2.modeling.model import DIFFA2Model

# Options stages/*.yaml set that are not part of the recipe but of how it is launched (they need DeepSpeed).
LAUNCH_KEYS = {"deepspeed": "stages/deepspeed/zero1_offload.json"}

FROZEN_BASES = {"train_encoder": False, "train_backbone": False, "train_adapters": True}
# DIFFA-2 trains with its long system prompt and answers with the short one (docs/reference-compat.md).
SYSTEM_PROMPTS = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "training_system_prompt": DIFFA2_TRAINING_SYSTEM_PROMPT}
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
# LLaDA's SFT loss as DIFFA-2 codes it (docs/recipes.md), on a canvas padded to the batch's longest answer.
SFT_LOSS = {"answer_canvas": "batch", "masking_form": "ratio", "stop_token_loss_weight": 1.0, "loss_reduction": "batch"}
# VRPO (train_vrpo.py): beta 0.2; 4 Monte-Carlo timesteps x 1 mask; the k-token ELBO; antithetic sampling.
VRPO = {"answer_canvas": "batch", "beta": 0.2, "n_t": 4, "n_yt": 1, "elbo_form": "count", "antithetic": True,
        "pref_eval_limit": 200}
# RL (stage 5, no DIFFA-2 counterpart): d1-style diffu-GRPO on the stage-3 QA items with MC rewards; 8 answers per
# prompt at temperature 0.9, GRPO loss and advantages, k3 KL at 0.04, 2 updates per rollout batch; MMAU-length answers.
RL = {"group_size": 8, "rollout_temperature": 0.9, "likelihood": "d1_one_step", "advantage": "grpo",
      "policy_loss": "grpo", "kl": "k3", "kl_coef": 0.04, "ppo_epochs": 2, "gen_length": 32, "block_length": 32,
      "steps": 32}
SCHEDULE = {"gradient_accumulation_steps": 1, "warmup_steps": 1000, "weight_decay": 0.05, "max_grad_norm": 1.0,
            "max_steps": -1, "seed": 42, "bf16": True, "save_strategy": "epoch", "logging_steps": 50}


@dataclass(frozen=True)
class RealRecipe:
    """What differs between DIFFA-2's four stages; `options()` adds what they share."""

    stage: str  # the stage's module and run folder name
    recipe: str  # data recipe (data_recipes/diffa2_stage{N}.yaml)
    speech_path: int = 2  # 1: prompt embeddings + semantic; 2: acoustic + semantic
    lora: bool = False
    per_device_train_batch_size: int = 3  # x 64 GPUs = global batch 192
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    num_train_epochs: int = 10
    vrpo: bool = False
    rl: bool = False

    def options(self) -> dict[str, Any]:
        """Every option of the stage's real recipe, by option name (the keys of stages/<stage>.yaml)."""
        model = {"preset": "real", "model": "auto", "speech_path": self.speech_path, "lora": self.lora,
                 **(LORA if self.lora else {}), **FROZEN_BASES, **SYSTEM_PROMPTS}
        objective = VRPO if self.vrpo else RL if self.rl else SFT_LOSS
        data = {"recipe": self.recipe, **objective, "feature_cache_items": 0, "test_file": None}
        training = {"output_dir": f"runs/real/{self.stage}",
                    "per_device_train_batch_size": self.per_device_train_batch_size,
                    "learning_rate": self.learning_rate, "lr_scheduler_type": self.lr_scheduler_type,
                    "num_train_epochs": self.num_train_epochs, **SCHEDULE}
        return {**model, **data, **training}


REAL_RECIPES: dict[str, RealRecipe] = {
    "semantic": RealRecipe("semantic", "data_recipes/diffa2_stage1.yaml", speech_path=1, per_device_train_batch_size=20,
                           learning_rate=1e-4, lr_scheduler_type="linear", num_train_epochs=20),  # global batch 1280
    "acoustic": RealRecipe("acoustic", "data_recipes/diffa2_stage2.yaml"),
    "sft": RealRecipe("sft", "data_recipes/diffa2_stage3.yaml", lora=True),
    "vrpo": RealRecipe("vrpo", "data_recipes/diffa2_stage4.yaml", lora=True, per_device_train_batch_size=1,
                       vrpo=True),  # x 16 GPUs (2 nodes x 8) = global batch 16 pairs
    "rl": RealRecipe("rl", "data_recipes/diffa2_stage3.yaml", lora=True, per_device_train_batch_size=1,
                     learning_rate=3e-6, lr_scheduler_type="constant", num_train_epochs=1,
                     rl=True),  # 1 prompt x 8 answers per GPU
}


def preset_options(stage: str, argv: list[str] | None) -> dict[str, Any]:
    """The real recipe's options when `--preset real` is given (on the command line or in `--config`), else none."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    preset = known.preset
    if preset is None and known.config is not None and known.config.is_file():
        preset = (yaml.safe_load(known.config.read_text()) or {}).get("preset")
    return REAL_RECIPES[stage].options() if preset == "real" else {}


class FullTrainingRefused(ValueError):
    """A run that would train a pretrained encoder or backbone in full without `--allow_full_training true`."""


def check_full_training(model: DIFFA2Model, allowed: bool) -> None:
    """Refuse to train a pretrained base (Whisper, LLaDA) in full unless `allowed`: DIFFA-2 keeps both frozen."""
    config = model.config
    parts = {"encoder": (model.encoder, config.encoder_trainable, config.encoder_source),
             "backbone": (model.backbone, config.backbone_trainable, config.backbone_source)}
    full = {name: sum(p.numel() for p in module.parameters())
            for name, (module, trainable, source) in parts.items() if trainable and source is not None}
    if full and not allowed:
        total = sum(p.numel() for p in model.parameters())
        listed = " and ".join(f"the {name} ({count / 1e9:.2f} B parameters)" for name, count in full.items())
        raise FullTrainingRefused(
            f"refusing to train {listed} in full, {sum(full.values()) / total:.0%} of the model's "
            f"{total / 1e9:.2f} B parameters: DIFFA-2 keeps Whisper and LLaDA frozen and trains the adapters, prompt "
            f"embeddings and LoRA (--train_encoder false --train_backbone false --lora true). To train them anyway, "
            f"pass --allow_full_training true (the optimizer then holds state for every one of those parameters)"
        )
