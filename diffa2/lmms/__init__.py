"""DIFFA-2 in lmms-eval: the `diffa2` model and a local task for the synthetic split (docs/lmms-eval.md).

Optional: `pip install -e '.[lmms]'` (the Makefile installs it). Nothing else in diffa2 imports this package, and
importing it does not import lmms-eval; lmms-eval finds the model through the `lmms_eval.models` entry point
(`manifest`) and the task through `--include_path` pointing at `TASKS_DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # lmms-eval's --include_path for the tasks shipped here
MODEL_NAME = "diffa2"


def manifest() -> Any:
    """The `lmms_eval.models` entry point's payload: lmms-eval's ModelManifest for `--model diffa2`.

    lmms-eval 0.7 loads every entry point of that group when `lmms_eval.models` is imported
    (lmms_eval/models/registry_v2.py, `ModelRegistryV2.load_entrypoint_manifests`).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="diffa2.lmms.model.DIFFA2")


def synth_task(corpus_dir: str | Path) -> dict[str, Any]:
    """The `diffa2_synth` task config for the corpus at `corpus_dir` (its test_mmau.json and audio), as a dict for
    `lmms_eval.evaluator.simple_evaluate(tasks=[...])`; the YAML task reads data/synth under the working folder."""
    from functools import partial

    from lmms_eval.utils import load_yaml_config

    corpus = Path(corpus_dir).resolve()
    data = corpus / "test_mmau.json"
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no synthetic test split there; build it with `python -m diffa2.data.synth "
                                f"--out {corpus_dir}`")
    config = load_yaml_config(str(TASKS_DIR / "diffa2_synth" / "diffa2_synth.yaml"), mode="full")
    config["dataset_kwargs"] = {"data_files": {"test": str(data)}}
    config["doc_to_visual"] = partial(config["doc_to_visual"], root=corpus)
    return config


def undecoded_audio(dataset: Any) -> Any:
    """An lmms-eval `process_docs` for HF audio tasks (MMAU, MMAR): the `audio` column read undecoded (bytes and
    path), which the diffa2 model decodes with soundfile; `datasets` >= 4 would decode it with torchcodec and FFmpeg,
    which the toolkit does not install. In a task YAML: `process_docs: !function diffa2.lmms.undecoded_audio`."""
    from datasets import Audio

    return dataset.cast_column("audio", Audio(decode=False))
