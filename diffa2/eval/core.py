"""The one evaluator: decode a benchmark's items with a loaded model and score them under a spec, in memory.

``evaluate(qa, spec, items)`` returns the per-item answers and the scored summary (accuracy overall and per
breakdown value, next to chance). With ``mcq="likelihood"`` an item's answer is not generated but chosen: the choice
whose text has the highest ELBO under the model (``AudioQA.score``, docs/answer-scoring.md), written as the answer
text so the official scorers apply unchanged. Everything that evaluates multiple-choice accuracy calls it or its
two halves (``decode_items``, ``score_entries``): ``python -m diffa2.eval run`` (``runner``, which adds resume,
shards and the result files), the stages' end-of-stage evaluation (``diffa2.stages.evaluate``), the demo and
``bench/decode.py``. So they give the same number for the same checkpoint, data and decoding by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from diffa2.audio import AudioError, decode_audio_bytes, load_audio, trim_to_window
from diffa2.chat import AudioRef as ChatAudio
from diffa2.chat import Conversation, Question, Turn
from diffa2.diffusion.continuous import DecodeJob, covers, decode_all
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.loaders import (
    AudioRef,
    DataError,
    Item,
    Record,
    breakdown_value,
    jsonable_record,
    read_records_with_identity,
    to_items,
    validate,
)
from diffa2.eval.prompts import get_prompt
from diffa2.eval.scoring import ScoreResult, accuracy_cell, normalize_prediction, score_records
from diffa2.eval.specs import BenchmarkSpec
from diffa2.likelihood import DEFAULT_DRAWS

MCQ_MODES = ("generate", "likelihood")  # answer a multiple-choice item by decoding, or by the best-scoring choice


def resolve_data(spec: BenchmarkSpec, data: str | None, audio_root: str | None) -> tuple[str, Path]:
    """The data source (`data`, else the spec's default; "synth" = the embedded corpus's test split) and the folder
    audio paths are relative to (`audio_root`, else the data file's folder)."""
    source = data or spec.default_data
    if source is None:
        raise DataError([f"benchmark {spec.name!r} needs --data (the {spec.format} metadata file)"])
    if source == "synth":
        from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus

        source = str(ensure_synth_corpus(DEFAULT_CORPUS_DIR).test_mmau)
    path = Path(source)
    root = Path(audio_root) if audio_root else (path.parent if path.is_file() else path if path.is_dir() else Path("."))
    return source, root


def load_items(
    spec: BenchmarkSpec, source: str | Path, audio_root: str | Path, *, limit: int | None = None,
    hf_revision: str | None = None,
) -> tuple[list[Item], dict[str, Any]]:
    """The first `limit` items of a benchmark file (or HF dataset), every record validated, plus the data identity."""
    records, identity = read_records_with_identity(source, hf_split=spec.hf_split, hf_revision=hf_revision)
    validate(records, spec, for_run=True, source=str(source))
    if limit is not None:
        records = records[: max(limit, 0)]
    return to_items(records, spec, audio_root), identity


def item_seed(seed: int, item_id: str) -> int:
    """Per-item decoding seed: independent of batch composition and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def render_prompts(spec: BenchmarkSpec, items: Sequence[Item]) -> list[str]:
    """Each item's instruction under the spec's prompt template."""
    template = get_prompt(spec.prompt)
    return [template(item.question, item.choices) for item in items]


def audio_limit(qa: Any) -> float:
    """The seconds of a clip the model hears: its encoder window, or under `long_audio` "window" the AudioQA's
    `max_audio_seconds` (docs/long-audio.md); a stand-in without `long_audio` trims."""
    if getattr(qa, "long_audio", "trim") == "window":
        return float(qa.max_audio_seconds)
    return float(qa.model.config.window_seconds)


def _load_wave(audio: AudioRef, where: str, limit: float) -> Any:
    """A clip, decoded only as far as `limit` seconds (a 2-hour file costs a window of memory)."""
    if audio.data is not None:
        return decode_audio_bytes(audio.data, name=audio.label, where=where, max_seconds=limit)
    return load_audio(audio.path, where=where, max_seconds=limit)


def item_clips(item: Item) -> list[AudioRef]:
    """The clips an item's prompt holds, in order: its audio, or a conversation item's clips (docs/conversations.md)."""
    if not item.is_conversation:
        return [item.audio]
    return [clip.source for turn in item.history for clip in turn.clips] + list(item.question_audio)


def item_question(item: Item, prompt: str) -> Question:
    """What the model is asked: the rendered prompt, or for a conversation item its history then a user turn with
    its `question_audio` clips and the prompt."""
    if not item.is_conversation:
        return prompt
    asked = Turn("user", (*(ChatAudio(clip) for clip in item.question_audio), prompt))
    return Conversation((*item.history, asked))


def _prepare(item: Item, limit: float, seed: int) -> tuple[dict[str, Any], Any]:
    """The item's entry (id, seed, audio status) and its wave trimmed to `limit` seconds (a conversation item: the
    list of its clips' waves), or None when audio is missing or unreadable (the entry then says why in
    `audio_error`)."""
    entry: dict[str, Any] = {"id": item.id, "seed": item_seed(seed, item.id)}
    waves, trimmed = [], False
    for clip in item_clips(item):
        try:
            wave = _load_wave(clip, item.record.where, limit)
        except AudioError as exc:
            missing = clip.path is not None and not clip.path.exists()
            return entry | {"audio_status": "missing" if missing else "unreadable", "audio_error": str(exc)}, None
        wave, cut = trim_to_window(wave, limit)
        waves.append(wave)
        trimmed = trimmed or cut
    return entry | {"audio_status": "ok", "trimmed": trimmed}, waves if item.is_conversation else waves[0]


def check_mcq(mcq: str) -> None:
    """Refuse an unknown multiple-choice answering mode, naming the allowed ones."""
    if mcq not in MCQ_MODES:
        raise ValueError(f"mcq must be one of {list(MCQ_MODES)}, got {mcq!r}")


def decode_batch(
    qa: Any, items: Sequence[Item], prompts: Sequence[str], decode: DecodeConfig, seed: int, *,
    mcq: str = "generate", n_draws: int = DEFAULT_DRAWS,
) -> list[dict[str, Any]]:
    """One entry per item: id, seed, audio status (with `audio_error` when it is missing or unreadable, else
    `trimmed`) and, for readable audio, the model's `output` text and the item's own `nfe` (`mcq` "generate"), or
    the best-scoring choice as `output` and every choice's ELBO in `choice_elbos` (`mcq` "likelihood", `n_draws`
    draws per choice)."""
    check_mcq(mcq)
    limit = audio_limit(qa)
    prepared = [_prepare(item, limit, seed) for item in items]
    entries = [entry for entry, _ in prepared]
    rows = [r for r, (_, wave) in enumerate(prepared) if wave is not None]
    waves = [prepared[r][1] for r in rows]
    if rows and mcq == "likelihood":
        choices = [[c for c in items[r].choices if c is not None] for r in rows]
        scores = qa.score(waves, [item_question(items[r], prompts[r]) for r in rows], choices, n_draws=n_draws,
                          seed=[entries[r]["seed"] for r in rows])
        for r, options, elbos, best in zip(rows, choices, scores.elbos, scores.best, strict=True):
            entries[r] |= {"output": options[best], "choice_elbos": elbos}
    elif rows:
        answers = qa.answer(waves, [item_question(items[r], prompts[r]) for r in rows], decode,
                            seed=[entries[r]["seed"] for r in rows])
        for r, text, nfe in zip(rows, answers.texts, answers.row_nfe, strict=True):
            entries[r] |= {"output": text, "nfe": nfe}  # the item's own NFE: independent of its batch
    return entries


def decode_items(
    qa: Any, items: Sequence[Item], prompts: Sequence[str], decode: DecodeConfig, seed: int, batch_size: int, *,
    mcq: str = "generate", n_draws: int = DEFAULT_DRAWS,
) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Decode `items` and yield their `(index, entry)` pairs (entries as `decode_batch`'s) in groups of
    `batch_size` (the last may be smaller). Generated answers under settings continuous batching covers
    (`continuous.covers`: no KV cache) go through the continuous batcher, `batch_size` rows at a time, a finished
    answer's slot taken by the next item at once, so a batch never waits for its slowest answer; groups are then in
    finishing order. KV-cache settings and likelihood scoring run `decode_batch` on static batches in item order.
    The entries are the same either way (tested)."""
    check_mcq(mcq)
    if mcq != "generate" or not covers(decode):
        for lo in range(0, len(items), batch_size):
            yield list(enumerate(decode_batch(qa, items[lo : lo + batch_size], prompts[lo : lo + batch_size],
                                              decode, seed, mcq=mcq, n_draws=n_draws), lo))
        return
    limit = audio_limit(qa)
    entries: dict[int, dict[str, Any]] = {}
    ready: list[tuple[int, dict[str, Any]]] = []  # finished, not yet yielded

    def jobs() -> Iterator[tuple[int, DecodeJob]]:
        for i, item in enumerate(items):  # audio is read only when a slot is free
            entries[i], wave = _prepare(item, limit, seed)
            if wave is None:
                ready.append((i, entries[i]))
            else:
                yield i, DecodeJob((wave, item_question(item, prompts[i])), decode, seed=entries[i]["seed"])

    for finished in decode_all(qa.batcher(max_batch=batch_size), jobs()):
        for i, result in finished:
            entries[i] |= {"output": qa.chat.decode_answer(result.token_ids.tolist()), "nfe": result.nfe}
            ready.append((i, entries[i]))
        while len(ready) >= batch_size:
            group, ready[:] = ready[:batch_size], ready[batch_size:]
            yield group
    while ready:
        group, ready[:] = ready[:batch_size], ready[batch_size:]
        yield group


def score_entries(
    spec: BenchmarkSpec, items: Sequence[Item], entries: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], ScoreResult]:
    """The predictions rows (each record with the answer under the official keys, or its `audio_error`) and their
    score under the spec's rule and mode."""
    keys = (spec.prediction_key, *spec.extra_prediction_keys)
    rows = []
    for item, entry in zip(items, entries, strict=True):
        row = jsonable_record(item.record.data)
        for k in (*keys, "raw_output", "normalized_output", "audio_error"):  # from an earlier predictions file
            row.pop(k, None)
        if "output" in entry:
            raw = entry["output"]
            normalized = normalize_prediction(raw, item.record.data, spec)
            scored = normalized if spec.mode == "normalized" else raw
            for k in keys:
                row[k] = scored
            row["raw_output"] = raw
            row["normalized_output"] = normalized
        else:
            row["audio_error"] = entry.get("audio_error", "no output")
        rows.append(row)
    name = Path(spec.predictions_file).name
    records = [Record(r, f"{name}[{i}]", i) for i, r in enumerate(rows)]
    return rows, score_records(records, spec, spec.mode, spec.prediction_key)


def chance_of(item: Item) -> Fraction:
    """The accuracy of a uniform guess among the item's distinct options, exactly."""
    return Fraction(1, len({c for c in item.choices if c is not None}))


def _cell(pairs: Sequence[tuple[bool, Fraction]]) -> dict[str, Any]:
    """{correct, total, accuracy, chance}, in percent, of (correct, chance) pairs (chance summed exactly)."""
    cell = accuracy_cell(sum(correct for correct, _ in pairs), len(pairs))
    return cell | {"chance": float(100 * sum(chance for _, chance in pairs) / len(pairs)) if pairs else None}


def summarize(result: ScoreResult, items: Sequence[Item]) -> dict[str, Any]:
    """Accuracy and chance over the counted items, overall and per value of each breakdown field."""
    counted = [(item, s.correct) for item, s in zip(items, result.items, strict=True) if s.counted]
    breakdown: dict[str, dict[str, dict[str, Any]]] = {}
    for field in result.spec.breakdown:
        groups: dict[str, list[tuple[bool, Fraction]]] = {}
        for item, correct in counted:
            groups.setdefault(breakdown_value(item.record.data.get(field)), []).append((correct, chance_of(item)))
        breakdown[field] = {value: _cell(groups[value]) for value in sorted(groups)}
    return _cell([(correct, chance_of(item)) for item, correct in counted]) | {"breakdown": breakdown}


@dataclass
class Evaluation:
    """What `evaluate` returns: the inputs it decoded, one entry per item, the predictions rows and the scores."""

    spec: BenchmarkSpec
    items: list[Item]
    prompts: list[str]
    entries: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    result: ScoreResult
    summary: dict[str, Any]

    @property
    def answers(self) -> list[str | None]:
        """The model's text per item (None where the audio could not be read)."""
        return [entry.get("output") for entry in self.entries]


def evaluate(
    qa: Any, spec: BenchmarkSpec, items: Sequence[Item], *, decoding: DecodeConfig | None = None,
    batch_size: int = 8, seed: int = 0, progress: str | None = None, mcq: str = "generate",
    n_draws: int = DEFAULT_DRAWS,
) -> Evaluation:
    """Answer `items` with `qa` (an AudioQA) under `spec` (its prompt, its decoding unless `decoding` is given)
    `batch_size` at a time (`decode_items`; `mcq`: by decoding or by likelihood), then score them; `progress` names
    a progress bar (None: none)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    spec = spec if decoding is None else spec.replace(decoding=decoding)
    items = list(items)
    prompts = render_prompts(spec, items)
    entries: list[dict[str, Any]] = [{} for _ in items]
    with tqdm(total=len(items), desc=progress, unit="item", leave=False, disable=progress is None) as bar:
        for group in decode_items(qa, items, prompts, spec.decoding, seed, batch_size, mcq=mcq, n_draws=n_draws):
            for i, entry in group:
                entries[i] = entry
            bar.update(len(group))
    rows, result = score_entries(spec, items, entries)
    return Evaluation(spec, items, prompts, entries, rows, result, summarize(result, items))
