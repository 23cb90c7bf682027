"""How many torch/OpenMP threads a command uses, chosen once per entry point and said in its first lines.

The default is the physical cores this process may run on (its CPU affinity, capped by a cgroup CPU quota), minus
the cores other processes keep busy right now (CPU time over a quarter of a second, from /proc/stat; the
1-minute load average where that is missing, which lags: a run started just after another one finished would
count the finished one), shared among the processes of a launch on
this node (torchrun's LOCAL_WORLD_SIZE), and at least 1: on a 2-core machine where another job keeps one core busy
a run takes 1 thread instead of fighting for both. `--threads N` overrides it, and so does OMP_NUM_THREADS when
`--threads` is not given.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")
THREADS_HELP = ("torch/OpenMP threads (default: the physical cores free for this process: cores minus the "
                f"machine's load, at least 1; {THREADS_ENV} is used when set)")


@dataclass
class ThreadArguments:
    """The `--threads` option of the training stages (a dataclass for HfArgumentParser)."""

    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and why: the cores and load it was chosen from, and who chose it."""

    threads: int
    cores: int
    load: float
    source: str  # "auto", "--threads" or THREADS_ENV
    processes: int = 1

    def describe(self) -> str:
        """One line for the console, e.g. 'threads: 2 (2 cores, load 0.1; --threads to change)'."""
        shared = f", {self.processes} processes" if self.processes > 1 else ""
        seen = f"{self.cores} cores, load {self.load:.1f}{shared}"
        if self.source == "auto":
            return f"threads: {self.threads} ({seen}; --threads to change)"
        return f"threads: {self.threads} (set by {self.source}; {seen})"


def choose_threads(cores: int, load: float, *, requested: int | None = None, env: str | None = None,
                   processes: int = 1) -> ThreadChoice:
    """The thread count for `cores` physical cores under `load`, shared by `processes`; `requested` > `env` > auto."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return ThreadChoice(requested, cores, load, "--threads", processes)
    if env:
        return ThreadChoice(parse_env_threads(env), cores, load, THREADS_ENV, processes)
    free = cores - math.floor(load + 0.5)
    return ThreadChoice(max(1, free // max(processes, 1)), cores, load, "auto", processes)


def parse_env_threads(value: str) -> int:
    """OMP_NUM_THREADS as a positive count (OpenMP's list form "4,2" gives its first level)."""
    first = value.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r} is not a positive number of threads; unset it or fix it")
    return int(first)


def physical_cores(cpus: Iterable[int], sysfs: Path = SYSFS_CPU) -> int:
    """Distinct physical cores among logical `cpus` (hyper-threads share one); the CPU count if sysfs is silent."""
    cpus = list(cpus)
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """The CPU quota of this process's cgroup (v2 `cpu.max`), rounded up; None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cores() -> int:
    """Physical cores this process may run on: its affinity's cores, capped by the cgroup quota."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = physical_cores(cpus)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def cpu_times(stat: Path = PROC_STAT) -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine in clock ticks, from /proc/stat's first line; None if unreadable."""
    try:
        fields_ = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)  # idle + iowait
    return sum(fields_[:8]) - idle, sum(fields_[:8])


def busy_cores(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float:
    """Logical CPUs kept busy between two `cpu_times` samples."""
    total = after[1] - before[1]
    return 0.0 if total <= 0 else (after[0] - before[0]) / total * cpus


def machine_load(interval: float = 0.25, stat: Path = PROC_STAT) -> float:
    """Cores busy right now (measured over `interval` seconds); the 1-minute load average where /proc is missing."""
    before = cpu_times(stat)
    if before is not None:
        time.sleep(interval)
        after = cpu_times(stat)
        if after is not None:
            return busy_cores(before, after, os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def apply_threads(requested: int | None = None, log: Callable[[str], None] = print) -> ThreadChoice:
    """Choose the thread count for this machine, set it in torch, and say so (once per launch: on rank 0)."""
    import torch

    choice = choose_threads(available_cores(), machine_load(), requested=requested,
                            env=os.environ.get(THREADS_ENV), processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(choice.threads)
    if os.environ.get("RANK", "0") == "0":
        log(choice.describe())
    return choice


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add `--threads N` to an argparse command line."""
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
