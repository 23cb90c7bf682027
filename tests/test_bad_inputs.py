"""Every bad input of issues #8 and #15 and what it gets, as one table: a clear error naming the file/line/field
or option, skipped and counted, or accepted (converted / trimmed and counted).

Each row builds a real file in a temporary folder and feeds it to the entry point a user would hit: audio and
manifests go through the training data path (load_split + AudioInstructionDataset, which skips and counts),
configs through `parse_config`, checkpoints through the loaders, benchmark files through `validate` or the
runner, numeric options through each command line's range checks, output folders through a stage's setup.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import write_tiny_hf_whisper
from tiny_llada import write_tiny_llada

from diffa2.audio import AudioError, load_audio
from diffa2.config import parse_config
from diffa2.data.dataset import AudioInstructionDataset
from diffa2.data.manifest import ManifestError
from diffa2.data.recipe import DataSource, load_split
from diffa2.data.synth import build_parser as synth_parser
from diffa2.demo.cli import build_parser as demo_parser
from diffa2.eval.__main__ import build_parser as eval_parser
from diffa2.eval.loaders import DataError, read_records, validate
from diffa2.eval.specs import BUILTIN_SPECS
from diffa2.modeling.backbone import LLaDABackbone
from diffa2.modeling.checkpoint import load_pretrained
from diffa2.modeling.encoder import WhisperSpeechEncoder
from diffa2.modeling.safe_load import CheckpointError
from diffa2.run_lock import LOCK_NAME, Holder, RunDirError, process_start
from diffa2.stages import sft
from diffa2.stages.arguments import DataArguments, EvalArguments, ModelArguments, StageTrainingArguments
from diffa2.stages.cli import SFT_ARG_TYPES, parse_stage_options
from diffa2.stages.runner import SFTStage
from diffa2.threads import choose_threads
from diffa2.validation import check_args

BENCH = Path(__file__).resolve().parents[1] / "bench"
PROJECT_ERRORS = (AudioError, ManifestError, CheckpointError, DataError, ValueError, RunDirError)
WINDOW = 30.0


@dataclass
class Ctx:
    tmp: Path
    checkpoint: Path  # a saved tiny DIFFA-2 checkpoint (session fixture), copied before being damaged
    chat: object


@dataclass
class Case:
    name: str
    gets: str  # "error", "skipped" (counted), "accepted" or "trimmed" (counted)
    message: str  # fragment of the error / skip message, or of the accepted item's description
    run: Callable[[Ctx], object]  # raises (error) or returns the messages / description to search


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def record(audio: object = "good.wav", **extra) -> dict:
    return {"audio_filepath": audio, "input": "What is the pitch?", "target": "high"} | extra


def train_on(ctx: Ctx, lines: list[str | bytes]) -> tuple[AudioInstructionDataset, list[str]]:
    """Manifest lines (line 1 a good record) through the training data path; every item is read once."""
    audio = ctx.tmp / "audio"
    audio.mkdir(exist_ok=True)
    sf.write(audio / "good.wav", tone(1.0, 16000), 16000)
    manifest = ctx.tmp / "train.jsonl"
    encoded = [line if isinstance(line, bytes) else line.encode() for line in [json.dumps(record()), *lines]]
    manifest.write_bytes(b"\n".join(encoded) + b"\n")
    items, problems = load_split([DataSource(path=str(manifest), audio_root=str(audio))], synth_dir=None, seed=0,
                                 on_error="skip")
    dataset = AudioInstructionDataset(items, WINDOW)
    for i in range(len(dataset)):
        dataset[i]
    return dataset, problems


def audio_row(write: Callable[[Path], None]) -> Callable[[Ctx], object]:
    """A row whose second manifest line points at the file `write` creates: skip messages, or what was loaded."""

    def run(ctx: Ctx) -> object:
        (ctx.tmp / "audio").mkdir(exist_ok=True)
        write(ctx.tmp / "audio" / "clip.wav")
        dataset, _ = train_on(ctx, [json.dumps(record("clip.wav"))])
        if dataset.stats.skipped:
            return list(dataset.stats.skipped.values())
        wave = dataset.load_wave(dataset.items[1])
        assert wave.dtype == np.float32 and np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
        cut = "trimmed" if dataset.stats.trimmed else "kept"
        return f"{len(wave)} samples at 16 kHz, {cut}"

    return run


def manifest_row(line: str | bytes) -> Callable[[Ctx], object]:
    """A row whose second manifest line is `line`: the problems and skip messages of the training data path."""

    def run(ctx: Ctx) -> object:
        dataset, problems = train_on(ctx, [line])
        return problems + list(dataset.stats.skipped.values())

    return run


def write_wav(seconds: float, rate: int, *, channels: int = 1, subtype: str | None = None, nan: bool = False):
    def write(path: Path) -> None:
        data = tone(seconds, rate, channels)
        if nan:
            data[10] = np.nan
        sf.write(path, data, rate, subtype=subtype)

    return write


def write_two_hours(path: Path) -> None:
    """2 hours of 8 kHz 8-bit mono (58 MB, the smallest real WAV of that length), written block by block."""
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_U8") as handle:
        block = (tone(600, 8000) * 32767).astype(np.int16)
        for _ in range(12):
            handle.write(block)


def two_hour_run(ctx: Ctx) -> object:
    """The 2-hour clip is trimmed to the window and counted, decoding only the window (checked with tracemalloc)."""
    sf.write(ctx.tmp / "warm.wav", tone(0.5, 8000), 8000)
    load_audio(ctx.tmp / "warm.wav")  # imports and first-call set-up are not the clip's memory
    (ctx.tmp / "audio").mkdir()
    write_two_hours(ctx.tmp / "audio" / "clip.wav")
    tracemalloc.start()
    try:
        description = audio_row(lambda path: None)(ctx)  # the clip is written already
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB: the whole file was decoded (2 h at 16 kHz is 460 MB)"
    return description


def config_row(yaml_text: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        path = ctx.tmp / "stage.yaml"
        path.write_text(yaml_text)
        return parse_config((ModelArguments, DataArguments, EvalArguments, StageTrainingArguments),
                            ["--config", str(path)], "test")

    return run


def damaged_checkpoint(damage: Callable[[Path], None]) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        directory = ctx.tmp / "ckpt"
        directory.mkdir()
        for file in ctx.checkpoint.iterdir():
            if file.is_file():
                (directory / file.name).write_bytes(file.read_bytes())
        damage(directory)
        return load_pretrained(directory)

    return run


def flatten_first_tensor(directory: Path) -> None:
    tensors = load_file(directory / "model.safetensors")
    first = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
    tensors[first] = tensors[first].flatten()
    save_file(tensors, directory / "model.safetensors")


class CreatesAFile:
    """A pickle payload: unpickling it with weights_only=False would run os.mkdir (here: create MARKER)."""

    marker = ""

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_pickle(path: Path, ctx: Ctx) -> None:
    CreatesAFile.marker = str(ctx.tmp / "PWNED")
    torch.save({"model.encoder.conv1.weight": CreatesAFile()}, path)


def pickle_row(load: Callable[[Ctx], object]) -> Callable[[Ctx], object]:
    """Load a malicious pickle; whatever the error, the payload must not have run."""

    def run(ctx: Ctx) -> object:
        try:
            return load(ctx)
        finally:
            assert not (ctx.tmp / "PWNED").exists(), "the pickle's code was executed"

    return run


def whisper_with_pickle(ctx: Ctx) -> object:
    directory = write_tiny_hf_whisper(ctx.tmp / "whisper", d_model=32, layers=2, with_safetensors=False)
    malicious_pickle(directory / "pytorch_model.bin", ctx)
    return WhisperSpeechEncoder.from_pretrained(directory)


def openai_pt_pickle(ctx: Ctx) -> object:
    malicious_pickle(ctx.tmp / "large-v3.pt", ctx)
    return WhisperSpeechEncoder.from_pretrained(ctx.tmp / "large-v3.pt")


def llada_with_pickle(ctx: Ctx) -> object:
    directory = ctx.tmp / "llada"
    write_tiny_llada(directory, vocab=len(ctx.chat.tokenizer), mask_id=ctx.chat.ids.mask, eos_id=ctx.chat.ids.eos)
    (directory / "model.safetensors").unlink()
    malicious_pickle(directory / "pytorch_model.bin", ctx)
    return LLaDABackbone.from_llada_pretrained(directory)


def diffa2_with_pickle(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    malicious_pickle(directory / "pytorch_model.bin", Ctx(directory.parent, directory, None))


MMAR_RECORD = {"id": "m1", "audio_path": "./audio/m1.wav", "question": "Which?", "choices": ["a", "b"],
               "answer": "a", "modality": "sound", "category": "Signal Layer", "sub-category": "x"}
MMSU_RECORD = {"id": "s1", "audio_path": "s1.wav", "question": "Which?", "choice_a": "a", "choice_b": "b",
               "choice_c": None, "choice_d": None, "answer_gt": "a", "category": "Perception",
               "sub-category": "x", "sub-sub-category": "y"}


def benchmark_row(records: list[dict], suffix: str, benchmark: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        path = ctx.tmp / f"meta{suffix}"
        path.write_text("".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records))
        return validate(read_records(path), BUILTIN_SPECS[benchmark], for_run=True, source=str(path))

    return run


def stage_option_row(*flags: str) -> Callable[[Ctx], object]:
    """Stage flags through the stages' parser and range checks."""

    def run(ctx: Ctx) -> object:
        return parse_stage_options(SFT_ARG_TYPES, ["--output_dir", str(ctx.tmp / "run"), *flags], "test", {})

    return run


def stage_yaml_row(yaml_text: str) -> Callable[[Ctx], object]:
    """A stage config YAML through the stages' parser and range checks."""

    def run(ctx: Ctx) -> object:
        (ctx.tmp / "stage.yaml").write_text(yaml_text)
        return stage_option_row("--config", str(ctx.tmp / "stage.yaml"))(ctx)

    return run


def cli_option_row(build_parser: Callable[[], object], *argv: str) -> Callable[[Ctx], object]:
    """Flags of an argparse command line through its range checks."""

    def run(ctx: Ctx) -> object:
        parser = build_parser()
        return check_args(parser, parser.parse_args(list(argv)))

    return run


def bench_parser(name: str) -> Callable[[], object]:
    def build() -> object:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module.build_parser()

    return build


def stage_into(prepare: Callable[[Path], None]) -> Callable[[Ctx], object]:
    """A stage set up in an output folder that `prepare` filled first."""

    def run(ctx: Ctx) -> object:
        prepare(ctx.tmp / "run")
        args = parse_config(SFT_ARG_TYPES, ["--output_dir", str(ctx.tmp / "run")], "test")
        return SFTStage(sft.SPEC, *args).setup()

    return run


def earlier_checkpoints(run: Path) -> None:
    (run / "checkpoint-1600").mkdir(parents=True)
    (run / "final").mkdir()


def locked_by_parent(run: Path) -> None:
    """The lock of a live process of this host (pytest's parent)."""
    run.mkdir(parents=True)
    pid = os.getppid()
    holder = Holder(pid, socket.gethostname(), "2026-12-03 10:00:00", "train", "t", process_start(pid))
    (run / LOCK_NAME).write_text(json.dumps(dataclasses.asdict(holder)))


def eval_without_audio(ctx: Ctx) -> object:
    from diffa2.eval.runner import RunOptions, run_benchmark

    path = ctx.tmp / "mmar.jsonl"
    path.write_text(json.dumps(MMAR_RECORD) + "\n")
    options = RunOptions(benchmark="mmar", model=str(ctx.checkpoint), data=str(path), out=str(ctx.tmp / "out"),
                         audio_root=str(ctx.tmp / "wrong"), progress=False)  # fmt: skip
    return run_benchmark(options, log=lambda _: None)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

ONE_SECOND = "16000 samples at 16 kHz, kept"
PICKLE_REFUSED = "not a PyTorch checkpoint loadable with weights_only=True"
CASES = [
    # audio (training data path: a bad clip is skipped, counted and replaced; the message names file and line)
    Case("audio: corrupt", "skipped", "cannot be decoded by libsndfile",
         audio_row(lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 50))),
    Case("audio: empty file (0 bytes)", "skipped", "clip.wav: is empty (0 bytes)", audio_row(lambda p: p.touch())),
    Case("audio: zero-length (header, no samples)", "skipped", "contains no samples (zero-length audio)",
         audio_row(write_wav(0, 16000))),
    Case("audio: NaN-valued samples", "skipped", "contains 1 NaN/inf sample values",
         audio_row(write_wav(1, 16000, subtype="FLOAT", nan=True))),
    Case("audio: 8-bit PCM", "accepted", ONE_SECOND, audio_row(write_wav(1, 16000, subtype="PCM_U8"))),
    Case("audio: 6 channels", "accepted", ONE_SECOND, audio_row(write_wav(1, 16000, channels=6))),
    Case("audio: 192 kHz", "accepted", ONE_SECOND, audio_row(write_wav(1, 192000))),
    Case("audio: 2 hours", "trimmed", "480000 samples at 16 kHz, trimmed", two_hour_run),
    Case("audio: missing file", "skipped", "clip.wav: file not found", audio_row(lambda p: None)),
    # manifests (training data path: on_bad_record=skip, the default; 'raise' gives the same text as an error)
    Case("manifest: bad JSON line", "skipped", "train.jsonl:2: invalid JSON", manifest_row('{"input": "q",')),
    Case("manifest: missing field", "skipped", "train.jsonl:2: missing field(s) ['target']",
         manifest_row(json.dumps({"audio_filepath": "good.wav", "input": "q"}))),
    Case("manifest: wrong type (text field)", "skipped",
         "train.jsonl:2: field(s) ['target'] must be strings, got ['int']", manifest_row(json.dumps(record(target=3)))),
    Case("manifest: wrong type (audio field)", "skipped",
         "train.jsonl:2: field 'audio_filepath' must be a path string or an HF audio cell",
         manifest_row(json.dumps(record(audio=5)))),
    Case("manifest: not UTF-8", "skipped", "train.jsonl:2: not UTF-8 text", manifest_row(b'{"input": "\xff"}')),
    Case("manifest: path outside the audio root", "skipped",
         "is outside the audio root", manifest_row(json.dumps(record(audio="../../etc/passwd")))),
    # configs
    Case("config: unknown key", "error", "stage.yaml: unknown keys ['max_stepz']", config_row("max_stepz: 3\n")),
    Case("config: wrong type (int)", "error", "stage.yaml: key 'max_steps': 'ten' is invalid",
         config_row("max_steps: ten\n")),
    Case("config: fractional int", "error", "stage.yaml: key 'max_steps': 1.5 is not a valid int",
         config_row("max_steps: 1.5\n")),
    Case("config: wrong type (bool)", "error", "stage.yaml: key 'lora': 'maybe' is invalid",
         config_row("lora: maybe\n")),
    Case("config: list for a single value", "error", "stage.yaml: key 'learning_rate': expected a single",
         config_row("learning_rate: [0.1, 0.2]\n")),
    Case("config: not YAML", "error", "stage.yaml: not valid YAML", config_row("max_steps: [1\n")),
    # checkpoints
    Case("checkpoint: missing config.json", "error", "not a complete DIFFA-2 checkpoint: missing config.json",
         damaged_checkpoint(lambda d: (d / "config.json").unlink())),
    Case("checkpoint: missing model.safetensors", "error", "ckpt: missing model.safetensors",
         damaged_checkpoint(lambda d: (d / "model.safetensors").unlink())),
    Case("checkpoint: truncated model.safetensors", "error", "model.safetensors: not a readable safetensors file",
         damaged_checkpoint(lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"))),
    Case("checkpoint: mismatched shapes", "error", "does not match its config.json",
         damaged_checkpoint(flatten_first_tensor)),
    Case("checkpoint: pickle instead of safetensors", "error",
         "found pickled weights ['pytorch_model.bin'], which are not read (safetensors only)",
         pickle_row(damaged_checkpoint(diffa2_with_pickle))),
    Case("checkpoint: malicious Whisper pytorch_model.bin", "error",
         f"pytorch_model.bin: {PICKLE_REFUSED}", pickle_row(whisper_with_pickle)),
    Case("checkpoint: malicious OpenAI .pt", "error",
         f"large-v3.pt: {PICKLE_REFUSED}", pickle_row(openai_pt_pickle)),
    Case("checkpoint: malicious LLaDA pytorch_model.bin", "error",
         f"pytorch_model.bin: {PICKLE_REFUSED}", pickle_row(llada_with_pickle)),
    # benchmark files
    Case("benchmark: MMAR metadata as MMAU", "error",
         "every record has the fields of mmar_jsonl data (audio_path, modality), not of mmau_json (mmau): wrong "
         "benchmark? use --benchmark mmar", benchmark_row([MMAR_RECORD], ".jsonl", "mmau")),
    Case("benchmark: MMSU metadata as MMAR", "error", "wrong benchmark? use --benchmark mmsu",
         benchmark_row([MMSU_RECORD], ".jsonl", "mmar")),
    Case("benchmark: no audio under --audio-root", "error", "none of the 1 audio files was found under ",
         eval_without_audio),
    # numeric options, every entry point (one table of ranges: diffa2.validation)
    Case("option: --max_steps -5", "error",
         "--max_steps -5 is out of range: must be >= 1, or -1 (train for --num_train_epochs instead)",
         stage_option_row("--max_steps", "-5")),
    Case("option: --learning_rate nan", "error", "--learning_rate nan is out of range: must be > 0",
         stage_option_row("--learning_rate", "nan")),
    Case("option: per_device_train_batch_size 0 in a config YAML", "error",
         "--per_device_train_batch_size 0 is out of range: must be >= 1",
         stage_yaml_row("per_device_train_batch_size: 0\n")),
    Case("option: eval --batch-size 0", "error", "--batch-size 0 is out of range: must be >= 1",
         cli_option_row(eval_parser, "run", "--benchmark", "synth", "--batch-size", "0")),
    Case("option: demo --port 70000", "error", "--port 70000 is out of range: must be 1..65535",
         cli_option_row(demo_parser, "--port", "70000")),
    Case("option: synth --vocab-size 100", "error", "--vocab-size 100 is out of range: must be >= 263",
         cli_option_row(synth_parser, "--vocab-size", "100")),
    Case("option: bench/decode.py --gen-lengths 0", "error", "--gen-lengths 0 is out of range: must be >= 1",
         cli_option_row(bench_parser("decode"), "--gen-lengths", "0")),
    Case("option: --threads 0", "error", "--threads 0 is out of range: must be >= 1",
         stage_option_row("--threads", "0")),
    Case("environment: OMP_NUM_THREADS=abc", "error", "OMP_NUM_THREADS='abc' is not a positive number of threads",
         lambda ctx: choose_threads(2, 0.0, env="abc")),
    # output folders
    Case("output dir: another run's checkpoints", "error",
         "holds another run's checkpoints (checkpoint-1600, final): pass --resume true",
         stage_into(earlier_checkpoints)),
    Case("output dir: locked by a running process", "error", "is in use by another run: PID ",
         stage_into(locked_by_parent)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, checkpoint, chat):
    ctx = Ctx(tmp_path, checkpoint, chat)
    if case.gets == "error":
        with pytest.raises(PROJECT_ERRORS) as err:
            case.run(ctx)
        assert case.message in str(err.value)
        return
    got = case.run(ctx)
    if case.gets == "skipped":
        assert len(got) == 1 and case.message in got[0], got  # counted once, with a message naming file and line
        assert "train.jsonl:2" in got[0], got
    else:
        assert case.message in got, got


def test_the_test_pickle_really_runs_code_when_unpickled_without_weights_only(tmp_path):
    """The control for the pickle rows: the same file, loaded unsafely, creates the marker."""
    ctx = Ctx(tmp_path, tmp_path, None)
    malicious_pickle(tmp_path / "evil.bin", ctx)
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "PWNED").exists()
