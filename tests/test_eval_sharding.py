"""The benchmark runner sharded over 2 processes (torchrun): same final files as one process, byte for byte; resumes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diffa2.eval.__main__ import main as eval_main
from diffa2.eval.sharding import Shard

FIXTURES = Path(__file__).parent / "fixtures"
FINAL_FILES = ("predictions.json", "samples.jsonl", "report.json", "report.md", "report.png")
ITEMS = 11  # odd, so the two ranks get different numbers of items (6 and 5)


@pytest.fixture(scope="module")
def mmau_dir(tmp_path_factory) -> Path:
    """The MMAU fixture with short tones at its audio paths, one of them missing (an audio_error row)."""
    root = tmp_path_factory.mktemp("mmau")
    shutil.copy(FIXTURES / "mmau_subset.json", root / "mmau.json")
    records = json.loads((root / "mmau.json").read_text(encoding="utf-8"))[:ITEMS]
    t = np.arange(8000) / 16000
    for i, r in enumerate(records):
        if i != 4:
            path = root / r["audio_id"]
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, (0.3 * np.sin(2 * np.pi * (200.0 + 37 * i) * t)).astype(np.float32), 16000)
    return root


def run_args(checkpoint: Path, data: Path, out: Path, limit: int = ITEMS) -> list[str]:
    """Sampling (temperature 1) with per-item seeds, so a wrong seed or item order would change the answers."""
    return ["run", "--benchmark", "mmau", "--model", str(checkpoint), "--data", str(data / "mmau.json"),
            "--out", str(out), "--limit", str(limit), "--batch-size", "3", "--gen-length", "4", "--block-length", "4",
            "--steps", "4", "--temperature", "1.0", "--no-progress"]


def torchrun(args: list[str], cwd: Path) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "diffa2.eval", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stderr


def test_shards_are_round_robin():
    shards = [Shard(r, 3) for r in range(3)]
    assert [[i for i in range(8) if s.owns(i)] for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Shard().log_path(Path("p"), "x") == Path("p/x.jsonl")
    assert Shard(1, 2).log_path(Path("p"), "x") == Path("p/x.rank1.jsonl")


@pytest.mark.slow
def test_two_processes_write_the_single_process_files_and_resume(checkpoint, mmau_dir, tmp_path, capsys):
    assert eval_main(run_args(checkpoint, mmau_dir, tmp_path / "one")) == 0
    # Sharded, interrupted after the first 5 items, then resumed with the full benchmark.
    torchrun(run_args(checkpoint, mmau_dir, tmp_path / "two", limit=5), tmp_path)
    log = torchrun(run_args(checkpoint, mmau_dir, tmp_path / "two"), tmp_path)
    assert "(6 on rank 0 of 2), 2 already done" in log and "(5 on rank 1 of 2), 2 already done" in log
    assert "retrying 1 item(s) whose audio was missing or unreadable before" in log  # item 4, still missing
    logs = sorted(p.name for p in (tmp_path / "two" / "partial").glob("*.jsonl"))
    assert [name.split(".", 1)[1] for name in logs] == ["rank0.jsonl", "rank1.jsonl"]
    for name in FINAL_FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    predictions = json.loads((tmp_path / "one" / "predictions.json").read_text(encoding="utf-8"))
    assert len(predictions) == ITEMS and len({p.get("raw_output") for p in predictions}) > 2
    # The rank logs resume a single-process run too: nothing is decoded again.
    shutil.copytree(tmp_path / "two" / "partial", tmp_path / "three" / "partial")
    capsys.readouterr()
    assert eval_main(run_args(checkpoint, mmau_dir, tmp_path / "three")) == 0
    assert "decoded 0 item(s)" in capsys.readouterr().err
    for name in FINAL_FILES:
        assert (tmp_path / "three" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
