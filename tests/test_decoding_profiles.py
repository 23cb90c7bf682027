"""Decoding profiles: `paper` (DIFFA-2's published decoding) per benchmark, picked for released models, in reports."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from diffa2.diffusion.decoding import DecodeConfig
from diffa2.diffusion.parallel import parallel_count
from diffa2.eval.runner import RunOptions, resolve_spec, run_benchmark
from diffa2.eval.specs import SpecError, load_spec, paper_decoding
from diffa2.inference import AudioQA

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE = "zhoujiaming777/DIFFA-2"
# DIFFA-2/run_mm{su,au,ar}_inference.sh: --accelerate fast_dllm (factor 1.0, early exit at EOS only), 16/16/16,
# greedy.
PAPER = DecodeConfig(gen_length=16, block_length=16, steps=16, temperature=0.0, cfg_scale=0.0,
                     remasking="low_confidence", factor=1.0, factor_quirk=True, eos_early_exit=True,
                     exit_on_eot=False)


@pytest.mark.parametrize(("confidence", "plain", "quirk"), [
    ([0.99, 0.9, 0.85, 0.81, 0.2], 4, 5),  # bars .667 .75 .8 .833: only the last fails -> the code commits all 5
    ([0.99, 0.6], 1, 2),  # the last two masked tokens of a block always go together
    ([0.99, 0.6, 0.5], 1, 1),  # the first failure is not the last candidate: no difference
    ([0.99, 0.9, 0.85], 3, 3),  # all pass
    ([0.3], 1, 1),
])
def test_factor_rule_edge_case_as_coded(confidence, plain, quirk):
    scores = torch.tensor(confidence, dtype=torch.float64)
    assert parallel_count(scores, None, 1.0) == plain
    assert parallel_count(scores, None, 1.0, quirk=True) == quirk


def test_factor_quirk_needs_a_factor_and_modes_reset_it():
    with pytest.raises(ValueError, match="needs a factor"):
        DecodeConfig(factor_quirk=True)
    assert PAPER.with_mode("parallel") == DecodeConfig(gen_length=16, block_length=16, steps=16, threshold=0.9,
                                                       eos_early_exit=True)
    assert PAPER.with_mode("fpd").factor_quirk is False  # the existing mode keeps its meaning


@pytest.mark.parametrize("benchmark", ["mmsu", "mmau", "mmar"])
def test_paper_profile_resolves_for_each_benchmark(benchmark):
    spec = load_spec(benchmark)  # diffa2/eval/benchmarks/<benchmark>.yaml
    assert spec.profile == "parallel" and sorted(spec.profiles) == ["paper"]
    assert spec.decoding == DecodeConfig.preset("parallel", gen_length=16, block_length=16, steps=16)
    paper = spec.with_profile("paper")
    assert paper.profile == "paper" and paper.decoding == PAPER == paper_decoding()
    assert paper.prompt == spec.prompt == ("diffa_mmsu" if benchmark == "mmsu" else "diffa")  # DIFFA-2's prompts
    assert paper.with_profile("parallel") == spec  # the swap loses nothing


def test_synth_has_no_paper_profile():
    with pytest.raises(SpecError, match=r"no decoding profile 'paper'; choose one of \['parallel'\]"):
        load_spec("synth").with_profile("paper")


@pytest.mark.parametrize(("release", "profile", "expected"), [
    (RELEASE, None, "paper"),  # a released DIFFA-2: its published decoding
    (None, None, "parallel"),  # a model trained here: the toolkit's default
    (RELEASE, "parallel", "parallel"),  # one flag away
    (None, "paper", "paper"),
])
def test_released_model_detection_picks_the_profile(release, profile, expected):
    spec = resolve_spec(RunOptions(benchmark="mmau", model="m", profile=profile), release)
    assert spec.profile == expected
    assert spec.decoding == (PAPER if expected == "paper" else load_spec("mmau").decoding)


def test_flags_change_the_chosen_profile():
    spec = resolve_spec(RunOptions(benchmark="mmsu", model="m", decoding={"steps": 8}), RELEASE)
    assert spec.profile == "paper" and spec.decoding == dataclasses.replace(PAPER, steps=8)


def test_report_records_the_profile_of_a_released_model(checkpoint, tmp_path):
    records = json.loads((FIXTURES / "mmau_subset.json").read_text(encoding="utf-8"))[:3]
    for i, record in enumerate(records):
        path = tmp_path / "data" / record["audio_id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(8000) / 16000
        sf.write(path, (0.3 * np.sin(2 * np.pi * (300 + 50 * i) * t)).astype(np.float32), 16000)
    (tmp_path / "data" / "mmau.json").write_text(json.dumps(records), encoding="utf-8")
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    qa = AudioQA.from_checkpoint(tmp_path / "ckpt")
    qa.model.config.release = RELEASE
    options = RunOptions(benchmark="mmau", model=str(tmp_path / "ckpt"), data=str(tmp_path / "data" / "mmau.json"),
                         out=str(tmp_path / "out"), progress=False)
    run_benchmark(options, qa=qa, log=lambda _: None)
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["run"]["profile"] == "paper"
    assert report["run"]["decoding"] == dataclasses.asdict(PAPER)
    assert "- profile: `paper`" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
