"""Run a DIFFA-2 checkpoint over a benchmark: prompts, batched decoding, resumable predictions, scoring, reports.

    python -m diffa2.eval run --benchmark synth                    # runs/sft/final on the synthetic test split
    python -m diffa2.eval run --benchmark mmau --model CKPT --data mmau-test-mini.json --audio-root DIR

Resume. Every finished item is appended to ``<out>/partial/<benchmark>-<fingerprint>.jsonl`` (flushed and
fsynced per batch) under a key made of the item id, its prompt text and audio reference. The fingerprint covers
everything that changes an answer: checkpoint content (sampled hash), prompt template, decoding settings, seed,
audio window and device type, but not the batch size (decoding is batch-safe). Rerunning the same command skips
finished items; a killed run loses at most the batch in flight. Final files are written atomically once every
item is done, and contain nothing time-dependent, so they are byte-identical to an uninterrupted run's.

Sharding. Under ``torchrun --nproc_per_node=N -m diffa2.eval run ...`` item i goes to rank i % N; each rank logs to
its own file and rank 0 merges all logs in item order (``diffa2.eval.sharding``), so the final files are
byte-identical to a single-process run's, and any rerun resumes whatever the number of processes.

Seeds. Each item gets its own decoding seed derived from ``--seed`` and its id, so results do not depend on
batch composition or order.

Audio. Missing or unreadable audio is recorded (``audio_error`` in the predictions and no prediction key, which
the official scripts count as they do: MMAU's and MMAR's skip the record, MMSU's counts it wrong; strict mode
counts it wrong), named in the report's warnings, and retried by the next run of the same command. A run that finds
not one of its audio files (a wrong ``--audio-root``) stops before loading the model. Clips longer than the model's
window are trimmed and counted.

One run per output folder: rank 0 holds a lock file naming its PID and host (``diffa2.run_lock``) while it runs;
a second run into the same folder is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffa2.audio import AudioError, decode_audio_bytes, load_audio, trim_to_window
from diffa2.eval.loaders import (
    DataError,
    Item,
    Record,
    jsonable_record,
    read_records_with_identity,
    to_items,
    validate,
    write_predictions,
)
from diffa2.eval.prompts import get_prompt
from diffa2.eval.report import build_report, format_table, write_report
from diffa2.eval.scoring import normalize_prediction, score_records
from diffa2.eval.sharding import Shard, log_paths
from diffa2.eval.specs import BenchmarkSpec, load_spec
from diffa2.io import atomic_write_json, atomic_write_text
from diffa2.run_lock import RunLock

SAMPLE_CHUNK = 1 << 16  # bytes per sampled chunk of a large weight file
SAMPLE_CHUNKS = 32
SMALL_FILE = 8 << 20  # files up to this size are hashed whole


@dataclass
class RunOptions:
    """What `python -m diffa2.eval run` takes; `decoding` overrides are applied on top of the spec's."""

    benchmark: str
    model: str
    data: str | None = None
    audio_root: str | None = None
    out: str | None = None  # default: runs/eval/<benchmark>
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0
    prompt: str | None = None  # template name; default: the spec's
    profile: str | None = None  # decoding profile; default: `paper` for a released DIFFA-2, else the spec's
    mode: str | None = None  # scoring mode; default: the spec's
    decoding: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str | None = None  # default: cuda when available, else cpu
    compat: str | None = None  # "toolkit" or "reference" (docs/reference-compat.md); default: the checkpoint's
    spec_file: str | None = None
    hf_revision: str | None = None
    progress: bool = True


@dataclass
class RunResult:
    report: dict[str, Any]
    paths: dict[str, Path]
    decoded: int  # items decoded in this session (not resumed)
    seconds: float


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints and seeds
# ---------------------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    """SHA-256 of a small file, or of its size plus evenly spaced chunks for a large one (weights)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= SMALL_FILE:
            h.update(handle.read())
        else:
            for k in range(SAMPLE_CHUNKS):
                handle.seek((size - SAMPLE_CHUNK) * k // (SAMPLE_CHUNKS - 1))
                h.update(handle.read(SAMPLE_CHUNK))
    return h.hexdigest()


def checkpoint_fingerprint(directory: str | Path) -> str:
    """A content fingerprint of a checkpoint folder (configs whole, weights sampled: fast on 16 GB)."""
    root = Path(directory)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and
                                                  not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{_file_digest(p)}\n".encode())
    return h.hexdigest()[:16]


def item_seed(seed: int, item_id: str) -> int:
    """Per-item decoding seed: independent of batch composition and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def item_key(item: Item, prompt: str) -> str:
    return hashlib.sha256(f"{item.id}\0{prompt}\0{item.audio.label}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# The partial (append-only) predictions log
# ---------------------------------------------------------------------------------------------------------------


def read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """Finished items by key; a line cut short by a crash is ignored (its item is decoded again)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "key" in entry:
                done[entry["key"]] = entry
    return done


def read_logs(directory: Path, stem: str) -> dict[str, dict[str, Any]]:
    """Finished items of every log of one run identity (one process's, or each rank's of a sharded run); a
    decoded entry wins over an audio failure of the same item (retried later, perhaps by another rank)."""
    done: dict[str, dict[str, Any]] = {}
    for path in log_paths(directory, stem):
        for key, entry in read_partial(path).items():
            if has_output(entry) or not has_output(done.get(key)):
                done[key] = entry
    return done


def has_output(entry: dict[str, Any] | None) -> bool:
    """Whether a log entry holds an answer (an entry for missing or unreadable audio does not: it is retried)."""
    return entry is not None and "output" in entry


def first_ids(ids: Sequence[str], shown: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def check_audio_found(items: Sequence[Item], audio_root: Path) -> None:
    """Refuse a run in which not one audio file exists (a wrong --audio-root, say), before the model is loaded."""
    files = [item.audio.path for item in items if item.audio.data is None and item.audio.path is not None]
    if not files or len(files) < len(items) or any(path.exists() for path in files):
        return
    raise DataError([f"none of the {len(files)} audio files was found under {audio_root.resolve()} (the first "
                     f"looked for: {files[0]}); check --audio-root (default: the data file's folder)"])


def shard_note(shard: Shard, owned: int) -> str:
    return "" if shard.world_size == 1 else f" ({owned} on rank {shard.rank} of {shard.world_size})"


def append_partial(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    """Append entries durably; first terminate a line a crash may have left unfinished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def model_release(model: Any) -> str | None:
    """Where a released DIFFA-2 checkpoint came from; None for a model this toolkit trained."""
    return getattr(model.config, "release", None)


def compat_identity(compat: str, override: str | None) -> dict[str, str]:
    """The compat entry of a run's identity: absent for the toolkit default (earlier runs keep their fingerprint),
    present whenever it was asked for or is not the default (a checkpoint's own setting is in its fingerprint)."""
    return {} if compat == "toolkit" and override is None else {"compat": compat}


def resolve_spec(options: RunOptions, release: str | None = None) -> BenchmarkSpec:
    """The spec with its decoding profile (`options.profile`, else the default for `release`) and the overrides."""
    spec = load_spec(options.benchmark, options.spec_file)
    spec = spec.with_profile(options.profile or spec.default_profile(release))
    changes: dict[str, Any] = {}
    if options.prompt:
        get_prompt(options.prompt)  # unknown names fail here, listing the valid ones
        changes["prompt"] = options.prompt
    if options.mode:
        changes["mode"] = options.mode
    if options.decoding:
        changes["decoding"] = dataclasses.replace(spec.decoding, **options.decoding)
    return spec.replace(**changes) if changes else spec


def resolve_data(spec: BenchmarkSpec, data: str | None, audio_root: str | None) -> tuple[str, Path]:
    """The data source and the folder audio paths are relative to."""
    source = data or spec.default_data
    if source is None:
        raise DataError([f"benchmark {spec.name!r} needs --data (the {spec.format} metadata file)"])
    if source == "synth":
        from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus

        source = str(ensure_synth_corpus(DEFAULT_CORPUS_DIR).test_mmau)
    path = Path(source)
    root = Path(audio_root) if audio_root else (path.parent if path.is_file() else path if path.is_dir() else Path("."))
    return source, root


def _load_wave(item: Item, where: str, window: float) -> Any:
    """The item's clip, decoded only as far as the model's window (a 2-hour file costs a window of memory)."""
    if item.audio.data is not None:
        return decode_audio_bytes(item.audio.data, name=item.audio.label, where=where, max_seconds=window)
    return load_audio(item.audio.path, where=where, max_seconds=window)


def run_benchmark(
    options: RunOptions,
    *,
    qa: Any = None,
    on_batch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or resume) a benchmark and write predictions, samples and reports; `on_batch(batch, done)` is
    called after every batch is safely appended (tests raise from it to simulate a crash)."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    spec = resolve_spec(options)
    if options.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {options.batch_size}")
    out = Path(options.out or f"runs/eval/{spec.name}")
    shard = Shard.from_env()

    # Data: read, validate every record, limit.
    source, audio_root = resolve_data(spec, options.data, options.audio_root)
    records, data_identity = read_records_with_identity(source, hf_split=spec.hf_split, hf_revision=options.hf_revision)
    validate(records, spec, for_run=True, source=str(source))
    if options.limit is not None:
        records = records[: max(options.limit, 0)]
    items = to_items(records, spec, audio_root)
    check_audio_found(items, audio_root)
    lock = RunLock(out, log).acquire() if shard.is_main else None  # one run per output folder

    # Model and everything that changes an answer.
    if qa is None:
        from diffa2.inference import AudioQA

        qa = AudioQA.from_checkpoint(options.model, device=options.device or shard.default_device(),
                                     compat=options.compat)  # fmt: skip
    spec = resolve_spec(options, model_release(qa.model))  # the profile depends on the model
    device_type = str(getattr(qa, "device", options.device or "cpu")).split(":")[0]
    window = float(qa.model.config.window_seconds)
    template = get_prompt(spec.prompt)
    decode = spec.decoding
    prompts = [template(item.question, item.choices) for item in items]
    model_fp = checkpoint_fingerprint(options.model)
    identity = {
        "benchmark": spec.name,
        "spec_version": spec.version,
        "checkpoint": model_fp,
        "prompt": spec.prompt,
        "prompt_fingerprint": template.fingerprint(),
        "decoding": dataclasses.asdict(decode),
        "seed": options.seed,
        "window_seconds": window,
        "device_type": device_type,
    } | compat_identity(qa.model.config.compat, options.compat)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{spec.name}-{fingerprint}"
    partial = shard.log_path(out / "partial", stem)
    keys = [item_key(item, p) for item, p in zip(items, prompts, strict=True)]
    done = read_logs(out / "partial", stem)
    mine = [i for i in range(len(items)) if shard.owns(i)]
    todo = [i for i in mine if not has_output(done.get(keys[i]))]
    log(f"[diffa2.eval] {spec.name}: {len(items)} items{shard_note(shard, len(mine))}, "
        f"{len(mine) - len(todo)} already done "
        f"({partial}), batch size {options.batch_size}, prompt {spec.prompt!r}, decoding profile {spec.profile!r} "
        f"{decode.gen_length}/{decode.block_length}/{decode.steps}")  # fmt: skip
    retried = [items[i].id for i in todo if keys[i] in done]
    if retried:
        log(f"[diffa2.eval] retrying {len(retried)} item(s) whose audio was missing or unreadable before: "
            f"{first_ids(retried)}")  # fmt: skip

    # Decode what is left, appending every batch as soon as it is finished.
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=spec.name, unit="item",
               disable=not options.progress, file=sys.stderr, position=shard.rank)  # fmt: skip
    decoded = 0
    try:
        for batch_no, lo in enumerate(range(0, len(todo), options.batch_size)):
            batch = todo[lo : lo + options.batch_size]
            entries: dict[int, dict[str, Any]] = {}
            waves, rows = [], []
            for i in batch:
                item = items[i]
                entry = {"key": keys[i], "id": item.id, "seed": item_seed(options.seed, item.id)}
                try:
                    wave = _load_wave(item, item.record.where, window)
                except AudioError as exc:
                    missing = item.audio.path is not None and not item.audio.path.exists()
                    entry |= {"audio_status": "missing" if missing else "unreadable", "audio_error": str(exc)}
                    entries[i] = entry
                    continue
                wave, trimmed = trim_to_window(wave, window)
                entry |= {"audio_status": "ok", "trimmed": trimmed}
                entries[i] = entry
                waves.append(wave)
                rows.append(i)
            if rows:
                answers = qa.answer(waves, [prompts[i] for i in rows], decode,
                                    seed=[entries[i]["seed"] for i in rows])  # fmt: skip
                for i, text, nfe in zip(rows, answers.texts, answers.row_nfe, strict=True):
                    entries[i] |= {"output": text, "nfe": nfe}  # the item's own NFE: independent of its batch
                decoded += len(rows)
            append_partial(partial, [entries[i] for i in batch])
            done.update({keys[i]: entries[i] for i in batch})
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(batch_no, len(mine) - len(todo) + lo + len(batch))
    finally:
        bar.close()
    shard.wait_for_all()
    if not shard.is_main:  # rank 0 merges and writes the final files
        return RunResult({}, {}, decoded, time.perf_counter() - start)

    # Final files, in item order, from the logs alone (so a resumed or sharded run writes what an uninterrupted
    # single-process one does).
    done = read_logs(out / "partial", stem)
    lost = [items[i].id for i, k in enumerate(keys) if k not in done]
    if lost:
        raise RuntimeError(f"{len(lost)} item(s) missing from the logs in {out / 'partial'} (first: {lost[:5]}); "
                           "rerun the same command to decode them")
    entries = [done[k] for k in keys]
    run_info = {
        "model": {"path": str(Path(options.model).resolve()), "fingerprint": model_fp},
        "data": data_identity,
        "audio_root": str(audio_root.resolve()),
        "limit": options.limit,
        "prompt": spec.prompt,
        "prompt_fingerprint": template.fingerprint(),
        "profile": spec.profile,
        "decoding": dataclasses.asdict(decode),
        "seed": options.seed,
        "seed_rule": "per item: sha256(seed, id) -> 31-bit",
        "window_seconds": window,
        "device_type": device_type,
        "compat": qa.model.config.compat,
        "fingerprint": fingerprint,
    }
    paths = finalize(spec, items, prompts, entries, out, run_info)
    seconds = time.perf_counter() - start
    report = json.loads(paths["report_json"].read_text(encoding="utf-8"))
    atomic_write_json(out / "timing.json", {"seconds": seconds, "decoded_this_session": decoded,
                                            "items_per_second": decoded / seconds if seconds else None})  # fmt: skip
    log(format_table(report))
    log(f"[diffa2.eval] decoded {decoded} item(s) in {seconds:.1f} s; files in {out}: "
        f"{paths['predictions'].name}, samples.jsonl, report.json, report.md, report.png")  # fmt: skip
    lock.release()
    return RunResult(report, paths, decoded, seconds)


def finalize(
    spec: BenchmarkSpec,
    items: Sequence[Item],
    prompts: Sequence[str],
    entries: Sequence[dict[str, Any]],
    out: Path,
    run_info: dict[str, Any],
) -> dict[str, Path]:
    """Write the predictions file (official format), samples.jsonl and the reports."""
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
    pred_path = out / spec.predictions_file
    scored_records = [Record(r, f"{pred_path.name}[{i}]", i) for i, r in enumerate(rows)]
    result = score_records(scored_records, spec, spec.mode, spec.prediction_key)
    samples = []
    for item, prompt, entry, s in zip(items, prompts, entries, result.items, strict=True):
        samples.append({
            "index": item.index, "id": item.id, "where": item.record.where, "audio": item.audio.label,
            "audio_status": entry.get("audio_status"), "audio_error": entry.get("audio_error"),
            "trimmed": entry.get("trimmed", False), "seed": entry["seed"], "prompt": prompt,
            "raw_output": entry.get("output"), "scored_text": s.scored_text, "letter": s.letter,
            "answer": item.answer, "status": s.status, "counted": s.counted, "correct": s.correct,
            "well_formed": s.well_formed, "nfe": entry.get("nfe"),
        })  # fmt: skip
    audio = [e.get("audio_status") for e in entries]
    extra = {
        "counts": {
            "audio_missing": audio.count("missing"),
            "audio_unreadable": audio.count("unreadable"),
            "audio_trimmed": sum(bool(e.get("trimmed")) for e in entries),
        },
        "predictions": pred_path.name,
        "run": run_info,
    }
    failed = [(item.id, s) for item, e, s in zip(items, entries, result.items, strict=True) if not has_output(e)]
    if failed:
        wrong = sum(s.counted for _, s in failed)  # as the official script counts a record without a prediction
        ids = first_ids([item_id for item_id, _ in failed])
        extra["warnings"] = [f"{len(failed)} item(s) had missing or unreadable audio ({ids}): no prediction "
                             f"written, {wrong} counted wrong and {len(failed) - wrong} left out of the count; "
                             f"rerun the same command to retry them"]  # fmt: skip
    report = build_report(result, extra)
    write_predictions(pred_path, rows)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    paths = write_report(report, out)
    return {"predictions": pred_path, "samples": out / "samples.jsonl", "report_json": paths["json"],
            "report_md": paths["md"], "report_png": paths["png"]}  # fmt: skip
