"""diffa2.rl registries: names, duplicate and unknown-name errors, typed configs with the reference defaults."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffa2.rl as rl
from diffa2.rl.registry import FunctionRegistry, Registry

EXPECTED_NAMES = {
    "policy loss": {"vanilla", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo", "gppo", "ce_gppo", "dgpo", "maspo"},
    "loss aggregation mode": {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"},
    "KL estimator": {"k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+"},
    "preference loss": {"dpo", "ipo", "simpo", "vrpo"},
    "advantage estimator": {"grpo", "dr_grpo", "rloo", "dual_track", "hian", "gtpo", "opd", "scope", "dynamo"},
    "likelihood estimator": {"elbo", "d1_one_step", "spg"},
}
REGISTRIES = [
    rl.POLICY_LOSSES,
    rl.AGGREGATIONS,
    rl.KL_ESTIMATORS,
    rl.PREFERENCE_LOSSES,
    rl.ADVANTAGE_ESTIMATORS,
    rl.LIKELIHOOD_ESTIMATORS,
]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_registered_names(registry):
    # Every name here has golden tests in tests/test_rl_*.py; a new registration must add both.
    assert set(registry.names()) == EXPECTED_NAMES[registry.kind]


def test_same_value_again_is_a_no_op_and_a_different_one_raises():
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)
    assert registry.get("a") == 1


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'; valid names: ce_gppo, cispo, dapo"):
        rl.get_policy_loss("ppo")
    with pytest.raises(ValueError, match="valid names: d1_one_step, elbo, spg"):
        rl.get_likelihood_estimator("eubo")


def test_function_registry_decorator_and_duplicates():
    registry = FunctionRegistry("toy")

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        scale: float = 2.0

    @registry.register("double", ToyConfig)
    def double(x, *, config):
        return config.scale * x

    assert double(3, config=ToyConfig()) == 6  # the decorator returns the function unchanged
    registry.register("double", ToyConfig)(double)  # same function again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.register("double", ToyConfig)(lambda x, *, config: x)
    entry = registry.get("double")
    assert entry(3) == 6  # the config's defaults are filled in
    assert entry(3, config=entry.default_config(scale=5.0)) == 15
    with pytest.raises(TypeError, match="needs a ToyConfig"):
        entry(3, config=rl.DPOConfig())


def test_global_registry_rejects_rebinding_and_stays_intact():
    with pytest.raises(ValueError, match="already registered"):
        rl.register_policy_loss("vanilla", rl.PPOClipConfig)(lambda *a, **k: None)
    assert rl.get_policy_loss("vanilla").fn.__name__ == "ppo_clip_loss"


def test_wrong_config_type_is_rejected():
    x = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="needs a DGPOConfig"):
        rl.get_policy_loss("dgpo")(x, x, x, mask, config=rl.PPOClipConfig())
    with pytest.raises(TypeError, match="needs a GRPOLossConfig"):  # presets have their own config class
        rl.get_policy_loss("grpo")(x, x, x, mask, config=rl.PPOClipConfig())


REFERENCE_DEFAULTS = [
    # verl actor.yaml / ActorConfig
    (rl.PPOClipConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean")),
    (rl.GRPOLossConfig(), dict(clip_ratio_high=0.2, clip_ratio_c=None, loss_agg_mode="seq-mean-token-mean")),
    (rl.DrGRPOLossConfig(), dict(clip_ratio_c=None, loss_agg_mode="seq-mean-token-sum-norm")),
    (rl.DAPOLossConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-mean")),
    (rl.GSPOConfig(), dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean")),
    (rl.CISPOConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.2, upper_is_absolute=False)),
    (rl.SAPOConfig(), dict(tau_pos=1.0, tau_neg=1.05, loss_agg_mode="seq-mean-token-mean")),
    (rl.GPPOConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.28, beta1=1.0, beta2=1.0)),
    (rl.CEGPPOConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.2, beta1=0.25, beta2=1.0)),
    (rl.DGPOConfig(), dict(clip_ratio_low=0.2, clip_ratio_high=0.2, n=1.0, m=2.0)),
    (
        rl.MASPOConfig(),
        dict(sigma_base=1.0, alpha=0.3, sigma_high=10.0, a_low=0.1, a_high=10.0, beta_pos=0.03, beta_neg=0.03),
    ),
    (rl.DPOConfig(), dict(beta=0.1, label_smoothing=0.0)),
    (rl.IPOConfig(), dict(beta=0.1)),
    (rl.SimPOConfig(), dict(beta=0.1, gamma=0.5)),
    (rl.VRPOConfig(), dict(beta=0.2)),
    (rl.GRPOAdvantageConfig(), dict(eps=1e-6, scale="group", unbiased_std=True)),
    (rl.DrGRPOAdvantageConfig(), dict(scale="none")),
    (rl.DualTrackConfig(), dict(weights=(0.5, 1.0), eps=1e-6, clip=10.0, unbiased_std=False)),
    (rl.OPDConfig(), dict(kl_penalty_coef=1.0, kl_discount_factor=0.0)),
    (rl.DynaMOConfig(), dict(clip_ratio_high=0.28, lambda_min=0.6, mu_max=1.2, slope=50.0, knee=0.99)),
    (rl.ElboEstimator(), dict(n_t=8, n_yt=1, form="ratio")),
    (rl.D1Estimator(), dict(p_mask_prompt=0.15)),
    (rl.SPGEstimator(), dict(bound="mix", beta=1.5, omega=0.5, n_t=2, min_t=0.0, max_t=1.0)),
]


@pytest.mark.parametrize("config, expected", REFERENCE_DEFAULTS, ids=lambda c: type(c).__name__)
def test_config_defaults_match_the_reference(config, expected):
    assert {key: getattr(config, key) for key in expected} == expected


def test_config_validation():
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        rl.PPOClipConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="n >= -1 and m >= 1"):
        rl.DGPOConfig(m=0.5)


RECONSTRUCTED = {"hian": "arXiv:2603.01481", "gtpo": "arXiv:2602.01675", "scope": "arXiv:2604.10688"}


def says_reconstructed(entry) -> bool:
    docs = [entry.fn.__doc__ or "", getattr(entry.config_cls, "__doc__", None) or ""] if isinstance(
        entry, rl.RegisteredFn) else [getattr(entry, "__doc__", None) or ""]
    return any("reconstructed from the abstract" in doc.lower() for doc in docs)


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_every_objective_reconstructed_from_an_abstract_carries_the_note(registry):
    for name in registry.names():
        source = RECONSTRUCTED.get(name) if registry is rl.ADVANTAGE_ESTIMATORS else None
        assert says_reconstructed(registry.get(name)) == (source is not None), name
        assert registry.note(name) == (rl.reconstructed(source) if source else ""), name


def test_notes_are_listed_by_describe_and_guarded_like_values():
    assert rl.ADVANTAGE_ESTIMATORS.describe(["grpo", "hian"]) == (
        "grpo, hian [reconstructed from the abstract of arXiv:2603.01481: not the paper's equation, defaults guessed]")
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1, note="from a README")
    registry.add("a", 1, note="from a README")  # the same again: fine
    with pytest.raises(ValueError, match="already registered with the note 'from a README'"):
        registry.add("a", 1)
    with pytest.raises(ValueError, match="unknown thing 'b'"):
        registry.note("b")


def test_rl_stage_help_shows_the_notes(capsys):
    from diffa2.stages import rl as rl_stage

    with pytest.raises(SystemExit) as exit_:
        rl_stage.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for name, source in RECONSTRUCTED.items():
        assert f"{name} [{rl.reconstructed(source)}]" in text
    assert "policy loss: ce_gppo, cispo, dapo, dgpo, dr_grpo, gppo, grpo, gspo, maspo, sapo, vanilla" in text
