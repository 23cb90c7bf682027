"""Loss-curve plot of a training run (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(history: list[dict], path: str | Path, title: str) -> None:
    """Plot `loss` against `step` from Trainer log entries (log scale when every loss is positive)."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([e["step"] for e in history], [e["loss"] for e in history], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if all(e["loss"] > 0 for e in history) else "linear")  # RL losses can be negative
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reward_curve(history: list[dict], path: str | Path, title: str) -> None:
    """Plot the rollouts' mean reward and accuracy (`reward/mean`, `rollout/accuracy`) against `step`."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label in (("reward/mean", "mean reward"), ("rollout/accuracy", "accuracy of the rollouts")):
        points = [(e["step"], e[key]) for e in history if key in e]
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
