"""The thread choice of every entry point: cores minus load, shared by a launch's processes; --threads and
OMP_NUM_THREADS override; the console line says which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffa2.threads import (
    apply_threads,
    busy_cores,
    cgroup_cpu_limit,
    choose_threads,
    cpu_times,
    parse_env_threads,
    physical_cores,
)


@pytest.mark.parametrize(
    ("cores", "load", "processes", "threads"),
    [
        (2, 0.1, 1, 2),  # an idle 2-core machine: both cores
        (2, 0.6, 1, 1),  # another job keeps about one core busy
        (2, 1.5, 1, 1),  # rounded load 2: still at least 1
        (2, 7.0, 1, 1),  # overloaded: at least 1
        (16, 3.4, 1, 13),  # 16 - round(3.4)
        (16, 0.0, 4, 4),  # torchrun --nproc_per_node 4: a quarter each
        (16, 4.0, 4, 3),  # (16 - 4) // 4
        (2, 0.0, 8, 1),  # more processes than cores: at least 1
    ],
)
def test_auto_choice_is_free_cores_shared_by_processes(cores, load, processes, threads):
    choice = choose_threads(cores, load, processes=processes)
    assert (choice.threads, choice.source) == (threads, "auto")


def test_flag_beats_environment_beats_auto():
    assert choose_threads(2, 0.1, requested=5, env="3").threads == 5
    assert choose_threads(2, 0.1, env="3").threads == 3
    assert choose_threads(2, 0.1, env="4,2").threads == 4  # OpenMP's nested list: the first level
    assert choose_threads(2, 0.1, env="").threads == 2


def test_console_line_says_what_and_why():
    assert choose_threads(2, 0.1).describe() == "threads: 2 (2 cores, load 0.1; --threads to change)"
    assert choose_threads(16, 0.0, processes=4).describe() == (
        "threads: 4 (16 cores, load 0.0, 4 processes; --threads to change)")
    assert choose_threads(2, 1.26, requested=1).describe() == "threads: 1 (set by --threads; 2 cores, load 1.3)"
    assert choose_threads(2, 0.1, env="3").describe() == "threads: 3 (set by OMP_NUM_THREADS; 2 cores, load 0.1)"


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_environment_value_is_an_error_naming_it(value):
    with pytest.raises(ValueError, match=rf"OMP_NUM_THREADS={value!r} is not a positive number of threads"):
        parse_env_threads(value)


def test_bad_flag_value_is_an_error():
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        choose_threads(2, 0.1, requested=0)


def write_topology(root: Path, cpu: int, package: int, core: int) -> None:
    topology = root / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text(f"{package}\n")
    (topology / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthreads_once(tmp_path):
    for cpu, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)]):
        write_topology(tmp_path, cpu, package, core)
    assert physical_cores(range(6), tmp_path) == 4  # two hyper-threads per core on package 0
    assert physical_cores([0, 2], tmp_path) == 1  # an affinity of two siblings is one core
    assert physical_cores([0, 7], tmp_path) == 2  # cpu7 has no topology: the logical count


def test_cgroup_quota_caps_the_cores(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_apply_sets_torch_and_prints_on_rank_0(monkeypatch):
    before = torch.get_num_threads()
    lines: list[str] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    try:
        choice = apply_threads(1, log=lines.append)
        assert torch.get_num_threads() == 1 and lines == [choice.describe()]
        monkeypatch.setenv("RANK", "1")
        apply_threads(1, log=lines.append)
        assert len(lines) == 1  # one line per launch, from rank 0
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_measured_from_proc_stat_not_the_lagging_load_average(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: 300 busy + 100 idle ticks, then 300 + 100 more busy + 100 idle
    stat.write_text("cpu  200 0 100 80 20 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert cpu_times(stat) == (300, 400)
    assert busy_cores((300, 400), (400, 600), cpus=2) == 1.0  # half the time busy on 2 CPUs: one core
    assert busy_cores((300, 400), (300, 400), cpus=2) == 0.0  # no time passed: nothing measured
    assert cpu_times(tmp_path / "missing") is None
