"""Variance of VRPO's preference-score estimate at equal budget: independent masks vs optimal allocation vs antithetic.

    python bench/vrpo_variance.py                                          # random tiny model, perturbed policy
    python bench/vrpo_variance.py --reference runs/sft/final --policy runs/vrpo/final   # after the default stages

The score of a pair is s = β[(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))], each B̂ an ELBO estimate with budget
n per answer (`diffa2.rl`: `ElboEstimator`, `paired_elbo`). Its variance bounds the bias and variance of the VRPO loss
and gradient (LLaDA 1.5, arXiv:2505.19223). At the same budget n it compares:

  (a) independent masks: one timestep per answer with n masks (n_t = 1, n_yt = n); policy and reference draw apart
  (b) + optimal allocation: n timesteps with one mask each (n_t = n, n_yt = 1); still drawn apart
  (c) + antithetic sampling: as (b), and the reference scores the policy's draws (VRPO, DIFFA-2's stage 4)
  (d) antithetic sampling alone, with (a)'s allocation, to separate the two effects

For every validation pair (the synthetic corpus's stage-4 pairs) it draws R independent estimates of s, takes their
variance, and averages over pairs; it prints each setting's variance and its ratio to (a), and, where n_t ≥ 2, the
in-batch estimate the trainer logs (`vrpo/score_variance`: var over timesteps / n_t) for comparison. Without a
`--policy`, the policy is the reference with Gaussian noise (`--perturb` x each tensor's std) on its trainable tensors,
standing in for a policy a few steps into training. About 4 minutes on one CPU thread at the defaults.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffa2.cli_flags import add_flag
from diffa2.data.collate import PairCollator
from diffa2.data.dataset import PreferenceDataset
from diffa2.data.recipe import DataSource, load_split
from diffa2.data.synth import ensure_synth_corpus
from diffa2.inference import AudioQA, checkpoint_or_random_tiny
from diffa2.modeling.model import DIFFA2Model
from diffa2.rl import MASKING_FORMS, ElboEstimator, ElboPair, VRPOConfig, masking_form, paired_elbo
from diffa2.stages.vrpo import answer_logprobs
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

SETTINGS = {  # name: (n_t, n_yt, antithetic) as functions of the budget n
    "(a) independent masks": lambda n: (1, n, False),
    "(b) optimal allocation": lambda n: (n, 1, False),
    "(c) optimal + antithetic": lambda n: (n, 1, True),
    "(d) antithetic only": lambda n: (1, n, True),
}


@torch.no_grad()
def perturbed(model: DIFFA2Model, scale: float, seed: int) -> DIFFA2Model:
    """A copy of `model` with N(0, (scale·std)²) noise added to each trainable tensor."""
    copy = DIFFA2Model(model.config)
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    for p in copy.parameters():
        if p.requires_grad and p.numel() > 1:
            p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    return copy


@torch.no_grad()
def score_variance(policy, reference, batch, mask_id: int, estimator: ElboEstimator, antithetic: bool, *,
                   replicates: int, beta: float, seed: int) -> tuple[float, float, float | None]:
    """Mean over pairs of the variance of ŝ across `replicates` independent estimates; mean ŝ; trainer's estimate."""
    pairs, width = batch.chosen_ids.shape

    def token_fn(model):  # one draw for every replicate: (R·2P, L) masks -> (R·2P, L) log-probs
        return lambda masked, _: answer_logprobs(model, batch, masked.view(replicates, 2 * pairs, width),
                                                 mask_id).flatten(0, 1)

    answer_mask = batch.answer_mask.repeat(2 * replicates, 1)  # replicate r holds rows r·2P .. r·2P + 2P − 1
    generator = torch.Generator().manual_seed(seed)
    pair = paired_elbo(token_fn(policy), token_fn(reference), answer_mask, estimator, antithetic=antithetic,
                       generator=generator)
    log_ratio = (pair.policy - pair.reference).view(replicates, 2, pairs)
    scores = beta * (log_ratio[:, 0] - log_ratio[:, 1])  # (R, P)
    logged = None
    if estimator.n_t >= 2:  # what VRPOTrainer logs from one estimate, averaged over the replicates

        def chosen_first(terms):  # (n, R·2P) replicate-major -> (n, 2·R·P): all chosen rows, then all rejected
            return terms.view(-1, replicates, 2, pairs).transpose(1, 2).flatten(1)

        elbos = ElboPair(chosen_first(pair.policy_terms), chosen_first(pair.reference_terms), estimator.n_t)
        logged = elbos.score_variance(beta).mean().item()
    return scores.var(0).mean().item(), scores.mean().item(), logged


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="reference checkpoint (default: a random tiny DIFFA-2)")
    parser.add_argument("--policy", help="policy checkpoint (default: the reference, perturbed)")
    parser.add_argument("--perturb", type=float, default=0.05, help="noise scale of the default policy")
    parser.add_argument("--budget", type=int, default=4, help="ELBO samples per answer, n = n_t x n_yt (DIFFA-2: 4)")
    parser.add_argument("--form", default="count", type=masking_form, choices=MASKING_FORMS,
                        help="ELBO form (DIFFA-2: count, exactly k of L; aliases l = count, t = ratio)")
    parser.add_argument("--beta", type=float, default=VRPOConfig.beta)
    parser.add_argument("--pairs", type=int, default=8, help="validation pairs")
    parser.add_argument("--replicates", type=int, default=32, help="independent estimates per pair and setting")
    add_flag(parser, "--answer_length", type=int, default=16)
    add_flag(parser, "--synth_dir", default="data/synth", help="synthetic corpus (built when missing)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.time()

    corpus = ensure_synth_corpus(args.synth_dir)
    reference, chat = checkpoint_or_random_tiny(args.reference, corpus.tokenizer_dir, args.seed)
    if args.policy:
        policy, _ = checkpoint_or_random_tiny(args.policy, corpus.tokenizer_dir, args.seed)
        origin = f"policy {args.policy}"
    else:
        policy = perturbed(reference, args.perturb, args.seed)
        origin = f"policy = reference + N(0, ({args.perturb} std)^2) on trainable tensors"
    policy.eval()
    reference.eval()
    source = DataSource(str(corpus.manifest("stage4_pref", "validation")), rejected_field="rejected")
    items, _ = load_split([source], synth_dir=None, seed=0)
    dataset = PreferenceDataset(items[: args.pairs], reference.config.window_seconds)
    collator = PairCollator(chat, AudioQA(reference, chat).featurizer, answer_length=args.answer_length)
    batch = collator([dataset[i] for i in range(len(dataset))])

    print(f"reference {args.reference or 'random tiny DIFFA-2 (seed ' + str(args.seed) + ')'}; {origin}")
    print(f"{len(dataset)} validation pairs, budget n = {args.budget} per answer, ELBO form {args.form!r}, "
          f"beta {args.beta}, {args.replicates} replicates per pair\n")
    print(f"{'setting':<26} {'n_t':>3} {'n_yt':>4} {'antithetic':>10} {'Var(s)':>11} {'ratio':>7} {'mean s':>8} "
          f"{'logged Var':>11}")
    baseline = None
    for name, allocation in SETTINGS.items():
        n_t, n_yt, antithetic = allocation(args.budget)
        estimator = ElboEstimator(n_t=n_t, n_yt=n_yt, form=args.form)
        variance, mean, logged = score_variance(policy, reference, batch, chat.ids.mask, estimator, antithetic,
                                                replicates=args.replicates, beta=args.beta, seed=args.seed)
        baseline = baseline or variance
        logged_text = f"{logged:11.4g}" if logged is not None else f"{'n/a':>11}"
        print(f"{name:<26} {n_t:>3} {n_yt:>4} {str(antithetic):>10} {variance:11.4g} {variance / baseline:7.3f} "
              f"{mean:8.3f} {logged_text}")
    print(f"\nratio = Var(s) / Var(s) of (a); {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
