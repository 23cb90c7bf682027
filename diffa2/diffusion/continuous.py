"""Continuous batching: answers at different decoding steps share one forward pass; a finished row leaves the batch
and a waiting request takes its place.

`generate` (`diffa2.diffusion.decoding`) decodes a fixed batch until its slowest row is done. Here every row carries
its own decoding state (canvas, current block, step in the block, the block's commit schedule, its noise generator,
its EOS early-exit flag), so rows that joined at different times, with different lengths and settings, are stepped
together: each shared forward runs every active row's [prompt ; canvas] (prompts left-padded, canvases right-padded
and masked out of attention, RoPE positions counted per row), and each row then commits tokens in its own block
exactly as `generate` would for that row alone (`decoding.commit_row`, `parallel.finish_at_eos`). A row's answer
therefore equals its one-by-one `generate` answer, for the same reason a `generate` batch does (padding is invisible,
positions are per row, noise is per row).

Covered decoding settings: every `DecodeConfig` without a KV cache, i.e. the presets "reference", "parallel" and
"fpd" and any lengths, temperature (per-row seeds), remasking rule, threshold / factor rules, EOS early exit and
classifier-free guidance (the unconditional branch is one more row in the shared forward). Left out: `cache="prefix"`
/ `"dual"` (presets "cache" and "fast"). A block-wise KV cache is filled by a full pass at the first step of each
block (and every `refresh_every` steps) and reused in between; rows at different steps would need full passes and
cached passes in the same forward, and caches of different lengths per row, which one batched forward cannot hold.
`submit` refuses them with a ValueError.

`ContinuousBatcher` is the scheduler: `submit` queues a job and returns a `concurrent.futures.Future`; `step` admits
waiting jobs into free slots (at most `max_batch` rows), encodes their prompts in one call, runs one shared forward
and retires finished rows; `run_until_idle` steps until nothing is left (tests, offline use); `start` runs the same
loop on a background thread that owns the model, waiting up to `max_wait_ms` after an idle period so that requests
arriving together start together. `trace` records which jobs every forward ran. `decode_all` drives a batcher over
a (lazy) stream of jobs on the calling thread, taking the next job only when a slot frees up (the eval runner and
the evaluator core, hence the demo's accuracy button and bench/decode.py).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from diffa2.chat import SpecialIds
from diffa2.diffusion.decoding import DecodeConfig, commit_row, num_transfer_tokens, row_generators
from diffa2.diffusion.parallel import finish_at_eos
from diffa2.modeling.model import Prefix

RowCallback = Callable[[torch.Tensor], None]  # sees a row's canvas `[G]` after each of its steps (do not keep it)
Encoder = Callable[[list[Any]], Prefix]  # prompt inputs of the jobs admitted together -> their (left-padded) prefix


@dataclass
class DecodeJob:
    """One answer to decode: what `encode` turns into its prompt, its settings, its noise seed, a step callback."""

    inputs: Any
    config: DecodeConfig
    seed: int = 0
    on_step: RowCallback | None = None
    abandoned: bool = False  # set by the caller (e.g. a client that disconnected): the row leaves at the next step


@dataclass
class JobResult:
    """A decoded answer: its canvas, its NFE (what decoding it alone takes) and its prompt length in positions."""

    job_id: int
    token_ids: torch.Tensor  # (gen_length,)
    nfe: int
    prompt_positions: int


@dataclass(frozen=True)
class ForwardRecord:
    """One shared forward of the trace: the jobs it ran, the jobs that joined just before and left just after."""

    rows: tuple[int, ...]
    joined: tuple[int, ...]
    left: tuple[int, ...]


def covers(config: DecodeConfig) -> bool:
    """Whether continuous batching covers these settings (everything but a KV cache; module docstring)."""
    return config.cache == "none"


def check_covered(config: DecodeConfig) -> None:
    """Raise ValueError for settings continuous batching does not cover (a KV cache; module docstring)."""
    if not covers(config):
        raise ValueError(f"continuous batching does not cover cache={config.cache!r} (a KV cache is refilled per "
                         "block, so rows at different steps cannot share a forward): use cache='none'")


def split_prefix(prefix: Prefix) -> list[Prefix]:
    """The rows of a left-padded prefix, each without its padding."""
    rows = []
    for i in range(prefix.embeds.shape[0]):
        real = int(prefix.attention_mask[i].sum())
        width = prefix.embeds.shape[1]
        rows.append(Prefix(prefix.embeds[i : i + 1, width - real :], prefix.attention_mask[i : i + 1, width - real :],
                           prefix.is_text[i : i + 1, width - real :]))
    return rows


class _Row:
    """The decoding state of one job: `generate`'s loop for a batch of one, advanced one step at a time."""

    def __init__(self, job_id: int, job: DecodeJob, prefix: Prefix, model, special: SpecialIds,
                 future: Future) -> None:
        config = job.config
        self.job_id, self.job, self.future, self.special, self.config = job_id, job, future, special, config
        self.branches = [prefix] + ([model.unconditional_prefix(prefix)] if config.cfg_scale > 0 else [])
        device = prefix.embeds.device
        self.x = torch.full((config.gen_length,), special.mask, dtype=torch.long, device=device)
        self.generator = row_generators(job.seed, 1, device)[0]
        self.num_blocks = config.gen_length // config.block_length
        self.steps_per_block = config.steps // self.num_blocks
        self.block = self.step = self.nfe = 0
        self.decided = False
        self._start_block()

    @property
    def bounds(self) -> tuple[int, int]:
        return self.block * self.config.block_length, (self.block + 1) * self.config.block_length

    @property
    def finished(self) -> bool:
        return self.decided or self.block == self.num_blocks

    def _start_block(self) -> None:
        lo, hi = self.bounds
        self.schedule = num_transfer_tokens((self.x[lo:hi] == self.special.mask).sum()[None], self.steps_per_block)[0]

    def _skip_done_blocks(self) -> None:
        """Move on while the current block is complete (all its steps run, or no [MASK] left), as `generate` does."""
        while not self.finished:
            lo, hi = self.bounds
            if self.step < self.steps_per_block and (self.x[lo:hi] == self.special.mask).any():
                return
            self.block, self.step = self.block + 1, 0
            if self.block < self.num_blocks:
                self._start_block()

    def advance(self, logits: list[torch.Tensor]) -> None:
        """One decoding step from this row's answer logits `[G, V]`, one per branch (conditional, unconditional)."""
        lo, hi = self.bounds
        block = [branch[lo:hi] for branch in logits]
        guided = block[0] if len(block) == 1 else block[1] + (self.config.cfg_scale + 1) * (block[0] - block[1])
        if self.config.logits_eos_inf:
            guided[..., self.special.eos] = float("-inf")
        commit_row(self.x[lo:hi], guided, int(self.schedule[self.step]), self.special, self.config, self.generator)
        self.nfe += len(self.branches)
        if self.config.eos_early_exit:
            self.decided = bool(finish_at_eos(self.x[None], self.special, with_eot=self.config.exit_on_eot)[0])
        if self.job.on_step is not None:
            self.job.on_step(self.x)
        self.step += 1
        self._skip_done_blocks()


class ContinuousBatcher:
    """Queue of decode jobs stepped together, at most `max_batch` at a time (module docstring)."""

    def __init__(self, model, special: SpecialIds, encode: Encoder, *, max_batch: int = 8,
                 max_wait_ms: float = 5.0, trace_size: int = 10_000) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.model, self.special, self.encode = model, special, encode
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.trace: collections.deque[ForwardRecord] = collections.deque(maxlen=trace_size)
        self._ids = itertools.count()
        self._waiting: collections.deque[tuple[int, DecodeJob, Future]] = collections.deque()
        self._rows: list[_Row] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def queued(self) -> int:
        """Jobs waiting for a slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Jobs being decoded."""
        return len(self._rows)

    def submit(self, job: DecodeJob) -> Future:
        """Queue `job`; the future gives its `JobResult` (job ids count submissions from 0)."""
        check_covered(job.config)
        future: Future = Future()
        with self._wake:
            self._waiting.append((next(self._ids), job, future))
            self._wake.notify()
        return future

    def _admit(self) -> list[int]:
        """Move waiting jobs into free slots, encoding their prompts in one call; a failed encode fails them."""
        with self._wake:
            taken = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(self._rows)))]
        taken = [(i, job, future) for i, job, future in taken if future.set_running_or_notify_cancel()]
        if not taken:
            return []
        try:
            with torch.no_grad():
                prefixes = split_prefix(self.encode([job.inputs for _, job, _ in taken]))
                rows = [_Row(i, job, p, self.model, self.special, f) for (i, job, f), p in zip(taken, prefixes,
                                                                                              strict=True)]
        except Exception as exc:  # noqa: BLE001 - the error belongs to these jobs; the batcher keeps serving
            for _, _, future in taken:
                future.set_exception(exc)
            return []
        self._rows += rows
        return [row.job_id for row in rows]

    @torch.no_grad()
    def _forward(self, rows: list[_Row]) -> list[list[torch.Tensor]]:
        """One forward over every branch of every row: prompts left-padded, canvases right-padded and masked."""
        branches = [(prefix, row.x) for row in rows for prefix in row.branches]
        width = max(p.embeds.shape[1] for p, _ in branches)
        gen = max(x.shape[0] for _, x in branches)
        first = branches[0][0]
        embeds = first.embeds.new_zeros(len(branches), width, first.embeds.shape[2])
        prompt_mask = torch.zeros(len(branches), width, dtype=torch.bool, device=first.embeds.device)
        is_text = torch.zeros_like(prompt_mask)
        ids = torch.full((len(branches), gen), self.special.mask, dtype=torch.long, device=first.embeds.device)
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, (prefix, x) in enumerate(branches):
            p = prefix.embeds.shape[1]
            embeds[i, width - p :], prompt_mask[i, width - p :] = prefix.embeds[0], prefix.attention_mask[0]
            is_text[i, width - p :] = prefix.is_text[0]
            ids[i, : x.shape[0]], answer_mask[i, : x.shape[0]] = x, True
        logits = self.model.answer_logits(Prefix(embeds, prompt_mask, is_text), ids, answer_mask)
        out, start = [], 0
        for row in rows:
            n = len(row.branches)
            out.append([logits[start + k, : row.x.shape[0]] for k in range(n)])
            start += n
        return out

    def step(self) -> bool:
        """Admit waiting jobs, run one shared forward, retire finished rows; False when there was nothing to do."""
        joined = self._admit()
        self._rows = [row for row in self._rows if not self._dropped(row)]
        if not self._rows:
            return bool(self._waiting)
        rows = list(self._rows)
        try:
            for row, logits in zip(rows, self._forward(rows), strict=True):
                row.advance(logits)
        except Exception as exc:  # noqa: BLE001 - fail the rows of this forward, keep the batcher alive
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(exc)
            self._rows = []
            self.trace.append(ForwardRecord(tuple(r.job_id for r in rows), tuple(joined),
                                            tuple(r.job_id for r in rows)))
            return True
        left = [row for row in rows if row.finished]
        for row in left:
            row.future.set_result(JobResult(row.job_id, row.x, row.nfe, row.branches[0].embeds.shape[1]))
        self._rows = [row for row in rows if not row.finished]
        self.trace.append(ForwardRecord(tuple(r.job_id for r in rows), tuple(joined), tuple(r.job_id for r in left)))
        return True

    @staticmethod
    def _dropped(row: _Row) -> bool:
        """A row whose caller abandoned it (e.g. a client that disconnected) leaves, its future failed."""
        if row.job.abandoned and not row.future.done():
            row.future.set_exception(RuntimeError(f"job {row.job_id} was abandoned by its caller"))
        return row.job.abandoned

    def run_until_idle(self) -> None:
        """Step on the calling thread until no job is waiting or active (do not mix with `start`)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the scheduler on a background thread (the only thread that touches the model from then on)."""
        if self._thread is not None:
            raise RuntimeError("the batcher is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="diffa2-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the background thread after its current step; jobs still queued or active are cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for _, _, future in self._waiting:
            future.cancel()
        for row in self._rows:
            if not row.future.done():
                row.future.set_exception(RuntimeError("the batcher was closed"))
        self._waiting.clear()
        self._rows = []

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not self._rows:
                    while not self._waiting and not self._stopping:
                        self._wake.wait()
                    deadline = time.monotonic() + self.max_wait_ms / 1000
                    while len(self._waiting) < self.max_batch and not self._stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._wake.wait(remaining)
                if self._stopping:
                    return
            self.step()



def decode_all(batcher: ContinuousBatcher, jobs: Iterable[tuple[Hashable, DecodeJob]]
               ) -> Iterator[list[tuple[Hashable, JobResult]]]:
    """Decode `(key, job)` pairs on the calling thread (a batcher not `start`ed), and yield after every shared
    forward the `(key, result)` pairs it finished, in submission order. The next job is read from `jobs` only when
    a slot is free (at most `max_batch` queued or active), so a lazy iterable (e.g. one loading audio) is read as
    the batch drains; a job that failed raises its error here."""
    pending = iter(jobs)
    outstanding: dict[Future, Hashable] = {}
    exhausted = False
    while True:
        while not exhausted and len(outstanding) < batcher.max_batch:
            pair = next(pending, None)
            if pair is None:
                exhausted = True
            else:
                outstanding[batcher.submit(pair[1])] = pair[0]
        if not outstanding:
            return
        batcher.step()
        finished = [future for future in outstanding if future.done()]
        if finished:
            yield [(outstanding.pop(future), future.result()) for future in finished]
