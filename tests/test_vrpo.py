"""Stage 4 (VRPO): the pair collator, the shared-prefix forward, the frozen reference, the loss at step 0, gradients,
the real recipe, and a tiny end-to-end run chained after SFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import clip, make_tiny_model, small_run_args

from diffa2.audio import LogMelFeaturizer
from diffa2.config import parse_config, read_yaml_config
from diffa2.data.collate import PairCollator, PairExample, SFTCollator, SFTExample
from diffa2.data.recipe import DataRecipe
from diffa2.rl import ElboEstimator, ElboPair
from diffa2.stages import curriculum, sft, vrpo
from diffa2.stages.arguments import ModelArguments
from diffa2.stages.reference_models import FrozenReference
from diffa2.stages.runner import REPO_ROOT, previous_checkpoint
from diffa2.stages.vrpo import VRPOStage, pair_elbos, vrpo_metrics

PAIRS = [
    ("What is the pitch of the tone?", "high", "low"),
    ("How many beeps are there?", "three", "two one"),
    ("Is the recording noisy?", "no", "yes"),
]


def pair_examples(seconds=(1.0, 1.6, 0.7)) -> list[PairExample]:
    """Clips of different lengths, so padding of features and prompts is exercised."""
    return [PairExample(clip(length, 300 + 100 * i, seed=i), question, chosen, rejected)
            for i, ((question, chosen, rejected), length) in enumerate(zip(PAIRS, seconds, strict=True))]


def collator_for(chat, answer_length=8) -> PairCollator:
    featurizer = LogMelFeaturizer(n_mels=80, window_seconds=4.0)
    return PairCollator(chat, featurizer, answer_length=answer_length)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer_length", [8, None])
def test_pair_collator_shares_audio_and_prompt_and_pads_answers_with_eos(chat, answer_length):
    examples = pair_examples()
    batch = collator_for(chat, answer_length=answer_length)(examples)
    width = answer_length or max(len(chat.encode_answer(t)) for _, c, r in PAIRS for t in (c, r))
    assert batch.input_features.shape[0] == len(examples) == len(batch.prompt_ids) == len(batch.audio_slots)
    assert batch.chosen_ids.shape == batch.rejected_ids.shape == batch.answer_mask.shape == (3, width)
    assert batch.answer_mask.all() and torch.equal(batch.answers, torch.cat([batch.chosen_ids, batch.rejected_ids]))
    # one prompt and one clip per pair; each answer as SFT would train it (text, <|eot_id|>, EOS padding)
    featurizer = LogMelFeaturizer(n_mels=80, window_seconds=4.0)
    for field in ("chosen", "rejected"):
        sft_batch = SFTCollator(chat, featurizer, answer_length=width)(
            [SFTExample(ex.wave, ex.instruction, getattr(ex, field)) for ex in examples]
        )
        assert torch.equal(getattr(batch, f"{field}_ids"), sft_batch.answer_ids)
        assert batch.prompt_ids == sft_batch.prompt_ids and batch.audio_slots == sft_batch.audio_slots
        assert torch.equal(batch.input_features, sft_batch.input_features)
    for row, (_, chosen, _) in zip(batch.chosen_ids.tolist(), PAIRS, strict=True):
        text = chat.encode_answer(chosen)
        assert row[: len(text)] == text and text[-1] == chat.ids.eot
        assert row[len(text) :] == [chat.ids.eos] * (width - len(text))


def test_synth_recipe_reads_rejected_answers(small_corpus):
    from diffa2.data.dataset import PreferenceDataset
    from diffa2.data.recipe import load_split

    recipe = DataRecipe.load(REPO_ROOT / "data_recipes" / "synth_vrpo.yaml")
    items, problems = load_split(recipe.train, synth_dir=small_corpus, seed=0, on_error="raise")
    example = PreferenceDataset(items, 4.0)[0]
    record = items[0].record.fields
    assert not problems and example.chosen == record["chosen"] == record["target"]
    assert example.rejected == record["rejected"] != example.chosen
    unpaired = DataRecipe.load(REPO_ROOT / "data_recipes" / "synth_sft.yaml")
    sft_items, _ = load_split(unpaired.train, synth_dir=small_corpus, seed=0)
    with pytest.raises(ValueError, match="rejected_field"):
        PreferenceDataset(sft_items, 4.0)


# --------------------------------------------------------------------------------------------------
# model: one prefix per pair, the frozen reference
# --------------------------------------------------------------------------------------------------


def test_forward_with_several_answers_per_prompt_equals_separate_calls(chat, tiny_model):
    batch = collator_for(chat)(pair_examples())
    inputs = (batch.input_features, batch.feature_lengths, batch.prompt_ids, batch.audio_slots)
    with torch.no_grad():
        stacked = tiny_model(*inputs, batch.answers, batch.answer_mask.repeat(2, 1), answers_per_prompt=2)
        chosen = tiny_model(*inputs, batch.chosen_ids, batch.answer_mask)
        rejected = tiny_model(*inputs, batch.rejected_ids, batch.answer_mask)
    torch.testing.assert_close(stacked, torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="answers per prompt"):
        tiny_model(*inputs, batch.answers, answers_per_prompt=3)


def lora_policy(chat):
    """Stage 3/4 at real scale in miniature: frozen encoder and backbone, trainable adapters, prompts and LoRA."""
    model = make_tiny_model(chat)
    model.add_lora()
    model.set_trainable(encoder=False, backbone=False)
    return model.train()


def test_step0_loss_is_log2_with_antithetic_sampling(chat, tiny_model):
    """Policy == reference and shared draws: every log ratio, hence every margin, is exactly 0 (tiny: no dropout)."""
    batch = collator_for(chat)(pair_examples())
    tiny_model.train()
    reference = FrozenReference(tiny_model)
    estimator = ElboEstimator(n_t=4, form="l")
    seeded = torch.Generator().manual_seed(0)
    elbos = pair_elbos(tiny_model, reference, batch, estimator, chat.ids.mask, generator=seeded)
    assert torch.equal(elbos.policy_terms, elbos.reference_terms) and (elbos.policy_terms < 0).all()
    losses, metrics = vrpo_metrics(elbos, beta=0.2)
    assert torch.equal(losses, torch.full((3,), math.log(2.0)))
    assert metrics["rewards/margins"] == 0 and metrics["vrpo/score_variance"] == 0
    assert losses.requires_grad  # the policy's side carries the gradient, the reference's does not
    # without antithetic sampling the reference has draws of its own: the margins are noise around 0
    independent = pair_elbos(tiny_model, reference, batch, estimator, chat.ids.mask, antithetic=False,
                             generator=torch.Generator().manual_seed(0))
    noisy_losses, _ = vrpo_metrics(independent, beta=0.2)
    assert not torch.allclose(noisy_losses, losses)


def test_reference_copies_only_trainable_tensors_and_shares_the_rest(chat):
    model = lora_policy(chat)
    reference = FrozenReference(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(reference.tensors) == trainable and any("lora_" in name for name in trainable)
    assert not any(name.startswith(("encoder.", "backbone.")) and "lora_" not in name for name in reference.tensors)
    assert all(not t.requires_grad for t in reference.tensors.values())


def test_gradient_reaches_only_trainable_tensors_and_reference_stays_fixed(chat):
    model = lora_policy(chat)
    batch = collator_for(chat)(pair_examples())
    reference = FrozenReference(model)
    snapshot = {name: t.clone() for name, t in reference.tensors.items()}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    estimator = ElboEstimator(n_t=4, form="l")

    def elbos():  # the same draws every time
        return pair_elbos(model, reference, batch, estimator, chat.ids.mask, generator=torch.Generator().manual_seed(0))

    model.eval()  # no LoRA dropout: the step-0 loss is exactly log 2 and the step's effect is deterministic
    initial = elbos()
    losses, _ = vrpo_metrics(initial, beta=0.2)
    assert torch.equal(losses, torch.full((3,), math.log(2.0)))
    losses.mean().backward()
    for name, p in model.named_parameters():  # the prompt embeddings are unused on the stage-2 speech path
        assert (p.grad is not None) == (p.requires_grad and not name.startswith("prompt_embeddings")), name
    assert any(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05).step()

    after = elbos()
    assert all(torch.equal(reference.tensors[n], snapshot[n]) for n in snapshot)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(after.reference_terms, initial.reference_terms)  # same draws, same reference outputs
    assert not torch.equal(after.policy_terms, initial.policy_terms)  # the policy moved
    new_losses, metrics = vrpo_metrics(after, beta=0.2)
    assert new_losses.mean() < math.log(2.0) and metrics["rewards/margins"] > 0  # one step on the same draws helps


def test_score_variance_by_hand():
    # n_t = 2 timesteps x n_yt = 2 masks, one pair: per timestep, average the masks' (policy − reference) terms
    policy = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0], [6.0, 1.0]])  # (n=4, 2P=2): chosen, rejected
    elbos = ElboPair(policy, torch.zeros_like(policy), n_t=2)
    # timestep means: (2, 1) and (4, 1); scores β(c − r) = 0.5·(1, 3); sample variance 2·0.25 = 0.5; / n_t
    assert elbos.score_variance(beta=0.5).tolist() == [0.25]
    assert ElboPair(policy, policy, n_t=1).score_variance(0.5) is None
    chosen, rejected, ref_chosen, ref_rejected = elbos.scores()
    assert (chosen.item(), rejected.item(), ref_chosen.item()) == (3.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def test_vrpo_without_the_sft_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*run `python -m diffa2\.stages\.sft --output_dir "):
        vrpo.main(["--output_dir", str(tmp_path / "runs" / "vrpo")])
    with pytest.raises(FileNotFoundError, match=r"python -m diffa2\.stages\.sft"):
        previous_checkpoint(ModelArguments(), vrpo.SPEC, tmp_path / "runs" / "vrpo")
    assert previous_checkpoint(ModelArguments(model="none"), vrpo.SPEC, tmp_path / "runs" / "vrpo") is None
    # the SFT stages keep falling back to a fresh model
    assert previous_checkpoint(ModelArguments(), sft.SPEC, tmp_path / "runs" / "sft") is None


def test_real_recipe_builds_its_trainer(tmp_path, real_format_bases):
    whisper, llada, _ = real_format_bases
    recipe = tmp_path / "pairs.yaml"
    pairs = f"  - path: {tmp_path / 'data.json'}\n    audio_root: {tmp_path / 'audio'}\n    rejected_field: rejected\n"
    recipe.write_text(f"name: t\ntrain:\n{pairs}validation:\n{pairs}")
    real = read_yaml_config(REPO_ROOT / "stages" / "vrpo.yaml", vrpo.ARG_TYPES)
    overrides = {k: v for k, v in real.items() if k not in ("deepspeed", "bf16")}  # GPU-only settings
    args = parse_config(vrpo.ARG_TYPES, ["--whisper_path", str(whisper), "--llada_path", str(llada), "--init_from",
                                         "none", "--recipe", str(recipe), "--output_dir", str(tmp_path / "run")],
                        "test", overrides=overrides)
    stage = VRPOStage(vrpo.SPEC, *args).setup()
    targs, config = stage.trainer.args, stage.vrpo_args
    assert (targs.learning_rate, targs.weight_decay, targs.warmup_steps, targs.max_grad_norm) == (5e-5, 0.05, 1000, 1)
    assert targs.per_device_train_batch_size == 1 and targs.num_train_epochs == 10 and targs.seed == 42
    assert real["bf16"] is True and real["deepspeed"].endswith("zero1_offload.json")
    assert (config.beta, config.n_t, config.n_yt, config.elbo_form, config.antithetic) == (0.2, 4, 1, "count", True)
    assert stage.trainer.estimator.budget == 4
    trainable = {n.split(".")[0] for n, p in stage.model.named_parameters() if p.requires_grad}
    assert trainable == {"semantic_adapter", "acoustic_adapter", "prompt_embeddings", "backbone"}
    assert all("lora_" in n for n, p in stage.model.named_parameters() if p.requires_grad and "backbone" in n)
    assert set(stage.reference.tensors) == {n for n, p in stage.model.named_parameters() if p.requires_grad}
    assert len(stage.validation_pairs) == 3 and stage.validation_pairs[0].rejected == "low"


@pytest.mark.slow
def test_curriculum_runs_vrpo_after_sft_and_reports_before_and_after(tmp_path, small_corpus, capsys):
    runs = tmp_path / "runs"
    # the curriculum appends --output_dir RUNS/<stage>, which overrides the one in the tiny-run flags
    sft_summary, summary = curriculum.main(["--runs_dir", str(runs), "--stages", "sft,vrpo", "--",
                                            *small_run_args(tmp_path / "unused", small_corpus, 2)])
    assert summary["model"] == f"initialised from {runs / 'sft' / 'final'}" and summary["steps"] == 2
    written = json.loads((runs / "vrpo" / "summary.json").read_text())
    before, after = written["before"], written["preference"]
    assert before["preference"]["max_log_ratio"] == 0 and before["preference"]["reward_accuracy"] == 0
    assert after["pairs"] == before["preference"]["pairs"] > 0 and 0 <= after["accuracy"] <= 100
    assert before["test"] == sft_summary["test"]  # "before" is the stage-3 model, evaluated the same way
    assert written["test"]["total"] == 4
    log = [json.loads(line) for line in (runs / "vrpo" / "train_log.jsonl").read_text().splitlines()]
    first = next(entry for entry in log if "loss" in entry)
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-4)  # step 0: the policy is the reference
    assert {"rewards/margins", "rewards/accuracies", "vrpo/score_variance", "elbo/chosen"} <= set(first)
    assert (runs / "vrpo" / "loss.png").stat().st_size > 1000
    assert (runs / "vrpo" / "final" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "preference accuracy on" in out and "synthetic test accuracy:" in out
    assert f"preference {before['preference']['accuracy']:.1f}% -> {after['accuracy']:.1f}%" in out


def test_vrpo_learns_the_preferences_of_a_few_pairs(chat, tiny_model):
    """Optimisation works end to end: a few steps make the model rank chosen above rejected on its training pairs,
    against the frozen reference, under draws it never trained on."""
    batch = collator_for(chat)(pair_examples())
    reference = FrozenReference(tiny_model)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    estimator = ElboEstimator(n_t=4, form="l")
    tiny_model.train()
    for _ in range(15):
        losses, _ = vrpo_metrics(pair_elbos(tiny_model, reference, batch, estimator, chat.ids.mask), beta=0.2)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    tiny_model.eval()
    with torch.no_grad():
        held_out = pair_elbos(tiny_model, reference, batch, ElboEstimator(n_t=64, form="l", stratified=True),
                              chat.ids.mask, generator=torch.Generator().manual_seed(123))
    losses, metrics = vrpo_metrics(held_out, beta=0.2)
    assert metrics["rewards/accuracies"] == 1 and (losses < math.log(2.0)).all()
