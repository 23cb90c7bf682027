"""Likelihood estimators for masked diffusion LMs, built from seedable noise draws and per-token log-probs.

A diffusion LM has no tractable `log π(y | x)`. Each estimator here works in two phases so that a trainer can
share the noise between the policy and the reference (antithetic sampling) or between old and new policies:

1. `estimator.sample(answer_mask, generator=g) -> ElboDraws`: which answer tokens are masked in each of the `n`
   draws (`masks (n, B, L)`), with per-draw weights (`weights (n, B)`).
2. The caller runs its model on each masked input and gathers `token_logp (n, B, L)`, the log-probability of the
   true token at every answer position (`token_logprobs(fn, draws)` loops a callable over the draws,
   `batched_token_logprobs(fn, draws)` passes them all to one call; the model forward never lives in this package).
3. `estimator.estimate(token_logp, draws) -> (B,)`.

Registered estimators (`get_likelihood_estimator(name)` returns the class; its fields are the config, its defaults
the references'): `elbo` (here), `d1_one_step` (`d1.py`), `spg` (`spg.py`).

The masked-token ELBO of LLaDA (Nie et al., arXiv:2502.09992), in its t-weighted form and in the lower-variance
"exactly l of L tokens" form LLaDA uses for likelihood evaluation, estimated by Monte Carlo as in LLaDA 1.5
(VRPO, Zhu et al., arXiv:2505.19223):

    B̂(y) = (1/n_t) Σ_j (1/n_yt) Σ_k  w_j · Σ_i 1[y_i masked in draw (j, k)] · log p(y_i | y_masked, x)
    form "ratio": t_j ~ U[0, 1), p_j = (1 − eps)·t_j + eps, each answer token masked w.p. p_j,  w_j = 1/p_j
    form "count": l_j ~ U{1..L}, exactly l_j of the L answer tokens masked (uniformly),         w_j = L/l_j

The two forms carry the names of `diffa2.diffusion.masking`'s training loss (`MaskingForm`, defined here so that
this package imports nothing else from diffa2); the letters "t" and "l" of the papers are accepted for them.

Budget n = n_t · n_yt; optimal allocation is n_yt = 1 (one mask per timestep); antithetic sampling shares the
draws between policy and reference on the same response (`paired_elbo`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .registry import Registry

MaskingForm = Literal["ratio", "count"]
MASKING_FORMS: tuple[MaskingForm, ...] = ("ratio", "count")
FORM_ALIASES: dict[str, MaskingForm] = {"t": "ratio", "l": "count"}  # the papers' letters: ratio t, count l
# fn(masked (B, L) bool, prompt_masked (B, P) bool | None) -> log-probs of the true answer tokens (B, L), one draw
TokenLogprobFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# fn(masked (n, B, L) bool, prompt_masked (n, B, P) bool | None) -> log-probs (n, B, L), every draw in one call
BatchedTokenLogprobFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class ElboDraws:
    """One set of noise draws for a batch of responses; draw `j·n_yt + k` is mask k of timestep j."""

    masks: torch.Tensor  # (n, B, L) bool, True where the answer token is masked (always inside answer_mask)
    weights: torch.Tensor  # (n, B) float, the draw's weight w (1/p, L/l, ...)
    answer_mask: torch.Tensor  # (B, L) bool, the answer (completion) tokens
    n_t: int  # timesteps per response
    n_yt: int  # masks per timestep
    prompt_masks: torch.Tensor | None = None  # (n, B, P) bool, masked prompt tokens (d1, SPG), else None

    @property
    def n(self) -> int:
        return self.n_t * self.n_yt


class LikelihoodEstimator(Protocol):
    """Sample noise draws for a batch of answers, then turn per-token log-probs under them into `(B,)` values."""

    def sample(
        self,
        answer_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> ElboDraws: ...

    def estimate(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor: ...


LIKELIHOOD_ESTIMATORS: Registry[type] = Registry("likelihood estimator")


def register_likelihood_estimator(name: str) -> Callable[[type], type]:
    """Class decorator registering a `LikelihoodEstimator` dataclass under `name`."""

    def decorate(cls: type) -> type:
        LIKELIHOOD_ESTIMATORS.add(name, cls)
        return cls

    return decorate


get_likelihood_estimator = LIKELIHOOD_ESTIMATORS.get


def masking_form(form: str) -> MaskingForm:
    """`form` as a `MaskingForm`: 'ratio' or 'count', or their aliases 't' and 'l'; else a ValueError."""
    canonical = FORM_ALIASES.get(form, form)
    if canonical not in MASKING_FORMS:
        raise ValueError(f"unknown masking form {form!r}; valid forms: ratio, count (aliases: t = ratio, l = count)")
    return canonical


def exactly_k_masks(answer_mask: torch.Tensor, counts: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Masks `(n, B, L)` with exactly `counts (n, B)` answer tokens each, chosen uniformly without replacement."""
    scores = torch.rand(counts.shape + answer_mask.shape[-1:], generator=generator, device=answer_mask.device)
    scores = torch.where(answer_mask.bool(), scores, torch.full_like(scores, 2.0))  # non-answer positions rank last
    ranks = scores.argsort(-1).argsort(-1)
    return ranks < counts[..., None]


def sample_elbo_draws(
    answer_mask: torch.Tensor,
    *,
    n_t: int,
    n_yt: int = 1,
    form: MaskingForm = "ratio",
    eps: float = 1e-3,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> ElboDraws:
    """Draw `n_t` timesteps per response and `n_yt` masks per timestep for the ELBO of `answer_mask (B, L)`.

    `stratified` spreads each response's n_t timesteps (form "ratio") or mask counts (form "count") evenly from one
    random offset, as LLaDA's `forward_process` does for its likelihood evaluation; every draw stays marginally uniform,
    so the estimator stays unbiased. `generator` must live on `answer_mask`'s device.
    """
    if n_t < 1 or n_yt < 1:
        raise ValueError(f"n_t and n_yt must be >= 1, got {n_t}, {n_yt}")
    form = masking_form(form)
    answer_mask = answer_mask.bool()
    batch, device = answer_mask.shape[0], answer_mask.device
    steps = torch.arange(n_t, device=device)[:, None]  # (n_t, 1)
    if stratified:
        u = (torch.rand(1, batch, generator=generator, device=device) + steps / n_t) % 1.0  # (n_t, B)
    else:
        u = torch.rand(n_t, batch, generator=generator, device=device)
    if form == "ratio":
        p_mask = ((1.0 - eps) * u + eps).repeat_interleave(n_yt, dim=0)  # (n, B)
        draws = torch.rand(p_mask.shape + answer_mask.shape[-1:], generator=generator, device=device)
        masks = (draws < p_mask[..., None]) & answer_mask
        weights = 1.0 / p_mask
    else:  # count
        length = answer_mask.sum(-1)  # (B,)
        if stratified:  # one uniform count k0, then shifts of floor(j·L/n_t), wrapped into 1..L
            first = (u[:1] * length).long()  # (1, B), k0 − 1
            counts = (first + steps * length // n_t) % length.clamp_min(1) + 1
        else:
            counts = (u * length).long() + 1  # (n_t, B), uniform on 1..L
        counts = torch.minimum(counts, length).repeat_interleave(n_yt, dim=0)  # 0 for an empty answer
        masks = exactly_k_masks(answer_mask, counts, generator)
        weights = torch.where(counts > 0, length / counts.clamp_min(1), torch.zeros_like(counts, dtype=torch.float))
    return ElboDraws(masks, weights.float(), answer_mask, n_t, n_yt)


def elbo_terms(token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
    """Per-draw ELBO terms `(n, B)`: `w · Σ_i 1[masked] · log p(y_i | ·)`; their mean over draws is the estimate."""
    masked = torch.where(draws.masks, token_logp, torch.zeros_like(token_logp)).sum(-1)
    return draws.weights.to(token_logp.dtype) * masked


def elbo_from_token_logprobs(token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
    """The Monte-Carlo estimate `(B,)` from `token_logp (n, B, L)` under `draws`."""
    return elbo_terms(token_logp, draws).mean(0)


def token_logprobs(fn: TokenLogprobFn, draws: ElboDraws) -> torch.Tensor:
    """Call `fn` once per draw and stack the answers' log-probs into `(n, B, L)`."""
    prompt_masks = draws.prompt_masks
    return torch.stack([fn(draws.masks[j], None if prompt_masks is None else prompt_masks[j]) for j in range(draws.n)])


@register_likelihood_estimator("elbo")
@dataclass(frozen=True)
class ElboEstimator:
    """LLaDA's masked-token ELBO with budget n = n_t · n_yt.

    Defaults: VRPO's optimal allocation (n_yt = 1) with budget 8 as given in `docs/objectives.md` §6.1 (unconfirmed
    there; this project's issue 5 gives 4 for the stage), form "ratio", and this repository's mask floor eps = 1e-3.
    """

    n_t: int = 8
    n_yt: int = 1
    form: MaskingForm = "ratio"  # or "count"; "t" / "l" are stored as these
    eps: float = 1e-3  # p = (1 − eps) t + eps keeps the 1/p weight finite (form "ratio" only)
    stratified: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "form", masking_form(self.form))

    @property
    def budget(self) -> int:
        return self.n_t * self.n_yt

    def sample(
        self,
        answer_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> ElboDraws:
        """Draws for `answer_mask (B, L)`; the prompt is never masked (`prompt_mask` is accepted and unused)."""
        return sample_elbo_draws(
            answer_mask,
            n_t=self.n_t,
            n_yt=self.n_yt,
            form=self.form,
            eps=self.eps,
            stratified=self.stratified,
            generator=generator,
        )

    def estimate(self, token_logp: torch.Tensor, draws: ElboDraws) -> torch.Tensor:
        return elbo_from_token_logprobs(token_logp, draws)


@dataclass(frozen=True)
class ElboPair:
    """Per-draw ELBO terms of the same responses under the policy and the reference (`paired_elbo`).

    For preference pairs the rows are the P chosen responses, then the P rejected ones (`scores`, `score_variance`).
    """

    policy_terms: torch.Tensor  # (n, B) per-draw terms; their mean over draws is the estimate
    reference_terms: torch.Tensor  # (n, B)
    n_t: int = 1  # timesteps; draws j·n_yt .. (j+1)·n_yt − 1 share timestep j

    @property
    def policy(self) -> torch.Tensor:
        """B̂_θ `(B,)`."""
        return self.policy_terms.mean(0)

    @property
    def reference(self) -> torch.Tensor:
        """B̂_ref `(B,)`."""
        return self.reference_terms.mean(0)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """B̂_θ(y_w), B̂_θ(y_l), B̂_ref(y_w), B̂_ref(y_l), each `(P,)`: a preference loss's inputs."""
        policy_chosen, policy_rejected = self.policy.chunk(2)
        reference_chosen, reference_rejected = self.reference.chunk(2)
        return policy_chosen, policy_rejected, reference_chosen, reference_rejected

    def score_variance(self, beta: float) -> torch.Tensor | None:
        """Per pair `(P,)`, the variance of the estimated preference score ŝ = β[(B̂_θ − B̂_ref)(y_w) − (same)(y_l)].

        The n_t per-timestep terms s_j are i.i.d. and ŝ is their mean, so Var(ŝ) ≈ var_j(s_j) / n_t (unbiased
        sample variance). None when n_t = 1.
        """
        if self.n_t < 2:
            return None
        diff = (self.policy_terms - self.reference_terms).unflatten(0, (self.n_t, -1)).mean(1)  # (n_t, 2P)
        chosen, rejected = diff.chunk(2, dim=1)
        return (beta * (chosen - rejected)).var(0) / self.n_t


def batched_token_logprobs(fn: BatchedTokenLogprobFn, draws: ElboDraws) -> torch.Tensor:
    """Call `fn` once on all the draws: `(n, B, L)` log-probs from one forward."""
    return fn(draws.masks, draws.prompt_masks)


def paired_elbo(
    policy_fn: TokenLogprobFn | BatchedTokenLogprobFn,
    reference_fn: TokenLogprobFn | BatchedTokenLogprobFn,
    answer_mask: torch.Tensor,
    estimator: ElboEstimator,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> ElboPair:
    """ELBOs of `answer_mask (B, L)` under policy and reference, sharing the draws when `antithetic` (VRPO).

    Without `antithetic`, the reference gets its own draws, sampled from `generator` after the policy's. Rows are
    independent, so chosen and rejected responses stacked in one batch get their own draws either way. Call the
    reference under `torch.no_grad()` inside `reference_fn`. The reference runs first, so its activations are
    gone before the policy's graph is built.

    `batched`: the callables score every draw in one call, `fn(masks (n, B, L), prompt_masks (n, B, P) | None) ->
    (n, B, L)` (`BatchedTokenLogprobFn`; e.g. a model that computes each prompt's prefix once for all its masked
    answers); else they are called once per draw (`TokenLogprobFn`).
    """
    draws = estimator.sample(answer_mask, generator=generator)
    reference_draws = draws if antithetic else estimator.sample(answer_mask, generator=generator)
    score = batched_token_logprobs if batched else token_logprobs
    reference_terms = elbo_terms(score(reference_fn, reference_draws), reference_draws)
    policy_terms = elbo_terms(score(policy_fn, draws), draws)
    return ElboPair(policy_terms, reference_terms, draws.n_t)
