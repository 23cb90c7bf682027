"""Run guards of the training stages: non-finite steps are skipped and counted; the output directory is checked first.

- `NonFiniteGuard` (a Trainer callback): a step whose loss or gradients hold NaN/inf gets no optimizer update
  (every gradient is dropped before `optimizer.step()`, so AdamW moves nothing, not even by momentum or weight
  decay); the step is logged and counted, and `max_bad_steps` such steps in a row stop the run.
- `check_output_dir`: before training, the output directory must be writable and hold the run's checkpoints.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

SKIPPED_KEY = "skipped_step"  # log_history entries of skipped steps carry this key (the reason as its value)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient; the run stopped."""


class OutputDirError(OSError):
    """The output directory cannot take the run's files; the message names it and what is missing."""


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after `max_bad_steps` in a row."""

    def __init__(self, max_bad_steps: int) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.bad_losses: list[float] = []  # non-finite micro-batch losses since the last optimizer step
        self.in_a_row = 0

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record a micro-batch loss (called by the trainer after each forward/backward)."""
        if not torch.isfinite(loss).all():
            self.bad_losses.append(float(loss.detach().float().sum()))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        reason = self._reason(model)
        self.bad_losses = []
        if reason is None:
            self.in_a_row = 0
            return
        for param in model.parameters():
            param.grad = None  # torch optimizers skip parameters without a gradient: no update at all
        self.in_a_row += 1
        step = state.global_step + 1
        total = sum(SKIPPED_KEY in entry for entry in state.log_history) + 1
        state.log_history.append({SKIPPED_KEY: reason, "step": step})
        print(f"[diffa2] step {step}: {reason}; optimizer step skipped ({self.in_a_row} in a row, {total} in all)")
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"stopped at step {step}: {self.in_a_row} optimizer steps in a row had a NaN/inf loss or gradient "
                f"(--max_bad_steps {self.max_bad_steps}); the last checkpoint in {args.output_dir} holds finite "
                f"weights. Check the data and lower --learning_rate, or resume with --resume true"
            )

    def _reason(self, model: torch.nn.Module) -> str | None:
        """Why this step must be skipped (agreed over all processes), or None when it is fine."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        reason = None
        if self.bad_losses:
            reason = f"non-finite loss ({self.bad_losses[0]})"
        elif not grads_finite:
            reason = "non-finite gradient"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = grads[0].device if grads else torch.device("cpu")
            flag = torch.tensor([reason is not None], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and reason is None:
                reason = "non-finite loss or gradient on another process"
        return reason


def skipped_steps(log_history: list[dict]) -> list[int]:
    """Steps that were skipped for a non-finite loss or gradient (resumed runs included: the log is restored)."""
    return [entry["step"] for entry in log_history if SKIPPED_KEY in entry]


def estimate_run_bytes(model: torch.nn.Module, stored: list[str], args) -> int:
    """Peak disk use of a run: the checkpoints that exist at once (kept + the one being written) and the final one.

    A checkpoint is the `stored` tensors plus AdamW's two fp32 moments per trainable parameter.
    """
    state = model.state_dict()
    weights = sum(state[k].numel() * state[k].element_size() for k in stored)
    checkpoint = weights + sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    if args.save_strategy == "no":
        return weights
    if args.max_steps > 0:
        saves = args.max_steps // args.save_steps if args.save_steps >= 1 else round(1 / args.save_steps)
    else:  # epoch-based runs: the number of saves is not known before the data loader exists
        saves = (args.save_total_limit or 0) + 1
    if args.save_total_limit:
        saves = min(saves, args.save_total_limit + 1)
    return max(int(saves), 1) * checkpoint + weights


def check_output_dir(directory: Path, needed: int | None = None) -> None:
    """Fail before training when `directory` cannot be created or written, or has less than `needed` bytes free."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as probe:
            probe.write(b"diffa2")
            probe.flush()
    except OSError as err:
        raise OutputDirError(
            f"output directory {directory} is not writable ({err.strerror or err}); choose another --output_dir "
            f"or fix its permissions"
        ) from err
    if needed is None:
        return
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputDirError(
            f"output directory {directory} has {human_bytes(free)} free ({free} bytes) but the run needs about "
            f"{human_bytes(needed)} ({needed} bytes) for its checkpoints; free space, choose another --output_dir, "
            f"or keep fewer checkpoints (--save_total_limit)"
        )


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    if count < 1024:
        return f"{count} B"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024**exponent:.1f} {'KMGT'[exponent - 1]}iB"
