"""Splitting a benchmark over the processes of a `torchrun` launch: item i goes to rank i % N.

Each rank decodes its items into its own append-only log (`<stem>.rank<r>.jsonl`, fsynced per batch, so a killed
run resumes as in one process), waits for the others, and rank 0 merges every log in the benchmark's item order
into the usual final files. Logs are keyed by item content, so a run resumes under any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

# Ranks finish their shards at different times; the wait for the slowest one must not time out first.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """This process's share of a benchmark."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The shard torchrun (or any launcher setting RANK and WORLD_SIZE) gives this process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK {rank} outside WORLD_SIZE {world_size}")
        return cls(rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether the item at `index` (in the benchmark's order) is decoded by this process."""
        return index % self.world_size == self.rank

    def log_path(self, directory: Path, stem: str) -> Path:
        """This process's log; one process keeps the single-file name of unsharded runs."""
        return directory / (f"{stem}.jsonl" if self.world_size == 1 else f"{stem}.rank{self.rank}.jsonl")

    def default_device(self) -> str:
        """One GPU per process (LOCAL_RANK), else the CPU."""
        import torch

        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"

    def wait_for_all(self) -> None:
        """Return once every process has finished its shard (a gloo barrier: no GPU collective needed)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        dist.barrier()
        dist.destroy_process_group()


def log_paths(directory: Path, stem: str) -> list[Path]:
    """Every log of one run identity: the single-process one and those of each rank of sharded runs."""
    return sorted(p for p in [directory / f"{stem}.jsonl", *directory.glob(f"{stem}.rank*.jsonl")] if p.is_file())
