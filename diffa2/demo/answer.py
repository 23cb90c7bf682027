"""What the demo does with a clip and a question: validate the audio, decode, stream the canvas as it unmasks.

Every failure a user can cause (no clip, a file that is not audio, an empty or silent clip, an upload over the size
limit, a question over the length limit, inconsistent decoding settings, a checkpoint that does not load) becomes a
`DemoError` whose message is shown in the page; the UI never shows a stack trace.

The answer path is the server's (`diffa2.serve`): one continuous batcher per loaded model
(`diffa2.diffusion.continuous`), running on its own thread, so visitors asking at the same time share its forward
passes. KV-cache settings, which the batcher does not cover, decode with `AudioQA.answer` (as the eval runner
does). `answer_clip` and `stream_answer` are async generators: a pause between frames is an `asyncio.sleep`, so it
holds no worker thread, and the page's queue can run several answers at once.

The page keeps a conversation (docs/conversations.md): `answer_clip` takes the answered turns so far
(`ChatTurn`s) and asks the model the new question after them; a turn brings its clip into the conversation when it
differs from the last clip used, so follow-up questions about the same clip do not repeat it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import io
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from diffa2.audio import SAMPLE_RATE, AudioError, decode_audio_bytes, load_audio, trim_to_window
from diffa2.chat import AudioRef, ChatFormat, Conversation, Question, Turn
from diffa2.demo import DEFAULT_MAX_UPLOAD_MB
from diffa2.demo.checkpoints import describe_model
from diffa2.diffusion.continuous import ContinuousBatcher, DecodeJob, covers
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA
from diffa2.serve.schema import Limits

logger = logging.getLogger(__name__)

MASK_GLYPH = "▒"  # a position still masked
END_GLYPH = "·"  # a position committed to end-of-answer (EOS / end of turn)
SILENCE_PEAK = 1e-4  # -80 dBFS: a clip whose loudest sample is below this is treated as silent
EVAL_DECODING = load_spec("synth").decoding  # what `python -m diffa2.eval run --benchmark synth` decodes with
MAX_QUESTION_CHARS = Limits().max_question_chars  # the server's limit (diffa2.serve)
MAX_BATCH = 8  # answers decoded together by a model's batcher


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


def model_info(checkpoint: str | None, compat: str | None = None) -> str:
    """What the page says about the selected checkpoint (`describe_model`), or why it cannot be loaded."""
    try:
        qa = load_model(checkpoint, compat)
    except DemoError as exc:
        return f"⚠ {exc}"
    return describe_model(checkpoint, qa.model.config, sum(p.numel() for p in qa.model.parameters()))


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
    failed: bool = False  # the last frame of an answer that could not be given (its status says why)


@dataclass(frozen=True)
class ChatTurn:
    """One answered turn of the page's conversation: the clip it was asked with (a path, or None), question, answer."""

    audio: str | None
    question: str
    answer: str


def conversation_of(history: Sequence[ChatTurn], audio: str | None, question: str) -> tuple[list[str | None], Question]:
    """The clips (paths, in order) and what the model is asked: without history, `question` about `audio`; else
    the history's turns then this one, each turn bringing its clip when it differs from the last clip brought."""
    if not history:
        return [audio], question
    turns, clips, last = [], [], None
    for clip, text, answer in [*((t.audio, t.question, t.answer) for t in history), (audio, question, None)]:
        brings = clip is not None and clip != last
        turns.append(Turn("user", (AudioRef(clip), text) if brings else (text,)))
        if brings:
            clips.append(clip)
            last = clip
        if answer is not None:
            turns.append(Turn("assistant", (answer,)))
    if not clips:
        clips.append(None)  # no clip anywhere: `prepare_clip` asks for one
        return clips, question
    return clips, Conversation(tuple(turns))


def warm_up() -> None:
    """Resample a tiny 44.1 kHz clip once, so the first visitor's non-16 kHz clip does not pay librosa's lazy
    import of scipy.signal (about a second or more)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(441, np.float32), 44100, format="WAV")
    decode_audio_bytes(buffer.getvalue(), name="warm-up clip")


_BATCHERS: collections.OrderedDict[int, tuple[AudioQA, ContinuousBatcher]] = collections.OrderedDict()
_BATCHERS_LOCK = threading.Lock()


def batcher_for(qa: AudioQA) -> ContinuousBatcher:
    """The running batcher of a loaded model (started on first use); as many are kept as models (`_load_cached`),
    the oldest closed when a third model is asked for."""
    with _BATCHERS_LOCK:
        if id(qa) in _BATCHERS:
            _BATCHERS.move_to_end(id(qa))
            return _BATCHERS[id(qa)][1]
        while len(_BATCHERS) >= 2:
            _BATCHERS.popitem(last=False)[1][1].close()
        batcher = qa.batcher(max_batch=MAX_BATCH)
        batcher.start()
        _BATCHERS[id(qa)] = (qa, batcher)
        return batcher


def _status(nfe: int, masked: int, total: int) -> str:
    return f"Unmasking… NFE {nfe}, {masked} of {total} positions masked"


async def stream_answer(
    qa: AudioQA, wave: np.ndarray | list[np.ndarray], question: Question, config: DecodeConfig, *,
    delay: float = 0.0, seed: int = 0,
) -> AsyncIterator[Update]:
    """Yield the all-masked canvas, then the canvas after every decoding step, then the answer with NFE and time;
    `wave` is a conversation's list of clips when `question` is a `Conversation`.

    `delay` pauses between frames shown (not between decoding steps, which run on the batcher's thread), so the
    reported time stays the decoder's.
    """
    loop = asyncio.get_running_loop()
    frames: asyncio.Queue[tuple[int, list[int]] | None] = asyncio.Queue()
    ended: dict[str, float] = {}

    def put(nfe: int, ids: list[int]) -> None:
        loop.call_soon_threadsafe(frames.put_nowait, (nfe, ids))

    def finished(_: object) -> None:  # runs on the event loop, after every frame the decoder queued
        ended["at"] = time.perf_counter()
        frames.put_nowait(None)

    total = config.gen_length
    start = time.perf_counter()
    job = None
    if covers(config):
        per_step = 2 if config.cfg_scale > 0 else 1  # guidance adds the unconditional branch's pass
        nfes = itertools.count(per_step, per_step)
        job = DecodeJob((wave, question), config, seed=seed, on_step=lambda x: put(next(nfes), x.tolist()))
        future = asyncio.wrap_future(batcher_for(qa).submit(job))
    else:
        future = asyncio.ensure_future(asyncio.to_thread(qa.answer, [wave], [question], config, seed=seed,
                                                         on_step=lambda nfe, x: put(nfe, x[0].tolist())))
    future.add_done_callback(finished)
    try:
        yield Update(render_canvas([qa.chat.ids.mask] * total, qa.chat), _status(0, total, total))
        if delay:
            await asyncio.sleep(delay)
        while (frame := await frames.get()) is not None:
            nfe, ids = frame
            yield Update(render_canvas(ids, qa.chat), _status(nfe, sum(t == qa.chat.ids.mask for t in ids), total))
            if delay:
                await asyncio.sleep(delay)
        result = future.result()
    finally:
        if job is not None:
            job.abandoned = True  # a visitor who left frees the slot (a no-op once finished)
    if job is None:
        text, nfe = result.texts[0], result.nfe
    else:
        text, nfe = qa.chat.decode_answer(result.token_ids.tolist()), result.nfe
    seconds = ended["at"] - start
    status = (f"Done: NFE {nfe}, {seconds:.2f} s ({total / max(seconds, 1e-9):.0f} tokens/s, "
              f"{total} answer positions)")
    if not text:
        status += "; the answer is empty (the model put an end-of-answer token first)"
    yield Update(text, status, done=True)


def check_question(question: str | None) -> str:
    """The question stripped, or a DemoError when it is empty or over `MAX_QUESTION_CHARS`."""
    if not question or not question.strip():
        raise DemoError("Type a question about the clip (or pick an example question).")
    question = question.strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise DemoError(f"The question is {len(question)} characters long, over the limit of {MAX_QUESTION_CHARS}; "
                        "shorten it.")
    return question


async def answer_clip(
    audio: str | None,
    question: str,
    checkpoint: str | None,
    settings: DecodeSettings,
    *,
    max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
    delay: float = 0.0,
    compat: str | None = None,
    history: Sequence[ChatTurn] = (),
) -> AsyncIterator[Update]:
    """The demo's answer function: a path and a question (after the answered turns of `history`) in, frames of the
    unmasking out; errors as a message."""
    try:
        question = check_question(question)
        config = settings.to_config()
        qa = await asyncio.to_thread(load_model, checkpoint, compat)
        paths, asked = conversation_of(history, audio, question)
        waves, notices = [], []
        for path in paths:
            wave, said = await asyncio.to_thread(prepare_clip, path, qa.model.config.window_seconds, max_bytes)
            waves.append(wave)
            notices += said
        prefix = "".join(f"ℹ {n}\n\n" for n in notices)
        wave = waves if isinstance(asked, Conversation) else waves[0]
        async for update in stream_answer(qa, wave, asked, config, delay=delay):
            yield Update(update.text, prefix + update.status, update.done)
    except DemoError as exc:
        yield Update("", f"⚠ {exc}", done=True, failed=True)
    except Exception as exc:  # a bug, not the user's fault: the page gets one line, the server log the traceback
        logger.exception("answering failed")
        yield Update("", f"⚠ Internal error ({type(exc).__name__}: {exc}); the details are in the server log.", True,
                     True)
