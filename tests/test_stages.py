"""Training stages: real recipes build trainers on real-format tiny bases; the embedded default runs and resumes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import sft_stage_options, small_run_args
from safetensors.torch import load_file

from diffa2.config import parse_config, read_yaml_config
from diffa2.data.synth import format_mc_prompt
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.stages import acoustic, semantic, sft
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.evaluate import evaluate_test_split
from diffa2.stages.runner import REPO_ROOT, SFTStage

ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, StageTrainingArguments)


@pytest.mark.parametrize(("name", "lora", "lead"), [("semantic", False, "prompt"), ("acoustic", False, "acoustic"),
                                                    ("sft", True, "acoustic")])
def test_real_recipes_build_their_trainers(tmp_path, real_format_bases, name, lora, lead):
    whisper, llada, recipe = real_format_bases
    yaml_path = REPO_ROOT / "stages" / f"{name}.yaml"
    real = read_yaml_config(yaml_path, ARG_TYPES)
    # DeepSpeed and bf16 need GPUs; everything else is the real recipe, pointed at tiny real-format bases.
    overrides = {k: v for k, v in real.items() if k not in ("deepspeed", "bf16")}
    args = parse_config(ARG_TYPES, ["--whisper_path", str(whisper), "--llada_path", str(llada), "--init_from", "none",
                                    "--recipe", str(recipe), "--output_dir", str(tmp_path / "run")],
                        "test", overrides=overrides)
    module = {"semantic": semantic, "acoustic": acoustic, "sft": sft}[name]
    stage = SFTStage(module.SPEC, *args).setup()
    targs = stage.trainer.args
    assert targs.learning_rate == real["learning_rate"] and targs.weight_decay == 0.05
    assert targs.per_device_train_batch_size == real["per_device_train_batch_size"]
    assert targs.warmup_steps == 1000 and targs.num_train_epochs == real["num_train_epochs"]
    assert stage.model.config.tap_layers == [3, 7, 11, 15, 19, 23, 27, 31]
    assert stage.model.config.num_queries == 64 and stage.model.config.num_prompt_embeddings == 20
    trainable = {n.split(".")[0] for n, p in stage.model.named_parameters() if p.requires_grad}
    expected = {"semantic_adapter", "prompt_embeddings"} | ({"acoustic_adapter"} if lead == "acoustic" else set())
    assert trainable == expected | ({"backbone"} if lora else set())
    if lora:
        assert all("lora_" in n for n, p in stage.model.named_parameters() if p.requires_grad and "backbone" in n)
    assert stage.model.config.speech_path == ("prompt+semantic" if lead == "prompt" else "acoustic+semantic")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, small_corpus):
    full = sft.main(small_run_args(tmp_path / "full", small_corpus, 4))
    # Interrupt: the same run stopped after its step-2 checkpoint (same schedule, since max_steps is unchanged).
    from transformers import TrainerCallback

    class StopAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    stage = SFTStage(sft.SPEC, *sft_stage_options(small_run_args(tmp_path / "resumed", small_corpus, 4))).setup()
    stage.trainer.add_callback(StopAfterTwo())
    stage.train()
    assert stage.trainer.state.global_step == 2
    resumed = sft.main(small_run_args(tmp_path / "resumed", small_corpus, 4, ["--resume", "true"]))
    assert resumed["steps"] == full["steps"] == 4
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_asr_warmup_trains_transcription_first_and_starts_from_it(tmp_path, small_corpus, capsys):
    run = tmp_path / "sft"
    summary = sft.main(small_run_args(run, small_corpus, 2, ["--asr_warmup_steps", "3"]))
    warm = run / "asr_warmup"
    assert summary["model"] == f"initialised from {warm / 'final'}"
    assert summary["asr_warmup"]["steps"] == 3 and summary["steps"] == 2
    assert json.loads((warm / "summary.json").read_text())["stage"] == "semantic"
    assert json.loads((warm / "final" / "config.json").read_text())["speech_path"] == "prompt+semantic"
    assert json.loads((run / "final" / "config.json").read_text())["speech_path"] == "acoustic+semantic"
    assert "ASR warm-up: 3 steps, transcription WER" in capsys.readouterr().out


@pytest.mark.slow
def test_curriculum_chains_stages_and_writes_reports(tmp_path, small_corpus, capsys):
    runs = tmp_path / "runs"
    s1 = semantic.main(small_run_args(runs / "semantic", small_corpus, 2))
    s2 = acoustic.main(small_run_args(runs / "acoustic", small_corpus, 2))
    s3 = sft.main(small_run_args(runs / "sft", small_corpus, 2))
    assert s1["model"] == "tiny preset, random initialisation" and "validation_wer" in s1
    assert s2["model"] == f"initialised from {runs / 'semantic' / 'final'}"
    assert s3["model"] == f"initialised from {runs / 'acoustic' / 'final'}"
    for stage in ("semantic", "acoustic", "sft"):
        assert (runs / stage / "loss.png").stat().st_size > 1000
        summary = json.loads((runs / stage / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["skipped_items"] == 0
    assert 0 <= s3["test"]["accuracy"] <= 100 and s3["test"]["total"] == 4
    # stage 1 is measured by its WER alone; stage 2 trains on plain questions and is asked that way, stage 3 with
    # MMAU's multiple-choice prompt
    assert "test" not in s1 and [s["test"]["prompt"] for s in (s2, s3)] == ["question", "choices"]
    assert "synthetic test accuracy" in capsys.readouterr().out


class ScriptedQA:
    """Stands in for AudioQA: records the prompts and answers from a script."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(config=SimpleNamespace(window_seconds=4.0))
        self.prompts, self.script = [], []

    def answer(self, waves, prompts, decode, seed=None):
        self.prompts += prompts
        return SimpleNamespace(texts=[self.script.pop(0) for _ in prompts], row_nfe=[decode.steps] * len(prompts))


@pytest.mark.parametrize("prompt", ["choices", "question"])
def test_test_split_is_asked_with_the_chosen_prompt_and_scored_against_the_choices(small_corpus, prompt, monkeypatch):
    # The scripted stand-in answers through `answer` (static batches); the continuous batcher gives the same entries
    # (tests/test_eval_runner.py).
    monkeypatch.setattr("diffa2.eval.core.covers", lambda decode: False)
    records = json.loads((small_corpus / "test_mmau.json").read_text())[:6]
    qa = ScriptedQA()
    # Item 0 answered with its answer, item 1 with a wrong choice, item 2 with text matching no choice, the rest right.
    wrong = next(c for c in records[1]["choices"] if c != records[1]["answer"])
    qa.script = [records[0]["answer"], wrong, "purple elephant", *(r["answer"] for r in records[3:])]
    result = evaluate_test_split(qa, small_corpus / "test_mmau.json", DecodeConfig(), limit=6, prompt=prompt)
    assert result["prompt"] == prompt and result["total"] == 6
    assert result["accuracy"] == pytest.approx(100 * 4 / 6)
    expected = [format_mc_prompt(r["question"], r["choices"]) if prompt == "choices" else r["question"]
                for r in records]
    assert qa.prompts == expected
    with pytest.raises(ValueError, match="test prompt 'letters'"):
        evaluate_test_split(qa, small_corpus / "test_mmau.json", DecodeConfig(), limit=6, prompt="letters")


def test_audio_path_learning_rate_multiplier(tmp_path, small_corpus):
    args = parse_config(ARG_TYPES, small_run_args(tmp_path, small_corpus, 2, ["--audio_lr_scale", "3",
                                                                              "--learning_rate", "1e-3"]), "test")
    stage = SFTStage(sft.SPEC, *args).setup()
    optimizer = stage.trainer.create_optimizer()
    names = {id(p): n.split(".")[0] for n, p in stage.model.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates.setdefault(names[id(p)], set()).add(group["lr"])
    assert rates["backbone"] == {1e-3}
    for part in ("encoder", "semantic_adapter", "acoustic_adapter", "prompt_embeddings"):
        assert len(rates[part]) == 1 and rates[part].pop() == pytest.approx(3e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(stage.model.parameters()))
