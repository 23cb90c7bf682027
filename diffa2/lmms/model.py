"""The `diffa2` model for lmms-eval: any checkpoint the toolkit loads, answering through `AudioQA`.

    lmms-eval --model diffa2 --model_args pretrained=CKPT,decode_mode=parallel,batch_size=8 --tasks mmau_test_mini

lmms-eval's interface (lmms_eval/api/model.py, class `lmms`, v0.7.3): `generate_until(requests) -> list[str]`,
`loglikelihood(requests) -> list[(logprob, is_greedy)]`; a request's `args` are `(context, generation kwargs or
continuation, doc_to_visual, doc_id, task, split)` and the model reads the doc from `self.task_dict[task][split]`
(as lmms_eval/models/simple/qwen2_audio.py does). docs/lmms-eval.md has the options and the semantics.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lmms_eval import evaluator as lmms_evaluator
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from tqdm import tqdm

from diffa2.audio import SAMPLE_RATE, _to_mono_resampled, decode_audio_bytes, load_audio, trim_to_window
from diffa2.diffusion.decoding import DEFAULT_MODE, DecodeConfig
from diffa2.eval.core import audio_limit, item_seed
from diffa2.inference import AudioQA
from diffa2.likelihood import DEFAULT_DRAWS

DECODING_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodeConfig))

# lmms-eval 0.7.3's evaluator patches filelock 3.x's `filelock._api` before it loads datasets (its
# `_enable_reentrant_filelocks`, after the model is built); filelock 4, which our pins resolve to, has no such module,
# so every run would crash there. The patch works around filelock 3.16+'s in-thread deadlock check; mark it as done.
if importlib.util.find_spec("filelock._api") is None:
    lmms_evaluator._enable_reentrant_filelocks._patched = True

# lmms-eval 0.7.3's evaluator passes every model output through `unwrap_generation_output` (api/instance.py), which
# turns anything but a string or a GenerationResult into its str(): a loglikelihood's (logprob, is_greedy) becomes
# "(-1.7, False)" and its multiple_choice scoring fails to unpack it, for every model. A GenerationResult's `text`
# passes unchanged, so the pairs travel in one while that is so.
WRAP_LOGLIKELIHOODS = isinstance(unwrap_generation_output((0.0, False))[0], str)


def to_wave(audio: Any, max_seconds: float, where: str) -> np.ndarray:
    """One clip from an lmms-eval doc as float32 mono 16 kHz, at most `max_seconds` long.

    Accepted: a file path; an HF audio dict (`array` + `sampling_rate`, or `bytes`, or `path`); a torchcodec
    decoder (what `datasets` >= 4 returns for an Audio column); a 1-D array taken as 16 kHz mono.
    """
    if isinstance(audio, str | Path):
        wave = load_audio(audio, where=where, max_seconds=max_seconds)
    elif isinstance(audio, dict) and audio.get("array") is not None:
        data = np.asarray(audio["array"], dtype=np.float32)
        wave = _to_mono_resampled(data[:, None] if data.ndim == 1 else data.T, int(audio["sampling_rate"]),
                                  SAMPLE_RATE)
    elif isinstance(audio, dict) and audio.get("bytes"):
        wave = decode_audio_bytes(audio["bytes"], name=str(audio.get("path") or "<audio bytes>"), where=where,
                                  max_seconds=max_seconds)
    elif isinstance(audio, dict) and audio.get("path"):
        wave = load_audio(audio["path"], where=where, max_seconds=max_seconds)
    elif hasattr(audio, "get_all_samples"):
        samples = audio.get_all_samples()
        wave = _to_mono_resampled(samples.data.numpy().T.astype(np.float32), int(samples.sample_rate), SAMPLE_RATE)
    elif isinstance(audio, np.ndarray) and audio.ndim == 1:
        wave = audio.astype(np.float32)
    else:
        raise TypeError(f"{where}: cannot read an audio clip from {type(audio).__name__}; expected a file path, an "
                        "HF audio dict (array + sampling_rate, bytes or path), a torchcodec decoder or a 1-D array")
    return trim_to_window(wave, max_seconds)[0]


class DIFFA2(lmms):
    """A DIFFA-2 checkpoint as an lmms-eval model (single process; one audio clip per request).

    `pretrained`: a checkpoint folder (`diffa2.inference.AudioQA.from_checkpoint`). Decoding: the `decode_mode`
    preset (`DecodeConfig.preset`) with any `DecodeConfig` field given as a model argument over it (`gen_length`,
    `block_length`, `steps`, `threshold`, ...); the task's `max_new_tokens`/`temperature` are not used, its
    `until` strings cut the answer. `seed`: each request's decoding seed derives from it and the doc's `id`
    (else its index), as `python -m diffa2.eval run` derives an item's. `n_draws`: the ELBO's Monte-Carlo budget
    for `loglikelihood`. `batch_size` in `model_args` wins over the harness's `--batch_size`.
    """

    is_simple = True

    def __init__(
        self, pretrained: str, decode_mode: str = DEFAULT_MODE, batch_size: int | str = 8, device: str | None = None,
        seed: int = 0, n_draws: int = DEFAULT_DRAWS, compat: str | None = None, long_audio: str | None = None,
        max_batch_size: int | None = None, **decoding: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(decoding) - DECODING_FIELDS)
        if unknown:
            raise ValueError(f"diffa2 model_args: unknown option(s) {unknown}; allowed: pretrained, decode_mode, "
                             f"batch_size, device, seed, n_draws, compat, long_audio and the decoding fields "
                             f"{sorted(DECODING_FIELDS)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"diffa2 model_args: batch_size must be an integer >= 1, got {batch_size!r}")
        self.decoding = DecodeConfig.preset(decode_mode, **decoding)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_draws = int(n_draws)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.qa = AudioQA.from_checkpoint(pretrained, device=device, compat=compat, long_audio=long_audio)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DIFFA2:
        """As lmms-eval's, but an option given in `model_args` wins over the harness's (its `--batch_size`
        default of 1 would otherwise clash with `batch_size=8` in `model_args`)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def _clip(self, request: Instance, max_seconds: float) -> tuple[np.ndarray, int]:
        """The request's one audio clip and its decoding seed; a clear error for text-only or multi-clip docs."""
        doc_to_visual, doc_id, task, split = request.args[2:6]
        doc = self.task_dict[task][split][doc_id]
        where = f"lmms-eval task {task!r}, split {split!r}, doc {doc_id}"
        clips = doc_to_visual(doc) if doc_to_visual is not None else None
        if not clips or len(clips) != 1:
            raise ValueError(f"{where}: the diffa2 model answers questions about exactly one audio clip, got "
                             f"{len(clips or [])} (text-only and multi-clip requests are not supported)")
        return to_wave(clips[0], max_seconds, where), item_seed(self.seed, str(doc.get("id", doc_id)))

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Answer each request by decoding with `AudioQA.answer`, `batch_size` requests per batch."""
        limit = audio_limit(self.qa)
        texts: list[str] = []
        with tqdm(total=len(requests), desc="diffa2 generate", disable=self.rank != 0) as bar:
            for lo in range(0, len(requests), self.batch_size):
                chunk = requests[lo : lo + self.batch_size]
                clips = [self._clip(r, limit) for r in chunk]
                answers = self.qa.answer([w for w, _ in clips], [r.args[0] for r in chunk], self.decoding,
                                         seed=[s for _, s in clips])
                texts += [cut_at(text, r.args[1].get("until")) for text, r in zip(answers.texts, chunk, strict=True)]
                bar.update(len(chunk))
        return texts

    def loglikelihood(self, requests: Sequence[Instance]) -> list[Any]:
        """Each continuation's negative ELBO (nats, the whole continuation) given the context and audio, from
        `AudioQA.score` (LLaDA's masked-token ELBO, `n_draws` stratified draws, form "count"; a doc's continuations
        share its draws). A loss, as lmms-eval's own models return (models/simple/llava.py: `loss.item()`) and its
        multiple_choice scoring expects (api/task.py: `pred = np.argmin(lls)`). `is_greedy` is always False (not
        computed). Pairs `(-elbo, False)`, each in a GenerationResult under WRAP_LOGLIKELIHOODS."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.args[4], request.args[5], request.args[3], request.args[0]), []).append(i)
        keys = list(groups)
        window = float(self.qa.model.config.window_seconds)  # `score` encodes one window per clip
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for lo in range(0, len(keys), self.batch_size):
            batch = keys[lo : lo + self.batch_size]
            clips = [self._clip(requests[groups[k][0]], window) for k in batch]
            candidates = [[self._continuation(requests[i]) for i in groups[k]] for k in batch]
            scores = self.qa.score([w for w, _ in clips], [k[3] for k in batch], candidates, n_draws=self.n_draws,
                                   seed=[s for _, s in clips])
            for key, elbos in zip(batch, scores.elbos, strict=True):
                for i, elbo in zip(groups[key], elbos, strict=True):
                    results[i] = (-float(elbo), False)
        return [GenerationResult(pair) for pair in results] if WRAP_LOGLIKELIHOODS else results

    def _continuation(self, request: Instance) -> str:
        """The continuation's text, lmms-eval's target delimiter (leading space) stripped."""
        continuation = request.args[1]
        if callable(continuation):  # output_type loglikelihood passes doc_to_target itself
            doc_id, task, split = request.args[3:6]
            continuation = continuation(self.task_dict[task][split][doc_id])
        return str(continuation).strip()

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        """Not supported: DIFFA-2 answers one question per clip."""
        raise NotImplementedError("the diffa2 model does not support generate_until_multi_round (multi-round tasks)")


def cut_at(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to the first of the stop strings `until` (lmms-eval's generation kwarg)."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop, 1)[0]
    return text
