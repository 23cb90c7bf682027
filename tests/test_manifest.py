"""Manifests in three formats, recipes, and the dataset's skip-and-count policy."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import soundfile as sf

from diffa2.data.dataset import AudioInstructionDataset
from diffa2.data.manifest import ManifestError, read_manifest
from diffa2.data.recipe import DataRecipe, DataSource, load_split
from diffa2.stages.runner import REPO_ROOT

REQUIRED = ("input", "target", "audio_filepath")


def record(i: int, **extra) -> dict:
    return {"audio_id": f"a{i}", "audio_filepath": f"{i}.wav", "transcription": f"word {i}", "input": "Pitch?",
            "target": "high", "dataset": "t", "duration": 0.5} | extra


def write_wavs(directory, n):
    directory.mkdir(exist_ok=True)
    for i in range(n):
        sf.write(directory / f"{i}.wav", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)


def test_json_list_and_jsonl_give_the_same_records(tmp_path):
    records = [record(i) for i in range(3)]
    (tmp_path / "m.json").write_text(json.dumps(records))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    a, _ = read_manifest(tmp_path / "m.json", required=REQUIRED)
    b, _ = read_manifest(tmp_path / "m.jsonl", required=REQUIRED)
    assert [r.fields for r in a] == [r.fields for r in b] == records
    assert a[1].where == f"{tmp_path / 'm.json'}[1]" and b[1].where == f"{tmp_path / 'm.jsonl'}:2"


def test_bad_jsonl_lines_are_named_by_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(record(0)), "{not json", json.dumps({"input": "q", "target": "t"}),
             json.dumps(record(3, target=7)), "", json.dumps(record(5))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=rf"{path}:2: invalid JSON"):
        read_manifest(path, required=REQUIRED)
    good, problems = read_manifest(path, required=REQUIRED, on_error="skip")
    assert [r.where for r in good] == [f"{path}:1", f"{path}:6"]
    assert problems == [f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
                        f"{path}:3: missing field(s) ['audio_filepath']",
                        f"{path}:4: field(s) ['target'] must be strings, got ['int']"]


def test_hugging_face_dataset_with_undecoded_audio(tmp_path):
    write_wavs(tmp_path / "audio", 2)
    rows = {"audio": [str(tmp_path / "audio" / f"{i}.wav") for i in range(2)], "question": ["Pitch?", "Loud?"],
            "answer": ["high", "no"]}
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(sampling_rate=16000))
    ds.save_to_disk(str(tmp_path / "hf"))
    source = DataSource(path=str(tmp_path / "hf"), instruction_field="question", target_field="answer",
                        audio_field="audio")
    items, problems = load_split([source], synth_dir=None, seed=0)
    assert problems == [] and len(items) == 2
    example = AudioInstructionDataset(items, max_seconds=4.0)[1]
    assert example.instruction == "Loud?" and example.answer == "no" and example.wave.shape == (8000,)


def test_recipe_weights_and_synth_placeholder(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([record(i) for i in range(10)]))
    recipe = DataRecipe.from_dict({"name": "mix", "train": [{"path": "{synth}/m.json", "weight": 2.5}]})
    items, _ = load_split(recipe.train, synth_dir=tmp_path, seed=0)
    assert len(items) == 25
    again, _ = load_split(recipe.train, synth_dir=tmp_path, seed=0)
    assert [i.record.where for i in items] == [i.record.where for i in again]
    with pytest.raises(ValueError, match=r"unknown keys \['weights'\]"):
        DataRecipe.from_dict({"train": [{"path": "x"}], "weights": 1})
    with pytest.raises(ValueError, match=r"train\[0\] must be a mapping"):
        DataRecipe.from_dict({"train": [{"path": "x", "wieght": 1}]})


def test_recipe_source_keeps_only_instructions_holding_a_text(tmp_path):
    records = [{**record(i), "input": f"Q{i}\nChoices:\nA. x" if i % 3 == 0 else f"Q{i}"} for i in range(7)]
    (tmp_path / "m.json").write_text(json.dumps(records))
    recipe = DataRecipe.from_dict({"train": [{"path": "{synth}/m.json", "instruction_contains": "Choices:"}]})
    items, _ = load_split(recipe.train, synth_dir=tmp_path, seed=0)
    assert [item.record.fields["input"].split("\n")[0] for item in items] == ["Q0", "Q3", "Q6"]
    with pytest.raises(ValueError, match="'instruction_contains' must be a string or null"):
        DataRecipe.from_dict({"train": [{"path": "x", "instruction_contains": 3}]})


def test_bad_audio_is_skipped_counted_and_replaced(tmp_path, capsys):
    write_wavs(tmp_path, 3)
    (tmp_path / "1.wav").write_bytes(b"RIFF garbage")
    records = [record(i) for i in range(3)] + [record(9)]  # 9.wav does not exist
    (tmp_path / "m.json").write_text(json.dumps(records))
    items, _ = load_split([DataSource(path=str(tmp_path / "m.json"))], synth_dir=None, seed=0)
    dataset = AudioInstructionDataset(items, max_seconds=0.25)
    examples = [dataset[i] for i in range(len(dataset))]
    assert len(examples) == 4 and all(ex.wave.shape == (4000,) for ex in examples)  # trimmed to 0.25 s
    assert sorted(dataset.stats.skipped) == [f"{tmp_path / 'm.json'}[1]", f"{tmp_path / 'm.json'}[3]"]
    assert len(dataset.stats.trimmed) == 2
    assert "skipping" in capsys.readouterr().out
    strict = AudioInstructionDataset(items, max_seconds=4.0, on_bad_audio="error")
    with pytest.raises(Exception, match=r"m\.json\[1\]"):
        strict[1]


@pytest.mark.parametrize("recipe", sorted((REPO_ROOT / "data_recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_data_recipe_loads(recipe):
    loaded = DataRecipe.load(recipe)
    assert loaded.train and all(source.path and source.weight > 0 for source in loaded.train)
