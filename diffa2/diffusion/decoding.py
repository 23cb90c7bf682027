"""Block decoding: LLaDA's reference decoder (semi-autoregressive, low-confidence remasking) and its fast modes.

Follows `ML-GSAI/LLaDA:generate.py` (LLaDA paper Alg. 5 and App. B.4): `gen_length` [MASK]s are appended to
the prompt and split into blocks decoded left to right; each block gets `steps / num_blocks` steps and a
linear schedule of how many tokens to commit per step; each step runs the model on the whole sequence,
takes x0 = argmax (with optional Gumbel noise at temperature > 0, computed in float64 as LLaDA does), scores
confidence (softmax probability of x0, or uniform for `random`), and commits the most confident masked
tokens of the current block. Committed tokens are never remasked.

Differences from LLaDA's code, all deliberate:
- every row is decoded independently of its batch-mates (per-row noise generators, per-row top-k, padding
  masked out of attention), so a batch gives exactly the answers of one-by-one decoding;
- special ids come from the tokenizer, never literals;
- `confidence_eos_eot_inf` acts on the confidence at every temperature (LLaDA's only worked at 0);
- Gumbel noise in float64 is drawn per row and only for the current block, not for the whole (B, L, V) tensor
  at once (LLaDA PR #124): positions outside the block are never committed, so their draws could not matter.

Fast modes (Fast-dLLM, arXiv 2505.22618; NVlabs/Fast-dLLM and DIFFA-2's `--accelerate fast_dllm`), selected by the
same config:
- `threshold` / `factor`: commit several tokens per step (`diffa2.diffusion.parallel`), never fewer than the
  reference schedule's count for that step, so `steps` stays an upper bound (one per step when steps =
  gen_length, Fast-dLLM's "at least one"); a block ends as soon as it has no [MASK] left;
- `eos_early_exit`: a row stops once its answer text is decided (`parallel.finish_at_eos`);
- `cache`: block-wise prefix / dual KV cache (`diffa2.diffusion.kv_cache`).
The defaults are the reference decoder; `DecodeConfig.preset(name)` gives the named combinations.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from diffa2.chat import SpecialIds
from diffa2.diffusion.kv_cache import BlockCache, BlockLogits, FullPass
from diffa2.diffusion.parallel import finish_at_eos, parallel_count


class Denoiser(Protocol):
    """What decoding needs from a model (DIFFA2Model provides it)."""

    def answer_logits(self, prefix, answer_ids: torch.Tensor) -> torch.Tensor: ...

    def unconditional_prefix(self, prefix): ...


@dataclass
class DecodeConfig:
    """Decoding settings (LLaDA's names and meaning)."""

    gen_length: int = 32  # answer tokens to generate (the answer region's length)
    block_length: int = 32  # semi-autoregressive block size; = gen_length is pure diffusion
    steps: int = 32  # total denoising steps over all blocks
    temperature: float = 0.0  # Gumbel-max noise; 0 = greedy
    cfg_scale: float = 0.0  # classifier-free guidance w: logits = u + (w + 1)(c - u)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    logits_eos_inf: bool = False  # never predict EOS (LLaDA App. B.4)
    confidence_eos_eot_inf: bool = False  # commit EOS / end-of-turn predictions last (LLaDA App. B.4)
    # Fast modes (module docstring); the defaults are the reference decoder.
    threshold: float | None = None  # commit every masked block token with confidence >= threshold (Fast-dLLM: 0.9)
    factor: float | None = None  # Fast-dLLM's factor rule, DIFFA-2's "FPD" (DIFFA-2: 1.0)
    factor_quirk: bool = False  # the factor rule's edge case as coded (`parallel.py`): DIFFA-2's published decoding
    cache: Literal["none", "prefix", "dual"] = "none"  # block-wise approximate KV cache
    refresh_every: int | None = None  # with a cache: also refill it every N steps of a block (None: once per block)
    eos_early_exit: bool = False  # stop a row once its answer text is decided
    exit_on_eot: bool = True  # early exit on end-of-turn too (DIFFA-2's published decoding watches EOS alone)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecodeConfig:
        """A named speed mode (`PRESETS`) with any field overridden, e.g. `preset("fast", gen_length=64)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown decoding preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_mode(self, name: str) -> DecodeConfig:
        """These lengths and sampling settings with the speed settings of preset `name` (others reset)."""
        speed = {k: v for k, v in dataclasses.asdict(DecodeConfig.preset(name)).items() if k in SPEED_FIELDS}
        return dataclasses.replace(self, **speed)

    def __post_init__(self) -> None:
        if min(self.gen_length, self.block_length, self.steps) <= 0:
            raise ValueError("gen_length, block_length and steps must be positive")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise ValueError(f"steps {self.steps} must be a multiple of the number of blocks ({blocks})")
        if self.steps > self.gen_length:
            raise ValueError(f"steps {self.steps} > gen_length {self.gen_length}: some steps would commit nothing")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be 'low_confidence' or 'random', got {self.remasking!r}")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise ValueError("temperature and cfg_scale must be >= 0")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are alternative parallel rules: set at most one")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.factor_quirk and self.factor is None:
            raise ValueError("factor_quirk is an edge case of the factor rule: it needs a factor")
        if (self.threshold is not None or self.factor is not None) and self.remasking != "low_confidence":
            raise ValueError("threshold and factor rank tokens by model confidence: they need "
                             "remasking='low_confidence' (random remasking has no confidence)")
        if self.cache not in ("none", "prefix", "dual"):
            raise ValueError(f"cache must be 'none', 'prefix' or 'dual', got {self.cache!r}")
        if self.refresh_every is not None and (self.cache == "none" or self.refresh_every < 1):
            raise ValueError(f"refresh_every={self.refresh_every} needs cache='prefix' or 'dual' and must be >= 1")


# Fields that change speed (and, being approximations, possibly answers) but not what is being decoded.
SPEED_FIELDS = ("threshold", "factor", "factor_quirk", "cache", "refresh_every", "eos_early_exit", "exit_on_eot")

# Named modes: `DecodeConfig.preset(name)`. "parallel"/"fast" use Fast-dLLM's evaluated threshold 0.9;
# "fpd" is DIFFA-2's `--accelerate fast_dllm` (factor 1.0 + EOS early exit, no cache; DIFFA-2/src/fast_dllm/
# diffa_generate.py) without the factor rule's edge case; the eval specs' "paper" profile adds it (factor_quirk).
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "parallel": {"threshold": 0.9, "eos_early_exit": True},
    "cache": {"cache": "dual"},
    "fast": {"threshold": 0.9, "eos_early_exit": True, "cache": "dual"},
    "fpd": {"factor": 1.0, "eos_early_exit": True},
}
# The mode `python -m diffa2.eval run` and AudioQA use unless told otherwise: the fastest whose accuracy matched
# the reference at every length in bench/decode.py ("fast" lost 6 points at 128 tokens; figures in docs/decoding.md §7).
DEFAULT_MODE = "parallel"


@dataclass
class DecodeOutput:
    token_ids: torch.Tensor  # (B, gen_length) generated answer ids, no [MASK] left
    nfe: int  # number of model forward passes over the batch (a CFG step counts two)
    row_nfe: torch.Tensor  # (B,) passes each row took part in while still decoding = its NFE when decoded alone
    seconds: float  # wall-clock time of the call

    @property
    def tokens_per_second(self) -> float:
        """Canvas positions decided per second (B * gen_length / seconds)."""
        return self.token_ids.numel() / max(self.seconds, 1e-9)


StepCallback = Callable[[int, torch.Tensor], None]


def num_transfer_tokens(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each row commits at each step: an even split, the remainder to the first steps."""
    base = masked_counts // steps
    remainder = masked_counts % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += (torch.arange(steps, device=masked_counts.device)[None, :] < remainder[:, None]).long()
    return schedule


def row_generators(seed: int | Sequence[int], batch: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, so a row's noise depends only on its own seed, never on the batch."""
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """argmax of exp(logits) / (-log U)^temperature in float64 for one row `[L, V]` (greedy at 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits64 = logits.to(torch.float64)
    uniform = torch.rand(logits64.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits64.exp() / (-torch.log(uniform)) ** temperature).argmax(dim=-1)


def step_branches(model: Denoiser, prefix, config: DecodeConfig) -> list[BlockLogits]:
    """The forward passes of one step: the conditional branch, plus the unconditional one under CFG."""
    prefixes = [prefix] + ([model.unconditional_prefix(prefix)] if config.cfg_scale > 0 else [])
    if config.cache == "none":
        return [FullPass(model, p) for p in prefixes]
    return [BlockCache(model, p, dual=config.cache == "dual", refresh_every=config.refresh_every) for p in prefixes]


def guided_block_logits(
    branches: list[BlockLogits], x: torch.Tensor, lo: int, hi: int, step: int, cfg_scale: float
) -> torch.Tensor:
    """Logits `[B, hi-lo, V]` of the current block, with classifier-free guidance when there are two branches."""
    logits = [branch.block_logits(x, lo, hi, step) for branch in branches]
    if len(logits) == 1:
        return logits[0]
    cond, uncond = logits
    return uncond + (cfg_scale + 1) * (cond - uncond)


@torch.no_grad()
def generate(
    model: Denoiser,
    prefix,
    special: SpecialIds,
    config: DecodeConfig | None = None,
    *,
    seed: int | Sequence[int] = 0,
    on_step: StepCallback | None = None,
) -> DecodeOutput:
    """Decode `config.gen_length` answer tokens for every row of `prefix`; `on_step(nfe, x)` sees each canvas."""
    start = time.perf_counter()
    config = config or DecodeConfig()
    batch = prefix.embeds.shape[0]
    device = prefix.embeds.device
    x = torch.full((batch, config.gen_length), special.mask, dtype=torch.long, device=device)
    generators = row_generators(seed, batch, device)
    branches = step_branches(model, prefix, config)
    num_blocks = config.gen_length // config.block_length
    steps_per_block = config.steps // num_blocks
    decided = torch.zeros(batch, dtype=torch.bool, device=device)
    row_nfe = torch.zeros(batch, dtype=torch.long)
    nfe = 0
    for block in range(num_blocks):
        lo, hi = block * config.block_length, (block + 1) * config.block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == special.mask).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            active = (~decided & (x[:, lo:hi] == special.mask).any(dim=1)).tolist()
            if not any(active):
                break  # every row's block is complete (parallel rules finish blocks early)
            logits = guided_block_logits(branches, x, lo, hi, step, config.cfg_scale)
            nfe += len(branches)
            row_nfe += torch.tensor(active, dtype=torch.long) * len(branches)
            if config.logits_eos_inf:
                logits[..., special.eos] = float("-inf")
            for row in (r for r in range(batch) if active[r]):
                commit_row(x[row, lo:hi], logits[row], int(schedule[row, step]), special, config, generators[row])
            if config.eos_early_exit:
                decided |= finish_at_eos(x, special, with_eot=config.exit_on_eot)
            if on_step is not None:
                on_step(nfe, x)
    return DecodeOutput(x, nfe, row_nfe, time.perf_counter() - start)


def commit_row(
    x: torch.Tensor,
    logits: torch.Tensor,
    count: int,
    special: SpecialIds,
    config: DecodeConfig,
    generator: torch.Generator,
) -> None:
    """Commit masked tokens of one row's block `x` `[L]` in place, most confident first: `count` of them (the
    reference schedule), or more when a parallel rule (threshold / factor) accepts more."""
    masked = x == special.mask
    if count == 0 or not masked.any():
        return
    x0 = gumbel_argmax(logits, config.temperature, generator)
    if config.remasking == "low_confidence":
        probs = torch.softmax(logits.float(), dim=-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1).to(torch.float64)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x.device, dtype=torch.float64)
    if config.confidence_eos_eot_inf:
        confidence = confidence.masked_fill((x0 == special.eos) | (x0 == special.eot), float("-inf"))
    # Deprioritised EOS (-inf confidence) must still outrank positions that are not masked at all.
    score = torch.where(masked, confidence.nan_to_num(neginf=-1e300), torch.full_like(confidence, float("-inf")))
    ranked = torch.argsort(score, descending=True, stable=True)[: int(masked.sum())]  # ties: leftmost first
    if config.threshold is not None or config.factor is not None:
        count = max(count, parallel_count(confidence[ranked], config.threshold, config.factor,
                                          quirk=config.factor_quirk))
    chosen = ranked[:count]
    x[chosen] = x0[chosen]
