"""One evaluator (issue 14): a trained tiny checkpoint scored by the stage's end-of-stage evaluation, by
`python -m diffa2.eval run --benchmark synth` and by the demo's accuracy check gives the same accuracy and the same
per-item answers; and the benchmark specs ship inside the package (importlib.resources, a built wheel)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
from helpers import small_run_args

from diffa2.data.synth import format_mc_prompt
from diffa2.demo.answer import DecodeSettings
from diffa2.demo.evaluation import evaluate_checkpoint, format_evaluation
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval import core
from diffa2.eval.__main__ import main as eval_main
from diffa2.eval.specs import SPEC_DIR, benchmark_names, load_spec
from diffa2.stages import evaluate as stage_evaluate
from diffa2.stages import sft

REPO = Path(__file__).resolve().parents[1]
ITEMS = 12


@pytest.mark.slow
def test_stage_cli_and_demo_give_the_same_accuracy_and_answers(tmp_path, small_corpus, monkeypatch):
    seen: list[core.Evaluation] = []

    def recording(*args, **kwargs):
        seen.append(core.evaluate(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(stage_evaluate, "evaluate", recording)  # the stage's call, recorded
    run = tmp_path / "sft"
    summary = sft.main(small_run_args(run, small_corpus, 4, ["--eval_limit", str(ITEMS)]))
    stage = summary["test"]
    (evaluation,) = seen
    assert stage["total"] == ITEMS and stage["accuracy"] == evaluation.summary["accuracy"]
    assert stage["per_kind"] == {k: {f: c[f] for f in ("accuracy", "chance", "total")}
                                 for k, c in evaluation.summary["breakdown"]["sub-category"].items()}
    stage_answers = evaluation.answers
    assert all(isinstance(text, str) for text in stage_answers)

    # The stage decodes with its own lengths (small_run_args: 8/8/4) and LLaDA's reference decoding.
    decode = DecodeConfig(gen_length=8, block_length=8, steps=4)
    test_file = small_corpus / "test_mmau.json"
    out = tmp_path / "cli"
    argv = ["run", "--benchmark", "synth", "--model", str(run / "final"), "--data", str(test_file), "--limit",
            str(ITEMS), "--out", str(out), "--no_progress", "--decode_mode", "reference", "--gen_length", "8",
            "--block_length", "8", "--steps", "4", "--batch_size", "5"]
    assert eval_main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["run"]["decoding"] == dataclasses.asdict(decode)
    assert report["overall"]["accuracy"] == stage["accuracy"]
    assert {k: c["accuracy"] for k, c in report["breakdown"]["sub-category"].items()} == {
        k: c["accuracy"] for k, c in stage["per_kind"].items()}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["raw_output"] for s in samples] == stage_answers

    settings = DecodeSettings(gen_length=8, block_length=8, steps=4)  # the page's defaults: speed settings off
    assert settings.to_config() == decode
    demo = evaluate_checkpoint(str(run / "final"), test_file, settings, limit=ITEMS, batch_size=3)
    assert demo.answers == stage_answers
    assert demo.summary == evaluation.summary
    assert f"**Synthetic test accuracy: {stage['accuracy']:.1f}%**" in format_evaluation(demo)


def test_summary_counts_chance_exactly_per_breakdown_value(small_corpus):
    spec = load_spec("synth")
    test_file = small_corpus / "test_mmau.json"
    items, _ = core.load_items(spec, test_file, test_file.parent, limit=ITEMS)
    entries = [{"id": item.id, "seed": 0, "output": item.answer if i % 3 else "purple"}
               for i, item in enumerate(items)]
    _, result = core.score_entries(spec, items, entries)
    summary = core.summarize(result, items)
    assert (summary["correct"], summary["total"]) == (8, ITEMS)  # items 0, 3, 6, 9 answered "purple"
    expected = 100 * sum(1 / len(set(item.choices)) for item in items) / ITEMS
    assert summary["chance"] == pytest.approx(expected, abs=1e-12)
    kinds = summary["breakdown"]["sub-category"]
    assert sum(cell["total"] for cell in kinds.values()) == ITEMS
    assert sum(cell["correct"] for cell in kinds.values()) == 8


def test_the_stage_prompts_are_templates():
    path = REPO / "tests" / "fixtures" / "mmau_subset.json"
    spec = load_spec("mmau")
    items, _ = core.load_items(spec, path, path.parent, limit=3)
    templates = stage_evaluate.TEST_PROMPT_TEMPLATES
    assert core.render_prompts(spec.replace(prompt=templates["question"]), items) == [i.question for i in items]
    assert core.render_prompts(spec.replace(prompt=templates["choices"]), items) == [
        format_mc_prompt(i.question, i.choices) for i in items]


def test_specs_are_package_data():
    assert SPEC_DIR == Path(str(files("diffa2.eval") / "benchmarks"))
    assert SPEC_DIR.is_relative_to(Path(core.__file__).parent)  # inside the package, not the checkout
    for name in benchmark_names():
        assert load_spec(name).name == name


@pytest.mark.slow
def test_a_built_wheel_ships_and_loads_the_specs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "diffa2", src / "diffa2", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist")], cwd=src, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("diffa2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(n for n in archive.namelist() if n.startswith("diffa2/eval/benchmarks/"))
        archive.extractall(tmp_path / "site")
    assert shipped == [f"diffa2/eval/benchmarks/{f.name}" for f in sorted(SPEC_DIR.glob("*.yaml"))]
    probe = ("import diffa2.eval.specs as s; print(s.SPEC_DIR); "
             "print(s.load_spec('synth').decoding.gen_length, s.benchmark_names())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    where, loaded = done.stdout.splitlines()
    assert Path(where) == tmp_path / "site" / "diffa2" / "eval" / "benchmarks"  # the wheel's copy, not the checkout
    assert loaded == "4 ('mmar', 'mmau', 'mmsu', 'synth')"
