"""What the demo does with a clip and a question: validate the audio, decode, stream the canvas as it unmasks.

Every failure a user can cause (no clip, a file that is not audio, an empty or silent clip, an upload over the size
limit, inconsistent decoding settings, a checkpoint that does not load) becomes a `DemoError` whose message is
shown in the page; the UI never shows a stack trace.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffa2.audio import SAMPLE_RATE, AudioError, load_audio, trim_to_window
from diffa2.chat import ChatFormat
from diffa2.demo import DEFAULT_MAX_UPLOAD_MB
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA

logger = logging.getLogger(__name__)

MASK_GLYPH = "▒"  # a position still masked
END_GLYPH = "·"  # a position committed to end-of-answer (EOS / end of turn)
SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose loudest sample is below this is treated as silent
EVAL_DECODING = load_spec("synth").decoding  # what `python -m diffa2.eval run --benchmark synth` decodes with


class DemoError(ValueError):
    """A problem with the user's input or choices; its message is meant for the page."""


@dataclass
class DecodeSettings:
    """The page's decoding controls: the evaluation's lengths; speed fields off (0, "none", False) by default."""

    gen_length: int = EVAL_DECODING.gen_length
    block_length: int = EVAL_DECODING.block_length
    steps: int = EVAL_DECODING.steps
    threshold: float = 0.0  # confidence threshold of parallel decoding; 0 = off
    factor: float = 0.0  # factor rule of parallel decoding; 0 = off
    cache: str = "none"
    eos_early_exit: bool = False

    @classmethod
    def from_mode(cls, mode: str) -> DecodeSettings:
        """The evaluation's lengths with the speed settings of a named decoding mode (`DecodeConfig.preset`)."""
        try:
            config = EVAL_DECODING.with_mode(mode)
        except ValueError as exc:
            raise DemoError(f"{exc}.") from exc
        return cls(threshold=config.threshold or 0.0, factor=config.factor or 0.0, cache=config.cache,
                   eos_early_exit=config.eos_early_exit)

    def to_config(self) -> DecodeConfig:
        """The DecodeConfig these settings mean, or a DemoError saying what is inconsistent."""
        try:
            return DecodeConfig(gen_length=int(self.gen_length), block_length=int(self.block_length),
                                steps=int(self.steps), threshold=self.threshold or None, factor=self.factor or None,
                                cache=self.cache, eos_early_exit=bool(self.eos_early_exit))
        except ValueError as exc:
            raise DemoError(f"Decoding settings: {exc}.") from exc


def load_model(checkpoint: str | None, compat: str | None = None) -> AudioQA:
    """The AudioQA of a checkpoint directory under `compat` (default: the checkpoint's own; cached, reloaded when
    its config.json changes)."""
    if not checkpoint:
        raise DemoError("No checkpoint selected. Train the tiny default or choose a checkpoint directory.")
    config = Path(checkpoint).expanduser() / "config.json"
    if not config.is_file():
        raise DemoError(f"{checkpoint} is not a DIFFA-2 checkpoint (no config.json there).")
    try:
        return _load_cached(str(config.parent.resolve()), config.stat().st_mtime, compat)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DemoError(f"Could not load the checkpoint {checkpoint}: {exc}") from exc


@functools.lru_cache(maxsize=2)
def _load_cached(directory: str, mtime: float, compat: str | None) -> AudioQA:
    """Load once per (directory, config.json mtime, compat): switching back and forth between two stays instant."""
    return AudioQA.from_checkpoint(directory, compat=compat)


def prepare_clip(path: str | None, window_seconds: float, max_bytes: int) -> tuple[np.ndarray, list[str]]:
    """Decode and check an uploaded or recorded clip; return the 16 kHz wave and notices (e.g. trimming)."""
    if not path:
        raise DemoError("Upload an audio file or record one with the microphone first.")
    name = Path(path).name
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > max_bytes:
        raise DemoError(f"{name} is {size / 2**20:.3g} MB, over the upload limit of {max_bytes / 2**20:.3g} MB.")
    try:
        wave = load_audio(path)
    except AudioError as exc:  # the server-side path means nothing to the user: name the file as they know it
        raise DemoError(f"Could not read the audio: {str(exc).replace(str(path), name)}.") from exc
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise DemoError(f"{name} is silent (its loudest sample is {_dbfs(peak)}); there is nothing to listen to.")
    seconds = wave.shape[0] / SAMPLE_RATE
    wave, trimmed = trim_to_window(wave, window_seconds)
    notices = []
    if trimmed:
        notices.append(f"The clip is {seconds:.1f} s long; only its first {window_seconds:g} s (the model's window) "
                       "were used.")
    return wave, notices


def _dbfs(peak: float) -> str:
    """A peak sample value in dB relative to full scale."""
    return "-inf dBFS" if peak == 0 else f"{20 * np.log10(peak):.0f} dBFS"


def render_canvas(token_ids: list[int], chat: ChatFormat) -> str:
    """The answer canvas as text: committed tokens decoded, masked positions as ▒, end-of-answer tokens as ·."""
    glyphs = {chat.ids.mask: MASK_GLYPH, chat.ids.eos: END_GLYPH, chat.ids.eot: END_GLYPH}
    pieces: list[str] = []
    run: list[int] = []
    for token in [*token_ids, None]:
        if token is not None and token not in glyphs:
            run.append(token)
            continue
        if run:
            pieces.append(chat.tokenizer.decode(run, skip_special_tokens=True))
            run = []
        if token is not None:
            pieces.append(glyphs[token])
    return "".join(pieces)


@dataclass
class Update:
    """One frame of the answer: the text shown and a status line; `done` on the last frame."""

    text: str
    status: str
    done: bool = False


def stream_answer(
    qa: AudioQA, wave: np.ndarray, question: str, config: DecodeConfig, *, delay: float = 0.0, seed: int = 0
) -> Iterator[Update]:
    """Decode in a worker thread and yield the canvas after every step, then the answer with NFE and time.

    `delay` pauses between frames shown (not between decoding steps), so the reported time stays the decoder's.
    """
    frames: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["answers"] = qa.answer([wave], [question], config, seed=seed,
                                           on_step=lambda nfe, x: frames.put((nfe, x[0].tolist())))
        except Exception as exc:  # re-raised in the consumer's thread below
            outcome["error"] = exc
        finally:
            frames.put(None)

    threading.Thread(target=work, daemon=True, name="diffa2-demo-decode").start()
    while (frame := frames.get()) is not None:
        nfe, ids = frame
        masked = sum(t == qa.chat.ids.mask for t in ids)
        yield Update(render_canvas(ids, qa.chat), f"Unmasking… NFE {nfe}, {masked} of {len(ids)} positions masked")
        time.sleep(delay)
    if "error" in outcome:
        raise outcome["error"]
    answers = outcome["answers"]
    status = (f"Done: NFE {answers.nfe}, {answers.seconds:.2f} s ({answers.tokens_per_second:.0f} tokens/s, "
              f"{config.gen_length} answer positions)")
    if not answers.texts[0]:
        status += "; the answer is empty (the model put an end-of-answer token first)"
    yield Update(answers.texts[0], status, done=True)


def answer_clip(
    audio: str | None,
    question: str,
    checkpoint: str | None,
    settings: DecodeSettings,
    *,
    max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
    delay: float = 0.0,
    compat: str | None = None,
) -> Iterator[Update]:
    """The demo's answer function: a path and a question in, frames of the unmasking out; errors as a message."""
    try:
        if not question or not question.strip():
            raise DemoError("Type a question about the clip (or pick an example question).")
        config = settings.to_config()
        qa = load_model(checkpoint, compat)
        wave, notices = prepare_clip(audio, qa.model.config.window_seconds, max_bytes)
        prefix = "".join(f"ℹ {n}\n\n" for n in notices)
        for update in stream_answer(qa, wave, question.strip(), config, delay=delay):
            yield Update(update.text, prefix + update.status, update.done)
    except DemoError as exc:
        yield Update("", f"⚠ {exc}", done=True)
    except Exception as exc:  # a bug, not the user's fault: the page gets one line, the server log the traceback
        logger.exception("answering failed")
        yield Update("", f"⚠ Internal error ({type(exc).__name__}: {exc}); the details are in the server log.", True)
