"""Reading pickled PyTorch weights (`.bin`/`.pt`) safely: `weights_only=True` always, failures named by file."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def load_weights_only(path: Path, *, mmap: bool = False) -> object:
    """``torch.load`` with ``weights_only=True``: a pickle that would run code is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint loadable with weights_only=True ({type(exc).__name__}: {first_line}); "
            "pickles are read as tensors only and never executed"
        ) from exc
