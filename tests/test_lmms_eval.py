"""lmms-eval's own evaluator with `--model diffa2` on the local synthetic task gives diffa2.eval's answers and accuracy.

Skipped when lmms-eval is not installed (the core install does not need it; `make setup` installs the [lmms] extra).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]', docs/lmms-eval.md)")

from helpers import make_tiny_model  # noqa: E402

from diffa2.chat import ChatFormat  # noqa: E402
from diffa2.diffusion.decoding import DecodeConfig  # noqa: E402
from diffa2.eval.core import evaluate, load_items  # noqa: E402
from diffa2.eval.specs import load_spec  # noqa: E402
from diffa2.inference import AudioQA  # noqa: E402
from diffa2.lmms import TASKS_DIR, synth_task  # noqa: E402
from diffa2.modeling.checkpoint import save_pretrained  # noqa: E402

LIMIT = 12
DECODING = "gen_length=4,block_length=4,steps=4"  # the synth spec's decoding under the parallel preset


FITTED = 6  # the first FITTED test items are memorised, so the accuracy is neither 0 nor 100 %


def fit_items(chat: ChatFormat, spec, items, steps: int = 150):
    """A tiny DIFFA-2 that has memorised `items` (their prompts under `spec`, gold answers) in a few seconds."""
    from diffa2.audio import load_audio
    from diffa2.data.collate import SFTCollator, SFTExample
    from diffa2.data.synth import ANSWER_TOKENS
    from diffa2.diffusion.objective import sft_loss
    from diffa2.eval.core import render_prompts

    model = make_tiny_model(chat, seed=3)
    examples = [SFTExample(load_audio(item.audio.path), prompt, item.answer)
                for item, prompt in zip(items, render_prompts(spec, items), strict=True)]
    batch = SFTCollator(chat, AudioQA(model, chat).featurizer, answer_length=ANSWER_TOKENS)(examples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = sft_loss(model, batch, chat.ids.mask, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def fitted_checkpoint(small_corpus, tmp_path_factory):
    """A tiny checkpoint on the small corpus's tokenizer that has memorised its first FITTED test items."""
    chat = ChatFormat.from_pretrained(small_corpus / "tokenizer")
    spec = load_spec("synth")
    items, _ = load_items(spec, small_corpus / "test_mmau.json", small_corpus, limit=FITTED)
    directory = tmp_path_factory.mktemp("lmms_ckpt")
    save_pretrained(fit_items(chat, spec, items), directory, tokenizer=chat.tokenizer)
    return directory


def run_lmms(ckpt, tasks, model_args="", **kwargs):
    """lmms-eval's Python entry point, the way its CLI calls it, with `--model diffa2`."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model="diffa2", model_args=f"pretrained={ckpt},decode_mode=parallel,{model_args}",
                           tasks=tasks, limit=LIMIT, batch_size=1, log_samples=True,
                           task_manager=TaskManager(include_path=str(TASKS_DIR)), **kwargs)


def test_the_synth_spec_decoding_is_the_model_args_decoding():
    spec = load_spec("synth")
    assert DecodeConfig.preset("parallel", gen_length=4, block_length=4, steps=4) == spec.decoding


@pytest.mark.slow
def test_lmms_eval_accuracy_equals_diffa2_eval(small_corpus, fitted_checkpoint):
    results = run_lmms(fitted_checkpoint, [synth_task(small_corpus)], f"{DECODING},batch_size=5")
    spec = load_spec("synth")
    items, _ = load_items(spec, small_corpus / "test_mmau.json", small_corpus, limit=LIMIT)
    reference = evaluate(AudioQA.from_checkpoint(fitted_checkpoint), spec, items, batch_size=8)

    samples = sorted(results["samples"]["diffa2_synth"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [item.id for item in items]
    assert [s["arguments"][0] for s in samples] == reference.prompts
    assert [s["resps"][0][0] for s in samples] == reference.answers  # every answer, item by item
    assert [s["accuracy"]["correct"] for s in samples] == [i.correct for i in reference.result.items]
    assert reference.summary["total"] == LIMIT and 0 < reference.summary["correct"] < LIMIT
    assert results["results"]["diffa2_synth"]["accuracy,none"] == reference.summary["accuracy"]


def test_text_only_requests_are_refused_by_name(small_corpus, checkpoint, tmp_path):
    rows = json.loads((small_corpus / "test_mmau.json").read_text(encoding="utf-8"))[:2]
    (tmp_path / "test_mmau.json").write_text(json.dumps(rows), encoding="utf-8")
    config = synth_task(tmp_path)
    config["doc_to_visual"] = lambda doc: []
    with pytest.raises(ValueError, match="task 'diffa2_synth', split 'test', doc 0: .* exactly one audio clip, got 0"):
        run_lmms(checkpoint, [config], DECODING)


def test_rules_on_hand_checked_predictions():
    from diffa2.lmms.compare import compare, lmms_eval_mmau_correct, official_score

    spec = load_spec("synth")
    doc = {"id": "x", "question": "What does the speaker say?", "answer": "gold sun bird",
           "choices": ["gold star bird", "gold sun bird", "gold sun cat", "gold sun red"]}
    assert official_score("gold sun bird", doc, spec).correct and not official_score("B", doc, spec).correct
    assert not official_score("gold star bird", doc, spec).correct
    assert lmms_eval_mmau_correct("B", doc, spec) and lmms_eval_mmau_correct("(B) gold sun bird", doc, spec)
    assert not lmms_eval_mmau_correct("(A) gold sun bird", doc, spec)  # the letter decides, not the text
    two = {"id": "y", "question": "q", "answer": "cat", "choices": ["dog", "cat"]}
    assert not lmms_eval_mmau_correct("(C)", two, spec)  # a letter past the options (lmms-eval: IndexError)
    row = compare([doc, doc, two], ["gold sun bird", "B", "(B) cat"], spec)
    assert row == {"items": 3, "official": 200 / 3, "lmms_eval": 200 / 3}


def test_compare_cli_on_oracle_answers(small_corpus, capsys):
    from diffa2.lmms.compare import main

    assert main(["--oracle", str(small_corpus / "test_mmau.json")]) == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    n = str(len(json.loads((small_corpus / "test_mmau.json").read_text(encoding="utf-8"))))
    assert rows["letter only: B"] == [n, "0.0", "100.0 |"]
    assert rows["letter and text: (B) text"] == [n, "100.0", "100.0 |"]
    assert rows["choice text (what the diffa prompt asks for)"][:2] == [n, "100.0"]


def test_model_args_are_checked_by_name(checkpoint):
    from diffa2.lmms.model import DIFFA2

    ckpt = checkpoint
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gen_len'\]"):
        DIFFA2.create_from_arg_string(f"pretrained={ckpt},gen_len=4")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 'auto'"):
        DIFFA2.create_from_arg_string(f"pretrained={ckpt},batch_size=auto")
    model = DIFFA2.create_from_arg_string(f"pretrained={ckpt},{DECODING},batch_size=5", {"batch_size": 1})
    assert model.batch_size == 5 and model.decoding == load_spec("synth").decoding


def test_lmms_eval_mmau_task_on_a_local_copy(small_corpus, checkpoint, tmp_path):
    """lmms-eval's own MMAU task, pointed at a local parquet in lmms-lab-audio/mmau's layout (audio column, choices
    as a JSON string), runs offline with `process_docs: diffa2.lmms.undecoded_audio`; its prompts are the
    toolkit's `lmms_eval_mmau` template."""
    import datasets
    import lmms_eval

    from diffa2.eval.prompts import get_prompt

    rows = json.loads((small_corpus / "test_mmau.json").read_text(encoding="utf-8"))[:5]
    records = [{"id": r["id"], "audio": {"bytes": (small_corpus / r["audio_id"]).read_bytes(), "path": r["audio_id"]},
                "question": r["question"], "choices": json.dumps(r["choices"]), "answer": r["answer"],
                "task": r["task"]} for r in rows]
    datasets.Dataset.from_list(records).cast_column("audio", datasets.Audio()).to_parquet(tmp_path / "mini.parquet")
    (tmp_path / "tasks").mkdir()
    template = f"{lmms_eval.__path__[0]}/tasks/mmau/mmau_test_mini.yaml"
    (tmp_path / "tasks" / "mmau_local.yaml").write_text(
        f"include: {template}\ntask: mmau_local\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n"
        f"    test_mini: {tmp_path / 'mini.parquet'}\nprocess_docs: !function diffa2.lmms.undecoded_audio\n",
        encoding="utf-8")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(model="diffa2", model_args=f"pretrained={checkpoint},{DECODING}", tasks=["mmau_local"],
                              batch_size=1, log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    samples = sorted(results["samples"]["mmau_local"], key=lambda s: s["doc_id"])
    prompt = get_prompt("lmms_eval_mmau")
    assert [s["arguments"][0] for s in samples] == [prompt(r["question"], r["choices"]) for r in rows]
    assert len(samples) == 5 and "accuracy,none" in results["results"]["mmau_local"]


@pytest.mark.slow
def test_lmms_eval_loglikelihood_is_the_toolkits_elbo(small_corpus, fitted_checkpoint):
    """A multiple-choice task (lmms-eval picks the continuation with the highest loglikelihood) gives the choices and
    accuracy of `python -m diffa2.eval run --mcq likelihood`: the same ELBO, draws and seeds."""
    config = synth_task(small_corpus) | {  # None, not left out: lmms-eval lays a dict over the indexed task's YAML
        "output_type": "multiple_choice", "process_results": None, "generation_kwargs": None,
        "doc_to_choice": lambda doc: doc["choices"], "doc_to_target": lambda doc: doc["choices"].index(doc["answer"]),
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    results = run_lmms(fitted_checkpoint, [config], "batch_size=5")
    spec = load_spec("synth")
    items, _ = load_items(spec, small_corpus / "test_mmau.json", small_corpus, limit=LIMIT)
    reference = evaluate(AudioQA.from_checkpoint(fitted_checkpoint), spec, items, batch_size=8, mcq="likelihood")

    samples = sorted(results["samples"]["diffa2_synth"], key=lambda s: s["doc_id"])
    elbos = [[-r[0][0] for r in s["resps"]] for s in samples]  # the model returns a loss: -ELBO
    assert elbos == [pytest.approx(e["choice_elbos"], rel=1e-5) for e in reference.entries]
    assert 0 < reference.summary["correct"] < LIMIT
    assert 100 * results["results"]["diffa2_synth"]["acc,none"] == pytest.approx(reference.summary["accuracy"])
