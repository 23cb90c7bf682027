"""`--preset real`: DIFFA-2's recipe without `--config`, built on the meta device at full size; its safety rails."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from accelerate import init_empty_weights
from helpers import clip, small_run_args
from tiny_checkpoints import write_llada_8b_config, write_whisper_large_v3_config

from diffa2.audio import LogMelFeaturizer
from diffa2.chat import AudioRef, ChatFormat, Conversation, Turn
from diffa2.config import read_yaml_config
from diffa2.data.collate import SFTCollator, SFTExample
from diffa2.data.dataset import TokenBudget, items_within
from diffa2.data.recipe import DataRecipe, load_split
from diffa2.diffusion.objective import sft_loss
from diffa2.modeling.model import DIFFA2Model
from diffa2.modeling.presets import real_config
from diffa2.stages import sft
from diffa2.stages.cli import SFT_ARG_TYPES, parse_stage_options, stage_overrides
from diffa2.stages.real_recipe import LAUNCH_KEYS, REAL_RECIPES, FullTrainingRefused
from diffa2.stages.runner import REPO_ROOT, configure_training

# DIFFA-2 at full size: Whisper-large-v3 encoder + LLaDA-8B-Instruct, adapters, 20 prompt embeddings, LoRA r 8.
SEMANTIC, ACOUSTIC, PROMPTS = 36_392_448, 47_892_992, 20 * 4096
LORA = 32 * (3 * 8 * (4096 + 4096) + 2 * 8 * (4096 + 12288))  # r (in + out) on q, k, v and ff, up in 32 blocks
TOTAL = 8_751_597_568


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Config-only Whisper-large-v3 and LLaDA-8B-Instruct directories (their config.json keys, no weights)."""
    root = tmp_path_factory.mktemp("bases")
    return write_whisper_large_v3_config(root / "whisper-large-v3"), write_llada_8b_config(root / "LLaDA-8B-Instruct")


def real_args(bases, *flags: str, stage: str = "sft") -> tuple:
    """The options `python -m diffa2.stages.<stage> --preset real ...` parses (no --config; bf16 needs a GPU)."""
    whisper, llada = bases
    argv = ["--preset", "real", "--whisper_path", str(whisper), "--llada_path", str(llada), "--bf16", "false", *flags]
    *parsed, _threads = parse_stage_options(SFT_ARG_TYPES, argv, "test", stage_overrides(stage, sft.DEFAULTS, argv))
    return tuple(parsed)


def meta_model(model_args) -> DIFFA2Model:
    """The real preset's model on the meta device (sizes from the config files; no memory, no weights)."""
    with init_empty_weights():
        model = DIFFA2Model(real_config(model_args.whisper_path, model_args.llada_path))
    configure_training(model, model_args)
    return model


def trainable_by_part(model: DIFFA2Model) -> dict[str, int]:
    parts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            parts[name.split(".")[0]] = parts.get(name.split(".")[0], 0) + param.numel()
    return parts


def test_real_preset_trains_exactly_the_adapters_prompts_and_lora(bases, capsys):
    model_args, data_args, _, train_args = real_args(bases)
    # DIFFA-2's loss settings and schedule, without --config.
    assert (data_args.answer_canvas, data_args.masking_form, data_args.stop_token_loss_weight,
            data_args.loss_reduction) == ("batch", "ratio", 1.0, "batch")
    assert (train_args.learning_rate, train_args.lr_scheduler_type, train_args.warmup_steps, train_args.weight_decay,
            train_args.max_grad_norm, train_args.num_train_epochs, train_args.per_device_train_batch_size) == (
        5e-5, "cosine", 1000, 0.05, 1.0, 10, 3)
    assert train_args.output_dir == "runs/real/sft"
    model = meta_model(model_args)
    assert next(model.parameters()).device.type == "meta"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with capsys.disabled():
        print(f"\nreal preset, stage 3: {trainable:,} of {TOTAL:,} parameters trainable")
    assert trainable == 99_047_424 == SEMANTIC + ACOUSTIC + PROMPTS + LORA
    assert sum(p.numel() for p in model.parameters()) == TOTAL
    assert trainable_by_part(model) == {"semantic_adapter": SEMANTIC, "acoustic_adapter": ACOUSTIC,
                                        "prompt_embeddings": PROMPTS, "backbone": LORA}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone"))


@pytest.mark.parametrize(("stage", "expected"), [
    ("semantic", {"semantic_adapter": SEMANTIC, "prompt_embeddings": PROMPTS}),  # 36.47 M
    ("acoustic", {"semantic_adapter": SEMANTIC, "acoustic_adapter": ACOUSTIC, "prompt_embeddings": PROMPTS}),
])
def test_real_preset_trainable_sets_of_the_alignment_stages(bases, stage, expected):
    model_args, *_ = real_args(bases, stage=stage)
    assert trainable_by_part(meta_model(model_args)) == expected


@pytest.mark.parametrize(("flag", "part"), [("--train_backbone", "the backbone (8.03 B parameters)"),
                                            ("--train_encoder", "the encoder (0.64 B parameters)")])
def test_training_a_pretrained_base_in_full_is_refused_unless_allowed(bases, flag, part):
    model_args, *_ = real_args(bases, flag, "true")
    with pytest.raises(FullTrainingRefused, match=rf"refusing to train {re.escape(part)} in full.*"
                                                   r"--allow_full_training true"):
        meta_model(model_args)
    model_args, *_ = real_args(bases, flag, "true", "--allow_full_training", "true")
    model = meta_model(model_args)
    module = model.backbone if flag == "--train_backbone" else model.encoder
    assert all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("stage", sorted(REAL_RECIPES))
def test_stage_yaml_is_the_typed_recipe(stage):
    """stages/<stage>.yaml holds exactly the preset's options plus the launch keys: one source of truth."""
    from diffa2.stages import rl, vrpo

    arg_types = rl.ARG_TYPES if stage == "rl" else vrpo.ARG_TYPES  # vrpo's options cover the SFT stages'
    assert read_yaml_config(REPO_ROOT / "stages" / f"{stage}.yaml", arg_types) == {
        **REAL_RECIPES[stage].options(), **LAUNCH_KEYS}


def test_token_budget_names_what_does_not_fit():
    fixed = TokenBudget(max_sequence_length=64, speech_tokens=20, canvas=4)
    assert fixed.problem(30, 4) is None
    assert fixed.problem(30, 301) == "its answer has 301 tokens, more than the 4-token answer canvas"
    assert fixed.problem(41, 4) == ("prompt (41) + speech (up to 20) + answer (4) tokens exceed the backbone's "
                                    "64-token window")
    per_batch = TokenBudget(max_sequence_length=64, speech_tokens=20, canvas=None)
    assert per_batch.problem(30, 14) is None and per_batch.problem(30, 15) is not None


def test_per_batch_canvas_loss_equals_hand_computation(chat):
    """Answers EOS-padded to the batch's longest; loss = Σ masked CE / p over the batch's summed answer length."""
    featurizer = LogMelFeaturizer(80, 4.0)
    batch = SFTCollator(chat, featurizer, answer_length=None)([SFTExample(clip(1.0), "Pitch?", "high"),
                                                               SFTExample(clip(1.0), "How many?", "two three")])
    short, long = chat.encode_answer("high"), chat.encode_answer("two three")
    width = len(long)
    assert batch.answer_ids.tolist() == [short + [chat.ids.eos] * (width - len(short)), long]
    vocab = len(chat.tokenizer)

    def uniform_model(*inputs) -> torch.Tensor:  # every token equally likely: CE = log V at every position
        return torch.zeros(2, width, vocab)

    loss = sft_loss(uniform_model, batch, chat.ids.mask, form="ratio", reduction="batch",
                    generator=torch.Generator().manual_seed(0))
    # By hand, with the same draws: t ~ U(0, 1) per row, p = 0.999 t + 0.001, a token is masked when its draw < p.
    draws = torch.Generator().manual_seed(0)
    t = torch.rand(2, generator=draws)
    u = torch.rand(2, width, generator=draws)
    p = 0.999 * t + 0.001
    masked = (u < p[:, None]).sum(dim=1)
    expected = math.log(vocab) * sum(masked[i].item() / p[i].item() for i in range(2)) / (2 * width)
    # "high" is 4 tokens + end of turn + 3 EOS; "two three" 7 + end of turn: 8 positions each, 16 in the batch.
    assert width == 8 and masked.tolist() == [5, 7] and p.tolist() == pytest.approx([0.49676, 0.76845], abs=1e-5)
    assert expected == pytest.approx(math.log(400) * (5 / 0.4967603 + 7 / 0.7684536) / 16) == pytest.approx(7.18018)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_answers_too_long_for_the_canvas_are_counted_before_training(small_corpus, tmp_path):
    """A 300-token answer in a tiny run: skipped and counted before training, never an error mid-run."""
    chat = ChatFormat.from_pretrained(small_corpus / "tokenizer")  # the corpus's: what the tiny run trains with
    records = json.loads((small_corpus / "stage3_sft_train.json").read_text())
    long_answer = " ".join(["high"] * 300)
    assert len(chat.encode_answer(long_answer)) == 301  # 300 tokens + end of turn
    long = {**records[0], "target": long_answer}
    (tmp_path / "train.json").write_text(json.dumps([long] + records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: long\ntrain:\n  - path: {tmp_path / 'train.json'}\n    audio_root: {small_corpus}\n")
    items, _ = load_split(DataRecipe.load(recipe).train, synth_dir=small_corpus, seed=0)
    kept, too_long = items_within(items, chat, TokenBudget(4096, 100, canvas=4))
    assert len(kept) == len(records) and list(too_long.values()) == [
        "its answer has 301 tokens, more than the 4-token answer canvas"]
    flags = ["--recipe", str(recipe), "--eval_limit", "1"]
    summary = sft.main(small_run_args(tmp_path / "run", small_corpus, 2, flags))
    assert summary["steps"] == 2 and summary["too_long_items"] == 1 and summary["skipped_items"] >= 1


def test_a_row_never_gets_padding_past_its_window(chat):
    """A long answer in the batch pads a long-prompt batch-mate with EOS; padding past that row's window is cut."""
    featurizer = LogMelFeaturizer(80, 4.0)
    examples = [SFTExample(clip(1.0), "What is the pitch of the tone? How many beeps are there?", "high"),
                SFTExample(clip(1.0), "Pitch?", "two three four loud quiet")]
    long_prompt = len(chat.encode_prompt(examples[0].instruction)[0])
    short, long = (len(chat.encode_answer(ex.answer)) for ex in examples)
    window = long_prompt + short + 2  # row 0 holds its answer and 2 EOS; row 1's prompt leaves room for its answer
    batch = SFTCollator(chat, featurizer, answer_length=None, text_window=window)(examples)
    assert batch.answer_ids.shape[1] == long and long > short + 2
    assert batch.answer_mask.tolist() == [[True] * (short + 2) + [False] * (long - short - 2), [True] * long]


def test_a_two_clip_row_is_cut_to_the_room_its_two_clips_leave(chat):
    """A row holding two clips has one clip's speech tokens less room than `text_window` (a one-clip row's)."""
    speech = 50  # speech tokens of a full clip
    conversation = Conversation((Turn("user", (AudioRef(), "Pitch?")), Turn("assistant", ("high",)),
                                 Turn("user", (AudioRef(), "Which clip is louder?"))))
    examples = [SFTExample([clip(1.0), clip(1.0, 500.0)], conversation, "two"),
                SFTExample(clip(1.0), "Pitch?", "two three four loud quiet")]
    two_clips, one_clip = (len(chat.encode(ex.instruction)[0]) for ex in examples)
    short, long = (len(chat.encode_answer(ex.answer)) for ex in examples)
    window = two_clips + 2 * speech + short + 2  # row 0 holds its answer and 2 EOS besides its prompt and clips
    budget = TokenBudget(window, speech, canvas=None)  # both items fit, as `items_within` would check them
    assert budget.problem(two_clips, short, clips=2) is None and budget.problem(one_clip, long, clips=1) is None
    batch = SFTCollator(chat, LogMelFeaturizer(80, 4.0), text_window=window - speech, speech_tokens=speech)(examples)
    assert batch.input_features.shape[0] == 3 and batch.answer_ids.shape[1] == long and long > short + 2
    assert batch.answer_mask.tolist() == [[True] * (short + 2) + [False] * (long - short - 2), [True] * long]
    held = batch.answer_mask.sum(1).tolist()
    assert two_clips + 2 * speech + held[0] == window and one_clip + speech + held[1] <= window
