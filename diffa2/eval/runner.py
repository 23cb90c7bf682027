"""Run a DIFFA-2 checkpoint over a benchmark: prompts, batched decoding, resumable predictions, scoring, reports.

    python -m diffa2.eval run --benchmark synth                    # runs/sft/final on the synthetic test split
    python -m diffa2.eval run --benchmark mmau --model CKPT --data mmau-test-mini.json --audio_root DIR

Resume. Every finished item is appended to ``<out>/partial/<benchmark>-<fingerprint>.jsonl`` (flushed and
fsynced per group of ``--batch_size`` finished items) under a key made of the item id, its prompt text and audio
reference. The fingerprint covers everything that changes an answer: checkpoint content (sampled hash), prompt
template, decoding settings, seed, audio window and device type, but not the batch size (decoding is batch-safe).
Rerunning the same command skips finished items; a killed run loses at most the items in flight (one batch being
decoded, and fewer than a batch finished but not yet written). Final files are written atomically once every item
is done, and contain nothing time-dependent, so they are byte-identical to an uninterrupted run's.

Batches. Without a KV cache the items go through the continuous batcher (``diffa2.diffusion.continuous``): up to
``--batch_size`` answers decode together and a finished answer's slot goes to the next item at once, so a batch
never waits for its slowest answer; KV-cache settings decode in static batches. Answers are the same either way.

Sharding. Under ``torchrun --nproc_per_node=N -m diffa2.eval run ...`` item i goes to rank i % N; each rank logs to
its own file and rank 0 merges all logs in item order (``diffa2.eval.sharding``), so the final files are
byte-identical to a single-process run's, and any rerun resumes whatever the number of processes.

Seeds. Each item gets its own decoding seed derived from ``--seed`` and its id, so results do not depend on
batch composition or order.

Audio. Missing or unreadable audio is recorded (``audio_error`` in the predictions and no prediction key, which
the official scripts count as they do: MMAU's and MMAR's skip the record, MMSU's counts it wrong; strict mode
counts it wrong), named in the report's warnings, and retried by the next run of the same command. A run that finds
not one of its audio files (a wrong ``--audio_root``) stops before loading the model. Clips longer than the model's
window are trimmed and counted; under ``--long_audio window`` they are encoded window by window up to
``--max_audio_seconds`` (longer ones are trimmed to it and counted; docs/long-audio.md).

One run per output folder: rank 0 holds a lock file naming its PID and host (``diffa2.run_lock``) while it runs;
a second run into the same folder is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffa2.audio import DEFAULT_MAX_AUDIO_SECONDS, check_long_audio
from diffa2.eval.core import (
    audio_limit,
    check_mcq,
    decode_items,
    load_items,
    render_prompts,
    resolve_data,
    score_entries,
)
from diffa2.eval.loaders import DataError, Item, write_predictions
from diffa2.eval.prompts import get_prompt
from diffa2.eval.report import build_report, format_table, write_report
from diffa2.eval.resume import append_partial, checkpoint_fingerprint, has_output, item_key, read_logs
from diffa2.eval.sharding import Shard
from diffa2.eval.specs import BenchmarkSpec, load_spec
from diffa2.io import atomic_write_json, atomic_write_text
from diffa2.likelihood import DEFAULT_DRAWS
from diffa2.run_lock import RunLock


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
    mcq: str = "generate"  # "likelihood": the best-scoring choice instead of a decoded answer (core.decode_batch)
    n_draws: int = DEFAULT_DRAWS  # ELBO draws per choice when mcq is "likelihood"
    long_audio: str | None = None  # "trim" or "window" (docs/long-audio.md); default: the checkpoint's
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS  # the longest clip "window" encodes; longer ones are cut


@dataclass
class RunResult:
    report: dict[str, Any]
    paths: dict[str, Path]
    decoded: int  # items decoded in this session (not resumed)
    seconds: float


def first_ids(ids: Sequence[str], shown: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def check_audio_found(items: Sequence[Item], audio_root: Path) -> None:
    """Refuse a run in which not one audio file exists (a wrong --audio_root, say), before the model is loaded."""
    files = [item.audio.path for item in items if item.audio.data is None and item.audio.path is not None]
    if not files or len(files) < len(items) or any(path.exists() for path in files):
        return
    raise DataError([f"none of the {len(files)} audio files was found under {audio_root.resolve()} (the first "
                     f"looked for: {files[0]}); check --audio_root (default: the data file's folder)"])


def shard_note(shard: Shard, owned: int) -> str:
    return "" if shard.world_size == 1 else f" ({owned} on rank {shard.rank} of {shard.world_size})"


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


def mcq_identity(options: RunOptions) -> dict[str, Any]:
    """The answering mode in a run's identity: absent for decoding (earlier runs keep their fingerprint), else the
    mode and its ELBO budget."""
    return {} if options.mcq == "generate" else {"mcq": options.mcq, "n_draws": options.n_draws}


def long_audio_identity(qa: Any) -> dict[str, Any]:
    """The long-audio handling in a run's identity: absent for trimming (earlier runs keep their fingerprint), else
    the mode and its limit."""
    if getattr(qa, "long_audio", "trim") == "trim":
        return {}
    return {"long_audio": qa.long_audio, "max_audio_seconds": audio_limit(qa)}


def check_long_audio_options(options: RunOptions) -> None:
    """Refuse an unknown `long_audio`, and windowed audio under likelihood answering (which scores one window)."""
    if options.long_audio is not None:
        check_long_audio(options.long_audio)
        if options.long_audio == "window" and options.mcq == "likelihood":
            raise ValueError("--long_audio window is not supported with --mcq likelihood (answer scoring encodes "
                             "one window per clip); use --long_audio trim or --mcq generate")
    if not options.max_audio_seconds > 0:
        raise ValueError(f"--max_audio_seconds must be > 0, got {options.max_audio_seconds}")


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
        raise ValueError(f"--batch_size must be >= 1, got {options.batch_size}")
    check_mcq(options.mcq)
    check_long_audio_options(options)
    out = Path(options.out or f"runs/eval/{spec.name}")
    shard = Shard.from_env()

    # Data: read, validate every record, limit.
    source, audio_root = resolve_data(spec, options.data, options.audio_root)
    items, data_identity = load_items(spec, source, audio_root, limit=options.limit, hf_revision=options.hf_revision)
    check_audio_found(items, audio_root)
    lock = RunLock(out, log).acquire() if shard.is_main else None  # one run per output folder

    # Model and everything that changes an answer.
    if qa is None:
        from diffa2.inference import AudioQA

        qa = AudioQA.from_checkpoint(options.model, device=options.device or shard.default_device(),
                                     compat=options.compat, long_audio=options.long_audio,
                                     max_audio_seconds=options.max_audio_seconds)
    elif options.long_audio is not None:
        qa.long_audio, qa.max_audio_seconds = options.long_audio, options.max_audio_seconds
    spec = resolve_spec(options, model_release(qa.model))  # the profile depends on the model
    device_type = str(getattr(qa, "device", options.device or "cpu")).split(":")[0]
    window = float(qa.model.config.window_seconds)
    template = get_prompt(spec.prompt)
    decode = spec.decoding
    prompts = render_prompts(spec, items)
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
    } | compat_identity(qa.model.config.compat, options.compat) | mcq_identity(options) | long_audio_identity(qa)
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
        f"{decode.gen_length}/{decode.block_length}/{decode.steps}")
    retried = [items[i].id for i in todo if keys[i] in done]
    if retried:
        log(f"[diffa2.eval] retrying {len(retried)} item(s) whose audio was missing or unreadable before: "
            f"{first_ids(retried)}")

    # Decode what is left, appending every batch as soon as it is finished.
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=spec.name, unit="item",
               disable=not options.progress, file=sys.stderr, position=shard.rank)
    decoded, finished = 0, len(mine) - len(todo)
    try:
        groups = decode_items(qa, [items[i] for i in todo], [prompts[i] for i in todo], decode, options.seed,
                              options.batch_size, mcq=options.mcq, n_draws=options.n_draws)
        for batch_no, group in enumerate(groups):
            entries = [{"key": keys[todo[j]]} | entry for j, entry in group]
            decoded += sum(map(has_output, entries))
            append_partial(partial, entries)
            done.update({entry["key"]: entry for entry in entries})
            bar.update(len(group))
            finished += len(group)
            if on_batch is not None:
                on_batch(batch_no, finished)
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
    } | mcq_identity(options) | long_audio_identity(qa)
    paths = finalize(spec, items, prompts, entries, out, run_info)
    seconds = time.perf_counter() - start
    report = json.loads(paths["report_json"].read_text(encoding="utf-8"))
    atomic_write_json(out / "timing.json", {"seconds": seconds, "decoded_this_session": decoded,
                                            "items_per_second": decoded / seconds if seconds else None})
    log(format_table(report))
    log(f"[diffa2.eval] decoded {decoded} item(s) in {seconds:.1f} s; files in {out}: "
        f"{paths['predictions'].name}, samples.jsonl, report.json, report.md, report.png")
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
    rows, result = score_entries(spec, items, entries)
    pred_path = out / spec.predictions_file
    samples = []
    for item, prompt, entry, s in zip(items, prompts, entries, result.items, strict=True):
        samples.append({
            "index": item.index, "id": item.id, "where": item.record.where, "audio": item.audio.label,
            "audio_status": entry.get("audio_status"), "audio_error": entry.get("audio_error"),
            "trimmed": entry.get("trimmed", False), "seed": entry["seed"], "prompt": prompt,
            "raw_output": entry.get("output"), "scored_text": s.scored_text, "letter": s.letter,
            "answer": item.answer, "status": s.status, "counted": s.counted, "correct": s.correct,
            "well_formed": s.well_formed, "nfe": entry.get("nfe"),
        })
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
                             f"rerun the same command to retry them"]
    report = build_report(result, extra)
    write_predictions(pred_path, rows)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    paths = write_report(report, out)
    return {"predictions": pred_path, "samples": out / "samples.jsonl", "report_json": paths["json"],
            "report_md": paths["md"], "report_png": paths["png"]}
