"""Reference decoding: LLaDA's semi-autoregressive block decoding with low-confidence remasking.

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
- Gumbel noise in float64 is drawn per row, not for the whole (B, L, V) tensor at once (LLaDA PR #124).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from diffa2.chat import SpecialIds


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


@dataclass
class DecodeOutput:
    token_ids: torch.Tensor  # (B, gen_length) generated answer ids, no [MASK] left
    nfe: int  # number of model forward passes (a CFG step counts two)


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


def guided_logits(model: Denoiser, prefix, x: torch.Tensor, cfg_scale: float) -> tuple[torch.Tensor, int]:
    """Model logits for the answer region, with classifier-free guidance when cfg_scale > 0; and the NFE."""
    if cfg_scale <= 0:
        return model.answer_logits(prefix, x), 1
    cond = model.answer_logits(prefix, x)
    uncond = model.answer_logits(model.unconditional_prefix(prefix), x)
    return uncond + (cfg_scale + 1) * (cond - uncond), 2


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
    config = config or DecodeConfig()
    batch = prefix.embeds.shape[0]
    device = prefix.embeds.device
    x = torch.full((batch, config.gen_length), special.mask, dtype=torch.long, device=device)
    generators = row_generators(seed, batch, device)
    num_blocks = config.gen_length // config.block_length
    steps_per_block = config.steps // num_blocks
    nfe = 0
    for block in range(num_blocks):
        lo, hi = block * config.block_length, (block + 1) * config.block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == special.mask).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            logits, cost = guided_logits(model, prefix, x, config.cfg_scale)
            nfe += cost
            if config.logits_eos_inf:
                logits[..., special.eos] = float("-inf")
            for row in range(batch):
                _commit_row(x[row], logits[row], int(schedule[row, step]), lo, hi, special, config, generators[row])
            if on_step is not None:
                on_step(nfe, x)
    return DecodeOutput(x, nfe)


def _commit_row(
    x: torch.Tensor,
    logits: torch.Tensor,
    count: int,
    lo: int,
    hi: int,
    special: SpecialIds,
    config: DecodeConfig,
    generator: torch.Generator,
) -> None:
    """Commit the `count` most confident masked tokens of block [lo, hi) of one row, in place."""
    if count == 0:
        return
    x0 = gumbel_argmax(logits, config.temperature, generator)
    if config.remasking == "low_confidence":
        probs = torch.softmax(logits.float(), dim=-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1).to(torch.float64)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x.device, dtype=torch.float64)
    if config.confidence_eos_eot_inf:
        confidence = confidence.masked_fill((x0 == special.eos) | (x0 == special.eot), float("-inf"))
    masked = x == special.mask
    eligible = torch.zeros_like(masked)
    eligible[lo:hi] = masked[lo:hi]
    # Deprioritised EOS (-inf confidence) must still outrank positions that are not eligible at all.
    score = torch.where(eligible, confidence.nan_to_num(neginf=-1e300), torch.full_like(confidence, float("-inf")))
    ranked = torch.argsort(score, descending=True, stable=True)  # ties: leftmost first, as in a batch of one
    chosen = ranked[: min(count, int(eligible.sum()))]
    x[chosen] = x0[chosen]
