"""Faults of long runs: kill -9 then --resume, a crash while saving, NaN/inf steps, an unwritable or full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from helpers import sft_stage_options, small_run_args
from safetensors.torch import load_file
from transformers import TrainerCallback

import diffa2.modeling.checkpoint as checkpoint_module
from diffa2.modeling.checkpoint import NonFiniteWeightsError, save_pretrained
from diffa2.run_lock import LOCK_NAME
from diffa2.stages import sft
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.checkpoints import last_complete_checkpoint
from diffa2.stages.guards import SKIPPED_KEY, NonFiniteGuard, NonFiniteLossError, OutputDirError
from diffa2.stages.runner import DiffusionSFTTrainer, SFTStage

ARG_TYPES = (ModelArguments, DataArguments, EvalArguments, StageTrainingArguments)


def stage_for(output_dir, corpus, steps, extra=()) -> SFTStage:
    """A set-up tiny SFT stage (the same run `python -m diffa2.stages.sft` would do with these flags)."""
    return SFTStage(sft.SPEC, *sft_stage_options(small_run_args(output_dir, corpus, steps, extra))).setup()


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# kill -9, crash while saving, resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_stage_then_resume_ends_with_the_uninterrupted_weights(tmp_path, small_corpus):
    steps = 16
    full = sft.main(small_run_args(tmp_path / "full", small_corpus, steps))
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "diffa2.stages.sft", *small_run_args(killed, small_corpus, steps)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-4").is_dir():  # published only once complete
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-4 within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "final").exists() and (killed / LOCK_NAME).exists()  # the kill left a stale lock

    resumed = sft.main(small_run_args(killed, small_corpus, steps, ["--resume", "true"]))  # takes it over
    assert resumed["steps"] == full["steps"] == steps and not (killed / LOCK_NAME).exists()
    a, b = final_weights(tmp_path / "full"), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_crash_while_saving_keeps_the_previous_checkpoint_and_resume_uses_it(tmp_path, small_corpus, monkeypatch,
                                                                             capsys):
    real_save_file = checkpoint_module.save_file
    calls = []

    def disk_full_on_second_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_on_second_save)
    run = tmp_path / "run"
    stage = stage_for(run, small_corpus, 4)
    with pytest.raises(OSError, match="No space left on device"):
        stage.train()
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no half checkpoint
    monkeypatch.undo()

    # What a kill -9 in the middle of a save leaves: a staging folder; and an incomplete folder from elsewhere.
    leftover = run / ".checkpoint-4.partial-staging" / "checkpoint-4"
    shutil.copytree(run / "checkpoint-2", leftover, ignore=shutil.ignore_patterns("trainer_state.json"))
    (run / "checkpoint-6").mkdir()
    shutil.copy(run / "checkpoint-2" / "config.json", run / "checkpoint-6")
    messages = []
    assert last_complete_checkpoint(run, messages.append) == run / "checkpoint-2"
    assert messages == [f"removing {leftover.parent}: an incomplete checkpoint left by an interrupted save",
                        f"ignoring {run / 'checkpoint-6'}: incomplete (missing model.safetensors, trainer_state.json)"]
    assert not leftover.parent.exists()

    shutil.rmtree(run / "checkpoint-6")
    summary = sft.main(small_run_args(run, small_corpus, 4, ["--resume", "true"]))
    assert summary["steps"] == 4 and f"resuming from {run / 'checkpoint-2'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf
# ---------------------------------------------------------------------------------------------------------------


def poison_loss(monkeypatch, bad_steps: set[int] | None) -> None:
    """Make the loss NaN on the given (1-based) optimizer steps, or on every step when `bad_steps` is None."""
    real = DiffusionSFTTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        return loss * float("nan") if bad_steps is None or step in bad_steps else loss

    monkeypatch.setattr(DiffusionSFTTrainer, "compute_loss", compute_loss)


@pytest.mark.slow
def test_nan_loss_steps_are_skipped_counted_and_change_no_weight(tmp_path, small_corpus, monkeypatch, capsys):
    poison_loss(monkeypatch, {3, 4})
    stage = stage_for(tmp_path / "run", small_corpus, 6)
    snapshots = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    stage.trainer.add_callback(Record())
    stage.train()
    same = [all(torch.equal(snapshots[2][k], snapshots[s][k]) for k in snapshots[2]) for s in (3, 4, 5)]
    assert same == [True, True, False]  # no update on the skipped steps, not even AdamW's momentum/decay
    assert stage.summary["skipped_steps"] == [3, 4]
    assert [e["step"] for e in stage.trainer.state.log_history if SKIPPED_KEY in e] == [3, 4]
    out = capsys.readouterr().out
    assert "step 4: non-finite loss (nan); optimizer step skipped (2 in a row, 2 in all)" in out
    stage.save()
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


@pytest.mark.slow
def test_nan_on_every_step_stops_the_run_after_max_bad_steps(tmp_path, small_corpus, monkeypatch):
    poison_loss(monkeypatch, None)
    run = tmp_path / "run"
    stage = stage_for(run, small_corpus, 10, ["--max_bad_steps", "3"])
    initial = {k: v.clone() for k, v in stage.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 3: 3 optimizer steps in a row had a NaN/inf"):
        stage.train()
    saved = load_file(run / "checkpoint-2" / "model.safetensors")  # written before the stop: the initial weights
    assert all(torch.equal(saved[k], initial[k]) for k in saved)


def test_non_finite_gradient_with_a_finite_loss_is_skipped(capsys):
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[1.0, float("inf")], [0.0, 0.0]])
    model.bias.grad = torch.zeros(2)
    guard = NonFiniteGuard(max_bad_steps=5)
    guard.note_loss(torch.tensor(0.5))
    state = namedtuple("State", "global_step log_history")(7, [])
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert model.weight.grad is None and model.bias.grad is None
    assert state.log_history == [{SKIPPED_KEY: "non-finite gradient", "step": 8}]
    model.weight.grad = torch.ones(2, 2)
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert model.weight.grad is not None and guard.in_a_row == 0 and len(state.log_history) == 1


def test_weights_with_nan_are_never_written(tmp_path, tiny_model, chat):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(tiny_model.semantic_adapter.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to save .*\['semantic_adapter\..*NaN/inf"):
        save_pretrained(tiny_model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # and no staging folder is left


# ---------------------------------------------------------------------------------------------------------------
# Disk full, unwritable output directory
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_fails_before_training(tmp_path, small_corpus):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match=rf"output directory {run} is not writable"):
            stage_for(run, small_corpus, 2)
    finally:
        run.chmod(0o700)


def test_output_dir_that_cannot_be_created_fails_before_training(tmp_path, small_corpus):
    (tmp_path / "a-file").write_text("x")
    run = tmp_path / "a-file" / "run"
    with pytest.raises(OutputDirError, match=rf"output directory {run} is not writable \(Not a directory\)"):
        stage_for(run, small_corpus, 2)


def test_full_disk_fails_before_training_naming_the_directory_free_and_needed_bytes(tmp_path, small_corpus,
                                                                                    monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("diffa2.stages.guards.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run = tmp_path / "run"
    with pytest.raises(OutputDirError) as err:
        stage_for(run, small_corpus, 4)
    message = str(err.value)
    assert message.startswith(f"output directory {run} has 1000 B free (1000 bytes) but the run needs about ")
    needed = int(message.split(" bytes) for its checkpoints")[0].rsplit("(", 1)[1])
    assert needed > 1000 and "--save_total_limit" in message
